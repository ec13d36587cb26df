"""BitDelta compression: a full fine-tune of the base -> a 1-bit delta file (CONTRACT §4), streaming.

For every attention and MLP projection P of the base (`model.layers.N.self_attn.{q,k,v,o}_proj`,
`model.layers.N.mlp.{gate,up,down}_proj`):

    delta = W_ft - W_base                        (float32)
    P.sign  = pack_signs(delta > 0)              (uint8 [out, ceil(in/8)]; delta == 0 counts as -1)
    P.scale = mean |delta|                       float32 [1]    ("per-matrix", the BitDelta paper's default)
            | mean |delta| over each row         float32 [out]  ("per-row")

mean|delta| is the scale that minimises ||delta - scale * sign(delta)||_F (per matrix, or per row). Scale
distillation (registry.distill) can then tune the scales on calibration text.

Tensors that are not projections (norms, embeddings, lm_head, biases) cannot be written as sign + scale in
the format; when the fine-tune changed them they are stored as replacements, under a policy:

- "exact" (the default): stored as the fine-tune stores them (same dtype, bit for bit). The served tenant is
  then exactly W_base + scale * sign on the projections and the fine-tune everywhere else.
- "half": stored in 16 bits (float16 if the fine-tune stores float16, else bfloat16), and a tensor whose
  relative change ||W_ft - W_base||_F / ||W_base||_F is below `negligible` (1e-3) is left out (the base's is used).

Why "exact" is the default. Measured with `deltaserve eval` (serving.evaluation) on a demo-like tiny Llama
(4 layers, hidden 128, untied embeddings, byte-level BPE of 320 tokens) pre-trained on English prose and
fully fine-tuned on Python source (every tensor changed), held-out Python text, per-matrix scales:

    checkpoint   policy   1-bit file   gain kept   perplexity (base 36.56, fine-tune 13.96)
    float32      exact    413,112 B    89.53 %     15.441
    float32      half     246,752 B    89.54 %     15.441
    float16      exact    246,744 B    89.52 %     15.443
    float16      half     246,744 B    89.52 %     15.443

"half" only pays off for float32 checkpoints (it halves their replacement bytes: -40 % of this file), at no
measurable cost; for 16-bit checkpoints (nearly all real ones, and the demo's) both policies write the same
file. "exact" keeps a simple, checkable meaning (the tenant IS
the fine-tune outside the projections, bit for bit, which tests compare against `transformers` in float32),
so it is the default; "half" is there when file size matters. The GPU cost of a replacement is the same
either way (a replacement pool holds the served dtype). Identical tensors are never stored in either policy.

Streaming: base and fine-tune are read one tensor at a time through `Checkpoint` (safetensors, memory
mapped); at most one tensor of each (plus its difference) is held in full precision at a time; the packed
signs (1/16 of fp16 size) and the replacements are kept until the single atomic write at the end. Every
check (architecture, config, tokenizer vocabulary, tensor names and shapes, missing shards, finite values)
happens before anything is written; on error nothing is written.

Distillation (optional) needs the base and the fine-tune in memory at once (registry.distill).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from formats.signs import pack_signs
from registry.bitdelta_format import save_bitdelta_file
from registry.checkpoint import Checkpoint
from registry.deltas import BaseSpec
from registry.errors import DeltaError
from registry.fingerprint import base_spec, check_matches_base
from registry.model_config import ModelConfig, UnsupportedModel

if TYPE_CHECKING:
    from registry.distill import DistillConfig, DistillReport

SCALE_MODES = ("per-matrix", "per-row")
OTHER_TENSOR_MODES = ("exact", "half")
NEGLIGIBLE_REL_CHANGE = 1e-3

# ModelConfig fields that must agree between base and fine-tune: they decide what the weights compute.
# (Not compared: max_position_embeddings, bos/eos ids, the checkpoint dtype, the name.)
_CONFIG_FIELDS = (
    "architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "rms_norm_eps", "rope", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "sliding_window",
    "qk_norm", "hidden_act", "query_scale", "layer_windows", "local_rope", "final_logit_softcap",
)  # fmt: skip


class CompressError(DeltaError):
    """A fine-tune that cannot be compressed against this base (code adapter_mismatch); nothing was written."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, code="adapter_mismatch", param=param)


@dataclass(frozen=True)
class CompressOptions:
    """scale: "per-matrix" (scale [1]) or "per-row" (scale [out]).
    other_tensors: "exact" or "half" (see the module docstring).
    negligible: relative Frobenius change below which "half" leaves a non-projection tensor out."""

    scale: str = "per-matrix"
    other_tensors: str = "exact"
    negligible: float = NEGLIGIBLE_REL_CHANGE

    def __post_init__(self) -> None:
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {', '.join(SCALE_MODES)}, not {self.scale!r}")
        if self.other_tensors not in OTHER_TENSOR_MODES:
            raise ValueError(f"other_tensors must be one of {', '.join(OTHER_TENSOR_MODES)}, not {self.other_tensors!r}")
        if not self.negligible >= 0:
            raise ValueError("negligible must be >= 0")


@dataclass
class CompressedDelta:
    """A 1-bit delta in memory, before it is written.

    projections:  P -> (sign uint8 [out, ceil(in/8)], scale float32 [1] or [out]), CPU.
    replacements: NAME -> tensor that replaces the base tensor (dtype as stored in the file).
    identical:    tensors equal in base and fine-tune (not stored).
    negligible:   tensors that changed, below the "half" threshold (not stored).
    """

    projections: dict[str, tuple[torch.Tensor, torch.Tensor]]
    replacements: dict[str, torch.Tensor]
    base_fingerprint: str
    metadata: dict[str, str]
    identical: list[str] = field(default_factory=list)
    negligible: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.projections.values() for t in pair] + list(self.replacements.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class CompressResult:
    path: Path
    sha256: str
    size_bytes: int
    num_projections: int
    replacements: list[str]
    identical: list[str]
    negligible: list[str]
    metadata: dict[str, str]
    distill: DistillReport | None = None


@dataclass(frozen=True)
class CheckedPair:
    """A base and a fine-tune that passed every check of `check_pair`."""

    base: Checkpoint
    finetune: Checkpoint
    spec: BaseSpec
    names: list[str]  # the tensors to compare (base state-dict names, tied lm_head copies and buffers left out)


# ---- checks ---------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike[str], role: str) -> Checkpoint:
    try:
        return Checkpoint(path)
    except DeltaError as e:
        raise CompressError(f"{role} {path}: {e.message}", param=e.param) from None


def _model_config(ckpt: Checkpoint, role: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(ckpt.config)
    except (UnsupportedModel, KeyError, TypeError, ValueError) as e:
        detail = f"config.json lacks {e}" if isinstance(e, KeyError) else str(e)
        raise CompressError(f"{role} {ckpt.path}: {detail}", param="config.json") from None


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """token -> id of tokenizer.json (model vocabulary and added tokens); None without a readable one."""
    try:
        tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(tok, dict):
        return None
    vocab: dict[str, int] = {}
    model_vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update({str(k): int(v) for k, v in model_vocab.items() if isinstance(v, int)})
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
        vocab.update({str(p[0]): i for i, p in enumerate(model_vocab) if isinstance(p, list) and p})
    for t in tok.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), int):
            vocab[str(t.get("content"))] = t["id"]
    return vocab


def check_pair(base_dir: str | os.PathLike[str], finetune_dir: str | os.PathLike[str]) -> CheckedPair:
    """Opens both directories and checks that the fine-tune is a fine-tune OF this base, reading headers
    and config files only (plus three rows per base tensor for the fingerprint).

    Raises CompressError (the message names what differs) for: a directory that is not a valid HF
    safetensors checkpoint (missing config, missing or unlisted shard, pickle only, ...); an unsupported
    architecture; different architectures or configs (vocab size, hidden sizes, layers, heads, RoPE, norm
    eps, biases, tied embeddings, sliding window); different tokenizer vocabularies (when both have a
    tokenizer.json); tensors in one and not the other; a tensor with another shape; a non-float tensor.
    """
    base = _open(base_dir, "base")
    ft = _open(finetune_dir, "fine-tune")
    base_cfg, ft_cfg = _model_config(base, "base"), _model_config(ft, "fine-tune")
    if base_cfg.architecture != ft_cfg.architecture:
        raise CompressError(
            f"different architectures: the base is {base_cfg.architecture}, the fine-tune is {ft_cfg.architecture}",
            param="config.json",
        )
    known = {f.name for f in fields(base_cfg)}
    for name in _CONFIG_FIELDS:
        assert name in known, name
        a, b = getattr(base_cfg, name), getattr(ft_cfg, name)
        if a != b:
            raise CompressError(
                f"the fine-tune's config differs from the base's: {name} is {b!r}, the base has {a!r}",
                param="config.json",
            )
    base_vocab, ft_vocab = _tokenizer_vocab(base.path), _tokenizer_vocab(ft.path)
    if base_vocab is not None and ft_vocab is not None and base_vocab != ft_vocab:
        diff = sorted(set(base_vocab.items()) ^ set(ft_vocab.items()))
        raise CompressError(
            f"the fine-tune's tokenizer vocabulary differs from the base's ({len(diff)} token/id pairs differ, "
            f"e.g. {diff[0][0]!r} -> {diff[0][1]}); a 1-bit delta is served with the base tokenizer",
            param="tokenizer.json",
        )
    spec = base_spec(base)
    names = check_matches_base(spec, ft, CompressError)
    return CheckedPair(base=base, finetune=ft, spec=spec, names=names)


# ---- the streaming pass -----------------------------------------------------------------------------------


def _half_dtype(stored: torch.dtype) -> torch.dtype:
    return torch.float16 if stored == torch.float16 else torch.bfloat16


def _compress_one(
    pair: CheckedPair, name: str, is_projection: bool, options: CompressOptions
) -> tuple[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None]:
    """One tensor: ("identical" | "negligible", None), ("projection", (sign, scale)) or ("replacement", tensor).
    The full-precision tensors read here are freed on return."""
    w_base = pair.base.get(name, torch.float32)
    w_ft = pair.finetune.get(name, torch.float32)
    if torch.equal(w_base, w_ft):
        return "identical", None
    if is_projection:
        delta = w_ft.sub_(w_base)  # in place: w_ft's memory now holds the difference
        del w_base
        if not bool(torch.isfinite(delta).all()):
            raise CompressError(f"tensor {name}: the fine-tune minus the base holds NaN or Inf", param=name)
        sign = pack_signs(delta > 0)
        magnitude = delta.abs_()
        if options.scale == "per-row":
            scale = magnitude.mean(dim=1, dtype=torch.float32)
        else:
            scale = magnitude.mean(dtype=torch.float32).reshape(1)
        return "projection", (sign, scale.contiguous())
    if not bool(torch.isfinite(w_ft).all()):
        raise CompressError(f"tensor {name} of the fine-tune holds NaN or Inf", param=name)
    stored = pair.finetune.info(name).dtype
    if options.other_tensors == "exact":
        return "replacement", w_ft.to(stored)
    rel = float((w_ft - w_base).norm()) / max(float(w_base.norm()), 1e-30)
    if rel < options.negligible:
        return "negligible", None
    return "replacement", w_ft.to(_half_dtype(stored))


def compress_pair(
    pair: CheckedPair,
    options: CompressOptions | None = None,
    *,
    progress: Callable[[float], None] | None = None,
) -> CompressedDelta:
    """The 1-bit delta of a checked pair, in memory (nothing is written). Streams one tensor at a time.

    progress: called with the fraction done (0..1) after each tensor. A tqdm bar is shown on stderr when
    it is a terminal. Raises CompressError for non-finite fine-tune values, or a fine-tune identical to the base.
    """
    from tqdm import tqdm

    options = options or CompressOptions()
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    identical: list[str] = []
    negligible: list[str] = []
    proj_weights = {p + ".weight" for p in pair.spec.projections}
    total = len(pair.names)
    bar = tqdm(total=total, desc="compress", unit="tensor", disable=not sys.stderr.isatty(), leave=False)
    try:
        for i, name in enumerate(pair.names):
            kind, tensor = _compress_one(pair, name, name in proj_weights, options)
            if kind == "identical":
                identical.append(name)
            elif kind == "negligible":
                negligible.append(name)
            elif kind == "projection":
                assert isinstance(tensor, tuple)
                projections[name[: -len(".weight")]] = tensor
            else:
                assert isinstance(tensor, torch.Tensor)
                replacements[name] = tensor
            bar.update(1)
            if progress is not None:
                progress((i + 1) / total)
    finally:
        bar.close()
    if not projections and not replacements:
        raise CompressError("the fine-tune is identical to the base (or differs only negligibly): nothing to compress")
    metadata = {
        "scale_mode": options.scale,
        "other_tensors": options.other_tensors,
        "distill_steps": "0",
        "source_base": pair.base.path.resolve().name,
        "source_finetune": pair.finetune.path.resolve().name,
        "architecture": str(pair.base.config.get("architectures", ["?"])[0]),
        "created_by": "deltaserve compress",
    }
    return CompressedDelta(projections, replacements, pair.spec.fingerprint, metadata, identical, negligible)


def write_delta(out: str | os.PathLike[str], delta: CompressedDelta) -> str:
    """Writes the delta atomically (CONTRACT §4); returns the file's hex sha256."""
    return save_bitdelta_file(out, delta.projections, delta.replacements, delta.base_fingerprint, delta.metadata)


def compress(
    base_dir: str | os.PathLike[str],
    finetune_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: CompressOptions | None = None,
    *,
    distill: DistillConfig | None = None,
    calibration_text: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> CompressResult:
    """`deltaserve compress`: checks, compresses (streaming), optionally distils the scales, writes `out`
    atomically. Raises CompressError (or ValueError for bad options) before writing anything.

    distill: when given with steps > 0, `calibration_text` is required; the scales are distilled
    (registry.distill.distill_scales: both models in memory) before the write.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise CompressError(f"--out {out}: directory {out.parent} does not exist", param=str(out))
    if out.is_dir():
        raise CompressError(f"--out {out} is a directory", param=str(out))
    if distill is not None and distill.steps > 0 and not calibration_text:
        raise CompressError("scale distillation needs calibration text (--calibration FILE)")
    pair = check_pair(base_dir, finetune_dir)
    distilling = distill is not None and distill.steps > 0
    share = 0.3 if distilling else 0.8  # of the progress: distillation's steps take most of the time
    delta = compress_pair(pair, options, progress=(lambda f: progress(share * f)) if progress else None)
    report = None
    if distilling:
        from registry.distill import distill_delta

        assert calibration_text is not None and distill is not None
        report = distill_delta(pair, delta, calibration_text, distill,
                               progress=(lambda f: progress(share + (0.95 - share) * f)) if progress else None)  # fmt: skip
    sha = write_delta(out, delta)
    if progress is not None:
        progress(1.0)
    return CompressResult(
        path=out,
        sha256=sha,
        size_bytes=out.stat().st_size,
        num_projections=len(delta.projections),
        replacements=sorted(delta.replacements),
        identical=delta.identical,
        negligible=delta.negligible,
        metadata=dict(delta.metadata),
        distill=report,
    )


def describe(result: CompressResult) -> dict[str, Any]:
    """A JSON-able summary of a compression (for the CLI)."""
    d: dict[str, Any] = {
        "out": str(result.path),
        "sha256": result.sha256,
        "size_bytes": result.size_bytes,
        "projections": result.num_projections,
        "replacements": result.replacements,
        "identical": len(result.identical),
        "negligible": result.negligible,
        "scale_mode": result.metadata.get("scale_mode"),
    }
    if result.distill is not None:
        d["distill"] = result.distill.as_dict()
    return d
