"""`python -m loadtest`: parse the flags, run the load test, print the table, optionally write the JSON report.

Exit status: 0 when the run completed and at least one request succeeded, 1 when every request failed,
2 for bad arguments (printed as `loadtest: error: ...`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest.report import build_report, render_text, to_json
from loadtest.runner import LoadConfig, Prompt, load_prompts, pair_targets, run_load

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_ENV = "DELTASERVE_API_KEY"


def parser() -> argparse.ArgumentParser:
    """The command's flags."""
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test deltaserve (or any OpenAI-compatible server) with many tenants and models at once.",
        epilog="Keys and models pair in order (as many of each), or one key serves every model, or every key "
               f"uses the one model. Without --key, ${KEY_ENV} is used. Keys never appear in a report.")
    p.add_argument("--url", default=os.environ.get("DELTASERVE_URL", DEFAULT_URL),
                   help="server root (a trailing /v1 is accepted); only this server is ever contacted "
                        "(default: $DELTASERVE_URL or %(default)s)")
    p.add_argument("--key", action="append", default=[], help="an API key (repeat for several tenants)")
    p.add_argument("--model", action="append", default=[], required=True,
                   help="a model name: the base id or an adapter name (repeat)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; default: a fixed one)")
    src.add_argument("--prompts", type=Path, help="JSONL file: strings, or objects with `prompt` or `messages` "
                                                  "and optionally `max_tokens`")
    p.add_argument("--requests", "-n", type=int, default=100, help="number of requests (default %(default)s)")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight at most (default %(default)s)")
    p.add_argument("--duration", type=float, help="start no request after this many seconds")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default %(default)s)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (deltaserve/vLLM extension) so every "
                                                             "request generates max_tokens tokens")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream (SSE) answers; TTFT and inter-token latencies need it (default: on)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    p.add_argument("--assign", choices=["round-robin", "random"], default="round-robin",
                   help="how targets and prompts are given to requests (default %(default)s)")
    p.add_argument("--seed", type=int, help="seed of --assign random")
    p.add_argument("--retry", type=int, default=0, help="retries of a 429/503 answer, after its Retry-After "
                                                        "(default %(default)s: counted as failures)")
    p.add_argument("--retry-max-wait", type=float, default=10.0, help="cap on one Retry-After wait, s")
    p.add_argument("--timeout", type=float, default=120.0, help="give a request up after this many s, retries "
                                                                "included (default %(default)s)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals at this many requests/s (default: each of "
                   "--concurrency workers sends as soon as its last request ended)")
    p.add_argument("--ramp", type=_rates, metavar="START:END", help="arrival rate going linearly from START to END "
                   "requests/s over the run (Poisson gaps)")
    p.add_argument("--zipf", type=float, metavar="S", help="target popularity: the k-th (key, model) target is drawn "
                   "with weight k^-S (seeded by --seed), as hot and cold tenants")
    p.add_argument("--goodput", action="append", type=_slo, default=[], metavar="METRIC:MS",
                   help="an SLO for goodput: ttft, tpot or e2e with a limit in ms (repeat; e.g. ttft:500 tpot:50)")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots here (latency CDFs, throughput and "
                   "TTFT over time, TTFT vs rate; needs matplotlib)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the JSON report here")
    p.add_argument("--no-request-log", action="store_true", help="leave the per-request records out of the JSON")
    return p


def _rates(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END rates, got {text!r}") from None
    return a, b


def _slo(text: str) -> tuple[str, float]:
    metric, _, ms = text.partition(":")
    try:
        return metric, float(ms) / 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METRIC:MS, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """A LoadConfig from parsed flags; ValueError for inconsistent ones."""
    keys = args.key or ([os.environ[KEY_ENV]] if os.environ.get(KEY_ENV) else [])
    if not keys:
        raise ValueError(f"no API key: pass --key or set {KEY_ENV}")
    if args.prompts is not None:
        prompts, source = load_prompts(args.prompts), str(args.prompts)
    else:
        texts = args.prompt or ["Write a short story about a lighthouse keeper."]
        prompts, source = [Prompt(text=t) for t in texts], "inline"
    config = LoadConfig(
        url=args.url, targets=pair_targets(keys, args.model), prompts=prompts, requests=args.requests,
        concurrency=args.concurrency, max_tokens=args.max_tokens, temperature=args.temperature, stream=args.stream,
        chat=args.chat, duration=args.duration, seed=args.seed, assign=args.assign, retry=args.retry,
        retry_max_wait=args.retry_max_wait, timeout=args.timeout, ignore_eos=args.ignore_eos, prompts_source=source,
        request_rate=args.request_rate, ramp=args.ramp, zipf=args.zipf, goodput=dict(args.goodput))
    config.validate()
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit status."""
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        p.error(str(e))
    run = run_load(config)
    report = build_report(run, include_requests=not args.no_request_log)
    print(render_text(report))
    if args.json_out is not None:
        args.json_out.write_text(to_json(report) + "\n", encoding="utf-8")
        print(f"\nJSON report: {args.json_out}")
    if args.plots is not None:
        from loadtest.plots import write_plots

        print("plots: " + ", ".join(str(p) for p in write_plots(run, args.plots)))
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
