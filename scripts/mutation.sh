#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (configured in pyproject.toml, [tool.mutmut]); not in CI.
# Needs `pip install mutmut==3.8.1`. Writes mutants/survivors.txt (each surviving mutant with its diff) and
# prints the kill rate per module and overall.
#   bash scripts/mutation.sh                   # every mutant (~4,800; several hours on 2 cores)
#   bash scripts/mutation.sh --sample 30       # a seeded random sample of 30 mutants per module (all of a smaller
#                                              # module): the overall rate is then estimated per module, weighted by
#                                              # each module's mutant count, with a 95 % interval
#   bash scripts/mutation.sh --rerun-survivors # after adding tests: only the last run's survivors again, same report
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip show mutmut >/dev/null 2>&1 || { echo "pip install mutmut==3.8.1 first" >&2; exit 2; }
sample=0
seed=0
rerun=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sample) sample="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --rerun-survivors) rerun=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export HYPOTHESIS_PROFILE=mutation OMP_NUM_THREADS=1

names=()
if [ "$rerun" -eq 1 ]; then
  [ -f mutants/survivors.txt ] || { echo "no mutants/survivors.txt: run a full or sampled run first" >&2; exit 2; }
  mapfile -t names < <(sed -n 's/^=== //p' mutants/survivors.txt)
  [ "${#names[@]}" -gt 0 ] || { echo "no survivors to run again" >&2; exit 0; }
else
  rm -rf mutants
fi
if [ "$sample" -gt 0 ] && [ "$rerun" -eq 0 ]; then
  # Generate the mutants and the test map only (a name that matches nothing stops mutmut there), then sample.
  mutmut run "no.such.mutant" >/dev/null 2>&1 || true
  mapfile -t names < <(python - "$sample" "$seed" <<'PY'
import json, pathlib, random, sys
n, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
for meta in sorted(pathlib.Path("mutants").rglob("*.meta")):
    keys = sorted(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    for key in (keys if len(keys) <= n else rng.sample(keys, n)):
        print(key)
PY
)
  printf '%s\n' "${names[@]}" > mutants/sampled.txt
  echo "mutation: ${#names[@]} mutants sampled (seed $seed)" >&2
fi

mutmut run "${names[@]}" &  # a non-zero exit means surviving mutants: the summary below says which
run=$!
# mutmut does not stop a worker stuck in an infinite loop (a mutated `while`) under its fork server: the
# watchdog kills workers older than 120 s (reported apart, not as detected: see the report below); a hanging
# test fails before that, at the 30 s per test of [tool.mutmut], so what the watchdog still kills is stuck below
# Python or very slow.
while kill -0 "$run" 2>/dev/null; do
  for server in $(pgrep -P "$run" -f "mutmut run"); do
    for pid in $(pgrep -P "$server"); do
      if [ "$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')" -gt 120 ] 2>/dev/null; then
        kill -9 "$pid" && echo "watchdog: killed a worker stuck for 120 s" >&2
      fi
    done
  done
  sleep 3
done
wait "$run" || true
python - <<'PY'
import collections, json, math, pathlib, subprocess
from mutmut.stats import status_by_exit_code

sampled = pathlib.Path("mutants/sampled.txt")
wanted = set(sampled.read_text().split()) if sampled.exists() else None
per_module, survivors = {}, []
for meta in sorted(pathlib.Path("mutants").rglob("*.meta")):
    codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
    if not codes:
        continue
    module = str(meta.relative_to("mutants")).removesuffix(".meta")
    counts = collections.Counter()
    for key, code in codes.items():
        if wanted is not None and key not in wanted:
            continue
        # -9 is the watchdog's kill: a hang, or only a slow run on a loaded machine. Not counted as detected:
        # verify such a mutant by running its tests alone (`mutmut tests-for-mutant`, MUTANT_UNDER_TEST=...).
        status = "watchdog" if code == -9 else status_by_exit_code[code]
        counts[status] += 1
        if status in ("survived", "no tests", "watchdog"):
            survivors.append(key)
    per_module[module] = (len(codes), counts)
total_all, estimate, variance = 0, 0.0, 0.0
for module, (size, counts) in per_module.items():
    n = sum(counts.values())
    detected = counts["killed"] + counts["timeout"] + counts["segfault"]
    rate = detected / max(n, 1)
    total_all += size
    estimate += size * rate
    if n < size:  # a sample: finite-population variance of the rate
        variance += size**2 * rate * (1 - rate) / max(n - 1, 1) * (1 - n / size)
    print(f"{module:40} {detected:4}/{n:<4} detected = {rate:6.1%}   (module: {size} mutants)  {dict(counts)}")
rate = estimate / total_all
half = 1.96 * math.sqrt(variance) / total_all
print(f"overall: {rate:.1%}" + (f" (estimated from the sample, 95 % interval ±{half:.1%})" if wanted else "")
      + f" over {total_all} mutants")
with open("mutants/survivors.txt", "w") as out:
    for key in survivors:
        diff = subprocess.run(["mutmut", "show", key], capture_output=True, text=True).stdout
        out.write(f"=== {key}\n" + "\n".join(l for l in diff.splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")) + "\n")
print(f"{len(survivors)} survivors with their diffs: mutants/survivors.txt")
PY
