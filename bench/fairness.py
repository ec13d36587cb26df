"""A flooding tenant beside a light one: the light tenant's time to first token, and the throughput, with the
fair scheduler and with first come, first served, on the same load, in the same run (A B A B, medians).

The engine of bench/decode.py's CPU model (or the GPU's Llama-2-7B shape with --device cuda) runs a flood of
`--flood` requests of one tenant (`--flood-tokens` each, twice the batch or more) while a light tenant sends a
`--light-tokens` request every few steps. Reported: the light requests' TTFT p50 / p95 in seconds and in steps,
the median step time under the flood, and the tokens/s of the whole run. The issue's bar: TTFT p95 <= 3 x the
median step time, and the fair throughput within 10 % of first come, first served.

Usage:  python bench/fairness.py [--device cpu|cuda] [--rounds 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.decode import (  # noqa: E402
    CPU_SHAPE,
    LLAMA2_7B,
    device_name,
    engine_for,
    git_commit,
    hf_llama_config,
    random_hf_model,
    write_result,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--flood", type=int, default=48, help="requests of the flooding tenant, all at once")
    p.add_argument("--flood-tokens", type=int, default=64)
    p.add_argument("--light", type=int, default=12, help="requests of the light tenant, one every --every steps")
    p.add_argument("--light-tokens", type=int, default=4)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run_once(engine, args, fair: bool) -> dict:
    from serving.engine.sampling_params import SamplingParams

    engine.config = type(engine.config)(**{**engine.config.model_dump(), "fair_scheduling": fair})
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    tag = f"{'fair' if fair else 'fcfs'}-{engine.num_steps}"
    prompt = list(range(100, 100 + args.prompt_len))
    flood = SamplingParams(max_tokens=args.flood_tokens, temperature=0.0, ignore_eos=True)
    light = SamplingParams(max_tokens=args.light_tokens, temperature=0.0, ignore_eos=True)
    for i in range(args.flood):
        engine.add_request(f"{tag}-flood-{i}", prompt, flood, None, tenant="flood")
    sent: dict[str, tuple[float, int]] = {}
    first: dict[str, tuple[float, int]] = {}
    step_times: list[float] = []
    tokens, steps, n_light = 0, 0, 0
    preempted0 = engine.scheduler.num_preemptions
    t_start = time.perf_counter()
    while engine.has_unfinished() or n_light < args.light:
        if steps % args.every == 0 and n_light < args.light:
            rid = f"{tag}-light-{n_light}"
            engine.add_request(rid, prompt, light, None, tenant="light")
            sent[rid] = (time.perf_counter(), steps)
            n_light += 1
        t0 = time.perf_counter()
        outputs = engine.step()
        sync()
        now = time.perf_counter()
        step_times.append(now - t0)
        steps += 1
        tokens += len(outputs)
        for o in outputs:
            if o.request_id in sent and o.request_id not in first:
                first[o.request_id] = (now, steps)
    total = time.perf_counter() - t_start
    ttft = sorted(first[r][0] - sent[r][0] for r in sent)
    ttft_steps = sorted(first[r][1] - sent[r][1] for r in sent)
    p95 = ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]
    return {"fair": fair, "tok_s": tokens / total, "steps": steps, "median_step_s": statistics.median(step_times),
            "preemptions": engine.scheduler.num_preemptions - preempted0, "seconds": total,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": p95, "ttft_steps_max": max(ttft_steps),
            "ttft_steps_p50": statistics.median(ttft_steps)}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = LLAMA2_7B if device.type == "cuda" else CPU_SHAPE
    max_len = args.prompt_len + args.flood_tokens + 8
    config = hf_llama_config(shape, max_len)
    engine = engine_for(random_hf_model(config, dtype, device, seed=0), config, device, dtype, 1, 1, max_len)
    engine.config = type(engine.config)(**{**engine.config.model_dump(), "max_num_seqs": args.max_num_seqs})
    engine.scheduler.config = engine.config
    runs = []
    for r in range(args.rounds):  # A B A B
        for fair in (True, False):
            res = run_once(engine, args, fair)
            engine.scheduler.config = engine.config
            print(f"round {r} {'fair' if fair else 'fcfs'}: {res['tok_s']:.1f} tok/s ({res['steps']} steps, "
                  f"{res['preemptions']} preemptions), median step {res['median_step_s'] * 1e3:.1f} ms, "
                  f"light TTFT p50 {res['ttft_p50_s'] * 1e3:.0f} ms p95 {res['ttft_p95_s'] * 1e3:.0f} ms "
                  f"(steps: p50 {res['ttft_steps_p50']}, max {res['ttft_steps_max']})", flush=True)  # fmt: skip
            runs.append(res)

    def med(fair: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["fair"] == fair)

    summary = {
        "light_ttft_p95_over_median_step": med(True, "ttft_p95_s") / med(True, "median_step_s"),
        "fcfs_light_ttft_p95_over_median_step": med(False, "ttft_p95_s") / med(False, "median_step_s"),
        "fair_over_fcfs_throughput": med(True, "tok_s") / med(False, "tok_s"),
    }
    res = {"device": device_name(device), "date": dt.date.today().isoformat(), "git_commit": git_commit(),
           "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}  # fmt: skip
    print(f"\nlight TTFT p95 / median step: fair {summary['light_ttft_p95_over_median_step']:.2f} (target <= 3), "
          f"first come first served {summary['fcfs_light_ttft_p95_over_median_step']:.1f}; "
          f"throughput fair / FCFS {summary['fair_over_fcfs_throughput']:.3f} (target >= 0.9)")  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"fairness-{device.type}-{res['date']}.json"
    write_result(res, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
