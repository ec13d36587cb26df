"""Compresses the demo's full fine-tunes into the shipped 1-bit delta files and measures their fidelity.

Reproducible: the calibration text of each tenant is a fixed slice of its TRAINING split (the same Debian
packages and the same deterministic split as scripts/demo/build_demo.py; never the held-out entries), the
distillation is seeded, and the fidelity table is measured on the held-out files shipped with the demo.

    python scripts/demo/compress_demo.py --cache /tmp/deltaserve-demo-cache [--distill-steps 200]

Writes serving/demo/assets/deltas/<tenant>.bitdelta.safetensors, serving/demo/FIDELITY.md (the table the
README shows) and serving/demo/assets/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_demo  # noqa: E402  (the data pipeline of the demo: same packages, same split)

from registry.compress import CompressOptions, compress  # noqa: E402
from registry.distill import DistillConfig  # noqa: E402
from serving.demo import demo_dir, demo_tenants, read_heldout  # noqa: E402
from serving.evaluation import evaluate, merge_lora  # noqa: E402

CALIBRATION_CHARS = 60_000


def calibration_text(name: str, cache: Path) -> str:
    corpus = next(c for c in build_demo.CORPORA if c.name == name)
    fetched = {p: build_demo.fetch(build_demo.PACKAGES[p], cache) for p in corpus.packages}
    train = build_demo.load_corpus(corpus, fetched).train
    out, size = [], 0
    for entry in train:  # the split's order is deterministic
        out.append(entry)
        size += len(entry) + 1
        if size >= CALIBRATION_CHARS:
            break
    return "\n".join(out)


def projection_sizes(delta_file: Path) -> dict:
    """Bytes of the projections in the 1-bit file (signs + scales) against the same projections in fp16."""
    from registry.safetensors_io import read_header

    tensors, _ = read_header(delta_file)
    one_bit = sum(i.nbytes for n, i in tensors.items() if n.endswith((".sign", ".scale")))
    fp16 = sum(2 * i.shape[0] * i.shape[1] * 8 for n, i in tensors.items() if n.endswith(".sign"))  # upper bound: padded in
    replaced = sum(i.nbytes for n, i in tensors.items() if not n.endswith((".sign", ".scale")))
    return {"one_bit_bytes": one_bit, "fp16_bytes": fp16, "ratio": round(fp16 / one_bit, 2), "replacements_bytes": replaced}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None, help="where the Debian packages are downloaded")
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--scale", choices=["per-matrix", "per-row"], default="per-matrix")
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored per tenant")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if args.cache is None else None
    cache = Path(tmp.name) if tmp else args.cache
    cache.mkdir(parents=True, exist_ok=True)
    root = demo_dir()
    base = root / "base"
    results = {}
    for t in demo_tenants():
        heldout = "\n".join(read_heldout(t.heldout_path))
        if t.kind != "bitdelta":
            continue
        calib = calibration_text(t.name, cache)
        t.adapter_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        distill = DistillConfig(steps=args.distill_steps, lr=args.distill_lr, device="cpu")
        result = compress(base, t.finetune_path, t.adapter_path, CompressOptions(scale=args.scale), distill=distill,
                          calibration_text=calib)
        seconds = time.time() - t0
        report = evaluate(base, t.finetune_path, heldout, delta_path=t.adapter_path, options=CompressOptions(scale=args.scale),
                          max_tokens=args.max_tokens, device="cpu", kernel_backend="torch")
        results[t.name] = {"compress_seconds": round(seconds, 1), "size_bytes": result.size_bytes,
                           "projections": projection_sizes(t.adapter_path), **report.as_dict()}
        print(f"\n== {t.name} ({t.description})\n{report.table()}", flush=True)
    # The LoRA tenant was trained as a LoRA: its "full fine-tune" is the LoRA merged into the base (W + s·B·A,
    # by peft), so the table checks our LoRA path against it and shows the 1-bit form of that merge too.
    for t in demo_tenants():
        if t.kind == "lora":
            heldout = "\n".join(read_heldout(t.heldout_path))
            with tempfile.TemporaryDirectory() as merged:
                merge_lora(base, t.adapter_path, Path(merged))
                report = evaluate(base, merged, heldout, lora_dir=t.adapter_path, max_tokens=args.max_tokens,
                                  device="cpu", kernel_backend="torch")
            results[t.name] = report.as_dict()
            print(f"\n== {t.name} (LoRA; fine-tune = the LoRA merged into the base)\n{report.table()}", flush=True)
    (root / "fidelity.json").write_text(json.dumps({"command": " ".join(sys.argv), "scale": args.scale,
                                                    "distill_steps": args.distill_steps, "tenants": results}, indent=1))
    write_markdown(results, args)
    return 0


def write_markdown(results: dict, args) -> None:
    lines = [
        "# Fidelity of the demo tenants",
        "",
        f"Produced by `python scripts/demo/compress_demo.py --distill-steps {args.distill_steps} --scale {args.scale}` "
        "(figures in serving/demo/assets/fidelity.json). Perplexity on each tenant's held-out text "
        f"(at most {args.max_tokens} tokens), computed through deltaserve's serving model.",
        "gain kept = (loss_base - loss_x) / (loss_base - loss_finetune), on mean next-token loss.",
        "",
        "| tenant | form | perplexity | gain kept | top-1 agreement with the fine-tune | size |",
        "|---|---|---|---|---|---|",
    ]
    sizes = ["", "Size of the projections (the compressed part), 1-bit file vs the same projections in fp16:", "",
             "| tenant | 1-bit signs + scales | fp16 | ratio | exact replacements (embeddings, norms) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if "projections" in r:
            p = r["projections"]
            sizes.append(f"| {name} | {p['one_bit_bytes']:,} B | {p['fp16_bytes']:,} B | {p['ratio']}x | "
                         f"{p['replacements_bytes']:,} B |")
        for form, f in r["forms"].items():
            gain = "-" if f.get("gain_kept") is None else f"{100 * f['gain_kept']:.1f} %"
            size = "-" if f.get("size_bytes") is None else f"{f['size_bytes']:,} B"
            lines.append(f"| {name} | {form} | {f['perplexity']:.2f} | {gain} | {100 * f['top1_agreement']:.1f} % | {size} |")
    (demo_dir().parent / "FIDELITY.md").write_text("\n".join(lines + sizes) + "\n")


if __name__ == "__main__":
    sys.exit(main())
