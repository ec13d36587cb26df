"""Identity of a base model's weights, and the BaseSpec that deltas are checked against.

The fingerprint names the base WEIGHTS, cheaply (three rows per tensor are read, never whole tensors),
and independently of the dtype the weights are served in: an fp32 checkpoint and its bf16 copy
(round-to-nearest, as `tensor.to(torch.bfloat16)` makes it) get the same fingerprint. An fp16 copy
generally does not: rounding to fp16 and then to bf16 differs from rounding to bf16 directly for some values.

Definition (version 1): sha256 over, for every tensor in sorted name order,
    b"<name>\0" + b"<shape, comma-separated>\0" + sample
where sample = rows 0, shape[0] // 2 and shape[0] - 1 of dim 0 (distinct, ascending; the whole tensor if
0-d; nothing if empty), each row flattened and, when wider than 1024, subsampled at the indices
i * (width - 1) // 1023 for i < 1024; the values converted to float32, rounded to bfloat16 and hashed as
little-endian 2-byte words. The result is "sha256:" + hex digest.

1-bit delta files record this fingerprint, so the definition must never change silently: a new definition
needs a new prefix (e.g. "sha256v2:").
"""

from __future__ import annotations

import hashlib
import re

import torch

from registry.checkpoint import Checkpoint, tie_word_embeddings
from registry.deltas import BaseSpec
from registry.errors import DeltaError

FINGERPRINT_PREFIX = "sha256:"
_VALUES_PER_ROW = 1024
_PROJECTION_RE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def _sample_rows(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1}) if n > 0 else []


def _sample_bytes(rows: torch.Tensor) -> bytes:
    """Per row: at most _VALUES_PER_ROW evenly spaced values, float32 -> bfloat16, little-endian bytes."""
    flat = rows.reshape(rows.shape[0], -1) if rows.dim() > 0 else rows.reshape(1, 1)
    width = flat.shape[1]
    if width > _VALUES_PER_ROW:
        # integer arithmetic only: the sample must never depend on floating-point details of a torch version
        idx = torch.tensor([i * (width - 1) // (_VALUES_PER_ROW - 1) for i in range(_VALUES_PER_ROW)])
        flat = flat[:, idx]
    bf16 = flat.to(torch.float32).to(torch.bfloat16).contiguous()
    return bf16.view(torch.int16).numpy().astype("<i2").tobytes()


def fingerprint_checkpoint(ckpt: Checkpoint) -> str:
    """The base weights' fingerprint, "sha256:<hex>" (definition in the module docstring)."""
    h = hashlib.sha256()
    for name in ckpt.names():
        info = ckpt.info(name)
        h.update(name.encode("utf-8") + b"\0")
        h.update(",".join(str(d) for d in info.shape).encode("ascii") + b"\0")
        if info.numel == 0:
            continue
        rows = ckpt.get_rows(name, _sample_rows(info.shape[0]) if info.shape else [])
        h.update(_sample_bytes(rows))
    return FINGERPRINT_PREFIX + h.hexdigest()


def base_spec(ckpt: Checkpoint) -> BaseSpec:
    """The BaseSpec of a checkpoint: fingerprint, tensors (name -> (shape, dtype on disk)) from the headers,
    the attention/MLP projection module paths present (`model.layers.N.self_attn.{q,k,v,o}_proj`,
    `model.layers.N.mlp.{gate,up,down}_proj` with a 2-D `.weight`), and tie_word_embeddings.

    `tensors` holds the served model's tensors only (Checkpoint.served_names: no rotary buffers, no stored copy
    of a tied lm_head).
    """
    tied = tie_word_embeddings(ckpt.config)
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in ckpt.served_names():
        info = ckpt.info(name)
        tensors[name] = (info.shape, info.dtype)
    projections = frozenset(
        name[: -len(".weight")]
        for name, (shape, _) in tensors.items()
        if name.endswith(".weight") and len(shape) == 2 and _PROJECTION_RE.fullmatch(name[: -len(".weight")])
    )
    return BaseSpec(
        fingerprint=fingerprint_checkpoint(ckpt),
        tensors=tensors,
        projections=projections,
        tie_word_embeddings=tied,
    )


def check_matches_base(spec: BaseSpec, finetune: Checkpoint, error: type[DeltaError]) -> list[str]:
    """Checks that a full fine-tune has exactly the served base's tensors: the same tied embeddings, no tensor
    missing or extra, the same shapes, floating point. Raises `error` (param: the tensor or config.json)
    naming what differs; returns the served tensor names, sorted. Reads headers and config.json only."""
    tied = tie_word_embeddings(finetune.config)
    if tied != spec.tie_word_embeddings:
        raise error(f"config.json: tie_word_embeddings is {tied}, the base's is {spec.tie_word_embeddings}",
                    param="config.json")  # fmt: skip
    names = finetune.served_names()
    missing, extra = sorted(set(spec.tensors) - set(names)), sorted(set(names) - set(spec.tensors))
    if missing:
        raise error(f"the fine-tune lacks {len(missing)} tensor(s) of the base: {_listing(missing)}", param=missing[0])
    if extra:
        raise error(f"the fine-tune has {len(extra)} tensor(s) the base lacks: {_listing(extra)}", param=extra[0])
    for name in names:
        info, (shape, dtype) = finetune.info(name), spec.tensors[name]
        if info.shape != shape:
            raise error(f"tensor {name} has shape {list(info.shape)} in the fine-tune, {list(shape)} in the base",
                        param=name)  # fmt: skip
        if not (info.dtype.is_floating_point and dtype.is_floating_point):
            raise error(f"tensor {name} is not floating point ({dtype} in the base, {info.dtype} in the fine-tune)",
                        param=name)  # fmt: skip
    return names


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
