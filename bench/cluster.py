"""What the cluster's path costs a request: `deltaserve serve --replicas 2` beside one `deltaserve serve`, both on
the embedded demo on this machine's CPU, the same requests one at a time, interleaved (A B A B), medians.

Requests of one token show the fixed cost of the path (Ray Serve's proxy, the ingress, the handle to a replica and
the stream back, against uvicorn and the engine thread in one process); of 32 tokens, what each token costs on top
(each output crosses from the replica to the ingress). docs/scaling.md starts from these figures.

    python bench/cluster.py [--out bench/results/cluster-<date>.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.decode import device_name, write_result  # noqa: E402
from loadtest.provenance import git_commit  # noqa: E402
from loadtest.server_process import ServeProcess  # noqa: E402

ADMIN = "bench-admin-key-0123456789abcdef"
ROUNDS = 5
REQUESTS = 20  # per round and case
CASES = (("base", 1), ("german", 1), ("german", 32), ("italian", 32))  # (model, max_tokens)


def seconds_per_request(server: ServeProcess, model: str, max_tokens: int, stream: bool) -> float:
    body = {"model": model, "prompt": "Der Hund", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.demo_key}"}, timeout=120) as c:
        c.post("/v1/completions", json=body).raise_for_status()  # warm: the delta loaded, the route's first call
        t0 = time.perf_counter()
        for _ in range(REQUESTS):
            r = c.post("/v1/completions", json=body)
            r.raise_for_status()
        return (time.perf_counter() - t0) / REQUESTS


def report_bytes() -> tuple[int, int, int]:
    """(bytes, families, samples) of one replica's report to the board: its engine metrics after a few steps,
    pickled as Ray sends them (serving.cluster.replica.EngineReplica.snapshot)."""
    import pickle

    from prometheus_client import CollectorRegistry

    from serving.metrics import EngineMetrics

    registry = CollectorRegistry()
    m = EngineMetrics(registry)
    for seconds in (0.001, 0.01, 0.1):
        m.step_time.observe(seconds)
        m.batch_size.observe(32)
        m.distinct_tenants.observe(8)
    families = list(registry.collect())
    snapshot = {"families": families, "alive": True, "pending": 3}
    return len(pickle.dumps(snapshot)), len(families), sum(len(f.samples) for f in families)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"one server": ServeProcess(Path(tmp) / "single", "--device", "cpu", admin_key=ADMIN)}
        try:
            servers["2 replicas"] = ServeProcess(Path(tmp) / "cluster", "--device", "cpu", "--replicas", "2",
                                                 admin_key=ADMIN)  # fmt: skip
            times = {(name, case, stream): [] for name in servers for case in CASES for stream in (False, True)}
            for _ in range(ROUNDS):
                for case in CASES:
                    for stream in (False, True):
                        for name, server in servers.items():  # A B A B
                            times[name, case, stream].append(seconds_per_request(server, *case, stream))
        finally:
            for server in servers.values():
                server.stop()
    rows = []
    print(f"seconds per request, one at a time, median of {ROUNDS} rounds of {REQUESTS} (demo model, CPU)")
    print("| model | max_tokens | streamed | one server ms | 2 replicas ms | cluster - one server ms |")
    print("|---|---|---|---|---|---|")
    for (model, n) in CASES:
        for stream in (False, True):
            one = 1e3 * statistics.median(times["one server", (model, n), stream])
            two = 1e3 * statistics.median(times["2 replicas", (model, n), stream])
            rows.append({"model": model, "max_tokens": n, "stream": stream, "one_server_ms": one, "cluster_ms": two})
            print(f"| {model} | {n} | {'yes' if stream else 'no'} | {one:.1f} | {two:.1f} | {two - one:+.1f} |")
    size, n_families, n_samples = report_bytes()
    print(f"a replica's report to the board: {size:,} bytes ({n_families} metric families, {n_samples} samples), "
          "once a second")  # fmt: skip
    res = {"device": device_name(torch.device("cpu")), "date": dt.date.today().isoformat(), "git_commit": git_commit(),
           "rounds": ROUNDS, "requests_per_round": REQUESTS, "rows": rows,
           "board_report": {"bytes": size, "families": n_families, "samples": n_samples}}  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"cluster-{res['date']}.json"
    write_result(res, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
