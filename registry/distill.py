"""Scale distillation (BitDelta, Liu et al. 2024, §3.2): train ONLY the 1-bit delta's scales so that the
compressed model's logits match the fine-tune's on calibration text.

Teacher: the full fine-tune (transformers' AutoModelForCausalLM of the fine-tune directory), frozen.
Student: the base (transformers model of the base directory) with the delta's replacements copied in and,
on every compressed projection, the weight parametrized as

    W(scale) = W_base + scale[:, None] * unpack(sign)        (scale [1] or [out]: the only trainable tensors)

The signs stay packed (1 bit each); they are unpacked inside the forward and again in the backward
(`_SignScaleAdd`), so no unpacked sign matrix is kept alive between steps.

Loss: by default the mean squared error between the student's and the teacher's logits over every position
of the calibration chunks (the paper's objective). MSE on logits matches the whole logit vector, the
fine-tune's full distribution, not only its top tokens, and its gradients do not vanish where the softmax
saturates. "kl" (KL(teacher || student) per position, averaged) is offered too: it is what perplexity
measures, but it ignores per-position logit shifts and is flatter where both models are confident.

Calibration text is tokenized with the BASE tokenizer and cut into chunks of `seq_len` tokens; each step
takes the next `batch_size` chunks (cycling); Adam, constant learning rate. The logit error over all chunks
is measured before and after; if training did not lower it (e.g. a learning rate too high), the initial
scales (mean|delta|) are kept and the report says so.

Memory: distillation needs the teacher and the student in memory at once, and the backward pass keeps each
layer's effective weights: about three copies of the model. That is fine on a GPU or for small models;
streaming compression without distillation (registry.compress) never needs a whole model in memory.
On CUDA the models run in bfloat16 (scales and their optimizer stay float32); on the CPU in float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from formats.signs import unpack_signs

if TYPE_CHECKING:
    from registry.compress import CheckedPair, CompressedDelta

LOSSES = ("mse", "kl")


@dataclass(frozen=True)
class DistillConfig:
    """steps: optimizer steps (0 = no distillation). lr: Adam learning rate. seq_len: tokens per chunk.
    batch_size: chunks per step. loss: "mse" (logits, default) or "kl". device: cpu | cuda, where it runs
    (the caller resolves "auto" and checks that CUDA is there: serving.models.loader.resolve_device).
    dtype: None = float32 on the CPU, bfloat16 on CUDA."""

    steps: int = 200
    lr: float = 1e-4
    seq_len: int = 128
    batch_size: int = 4
    loss: str = "mse"
    device: str = "cpu"
    dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("distill steps must be >= 0")
        if not self.lr > 0:
            raise ValueError("distill learning rate must be > 0")
        if self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"distill loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"distill device must be cpu or cuda, not {self.device!r}")


@dataclass(frozen=True)
class DistillReport:
    """loss_before / loss_after: the logit error (`loss`) over all calibration chunks with the initial
    scales and with the returned ones. kept: "distilled", or "initial" when training did not lower it."""

    steps: int
    loss: str
    loss_before: float
    loss_after: float
    kept: str
    chunks: int
    tokens: int
    lr: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _SignScaleAdd(torch.autograd.Function):
    """W + scale[:, None] * unpack(sign), with the gradient for `scale` only; the sign is re-unpacked in
    the backward instead of being saved."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(sign, scale)
        ctx.in_features = weight.shape[1]
        s = unpack_signs(sign, weight.shape[1], torch.float32)
        return (weight.float() + scale.view(-1, 1) * s).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        sign, scale = ctx.saved_tensors
        s = unpack_signs(sign, ctx.in_features, torch.float32)
        g = (grad.float() * s).sum(dim=1)  # [out]
        g_scale = g if scale.numel() == g.numel() else g.sum().reshape(1)
        return None, None, g_scale.to(scale.dtype)


class SignScale(nn.Module):
    """The parametrization W -> W + scale * sign of one projection; `scale` is its only parameter."""

    def __init__(self, sign: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("sign", sign, persistent=False)
        self.scale = nn.Parameter(scale.detach().clone().float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _SignScaleAdd.apply(weight, self.sign, self.scale)


def calibration_chunks(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """[n, L] int64: the text's tokens (base tokenizer, special tokens as the tokenizer adds them) in
    consecutive chunks of seq_len; a text shorter than seq_len gives one chunk of all its tokens; a trailing
    partial chunk is dropped. Raises ValueError for a text of fewer than 2 tokens."""
    ids = tokenizer(text).input_ids
    if len(ids) < 2:
        raise ValueError("the calibration text has fewer than 2 tokens")
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.int64)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """student, teacher: [B, L, V] logits. "mse": mean over all entries of (s - t)^2. "kl": mean over
    positions of KL(softmax(t) || softmax(s))."""
    s, t = student.float(), teacher.float()
    if loss == "mse":
        return F.mse_loss(s, t)
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def logit_error(student: nn.Module, teacher: nn.Module, chunks: torch.Tensor, loss: str, batch_size: int) -> float:
    """The mean logit error over all chunks (each batch weighted by its chunk count)."""
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        ids = chunks[start : start + batch_size]
        total += float(logit_loss(_logits(student, ids), _logits(teacher, ids), loss)) * ids.shape[0]
        count += ids.shape[0]
    return total / count


def _load_hf(model_dir: os.PathLike[str] | str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_student(
    base_dir: os.PathLike[str] | str,
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]],
    replacements: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[nn.Module, dict[str, SignScale]]:
    """The base with the replacements copied in and every compressed projection parametrized; returns the
    model and P -> its SignScale (whose `.scale` are the trainable parameters)."""
    model = _load_hf(base_dir, dtype, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in replacements.items():
            params[name].copy_(tensor.to(device=device, dtype=dtype))
    scales: dict[str, SignScale] = {}
    for path, (sign, scale) in projections.items():
        module = model.get_submodule(path)
        p = SignScale(sign.to(device), scale.to(device))
        parametrize.register_parametrization(module, "weight", p)
        scales[path] = p
    return model, scales


def _train(student, teacher, scales, chunks: torch.Tensor, config: DistillConfig, bs: int, progress) -> None:
    """config.steps Adam steps on the scales (signs fixed), cycling through the calibration chunks."""
    import sys

    from tqdm import tqdm

    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam([s.scale for s in scales.values()], lr=config.lr)
    n = chunks.shape[0]
    bar = tqdm(total=config.steps, desc="distill", unit="step", disable=not sys.stderr.isatty(), leave=False)
    for step in range(config.steps):
        rows = [(step * bs + i) % n for i in range(bs)]
        ids = chunks[rows]
        with torch.no_grad():
            target = _logits(teacher, ids)
        loss = logit_loss(_logits(student, ids), target, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # a scale is a magnitude: keep it >= 0 (a negative one would flip every sign)
            for s in scales.values():
                s.scale.clamp_(min=0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        if progress is not None:
            progress((step + 1) / config.steps)
    bar.close()


def distill_scales(
    base_dir: os.PathLike[str] | str,
    finetune_dir: os.PathLike[str] | str,
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]],
    replacements: dict[str, torch.Tensor],
    calibration_text: str,
    config: DistillConfig,
    *,
    progress: Callable[[float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], DistillReport]:
    """Trains the scales of `projections` (signs fixed) against the fine-tune's logits.

    Returns (P -> new scale, float32 CPU, same shape as given; the report). The inputs are not modified.
    """
    from transformers import AutoTokenizer

    device = torch.device(config.device)
    dtype = config.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    chunks = calibration_chunks(tokenizer, calibration_text, config.seq_len).to(device)
    teacher = _load_hf(finetune_dir, dtype, device)
    student, scales = build_student(base_dir, projections, replacements, dtype, device)
    initial = {p: s.scale.detach().clone() for p, s in scales.items()}
    bs = min(config.batch_size, chunks.shape[0])
    before = logit_error(student, teacher, chunks, config.loss, bs)

    _train(student, teacher, scales, chunks, config, bs, progress)

    after = logit_error(student, teacher, chunks, config.loss, bs) if config.steps else before
    kept = "distilled"
    if not after < before or not math.isfinite(after):
        kept, after = "initial", before
        result = {p: t.float().cpu() for p, t in initial.items()}
    else:
        result = {p: s.scale.detach().float().cpu().contiguous() for p, s in scales.items()}
    report = DistillReport(
        steps=config.steps,
        loss=config.loss,
        loss_before=before,
        loss_after=after,
        kept=kept,
        chunks=int(chunks.shape[0]),
        tokens=int(chunks.numel()),
        lr=config.lr,
    )
    return result, report


def distill_delta(
    pair: CheckedPair,
    delta: CompressedDelta,
    calibration_text: str,
    config: DistillConfig,
    *,
    progress: Callable[[float], None] | None = None,
) -> DistillReport:
    """Distils `delta`'s scales in place (registry.compress's in-memory delta) and records the run in its
    metadata (distill_steps, distill_loss, distill_loss_before, distill_loss_after, distill_kept)."""
    scales, report = distill_scales(
        pair.base.path, pair.finetune.path, delta.projections, delta.replacements, calibration_text, config,
        progress=progress,
    )  # fmt: skip
    for path, scale in scales.items():
        sign, _ = delta.projections[path]
        delta.projections[path] = (sign, scale)
    delta.metadata.update(
        {
            "distill_steps": str(report.steps),
            "distill_loss": report.loss,
            "distill_lr": repr(report.lr),
            "distill_loss_before": repr(report.loss_before),
            "distill_loss_after": repr(report.loss_after),
            "distill_kept": report.kept,
            "distill_tokens": str(report.tokens),
        }
    )
    return report
