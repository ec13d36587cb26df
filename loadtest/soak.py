"""The hostile-tenants soak: a real `deltaserve serve` (the embedded demo) under 64 streams over 100 tenants, one
of which floods, for some minutes; every request must succeed and the server's memory must stay flat.

    python -m loadtest.soak [--minutes 10] [--out bench/results/soak-<date>.json]

It starts the server on a free port with a fresh registry, creates 100 tenants, uploads one of the demo's
adapters for each (1-bit deltas and a LoRA: 100 distinct tenants' deltas competing for a few GPU slots), then
runs two loads at once for the whole time: the flooding tenant (32 streams of long generations on its adapter),
and 32 streams round-robin over the 99 others (their adapter or the base). The server's resident memory is read
every 10 s. Reported: requests, errors by code, tokens/s, TTFT p50/p95 of the flood and of the others, and the
memory series (first, last, peak of the second half against the first half).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from loadtest.provenance import git_commit
from loadtest.runner import LoadConfig, Prompt, Target, run_load

ADMIN = "soak-admin-key-0123456789abcdef"
DEMO_ADAPTERS = ("german", "spanish", "bofh", "italian")
PROMPTS = ["Das Leben ist", "La vida es", "BOFH excuse #", "La vita", "A wise man once said"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _machine() -> dict[str, object]:
    """Where and on what code the soak ran (the server is started from this checkout)."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"git_commit": git_commit(), "device": f"{cpu} x{os.cpu_count()}"}


def _percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else None


def main(argv: list[str] | None = None) -> int:
    # Over 60 lines: the soak is one script run top to bottom (server up, tenants, two loads, memory, report);
    # its steps share the server and the clock, and reading it in order is how it is checked.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--demo-assets", type=Path, default=Path(__file__).resolve().parents[1] / "serving" / "demo" / "assets",
                   help="the demo's assets (its tenants.json names the adapters uploaded for the tenants)")  # fmt: skip
    args = p.parse_args(argv)
    machine = _machine()  # before the run: the code the server starts with
    root = Path(tempfile.mkdtemp(prefix="deltaserve-soak-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")  # noqa: SIM115 (the server's whole life)
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--registry", str(root / "registry"), "--port", str(port),
         "--bitdelta-slots", "8", "--lora-slots", "8", "--tenant-max-concurrent", "64"],
        env={**os.environ, "DELTASERVE_ADMIN_KEY": ADMIN}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.2)
        manifest = json.loads((args.demo_assets / "tenants.json").read_text())
        files = {t["name"]: (t["kind"], args.demo_assets / t["adapter"]) for t in manifest["tenants"]}
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        base = None
        targets: list[Target] = []
        for i in range(args.tenants):
            key = admin.post("/v1/tenants", json={"name": f"t{i:03d}"}).json()["api_key"]
            kind, path = files[DEMO_ADAPTERS[i % len(DEMO_ADAPTERS)]]
            paths = sorted(path.iterdir()) if path.is_dir() else [path]
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
                r = c.post("/v1/adapters", data={"name": "mine", "format": kind},
                           files=[("files", (f.name, f.read_bytes())) for f in paths])  # fmt: skip
                assert r.status_code == 201, r.text
                base = base or c.get("/v1/models").json()["data"][0]["id"]
            targets.append(Target(key, "mine"))
            if i % 3 == 0:
                targets.append(Target(key, base))
        flood, others = [t for t in targets if t.key == targets[0].key][:1], [t for t in targets if t.key != targets[0].key]
        prompts = [Prompt(text=t) for t in PROMPTS]
        seconds = args.minutes * 60
        loads = {
            "flood": LoadConfig(url=url, targets=flood, prompts=prompts, requests=10**7, concurrency=32, max_tokens=96,
                                temperature=0.8, stream=True, duration=seconds, ignore_eos=True, timeout=300),
            "others": LoadConfig(url=url, targets=others, prompts=prompts, requests=10**7, concurrency=32,
                                 max_tokens=24, temperature=0.8, stream=True, duration=seconds, timeout=300),
        }  # fmt: skip
        results: dict[str, object] = {}
        threads = [threading.Thread(target=lambda n=n, c=c: results.__setitem__(n, run_load(c))) for n, c in loads.items()]
        memory: list[tuple[float, int]] = []
        t0 = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            memory.append((time.time() - t0, _rss(server.pid)))
            time.sleep(10)
        for t in threads:
            t.join()
        report: dict[str, object] = {"date": dt.date.today().isoformat(), **machine, "minutes": args.minutes,
                                     "tenants": args.tenants, "streams": 64}  # fmt: skip
        for name, run in results.items():
            rs = run.results  # type: ignore[attr-defined]
            errors: dict[str, int] = {}
            for r in rs:
                if not r.ok:
                    errors[r.error_key] = errors.get(r.error_key, 0) + 1
            tokens = sum(r.output_tokens or 0 for r in rs)
            report[name] = {"requests": len(rs), "errors": errors, "tokens": tokens,
                            "tok_s": tokens / run.wall_time,  # type: ignore[attr-defined]
                            "ttft_p50_s": _percentile([r.ttft for r in rs], 0.5),
                            "ttft_p95_s": _percentile([r.ttft for r in rs], 0.95)}  # fmt: skip
        half = len(memory) // 2
        first_half = [m for _, m in memory[:half]] or [0]
        second_half = [m for _, m in memory[half:]] or [0]
        report["memory_mb"] = {"first": memory[0][1] / 2**20, "last": memory[-1][1] / 2**20,
                               "peak_first_half": max(first_half) / 2**20, "peak_second_half": max(second_half) / 2**20,
                               "median_first_half": statistics.median(first_half) / 2**20,
                               "median_second_half": statistics.median(second_half) / 2**20,
                               "series": [(round(t), m // 2**20) for t, m in memory]}  # fmt: skip
        report["server_alive"] = server.poll() is None
        print(json.dumps({k: v for k, v in report.items() if k != "memory_mb"}, indent=2))
        mem = report["memory_mb"]
        print(f"memory MB: first {mem['first']:.0f}, median first half {mem['median_first_half']:.0f}, "  # type: ignore[index]
              f"median second half {mem['median_second_half']:.0f}, last {mem['last']:.0f}")  # type: ignore[index]
        out = args.out or Path("bench/results") / f"soak-{report['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
        ok = all(not report[n]["errors"] for n in results) and report["server_alive"]  # type: ignore[index]
        return 0 if ok else 1
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
