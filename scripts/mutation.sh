#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (configured in pyproject.toml, [tool.mutmut]); not in CI.
# Prints mutmut's summary and writes the survivors to mutants/survivors.txt. Needs `pip install mutmut==3.8.1`.
#   bash scripts/mutation.sh            # the whole configured set (tens of minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip show mutmut >/dev/null 2>&1 || { echo "pip install mutmut==3.8.1 first" >&2; exit 2; }
rm -rf mutants
HYPOTHESIS_PROFILE=mutation OMP_NUM_THREADS=1 mutmut run &  # a non-zero exit means surviving mutants: the summary below says which
run=$!
# mutmut does not stop a worker stuck in an infinite loop (a mutated `while`) under its fork server: the
# watchdog kills workers older than 60 s (counted as detected: the tests never pass against them).
while kill -0 "$run" 2>/dev/null; do
  for server in $(pgrep -P "$run" -f "mutmut run"); do
    for pid in $(pgrep -P "$server"); do
      if [ "$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')" -gt 60 ] 2>/dev/null; then
        kill -9 "$pid" && echo "watchdog: killed a worker stuck for 60 s" >&2
      fi
    done
  done
  sleep 3
done
wait "$run" || true
mutmut results > mutants/survivors.txt || true
python - <<'PY'
import collections, json, pathlib
from mutmut.stats import status_by_exit_code
counts = collections.Counter()
for meta in pathlib.Path("mutants").rglob("*.meta"):
    for code in json.loads(meta.read_text()).get("exit_code_by_key", {}).values():
        counts[status_by_exit_code[code]] += 1
total = sum(counts.values())
detected = counts["killed"] + counts["timeout"] + counts["segfault"]
print(dict(counts), f"detected (killed, timed out, crashed) {detected}/{total} = {detected / max(total, 1):.1%}")
PY
