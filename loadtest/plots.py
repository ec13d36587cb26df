"""PNG plots of a load-test run, beside its JSON report (matplotlib, drawn off-screen):

- latency_cdf.png: the CDFs of TTFT, time per output token and end-to-end latency of the successful requests;
- over_time.png: output tokens/s and requests/s finishing per second, and each request's TTFT at its start time;
- ttft_vs_rate.png: TTFT (median and p90, per bin of the offered rate) against the arrival rate when each request
  arrived — a ramp (`--ramp A:B`) sweeps the rate in one run; a fixed `--request-rate` gives one bin; without a
  rate, TTFT against the requests in flight when each one was sent.
"""

from __future__ import annotations

from pathlib import Path

from loadtest.report import percentile
from loadtest.runner import RequestResult, RunResult

PLOT_FILES = ("latency_cdf.png", "over_time.png", "ttft_vs_rate.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plots needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(run: RunResult, out_dir: Path) -> list[Path]:
    """Writes the three PNGs into `out_dir` (created); returns their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in run.results if r.ok]
    paths = [out_dir / name for name in PLOT_FILES]
    for path, draw in zip(paths, (_latency_cdf, _over_time, _ttft_vs_rate)):
        fig = plt.figure(figsize=(8, 4.5), dpi=100)
        draw(fig, ok, run)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
    return paths


def _latency_cdf(fig, ok: list[RequestResult], run: RunResult) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for name, values in (("TTFT", [r.ttft for r in ok]), ("time per output token", [r.tpot for r in ok]),
                         ("end to end", [r.e2e for r in ok])):  # fmt: skip
        xs = sorted(v * 1000 for v in values if v is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{name} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"Latency CDFs: {len(ok)} successful requests")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")


def _over_time(fig, ok: list[RequestResult], run: RunResult) -> None:
    span = max(1, int(run.wall_time) + 1)
    tokens, done = [0.0] * span, [0.0] * span
    for r in ok:
        second = min(span - 1, int(r.start + (r.e2e or 0.0)))
        tokens[second] += r.output_tokens or 0
        done[second] += 1
    ax = fig.add_subplot(2, 1, 1)
    ax.plot(range(span), tokens, label="output tokens/s")
    ax.plot(range(span), done, label="requests/s")
    ax.set_ylabel("per second")
    ax.set_title("Throughput and TTFT over the run")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
    ax2.scatter([r.start for r in ok if r.ttft is not None], [r.ttft * 1000 for r in ok if r.ttft is not None], s=6)
    ax2.set_xlabel("time since the run started (s)")
    ax2.set_ylabel("TTFT (ms)")
    ax2.grid(True, alpha=0.3)


def _ttft_vs_rate(fig, ok: list[RequestResult], run: RunResult) -> None:
    ax = fig.add_subplot(1, 1, 1)
    timed = [r for r in ok if r.ttft is not None]
    if timed and timed[0].offered_rate is not None:
        xs, label = [r.offered_rate for r in timed], "offered request rate when the request arrived (req/s)"
    else:  # closed loop: how loaded the server was, as requests in flight at each send
        xs = [sum(1 for o in run.results if o.start <= r.start < o.start + (o.e2e or 0.0)) for r in timed]
        label = "requests in flight when the request was sent"
    ys = [r.ttft * 1000 for r in timed]
    ax.scatter(xs, ys, s=6, alpha=0.4, label="requests")
    if xs:
        lo, hi = min(xs), max(xs)
        bins = 10 if hi > lo else 1
        width = (hi - lo) / bins or 1.0
        centers, p50, p90 = [], [], []
        for b in range(bins):
            inside = [y for x, y in zip(xs, ys) if lo + b * width <= x < lo + (b + 1) * width or (b == bins - 1 and x == hi)]
            if inside:
                centers.append(lo + (b + 0.5) * width if bins > 1 else lo)
                p50.append(percentile(inside, 50))
                p90.append(percentile(inside, 90))
        ax.plot(centers, p50, "o-", label="median")
        ax.plot(centers, p90, "s--", label="p90")
    ax.set_xlabel(label)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT against load")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
