"""Delta kernels on one GPU beside their byte floors and the naive torch way, all measured in the same run.

For the Llama-7B projections 4096->4096, 4096->11008 and 11008->4096 in bfloat16, with 32 decode rows shared
by 1, 8 and 32 distinct tenants, times (median of CUDA-event timings after a warm-up):
  base GEMM       x @ W.T
  bitdelta        our bitdelta_apply (the 1-bit delta alone)
  lora_r16        our lora_shrink + lora_expand at rank 16 (the delta alone)
  naive_1bit      base GEMM + per tenant: unpack bits -> bf16 -> matmul (as /work/shared/anchors/peer_bench.py)
  ours_1bit       base GEMM + our bitdelta_apply (compare with naive_1bit)
and for each its byte floor = bytes it must move / device-to-device copy bandwidth (read + write) measured here.

Usage:  python bench/kernels.py [--out bench/results/kernels-<device>-<date>.json] [--iters 50]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and this file would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loadtest.provenance import git_commit  # noqa: E402

PROJECTIONS = ((4096, 4096), (4096, 11008), (11008, 4096))
TENANTS = (1, 8, 32)
ROWS = 32
LORA_RANK = 16
DTYPE = torch.bfloat16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=None, help="JSON output (default bench/results/kernels-<device>-<date>.json)"
    )
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the device-to-device copy for the bandwidth")
    return p.parse_args(argv)


def time_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median of CUDA-event timings of fn(), after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(mib: int, iters: int, warmup: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written (as the anchors do)."""
    n = mib << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters, warmup)
    return 2 * n / ms / 1e6


def bench_projection(in_f: int, out_f: int, bw: float, args: argparse.Namespace) -> list[dict]:
    """All cases of one projection, for each tenant count."""
    from deltakernels.bitdelta import packed_width

    dev = "cuda"
    gen = torch.Generator(dev).manual_seed(0)
    n_slots = max(TENANTS)
    data = {
        "w": (torch.randn(out_f, in_f, device=dev, generator=gen) * 0.02).to(DTYPE),
        "signs": torch.randint(
            0, 256, (n_slots, out_f, packed_width(in_f)), dtype=torch.uint8, device=dev, generator=gen
        ),
        "scales": torch.rand(n_slots, out_f, device=dev, generator=gen) * 0.01,
        "a": (torch.randn(n_slots, LORA_RANK, in_f, device=dev, generator=gen) / in_f**0.5).to(DTYPE),
        "bt": (torch.randn(n_slots, LORA_RANK, out_f, device=dev, generator=gen) / LORA_RANK**0.5).to(DTYPE),
        "scaling": torch.ones(n_slots, device=dev),
        "ranks": torch.full((n_slots,), LORA_RANK, dtype=torch.int32, device=dev),
        "x": torch.randn(ROWS, in_f, device=dev, generator=gen).to(DTYPE),
        "y": torch.zeros(ROWS, out_f, device=dev, dtype=DTYPE),
        "buf": torch.empty(ROWS, LORA_RANK, device=dev),
    }
    rows: list[dict] = []
    for n_tenants in TENANTS:
        rows.extend(bench_tenants(in_f, out_f, n_tenants, data, bw, args))
    return rows


def bench_tenants(
    in_f: int, out_f: int, n_tenants: int, d: dict[str, torch.Tensor], bw: float, args: argparse.Namespace
) -> list[dict]:
    """One projection, one tenant count: every case timed beside its floor. Over 60 lines: the cases are timed
    interleaved in one loop (A B A B), so they stay together."""
    from deltakernels.bitdelta import bitdelta_apply, bitdelta_apply_ref, packed_width
    from deltakernels.lora import lora_expand, lora_shrink
    from deltakernels.segments import build_slot_tiles

    dev = "cuda"
    x, y, w, signs, scales, buf = d["x"], d["y"], d["w"], d["signs"], d["scales"], d["buf"]
    row_slots = [i % n_tenants for i in range(ROWS)]  # decode: one row per sequence, tenants round-robin
    tiles = build_slot_tiles(row_slots, [1] * ROWS, dev)
    rows_of = [torch.tensor([i for i, s in enumerate(row_slots) if s == t], device=dev) for t in range(n_tenants)]
    shifts = torch.arange(8, device=dev, dtype=torch.uint8)

    # correctness first: one call of ours against the torch reference on fresh outputs
    y_k, y_r = torch.zeros_like(y), torch.zeros_like(y)
    bitdelta_apply(y_k, x, signs, scales, tiles)
    bitdelta_apply_ref(y_r, x, signs, scales, tiles)
    max_err = (y_k.float() - y_r.float()).abs().max().item()

    def base() -> torch.Tensor:
        return x @ w.T

    def ours_bitdelta() -> None:
        bitdelta_apply(y, x, signs, scales, tiles)

    def ours_lora() -> None:
        lora_shrink(buf, x, d["a"], d["ranks"], tiles)
        lora_expand(y, buf, d["bt"], d["scaling"], d["ranks"], tiles)

    def ours_base_1bit() -> None:
        out = x @ w.T
        bitdelta_apply(out, x, signs, scales, tiles)

    def naive_1bit() -> torch.Tensor:
        out = x @ w.T
        for t in range(n_tenants):
            bits = (signs[t].unsqueeze(-1) >> shifts) & 1
            dense = (bits.to(DTYPE) * 2 - 1).reshape(out_f, -1)[:, :in_f]
            r = rows_of[t]
            out[r] += (x[r] @ dense.T) * scales[t].to(DTYPE)
        return out

    act_bytes = ROWS * in_f * 2 + 2 * ROWS * out_f * 2  # x read, y read + written
    sign_bytes = n_tenants * out_f * (packed_width(in_f) + 4)  # packed signs + float32 scales
    lora_bytes = n_tenants * LORA_RANK * (in_f + out_f) * 2
    base_bytes = out_f * in_f * 2 + ROWS * in_f * 2 + ROWS * out_f * 2
    cases = [
        ("base_gemm", base, base_bytes, args.iters),
        ("bitdelta", ours_bitdelta, sign_bytes + act_bytes, args.iters),
        ("lora_r16", ours_lora, lora_bytes + act_bytes, args.iters),
        ("ours_base+1bit", ours_base_1bit, base_bytes + sign_bytes + 2 * ROWS * out_f * 2, args.iters),
        ("naive_base+1bit", naive_1bit, base_bytes + sign_bytes + 2 * ROWS * out_f * 2, max(5, args.iters // 5)),
    ]
    rows: list[dict] = []
    for name, fn, n_bytes, iters in cases:
        ms = time_ms(fn, iters, args.warmup)
        floor_ms = n_bytes / bw / 1e6
        row = {
            "projection": f"{in_f}->{out_f}",
            "tenants": n_tenants,
            "rows": ROWS,
            "what": name,
            "ms": ms,
            "bytes": n_bytes,
            "floor_ms": floor_ms,
            "x_floor": ms / floor_ms,
            "GBps": n_bytes / ms / 1e6,
        }
        if name == "bitdelta":
            row["max_abs_err_vs_ref"] = max_err
        rows.append(row)
        print(
            f"{in_f:>5}->{out_f:<5} T={n_tenants:<2} {name:<16} {ms:9.4f} ms  floor {floor_ms:8.4f} ms"
            f"  x{ms / floor_ms:7.1f}  {n_bytes / ms / 1e6:8.0f} GB/s",
            flush=True,
        )
    return rows


def run(args: argparse.Namespace) -> dict:
    import triton

    bw = copy_bandwidth_gbps(args.copy_mib, max(10, args.iters // 2), args.warmup)
    print(f"device-to-device copy: {bw:,.0f} GB/s (read + write)", flush=True)
    rows: list[dict] = []
    for in_f, out_f in PROJECTIONS:
        rows.extend(bench_projection(in_f, out_f, bw, args))
        torch.cuda.empty_cache()

    tuned = {}
    from deltakernels import bitdelta as bd_mod
    from deltakernels import lora as lora_mod

    for label, tuner in [
        ("bitdelta_apply", getattr(bd_mod, "_bitdelta_apply_tuned", None)),
        ("lora_shrink", getattr(lora_mod, "_lora_shrink_tuned", None)),
        ("lora_expand", getattr(lora_mod, "_lora_expand_tuned", None)),
    ]:
        cache = getattr(tuner, "cache", {}) or {}
        tuned[label] = {str(k): str(v) for k, v in cache.items()}

    return {
        "device": torch.cuda.get_device_name(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "dtype": "bfloat16",
        "copy_GBps": bw,
        "floors": {
            "bitdelta": "(tenants*out*(ceil(in/8) + 4 scale bytes) + x + y read/write) / copy_GBps",
            "lora_r16": "(tenants*16*(in+out)*2 + x + y read/write) / copy_GBps",
            "base_gemm": "(out*in*2 + x + y write) / copy_GBps",
            "ours_base+1bit / naive_base+1bit": "base bytes + 1-bit delta bytes + y read/write",
        },
        "results": rows,
        "autotuned_configs": tuned,
    }


def print_table(res: dict) -> None:
    print(f"\n{res['device']}, torch {res['torch']}, triton {res['triton']}, copy {res['copy_GBps']:,.0f} GB/s\n")
    print("| projection | tenants | what | ms | floor ms | x floor | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in res["results"]:
        print(
            f"| {r['projection']} | {r['tenants']} | {r['what']} | {r['ms']:.4f} | {r['floor_ms']:.4f} "
            f"| {r['x_floor']:.1f} | {r['GBps']:.0f} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (none visible to torch); nothing measured.", file=sys.stderr)
        return 2
    res = run(args)
    print_table(res)
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", res["device"].lower()).strip("-")
        out = ROOT / "bench" / "results" / f"kernels-{slug}-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
