"""Loading a tenant's delta from a path, by what the path contains (never by its name)."""

from __future__ import annotations

from pathlib import Path

from registry.bitdelta_format import load_bitdelta_file
from registry.deltas import BaseSpec, Delta
from registry.errors import UnsupportedFormat
from registry.lora_format import load_lora_dir
from registry.safetensors_io import read_header


def load_delta(path: str | Path, spec: BaseSpec, max_lora_rank: int | None = None) -> Delta:
    """A PEFT LoRA directory (it holds adapter_config.json) or a 1-bit delta file (a safetensors file
    whose metadata says format deltaserve.bitdelta). Anything else is refused."""
    p = Path(path)
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
