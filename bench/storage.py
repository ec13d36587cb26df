"""Lossless storage of fine-tunes: raw size, zstd, zipnn and deltaserve's FM-Delta containers, side by side.

For each checkpoint pair (base, fine-tune) and each of its safetensors files: the stored size and the speed both
ways (MB/s of the original file) of
  zstd      the file through zstd level 3 (python-zstandard), as it is
  zipnn     the file through ZipNN (the PyPI library for lossless model compression: byte grouping + Huffman),
            told the file's float dtype
  fmdelta   registry/fmdelta.py: float tensors as integer deltas against the base, byte planes through zstd
All single-threaded, rounds interleaved (A B C A B C ...), medians; every decode is checked byte for byte.

Pairs: the demo's three real fine-tunes (float16, 2.4 M parameters, trained from the demo base), and a random
Llama-shaped base (--params, default 100 M) in bfloat16 and float16 with a fine-tune made from it: every weight
moved by a normal step of --step (default 1e-3) times its row's scale, rounded to the dtype, as many small
optimizer steps would. Usage:
    pip install -e ".[bench]"; python bench/storage.py [--params 100e6] [--rounds 3] [--out bench/results/storage-<device>-<date>.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.decode import device_name, git_commit, write_result  # noqa: E402
from registry import fmdelta  # noqa: E402
from registry.checkpoint import Checkpoint  # noqa: E402
from registry.source_files import CheckpointTensors, regions  # noqa: E402

DEMO = ROOT / "serving" / "demo" / "assets"
ZIPNN_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _random_pair(root: Path, params: float, dtype: torch.dtype, step: float) -> tuple[Path, Path]:
    """A random Llama-shaped base of about `params` parameters and a fine-tune of it, one safetensors file each."""
    from safetensors.torch import save_file

    hidden, inter = 1024, 2816
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * 32000 * hidden) / per_layer))
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    shapes = {"model.embed_tokens.weight": (32000, hidden), "lm_head.weight": (32000, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 4, hidden),
                   p + "self_attn.v_proj.weight": (hidden // 4, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)}  # fmt: skip
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen) * 0.02 if len(shape) > 1 else torch.ones(shape)
        rows = (torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen) + 0.5) * 0.02
        base[name] = w.to(dtype)
        ft[name] = (w + step * rows * torch.randn(shape, generator=gen)).to(dtype)
    out = []
    for tag, tensors in (("base", base), ("ft", ft)):
        d = root / f"{tag}-{str(dtype).removeprefix('torch.')}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        out.append(d)
    changed = sum(int((base[n] != ft[n]).sum()) for n in shapes) / sum(t.numel() for t in base.values())
    print(f"random pair {dtype}: {sum(t.numel() for t in base.values()) / 1e6:.0f} M parameters, "
          f"{changed:.1%} of the elements changed by the fine-tune")  # fmt: skip
    return out[0], out[1]


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _codecs(path: Path, base: Checkpoint, dtype: torch.dtype):
    """(name, compress() -> bytes, decompress(bytes) -> bytes) for one file."""
    import zstandard
    from zipnn import ZipNN

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    zipnn = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE[dtype], threads=1)
    rs, tensors = regions(path, base), CheckpointTensors(base)

    def fm_compress() -> bytes:
        out = io.BytesIO()
        with open(path, "rb") as src:
            fmdelta.encode(src, rs, tensors, out, size=len(data), sha256=digest, base_fingerprint="bench")
        return out.getvalue()

    def fm_decompress(blob: bytes) -> bytes:
        return b"".join(fmdelta.decode(io.BytesIO(blob), tensors))

    return data, [
        ("zstd", lambda: zc.compress(data), lambda b: zd.decompress(b)),
        # zipnn 0.5.4 reorders the bits of its input buffer in place (even of a bytes object): give it a copy
        ("zipnn", lambda: bytes(zipnn.compress(bytearray(data))), lambda b: bytes(zipnn.decompress(b))),
        ("fmdelta", fm_compress, fm_decompress),
    ]


def measure(name: str, base_dir: Path, ft_dir: Path, rounds: int) -> dict:
    base = Checkpoint(base_dir)
    files = sorted(ft_dir.glob("*.safetensors"))
    dtype = Checkpoint(ft_dir).info(Checkpoint(ft_dir).names()[0]).dtype
    raw = sum(p.stat().st_size for p in files)
    sizes: dict[str, int] = {}
    enc: dict[str, list[float]] = {}
    dec: dict[str, list[float]] = {}
    for path in files:
        data, codecs = _codecs(path, base, dtype)
        times_e: dict[str, list[float]] = {c: [] for c, _, _ in codecs}
        times_d: dict[str, list[float]] = {c: [] for c, _, _ in codecs}
        for round_ in range(rounds):
            for codec, compress, decompress in codecs:  # interleaved: A B C A B C
                te, blob = _timed(compress)
                td, back = _timed(lambda d=decompress, b=blob: d(b))
                assert back == data, f"{codec} did not give {path.name} back"
                times_e[codec].append(te)
                times_d[codec].append(td)
                sizes[codec] = sizes.get(codec, 0) + (len(blob) if round_ == 0 else 0)
        for codec in times_e:
            enc.setdefault(codec, []).append(statistics.median(times_e[codec]))
            dec.setdefault(codec, []).append(statistics.median(times_d[codec]))
    result = {"pair": name, "dtype": str(dtype).removeprefix("torch."), "files": len(files), "raw_bytes": raw}
    for codec in sizes:
        result[codec] = {"bytes": sizes[codec], "ratio": raw / sizes[codec],
                         "compress_mb_s": raw / 1e6 / sum(enc[codec]), "decompress_mb_s": raw / 1e6 / sum(dec[codec])}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=100e6, help="parameters of the random base (default 100e6)")
    p.add_argument("--step", type=float, default=1e-3, help="the random fine-tune's step, relative to a row's scale")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for tenant in ("german", "spanish", "bofh"):
        results.append(measure(f"demo {tenant}", DEMO / "base", DEMO / "finetunes" / tenant, args.rounds))
    with tempfile.TemporaryDirectory(prefix="deltaserve-storage-") as tmp:
        for dtype in (torch.bfloat16, torch.float16):
            base_dir, ft_dir = _random_pair(Path(tmp), args.params, dtype, args.step)
            results.append(measure(f"random {args.params / 1e6:.0f} M", base_dir, ft_dir, args.rounds))
    print("\n| pair | dtype | raw MB | zstd | zipnn | fmdelta | MB/s zstd | MB/s zipnn | MB/s fmdelta |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speeds = [f"{r[c]['compress_mb_s']:.0f} / {r[c]['decompress_mb_s']:.0f}" for c in ("zstd", "zipnn", "fmdelta")]
        print(f"| {r['pair']} | {r['dtype']} | {r['raw_bytes'] / 1e6:.1f} | {r['zstd']['ratio']:.2f}× | "
              f"{r['zipnn']['ratio']:.2f}× | **{r['fmdelta']['ratio']:.2f}×** | {' | '.join(speeds)} |")  # fmt: skip
    print("(ratio = raw / stored; MB/s = of the original file, compress / decompress, one thread)")
    res = {"device": device_name(torch.device("cpu")), "date": dt.date.today().isoformat(), "git_commit": git_commit(),
           "rounds": args.rounds, "step": args.step, "results": results}  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"storage-cpu-{res['date']}.json"
    write_result(res, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
