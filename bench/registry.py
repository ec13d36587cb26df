"""What the catalog costs each request, by catalog size: authenticate a key and resolve the tenant's adapter (the
two lookups the ingress makes before a request reaches an engine), with 1,000 and with 100,000 tenants of one
adapter version each, timed interleaved (A B A B), medians, on the default SQLite catalog and, where PostgreSQL's
server programs are installed, on a PostgreSQL catalog over TCP on this machine (what a cluster shares; a server
started by the bench, as the tests start theirs). The figures docs/scaling.md starts from.

    python bench/registry.py [--no-postgres] [--out bench/results/registry-<date>.json]

Rows are written straight into a fresh catalog in one transaction (as Registry.create_tenant and commit_adapter
would write them: the lookups read the same tables and indexes); the keys are real, so authenticate() hashes and
compares them as it does for every request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from bench.decode import device_name, write_result  # noqa: E402
from loadtest.provenance import git_commit  # noqa: E402
from registry.catalog import Registry  # noqa: E402
from registry.keys import hash_key  # noqa: E402
from registry.schema import adapters, tenants  # noqa: E402

SIZES = (1_000, 100_000)
LOOKUPS = 2_000  # per round
ROUNDS = 5


def fill(registry: Registry, n: int) -> list[tuple[str, str]]:
    """n tenants with one ready LoRA version each; returns their (key, adapter name)."""
    keys = [f"ds-bench-{i:08d}-{'x' * 24}" for i in range(n)]
    now = int(time.time())
    # The bench writes rows directly (the lookups it times read exactly these), through the catalog's engine.
    with registry._engine.begin() as db:
        db.execute(insert(tenants), [{"name": f"t{i}", "key_hash": hash_key(k), "created": now}
                                     for i, k in enumerate(keys)])  # fmt: skip
        db.execute(insert(adapters), [
            {"id": f"ad-{i:024x}", "tenant": f"t{i}", "name": "a", "format": "lora", "version": 1,
             "sha256": f"{i:064x}", "status": "ready", "progress": 1.0, "created": now, "size_bytes": 1000,
             "rank": 16, "blob": f"lora/{i % 256:02x}/{i:064x}"} for i in range(n)])  # fmt: skip
    return [(k, "a") for k in keys]


def lookups(registry: Registry, pairs: list[tuple[str, str]], rng: random.Random) -> float:
    """Seconds per request's two lookups (authenticate + resolve), over LOOKUPS random tenants."""
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(LOOKUPS)]
    t0 = time.perf_counter()
    for key, name in chosen:
        tenant = registry.authenticate(key)
        assert tenant is not None and registry.resolve(tenant.name, name) is not None
    return (time.perf_counter() - t0) / LOOKUPS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = random.Random(0)
    server = None
    catalogs = ["sqlite"]
    if not args.no_postgres:
        from tests.postgres import PostgresServer

        try:
            server = PostgresServer()
            catalogs.append("postgresql")
        except (RuntimeError, OSError) as e:
            print(f"bench: no PostgreSQL server ({e}); SQLite only", file=sys.stderr)
    cases = [(c, n) for c in catalogs for n in SIZES]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            registries = {(c, n): Registry(Path(tmp) / f"{c}{n}", catalog=server.new_database() if c != "sqlite" else None)
                          for c, n in cases}  # fmt: skip
            pairs = {case: fill(registries[case], case[1]) for case in cases}
            times: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
            for _ in range(ROUNDS):  # A B A B
                for case in cases:
                    times[case].append(lookups(registries[case], pairs[case], rng))
            for r in registries.values():
                r.close()
    finally:
        if server is not None:
            server.stop()
    rows = [{"catalog": c, "tenants": n, "us_per_request": 1e6 * statistics.median(times[c, n]),
             "requests_per_s_one_thread": 1 / statistics.median(times[c, n])} for c, n in cases]  # fmt: skip
    base = rows[0]["us_per_request"]
    print(f"catalog lookups per request (authenticate + resolve), one thread, median of {ROUNDS} rounds")
    print("| catalog | tenants | us per request | requests/s (one thread) | vs SQLite, 1,000 tenants |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['catalog']} | {row['tenants']:,} | {row['us_per_request']:.1f} | "
              f"{row['requests_per_s_one_thread']:,.0f} | {row['us_per_request'] / base:.2f}x |")  # fmt: skip
    res = {"device": device_name(torch.device("cpu")), "date": dt.date.today().isoformat(), "git_commit": git_commit(),
           "rounds": ROUNDS, "lookups_per_round": LOOKUPS, "rows": rows}  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"registry-{res['date']}.json"
    write_result(res, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
