"""Loading a tenant's delta from a path, by what the path contains (never by its name)."""

from __future__ import annotations

from pathlib import Path

from registry.bitdelta_format import load_bitdelta_file
from registry.deltas import BaseSpec, Delta, LoraDelta
from registry.errors import UnsupportedFormat
from registry.lora_format import load_lora_dir
from registry.magnitudes import check_bitdelta, check_lora
from registry.safetensors_io import read_header


def load_delta(path: str | Path, spec: BaseSpec, max_lora_rank: int | None = None) -> Delta:
    """A PEFT LoRA directory (it holds adapter_config.json) or a 1-bit delta file (a safetensors file
    whose metadata says format deltaserve.bitdelta). Anything else is refused, and so is a delta whose
    magnitudes are absurd against the served base (registry.magnitudes, when spec.magnitudes is known)."""
    delta = _load(Path(path), spec, max_lora_rank)
    if spec.magnitudes:
        if isinstance(delta, LoraDelta):
            check_lora(delta.weights, delta.scaling, spec.magnitudes)
        else:
            check_bitdelta(delta.projections, delta.replacements, spec.magnitudes)
    return delta


def _load(p: Path, spec: BaseSpec, max_lora_rank: int | None) -> Delta:
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise UnsupportedFormat(
            f"{p} is a directory without adapter_config.json: not a PEFT LoRA adapter", param="adapter_config.json"
        )
        return load_lora_dir(p, spec, max_rank=max_lora_rank)
    if not p.is_file():
        raise FileNotFoundError(f"no such adapter: {p}")
    _, metadata = read_header(p)
    if metadata.get("format") != "deltaserve.bitdelta":
        raise UnsupportedFormat(
            f"{p.name} is a safetensors file without format=deltaserve.bitdelta metadata; a LoRA adapter is a PEFT directory",
            param=p.name,
        )
    return load_bitdelta_file(p, spec)
