"""`deltaserve eval`: how much of a fine-tune each served form keeps, on held-out text.

Forms: the base, the full fine-tune, the 1-bit delta before scale distillation (mean|delta| scales,
compressed on the fly), the 1-bit delta after (a given file, or distilled on the fly), and a LoRA adapter
when one is given. For each: perplexity, the share of the fine-tune's gain it keeps, top-1 agreement with
the fine-tune, and its size in bytes.

Definitions (also printed):
  loss(x)       mean next-token cross-entropy (nats) of form x over every predicted token of the text;
                perplexity = exp(loss).
  gain kept(x)  (loss(base) - loss(x)) / (loss(base) - loss(finetune)): 1 = all of the fine-tune's gain, 0 =
                none (the base), < 0 = worse than the base. Undefined (null) when the fine-tune does not beat
                the base on this text by at least 1e-6 nats.
  top-1 agree   share of positions where the form's most likely next token equals the fine-tune's.
  size          bytes to store the form: the fine-tune's projections in float16 (out*in*2 each, what a
                1-bit delta or a LoRA replaces); the 1-bit file; the LoRA's adapter_model.safetensors.

Every delta perplexity is computed through the serving model (serving.models) with the deltas applied per
row exactly as the engine does: a SlotPool holds every delta form, and each window of text runs as ONE
mixed batch (one sequence per form: base rows with no slot, 1-bit rows with their slot, LoRA rows with
theirs; DeltaBatch built as the model runner builds it), prefill without a KV cache. The full fine-tune is
the serving model loaded from the fine-tune directory. So the figures measure what is served.

The text is tokenized with the base tokenizer, truncated to `max_tokens`, and cut into windows of `window`
tokens (each scored independently, a window's first token predicted by none).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakernels import select_delta_ops
from registry.compress import CompressOptions, check_pair, compress_pair, write_delta
from registry.deltas import Delta
from registry.distill import DistillConfig, DistillReport, distill_delta
from registry.loading import load_delta
from registry.slot_pool import SlotPool
from serving.models.attention import build_attention_batch
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import load_model, resolve_device
from serving.models.tenant_layers import DeltaBatch

GAIN_DEFINITION = "gain kept = (loss_base - loss_form) / (loss_base - loss_finetune), loss = mean next-token NLL (nats)"
SIZE_DEFINITION = "size: fine-tune projections in fp16; 1-bit delta file; LoRA adapter_model.safetensors"
DEFAULT_WINDOW = 256


@dataclass(frozen=True)
class FormResult:
    """One form's figures. gain_kept is None where undefined (see the module docstring)."""

    name: str
    label: str
    loss: float
    perplexity: float
    gain_kept: float | None
    top1_agreement: float
    size_bytes: int | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "gain_kept": self.gain_kept,
            "top1_agreement": self.top1_agreement,
            "size_bytes": self.size_bytes,
            "note": self.note,
        }


@dataclass(frozen=True)
class EvalReport:
    tokens: int  # predicted tokens
    windows: int
    window: int
    forms: list[FormResult]
    distill: DistillReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def form(self, name: str) -> FormResult:
        return next(f for f in self.forms if f.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "windows": self.windows,
            "window": self.window,
            "definitions": {"gain_kept": GAIN_DEFINITION, "size_bytes": SIZE_DEFINITION},
            "forms": {f.name: f.as_dict() for f in self.forms},
            "distill": self.distill.as_dict() if self.distill is not None else None,
            **self.extra,
        }

    def table(self) -> str:
        """The human-readable table, definitions included."""
        head = f"{'form':<24}{'perplexity':>12}{'gain kept':>12}{'top-1 agree':>13}{'size':>12}"
        lines = [f"{self.tokens} predicted tokens in {self.windows} window(s) of up to {self.window}", head, "-" * len(head)]
        for f in self.forms:
            gain = "n/a" if f.gain_kept is None else f"{100 * f.gain_kept:.1f}%"
            size = "-" if f.size_bytes is None else _human_bytes(f.size_bytes)
            lines.append(f"{f.label:<24}{f.perplexity:>12.3f}{gain:>12}{100 * f.top1_agreement:>12.1f}%{size:>12}")
        lines += ["", GAIN_DEFINITION, "top-1 agree = share of positions whose argmax equals the fine-tune's", SIZE_DEFINITION]
        if self.distill is not None:
            d = self.distill
            lines.append(
                f"distillation: {d.steps} steps, {d.loss} logit error {d.loss_before:.4g} -> {d.loss_after:.4g} "
                f"({d.kept} scales kept)"
            )
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive windows of at most `window` tokens; a trailing window of 1 token predicts nothing: dropped."""
    out = [list(ids[i : i + window]) for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


def delta_batch(pool: SlotPool, ops, bd_slots: Sequence[int], lora_slots: Sequence[int], lens: Sequence[int],
                 device: torch.device) -> DeltaBatch:  # fmt: skip
    """As the model runner builds it for a step (a scratch buffer of this batch's size: evaluation only)."""
    buf = torch.zeros(sum(lens), pool.max_lora_rank, dtype=torch.float32, device=device)
    return DeltaBatch.build(ops, pool, bd_slots, lora_slots, lens, buf, device)


@dataclass
class _Tally:
    nll: float = 0.0
    agree: int = 0
    count: int = 0


@torch.inference_mode()
def prefill_logits(
    model: LlamaForCausalLM, windows: list[list[int]], deltas: DeltaBatch | None, device: torch.device
) -> torch.Tensor:
    """[N, V] float32 logits of every position of the windows, run as one batch without a KV cache."""
    lens = [len(w) for w in windows]
    ids = torch.tensor([t for w in windows for t in w], dtype=torch.int64, device=device)
    attn = build_attention_batch(lens, lens, None, 1, device, model.config.sliding_window)
    hidden = model(ids, attn, deltas)
    return model.compute_logits(hidden, deltas)


def _score(logits: torch.Tensor, window: list[int], reference_top1: torch.Tensor | None, tally: _Tally) -> torch.Tensor:
    """Adds one window's NLL and top-1 agreement to `tally`; returns its top-1 tokens [L-1]."""
    target = torch.tensor(window[1:], dtype=torch.int64, device=logits.device)
    pred = logits[:-1]
    tally.nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
    top1 = pred.argmax(-1)
    if reference_top1 is not None:
        tally.agree += int((top1 == reference_top1).sum())
    tally.count += target.numel()
    return top1


@dataclass(frozen=True)
class _Form:
    """One form of the tenant's model that is scored on the base: a delta in a slot."""

    name: str
    label: str
    delta: Delta
    size: int | None  # bytes on disk
    note: str


def _forms(pair, options, delta_path, distill, calibration_text, lora_dir) -> tuple[list[_Form], DistillReport | None]:
    """The 1-bit delta computed now, the distilled (or given) one, the LoRA: loaded, with their sizes."""
    spec = pair.spec
    forms: list[_Form] = []
    report: DistillReport | None = None
    with tempfile.TemporaryDirectory(prefix="deltaserve-eval-") as tmp:
        delta = compress_pair(pair, options)
        before_path = Path(tmp) / "before.safetensors"
        write_delta(before_path, delta)
        forms.append(_Form("bitdelta", "1-bit (mean|Δ|)", load_delta(before_path, spec), before_path.stat().st_size,
                           f"{delta.metadata['scale_mode']} scales, computed on the fly"))  # fmt: skip
        after_path: Path | None = None
        note = ""
        if delta_path is not None:
            after_path = Path(delta_path)
            if not after_path.is_file():
                raise FileNotFoundError(f"no such 1-bit delta file: {after_path}")
            note = f"file {after_path.name}"
        elif distill is not None and distill.steps > 0:
            assert calibration_text is not None
            report = distill_delta(pair, delta, calibration_text, distill)
            after_path = Path(tmp) / "after.safetensors"
            write_delta(after_path, delta)
            note = f"distilled on the fly, {distill.steps} steps"
        if after_path is not None:
            after = load_delta(after_path, spec)
            if after.kind != "bitdelta":
                raise ValueError(f"{after_path} is not a 1-bit delta file")
            steps = after.metadata.get("distill_steps", "?")
            label = "1-bit (distilled)" if steps not in ("0", "?") else "1-bit (file)"
            forms.append(_Form("bitdelta_distilled", label, after, after_path.stat().st_size,
                               f"{note}; distill_steps={steps}"))  # fmt: skip
    if lora_dir is not None:
        lora = load_delta(lora_dir, spec)
        if lora.kind != "lora":
            raise ValueError(f"{lora_dir} is not a PEFT LoRA directory")
        size = (Path(lora_dir) / "adapter_model.safetensors").stat().st_size
        forms.append(_Form("lora", f"LoRA (r={lora.rank})", lora, size, ""))
    return forms, report


def _score_finetune(finetune_dir, windows, dtype, dev) -> tuple[_Tally, list[torch.Tensor]]:
    """The full fine-tune's scores and its top-1 tokens (the reference of agreement); the model is freed."""
    ft_model = load_model(finetune_dir, dtype, dev)
    ft_model.bind_kv_cache(None)
    tally = _Tally()
    top1 = [_score(prefill_logits(ft_model, [w], None, dev), w, None, tally) for w in windows]
    tally.agree = tally.count
    return tally, top1


def _score_forms(base_dir, forms: list[_Form], windows, reference, dtype, dev, kernel_backend) -> list[_Tally]:
    """Scores the base (tally 0) and every form (tally 1..) in one batch per window, each row in its own slot."""
    model = load_model(base_dir, dtype, dev)
    model.bind_kv_cache(None)
    n_bd = sum(1 for f in forms if f.delta.kind == "bitdelta")
    loras = [f.delta for f in forms if f.delta.kind == "lora"]
    max_rank = max((d.rank for d in loras), default=1)  # type: ignore[union-attr]
    ops = select_delta_ops(kernel_backend, dev)
    pool = SlotPool(model.projection_paths(), dict(model.state_dict()), bitdelta_slots=n_bd, lora_slots=len(loras),
                    max_lora_rank=max_rank, dtype=dtype, device=dev, sign_layout=ops.sign_layout)  # fmt: skip
    bd_slots, lora_slots = [-1], [-1]  # row 0 of every batch: the base
    for f in forms:
        pool.check_servable(f.delta)
        slot = pool.acquire(f.delta)
        assert slot is not None
        bd_slots.append(slot if f.delta.kind == "bitdelta" else -1)
        lora_slots.append(slot if f.delta.kind == "lora" else -1)
    tallies = [_Tally() for _ in bd_slots]
    for w, ref in zip(windows, reference):
        deltas = delta_batch(pool, ops, bd_slots, lora_slots, [len(w)] * len(bd_slots), dev)
        logits = prefill_logits(model, [w] * len(bd_slots), deltas, dev)
        for j, tally in enumerate(tallies):
            _score(logits[j * len(w) : (j + 1) * len(w)], w, ref, tally)
    return tallies


def evaluate(
    base_dir: str | os.PathLike[str],
    finetune_dir: str | os.PathLike[str],
    text: str,
    *,
    delta_path: str | os.PathLike[str] | None = None,
    lora_dir: str | os.PathLike[str] | None = None,
    distill: DistillConfig | None = None,
    calibration_text: str | None = None,
    options: CompressOptions | None = None,
    max_tokens: int = 4096,
    window: int | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    kernel_backend: str = "auto",
) -> EvalReport:
    """Evaluates the forms of one tenant (see the module docstring) on `text`.

    delta_path: a 1-bit delta file, the "after distillation" form (any file of this base; its metadata
    says how it was made). Otherwise, with `distill` (steps > 0) and `calibration_text`, the delta is
    distilled on the fly. options: how the on-the-fly 1-bit delta is compressed (scale mode, other tensors).
    dtype: None = float32 (the figures should not depend on the serving dtype's rounding).
    Raises CompressError / DeltaError for a mismatched pair or delta, ValueError for bad arguments or a
    text of fewer than 2 tokens.
    """
    if delta_path is not None and distill is not None and distill.steps > 0:
        raise ValueError("give a 1-bit delta file or distillation settings, not both")
    if distill is not None and distill.steps > 0 and not calibration_text:
        raise ValueError("distillation on the fly needs calibration text")
    if max_tokens < 2:
        raise ValueError("max_tokens must be >= 2")
    dev = resolve_device(device)
    dtype = dtype or torch.float32
    pair = check_pair(base_dir, finetune_dir)
    windows, window = _text_windows(base_dir, pair, text, max_tokens, window)

    forms, report = _forms(pair, options, delta_path, distill, calibration_text, lora_dir)
    ft_tally, ft_top1 = _score_finetune(finetune_dir, windows, dtype, dev)
    tallies = _score_forms(base_dir, forms, windows, ft_top1, dtype, dev, kernel_backend)
    return EvalReport(
        tokens=tallies[0].count,
        windows=len(windows),
        window=window,
        forms=_form_results(pair.spec, forms, tallies, ft_tally),
        distill=report,
        extra={"base": str(base_dir), "finetune": str(finetune_dir)},
    )


def _text_windows(base_dir, pair, text: str, max_tokens: int, window: int | None) -> tuple[list[list[int]], int]:
    """The evaluation text's first max_tokens tokens cut into windows of `window` tokens (at most the base's
    context), and that window length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    ids = tokenizer(text).input_ids[:max_tokens]
    window = window or DEFAULT_WINDOW
    max_pos = int(pair.base.config.get("max_position_embeddings", window))
    window = max(2, min(window, max_pos))
    windows = _windows(ids, window)
    if not windows:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    return windows, window


def _form_results(spec, forms: list, tallies: list[_Tally], ft_tally: _Tally) -> list[FormResult]:
    """One FormResult per form: the base (tallies[0]), the fine-tune, then `forms` (tallies[1:]); the gain kept
    is measured on the base-to-fine-tune loss gap."""
    loss_base = tallies[0].nll / tallies[0].count
    gap = loss_base - ft_tally.nll / ft_tally.count

    def result(name: str, label: str, tally: _Tally, size: int | None, note: str = "") -> FormResult:
        loss = tally.nll / tally.count
        gain = (loss_base - loss) / gap if gap > 1e-6 else None
        return FormResult(name, label, loss, math.exp(loss), gain, tally.agree / tally.count, size, note)

    ft_bytes = sum(out * inp * 2 for out, inp in (spec.projection_shape(p) for p in spec.projections))
    results = [
        result("base", "base", tallies[0], None),
        result("finetune", "fine-tune", ft_tally, ft_bytes, "projections in float16"),
    ]
    return results + [result(f.name, f.label, tally, f.size, f.note) for f, tally in zip(forms, tallies[1:])]


def merge_lora(base_dir: str | os.PathLike[str], lora_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Writes the full fine-tune a LoRA stands for, W + scaling * B @ A for every target projection, in the
    base's storage dtype (config.json + model.safetensors). For tenants trained as LoRAs, whose fine-tune is
    that merge. Streams one tensor at a time from the base."""
    import shutil

    from registry.checkpoint import Checkpoint
    from registry.fingerprint import base_spec
    from registry.lora_format import load_lora_dir
    from registry.safetensors_io import write_safetensors_atomic

    ckpt = Checkpoint(base_dir)
    lora = load_lora_dir(lora_dir, base_spec(ckpt))
    tensors = {}
    for name in ckpt.names():
        t = ckpt.get(name)
        entry = lora.weights.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if entry is not None:
            a, b = entry  # [r, in], [out, r]
            t = (t.float() + lora.scaling * (b @ a)).to(t.dtype)
        tensors[name] = t
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(base_dir) / "config.json", out / "config.json")
    write_safetensors_atomic(out / "model.safetensors", tensors, {"format": "pt"})
