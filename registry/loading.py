"""Loading a tenant's delta from a path, by what the path contains (never by its name)."""

from __future__ import annotations

from pathlib import Path

from registry.bitdelta_format import load_bitdelta_file
from registry.deltas import BaseSpec, BitDelta, Delta, LoraDelta
from registry.errors import AdapterMismatch, UnsupportedFormat
from registry.ia3_format import load_ia3_dir
from registry.lora_format import load_lora_dir
from registry.magnitudes import check_bitdelta, check_lora
from registry.peft_dir import peft_type
from registry.safetensors_io import read_header


def load_delta(path: str | Path, spec: BaseSpec, max_lora_rank: int | None = None) -> Delta:
    """A PEFT directory (it holds adapter_config.json: peft_type LORA or IA3) or a 1-bit delta file (a
    safetensors file whose metadata says format deltaserve.bitdelta). Anything else is refused, and so is a
    delta whose magnitudes are absurd against the served base (registry.magnitudes, when spec.magnitudes is
    known; an (IA)^3 vector's bound does not depend on the base: registry.ia3_format checks it)."""
    delta = _load(Path(path), spec, max_lora_rank)
    if spec.magnitudes:
        if isinstance(delta, LoraDelta):
            check_lora(delta.weights, delta.scaling, spec.magnitudes)
        elif isinstance(delta, BitDelta):
            check_bitdelta(delta.projections, delta.replacements, spec.magnitudes)
    return delta


def _load(p: Path, spec: BaseSpec, max_lora_rank: int | None) -> Delta:
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise UnsupportedFormat(
            f"{p} is a directory without adapter_config.json: not a PEFT adapter", param="adapter_config.json"
        )
        kind = peft_type(p)
        if kind == "IA3":
            return load_ia3_dir(p, spec)
        if kind == "LORA":
            return load_lora_dir(p, spec, max_rank=max_lora_rank)
        raise AdapterMismatch(
            f"peft_type {kind!r} is not supported: PEFT adapters of type LORA or IA3 are", param="peft_type"
        )
    if not p.is_file():
        raise FileNotFoundError(f"no such adapter: {p}")
    _, metadata = read_header(p)
    if metadata.get("format") != "deltaserve.bitdelta":
        raise UnsupportedFormat(
            f"{p.name} is a safetensors file without format=deltaserve.bitdelta metadata; a LoRA adapter is a PEFT directory",
            param=p.name,
        )
    return load_bitdelta_file(p, spec)
