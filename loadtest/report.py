"""Aggregate a load-test run into statistics, and render them as a plain-text table or a JSON report.

Latencies are in seconds in the JSON report and in milliseconds in the text table. Throughput counts the
successful requests only, over the run's wall time (first send to last answer). Neither rendering holds any
API key: the run's parameters come from `LoadConfig.public_params()`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.runner import RequestResult, RunResult

PERCENTILES = (50, 90, 95, 99)  # the dashboard shows p50/p95/p99; vllm bench serve prints p90 too
METRICS = ("ttft", "itl", "tpot", "e2e")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated between closest ranks (numpy's
    default method). Raises ValueError on an empty sequence or q outside [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, min, p50, p90, p95, p99, max of `values` (None for all but count when there are none)."""
    xs = [float(v) for v in values]
    out: dict[str, float | int | None] = {"count": len(xs)}
    if not xs:
        out.update({"mean": None, "min": None, **{f"p{q}": None for q in PERCENTILES}, "max": None})
        return out
    out.update({"mean": sum(xs) / len(xs), "min": min(xs), **{f"p{q}": percentile(xs, q) for q in PERCENTILES},
                "max": max(xs)})
    return out


def _metric_values(results: Sequence[RequestResult], metric: str) -> list[float]:
    ok = [r for r in results if r.ok]
    if metric == "itl":
        return [x for r in ok for x in r.itl]
    values = (getattr(r, metric) for r in ok)
    return [v for v in values if v is not None]


def meets(r: RequestResult, slo: dict[str, float]) -> bool:
    """A successful request within every limit of `slo` (seconds; a one-token answer has no time per token)."""
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2e": r.e2e}
    return r.ok and all(values[m] is not None and values[m] <= limit for m, limit in slo.items())


def aggregate(results: Sequence[RequestResult], wall_time: float, slo: dict[str, float] | None = None) -> dict[str, Any]:
    """Counts, throughput and latency statistics of `results` (successful requests for the latencies); with an
    `slo` ({"ttft"|"tpot"|"e2e": seconds}) the goodput too: the requests that met all of it, per second."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    by_status = Counter("none" if r.status is None else str(r.status) for r in results)
    by_error = Counter(r.error_key for r in results if not r.ok)
    out: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "by_status": dict(sorted(by_status.items())),
        "by_error": dict(sorted(by_error.items())),
        "retries": sum(r.retries for r in results),
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "wall_time": wall_time,
        "output_tokens_per_s": out_tokens / wall_time if wall_time > 0 else None,
        "requests_per_s": len(ok) / wall_time if wall_time > 0 else None,
        "latency": {m: summarize(_metric_values(results, m)) for m in METRICS},
        "goodput": None,
    }
    if slo:
        good = sum(meets(r, slo) for r in results)
        out["goodput"] = {"slo": dict(slo), "requests": good, "requests_per_s": good / wall_time if wall_time > 0 else None,
                          "share": good / len(results) if results else None}  # fmt: skip
    return out


def build_report(run: RunResult, include_requests: bool = True) -> dict[str, Any]:
    """The JSON-ready report of a run: parameters (no keys), start time, URL, totals, per-model breakdown and,
    when `include_requests`, every request's record."""
    models: dict[str, list[RequestResult]] = {}
    for t in run.config.targets:
        models.setdefault(t.model, [])
    for r in run.results:
        models.setdefault(r.model, []).append(r)
    report: dict[str, Any] = {
        "tool": "deltaserve-loadtest",
        "url": run.config.public_params()["url"],
        "started_at": run.started_at,
        "params": run.config.public_params(),
        "summary": aggregate(run.results, run.wall_time, run.config.goodput),
        "per_model": {m: aggregate(rs, run.wall_time, run.config.goodput) for m, rs in models.items()},
    }
    if include_requests:
        report["requests"] = [r.to_dict() for r in run.results]
    return report


def to_json(report: dict[str, Any]) -> str:
    """The report as indented JSON text."""
    return json.dumps(report, indent=2, sort_keys=False)


def _ms(v: float | int | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v: float | int | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in c.items()) or "-"


def render_text(report: dict[str, Any]) -> str:
    """A plain-text rendering of `build_report`'s output: totals, a latency table (ms), a per-model table."""
    p, s = report["params"], report["summary"]
    mode = ("chat" if p["chat"] else "completions") + (", streaming" if p["stream"] else ", not streaming")
    lines = [
        f"deltaserve load test: {report['url']}  started {report['started_at']}  wall {s['wall_time']:.2f} s",
        f"  targets {p['num_targets']} (keys {p['num_keys']}, models {len(set(p['models']))}), concurrency "
        f"{p['concurrency']}, max_tokens {p['max_tokens']}, {mode}"
        + (f", {p['request_rate']:g} req/s (Poisson)" if p.get("request_rate") else "")
        + (f", ramp {p['ramp'][0]:g} -> {p['ramp'][1]:g} req/s" if p.get("ramp") else "")
        + (f", Zipf {p['zipf']:g} over targets" if p.get("zipf") else ""),
        f"requests: {s['requests']} sent, {s['ok']} ok, {s['failed']} failed, {s['retries']} retries",
        f"  by status: {_counts(s['by_status'])}",
        f"  by error:  {_counts(s['by_error'])}",
        *([f"goodput: {s['goodput']['requests']} requests within "
           + ", ".join(f"{m} {v * 1000:g} ms" for m, v in s["goodput"]["slo"].items())
           + f" ({_num(s['goodput']['requests_per_s'])} req/s, {s['goodput']['share']:.0%} of those sent)"]
          if s.get("goodput") else []),
        f"throughput: {_num(s['output_tokens_per_s'], '.1f')} output tok/s, {_num(s['requests_per_s'])} req/s "
        f"({s['output_tokens']} output tokens, {s['prompt_tokens']} prompt tokens)",
        "",
    ]
    stats = ("count", "mean", "p50", "p90", "p99", "max")
    rows = [[m, *(str(s["latency"][m]["count"]) if k == "count" else _ms(s["latency"][m][k]) for k in stats)]
            for m in METRICS]
    lines += _table(["latency (ms)", *stats], rows)
    lines.append("")
    rows = []
    for model, a in report["per_model"].items():
        lat = a["latency"]
        rows.append([model, str(a["requests"]), str(a["ok"]), str(a["failed"]), str(a["output_tokens"]),
                     _num(a["output_tokens_per_s"], ".1f"), _ms(lat["ttft"]["p50"]), _ms(lat["e2e"]["p50"]),
                     _ms(lat["e2e"]["p99"]), _counts(a["by_error"])])
    lines += _table(["model", "requests", "ok", "failed", "out tok", "tok/s", "ttft p50", "e2e p50", "e2e p99",
                     "errors"], rows)
    return "\n".join(lines)
