"""1-bit delta files (`deltaserve.bitdelta` v1, CONTRACT §4): strict loading and atomic saving.

One safetensors file. Metadata: {"format": "deltaserve.bitdelta", "version": "1", "base": <fingerprint>}
plus free-form extras. For each compressed projection P (module path of the base, e.g.
"model.layers.0.mlp.down_proj"): `P.sign` uint8 [out, ceil(in/8)] (bit j of byte k = column 8k+j,
1 = +1, 0 = -1, padding bits 0) and `P.scale` float32 [out] or [1]; W' = W + scale[:, None] * (2*bits - 1).
Every other tensor NAME replaces the base tensor NAME exactly. Any name ending in ".sign" or ".scale"
is a projection part, never a replacement.

Identity: the sha256 of the file bytes, hex without prefix (BitDelta.sha256 and save_bitdelta_file's return).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from formats.signs import packed_width
from registry.deltas import BaseSpec, BitDelta
from registry.errors import AdapterMismatch, UnsupportedFormat
from registry.safetensors_io import (
    TensorInfo,
    check_finite,
    load_tensors,
    read_header,
    sha256_file,
    write_safetensors_atomic,
)

FORMAT = "deltaserve.bitdelta"
VERSION = "1"
_RESERVED_METADATA = ("format", "version", "base")
_SIGN, _SCALE = ".sign", ".scale"


def _split(name: str) -> tuple[str, str] | None:
    """(projection path, "sign" | "scale") for a projection part, None for a replacement."""
    for suffix in (_SIGN, _SCALE):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:]
    return None


def load_bitdelta_file(path: str | os.PathLike[str], spec: BaseSpec) -> BitDelta:
    """Validates a 1-bit delta file against the served base and loads it onto the CPU.

    Returns a BitDelta: projections {P: (sign uint8 [out, ceil(in/8)], scale float32 [out] or [1])},
    replacements {NAME: float32 tensor in the base tensor's shape}, metadata (all of the file's),
    sha256 = hex sha256 of the file bytes.

    Raises UnsupportedFormat for a malformed or pickle file, a missing or wrong format or version.
    Raises AdapterMismatch (the message names the tensor, and expected vs actual shapes) for: a missing
    base fingerprint or one that differs from spec.fingerprint; no tensors; a sign without its scale or a
    scale without its sign; P not a projection of the base; a sign that is not uint8 [out, ceil(in/8)]
    or has non-zero padding bits; a scale that is not float32 [out] or [1], or not finite; a replacement
    that is not a base tensor (or is "lm_head.weight" on a base with tied embeddings), has another shape
    than the base tensor, is not floating point or holds NaN/Inf; a tensor that is both replaced and
    compressed (P.weight next to P.sign).
    """
    path = Path(path)
    header, metadata = read_header(path)
    base = _check_metadata(path.name, metadata, spec)
    if not header:
        raise AdapterMismatch(f"{path.name}: the file holds no tensors", param=path.name)
    parts: dict[str, dict[str, str]] = {}  # projection -> {"sign": tensor name, "scale": tensor name}
    replaced: list[str] = []
    for name in header:
        split = _split(name)
        if split is None:
            replaced.append(name)
        else:
            parts.setdefault(split[0], {})[split[1]] = name
    for proj in sorted(parts):
        _check_projection(proj, parts[proj], header, spec)
    for name in replaced:
        _check_replacement(name, header[name], spec)

    raw = load_tensors(path)
    projections = {proj: _load_projection(raw, proj, parts[proj], spec) for proj in sorted(parts)}
    replacements = {name: _load_replacement(raw, name) for name in sorted(replaced)}
    assert not raw, f"unclassified tensors {sorted(raw)}"
    return BitDelta(
        sha256=sha256_file(path),
        base_fingerprint=base,
        projections=projections,
        replacements=replacements,
        metadata=dict(metadata),
    )


def _check_metadata(fname: str, metadata: Mapping[str, str], spec: BaseSpec) -> str:
    """The format, its version and the base fingerprint; returns the fingerprint."""
    fmt, version = metadata.get("format"), metadata.get("version")
    if fmt != FORMAT:
        raise UnsupportedFormat(f"{fname}: metadata format is {fmt!r}, expected {FORMAT!r}", param=fname)
    if version != VERSION:
        raise UnsupportedFormat(
            f"{fname}: {FORMAT} version {version!r} is not supported (this server reads version {VERSION})",
            param=fname,
        )
    base = metadata.get("base")
    if not base:
        raise AdapterMismatch(f"{fname}: metadata has no base fingerprint", param=fname)
    if base != spec.fingerprint:
        raise AdapterMismatch(
            f"{fname}: built for base {base}, this server serves base {spec.fingerprint}", param=fname
        )
    return base


def _check_projection(proj: str, have: Mapping[str, str], header: Mapping[str, TensorInfo], spec: BaseSpec) -> None:
    """A projection's sign and scale, from the header alone: both there, of the base's shapes and dtypes."""
    for need, other in (("sign", "scale"), ("scale", "sign")):
        if need not in have:
            raise AdapterMismatch(f"tensor {have[other]} has no matching {proj}.{need}", param=have[other])
    if proj not in spec.projections:
        raise AdapterMismatch(f"tensor {have['sign']}: {proj} is not a projection of the base", param=have["sign"])
    out_f, in_f = spec.projection_shape(proj)
    sign, scale = header[have["sign"]], header[have["scale"]]
    expected_sign = (out_f, packed_width(in_f))
    if sign.dtype != torch.uint8 or sign.shape != expected_sign:
        raise AdapterMismatch(
            f"tensor {have['sign']} must be uint8 {list(expected_sign)}, got {sign.dtype} {list(sign.shape)} "
            f"(projection [out={out_f}, in={in_f}])",
            param=have["sign"],
        )
    if scale.dtype != torch.float32 or scale.shape not in ((out_f,), (1,)):
        raise AdapterMismatch(
            f"tensor {have['scale']} must be float32 [{out_f}] or [1], got {scale.dtype} {list(scale.shape)}",
            param=have["scale"],
        )
    if proj + ".weight" in header:
        raise AdapterMismatch(
            f"tensor {proj}.weight is both replaced and compressed ({have['sign']})", param=proj + ".weight"
        )


def _check_replacement(name: str, info: TensorInfo, spec: BaseSpec) -> None:
    """A replaced base tensor, from the header alone: a floating-point tensor of the base, in its shape."""
    if name == "lm_head.weight" and spec.tie_word_embeddings:
        raise AdapterMismatch(
            "tensor lm_head.weight: the base ties lm_head to model.embed_tokens.weight; replace that instead",
            param=name,
        )
    if name not in spec.tensors:
        raise AdapterMismatch(f"tensor {name} is not a tensor of the base", param=name)
    base_shape = spec.tensors[name][0]
    if info.shape != base_shape:
        raise AdapterMismatch(
            f"tensor {name} has shape {list(info.shape)}, the base tensor {name} has shape {list(base_shape)}",
            param=name,
        )
    if not info.dtype.is_floating_point:
        raise AdapterMismatch(f"tensor {name} has dtype {info.dtype}; replacements must be floating point", param=name)


def _load_projection(
    raw: dict[str, torch.Tensor], proj: str, names: Mapping[str, str], spec: BaseSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, scale) of a checked projection, taken out of `raw`; what only the values can show is checked here."""
    sign, scale = raw.pop(names["sign"]).contiguous(), raw.pop(names["scale"]).contiguous()
    in_f = spec.projection_shape(proj)[1]
    if in_f % 8 and bool((sign[:, -1] >> (in_f % 8)).any()):
        raise AdapterMismatch(f"tensor {names['sign']} has non-zero padding bits (in = {in_f})", param=names["sign"])
    check_finite(names["scale"], scale)
    return sign, scale


def _load_replacement(raw: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    tensor = raw.pop(name)
    check_finite(name, tensor)
    tensor = tensor.to(torch.float32).contiguous()
    check_finite(name, tensor)  # e.g. float64 values beyond float32's range
    return tensor


def save_bitdelta_file(
    path: str | os.PathLike[str],
    projections: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    replacements: Mapping[str, torch.Tensor],
    base_fingerprint: str,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes a 1-bit delta file atomically (registry.safetensors_io.write_safetensors_atomic).

    projections: P -> (sign uint8 [out, ceil(in/8)], scale float32 [out] or [1]), as formats.signs.pack_signs
    makes them.  replacements: NAME -> tensor written as given (its dtype is kept).
    metadata: extra str -> str entries; "format", "version" and "base" are set here and may not be given.
    Returns the hex sha256 of the written file. Raises ValueError for malformed arguments (a caller bug).
    """
    extras = dict(metadata or {})
    clash = [k for k in _RESERVED_METADATA if k in extras]
    if clash:
        raise ValueError(f"metadata keys {clash} are set by save_bitdelta_file")
    if not base_fingerprint:
        raise ValueError("base_fingerprint is required")
    tensors: dict[str, torch.Tensor] = {}
    for proj, (sign, scale) in projections.items():
        if sign.dtype != torch.uint8 or sign.dim() != 2:
            raise ValueError(f"{proj}.sign must be a 2-D uint8 tensor, got {sign.dtype} {tuple(sign.shape)}")
        if scale.dtype != torch.float32 or scale.dim() != 1 or scale.shape[0] not in (1, sign.shape[0]):
            raise ValueError(
                f"{proj}.scale must be float32 [{sign.shape[0]}] or [1], got {scale.dtype} {tuple(scale.shape)}"
            )
        tensors[proj + _SIGN] = sign
        tensors[proj + _SCALE] = scale
    for name, tensor in replacements.items():
        if _split(name) is not None:
            raise ValueError(f"replacement {name} ends in .sign/.scale, which the format reserves")
        if name in tensors:
            raise ValueError(f"tensor {name} given twice")
        tensors[name] = tensor
    if not tensors:
        raise ValueError("a 1-bit delta file needs at least one tensor")
    meta = {**extras, "format": FORMAT, "version": VERSION, "base": base_fingerprint}
    return write_safetensors_atomic(path, tensors, meta)
