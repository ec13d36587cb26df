"""The CPU delta kernels beside their byte floors, the base GEMM and the torch references, in the same run.

For the projections of the CPU benchmark model (bench/decode.py: 1024->1024, 1024->256, 1024->2816, 2816->1024)
in float32, with 32 decode rows shared by 1, 8 and 32 distinct tenants, median wall times of:
  base_mkl        x @ W.T through F.linear (MKL)
  base_onednn     the same with the weight prepacked for oneDNN (what the engine runs on CPU)
  bitdelta        our compiled 1-bit kernel (deltakernels/csrc/bitdelta_cpu.cpp), the delta alone
  bitdelta_generic  the same kernel forced onto its portable code (only where this CPU takes AVX-512 or AVX2)
  bitdelta_ref    the torch reference (per distinct slot: unpack, matmul)
  lora_r16        our compiled LoRA at rank 16, shrink and expand in one pass (deltakernels/csrc/lora_cpu.cpp)
  lora_r16_generic  the same forced onto its portable code (only where this CPU takes AVX-512 or AVX2)
  lora_r16_ref    the torch references
Each measurement cycles through enough copies of the weights and slot pools to exceed the last-level cache, so
the bytes come from memory as in a model's step. Floor = bytes it must read / read bandwidth measured here
(a sum over 1 GiB). Usage:  python bench/cpu_kernels.py [--out FILE.json] [--iters 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.decode import device_name, git_commit, read_bandwidth_gbps, write_result  # noqa: E402

PROJECTIONS = ((1024, 1024), (1024, 256), (1024, 2816), (2816, 1024))
TENANTS = (1, 8, 32)
ROWS = 32
RANK = 16
CACHE_BYTES = 96 << 20  # every measurement's data set is larger than this (the last-level cache is smaller)


def median_ms(fn, copies: int, iters: int) -> float:
    for c in range(copies):
        fn(c)
    times = []
    for i in range(iters * copies):
        t0 = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_projection(in_f: int, out_f: int, bw: float, iters: int) -> list[dict]:
    # Over 60 lines: every kernel of one projection is timed interleaved in one loop (A B A B), so they stay together.
    from deltakernels import cpu_kernels, select_delta_ops
    from deltakernels.bitdelta import interleave_signs, packed_width
    from deltakernels.segments import build_slot_tiles

    cpu, ref = select_delta_ops("cpu"), select_delta_ops("torch")
    n_slots = max(TENANTS)
    sign_bytes = n_slots * out_f * packed_width(in_f)
    copies = max(2, -(-CACHE_BYTES // sign_bytes))
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(out_f, in_f, generator=gen) / in_f**0.5 for _ in range(copies)]
    w_packed = [torch.ops.mkldnn._reorder_linear_weight(t, ROWS) for t in w]
    signs = [torch.randint(0, 256, (n_slots, out_f, packed_width(in_f)), dtype=torch.uint8, generator=gen)
             for _ in range(copies)]  # fmt: skip
    blocked = [interleave_signs(s) for s in signs]
    scales = torch.rand(n_slots, out_f, generator=gen) * 0.01
    a = [torch.randn(n_slots, RANK, in_f, generator=gen) / in_f**0.5 for _ in range(copies)]
    bt = [torch.randn(n_slots, RANK, out_f, generator=gen) / RANK**0.5 for _ in range(copies)]
    scaling = torch.ones(n_slots)
    ranks = torch.full((n_slots,), RANK, dtype=torch.int32)
    x = torch.randn(ROWS, in_f, generator=gen)
    y = torch.zeros(ROWS, out_f)
    buf = torch.zeros(ROWS, RANK)
    module = cpu_kernels()
    isa = module.isa()

    def generic(op, *args):  # the same kernel on its portable path, beside the path this CPU takes
        module.set_isa("generic")
        try:
            op(*args)
        finally:
            module.set_isa("auto")

    def cases_for(n_tenants: int) -> dict:
        tiles = build_slot_tiles([i % n_tenants for i in range(ROWS)], [1] * ROWS)
        return {
            "base_mkl": (lambda c: torch.nn.functional.linear(x, w[c]), out_f * in_f * 4),
            "base_onednn": (lambda c: torch.ops.mkldnn._linear_pointwise(x, w_packed[c], None, "none", [], ""),
                            out_f * in_f * 4),  # fmt: skip
            "bitdelta": (lambda c: cpu.bitdelta_apply(y, x, blocked[c], scales, tiles),
                         n_tenants * out_f * (packed_width(in_f) + 4)),  # fmt: skip
            **({"bitdelta_generic": (lambda c: generic(cpu.bitdelta_apply, y, x, blocked[c], scales, tiles),
                                     n_tenants * out_f * (packed_width(in_f) + 4))} if isa != "generic" else {}),  # fmt: skip
            "bitdelta_ref": (lambda c: ref.bitdelta_apply(y, x, signs[c], scales, tiles),
                             n_tenants * out_f * (packed_width(in_f) + 4)),  # fmt: skip
            "lora_r16": (lambda c: cpu.lora_apply(y, x, a[c], bt[c], scaling, ranks, tiles, buf),
                         n_tenants * RANK * (in_f + out_f) * 4),  # fmt: skip
            **({"lora_r16_generic": (lambda c: generic(cpu.lora_apply, y, x, a[c], bt[c], scaling, ranks, tiles, buf),
                                     n_tenants * RANK * (in_f + out_f) * 4)} if isa != "generic" else {}),  # fmt: skip
            "lora_r16_ref": (lambda c: (ref.lora_shrink(buf, x, a[c], ranks, tiles),
                                        ref.lora_expand(y, buf, bt[c], scaling, ranks, tiles)),
                             n_tenants * RANK * (in_f + out_f) * 4),  # fmt: skip
        }

    rows = []
    for n_tenants in TENANTS:
        for name, (fn, n_bytes) in cases_for(n_tenants).items():
            if name.startswith("base") and n_tenants != TENANTS[0]:
                continue  # the base GEMM does not depend on the tenants
            ms = median_ms(fn, copies, iters if not name.endswith("_ref") else max(3, iters // 5))
            floor_ms = n_bytes / bw / 1e6
            rows.append({"projection": f"{in_f}->{out_f}", "tenants": n_tenants, "rows": ROWS, "what": name, "ms": ms,
                         "bytes": n_bytes, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
                         "GBps": n_bytes / ms / 1e6})  # fmt: skip
            print(f"{in_f:>5}->{out_f:<5} T={n_tenants:<2} {name:<13} {ms:8.4f} ms  floor {floor_ms:7.4f} ms"
                  f"  x{ms / floor_ms:6.1f}  {n_bytes / ms / 1e6:6.1f} GB/s", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--iters", type=int, default=30, help="timed passes over the copies (median reported)")
    args = p.parse_args(argv)
    from deltakernels import cpu_kernels

    bw = read_bandwidth_gbps(torch.device("cpu"))
    print(f"read bandwidth {bw:.1f} GB/s; CPU kernels on {cpu_kernels().isa()}", flush=True)
    rows = []
    for in_f, out_f in PROJECTIONS:
        rows.extend(bench_projection(in_f, out_f, bw, args.iters))
    res = {"device": device_name(torch.device("cpu")), "date": dt.date.today().isoformat(), "git_commit": git_commit(),
           "torch": torch.__version__, "python": platform.python_version(), "isa": cpu_kernels().isa(),
           "threads": torch.get_num_threads(), "read_GBps": bw, "results": rows}  # fmt: skip
    print("\n| projection | tenants | what | ms | floor ms | x floor | GB/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['projection']} | {r['tenants']} | {r['what']} | {r['ms']:.4f} | {r['floor_ms']:.4f} | "
              f"{r['x_floor']:.1f} | {r['GBps']:.1f} |")  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"cpu-kernels-{res['date']}.json"
    write_result(res, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
