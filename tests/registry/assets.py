"""Assets shared by the registry tests: a tiny base model and deltas of it, built once per session."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.checkpoint import Checkpoint
from registry.deltas import BaseSpec
from registry.fingerprint import base_spec
from registry.upload_formats import LORA_CONFIG, LORA_WEIGHTS
from registry.uploads import Staging
from tests.helpers import make_bitdelta, make_lora, make_model_dir


@dataclass(frozen=True)
class Assets:
    """A tiny base model and deltas of it, built once per test session (shared with test_catalog)."""

    model: Path
    spec: BaseSpec
    lora: Path  # PEFT directory, r=4
    lora2: Path  # another PEFT directory, r=2
    bd1: Path  # 1-bit delta files
    bd2: Path
    other_bd: Path  # a 1-bit delta of ANOTHER base


@functools.cache
def _build_assets(root: Path) -> Assets:
    model = make_model_dir(root / "base")
    other = make_model_dir(root / "other-base", seed=1)
    make_lora(model, root / "lora", r=4, seed=1)
    make_lora(model, root / "lora2", r=2, seed=2)
    make_bitdelta(model, root / "bd1.safetensors", seed=1, per_row=True, replace=False)
    make_bitdelta(model, root / "bd2.safetensors", seed=2, per_row=False, replace=True)
    make_bitdelta(other, root / "other.safetensors", seed=3, per_row=True, replace=False)
    return Assets(
        model=model,
        spec=base_spec(Checkpoint(model)),
        lora=root / "lora",
        lora2=root / "lora2",
        bd1=root / "bd1.safetensors",
        bd2=root / "bd2.safetensors",
        other_bd=root / "other.safetensors",
    )


def build_assets(factory: pytest.TempPathFactory) -> Assets:
    """The session's Assets (built on first use under the session's base temp directory)."""
    return _build_assets(factory.getbasetemp() / "registry-assets")


def chunks(path: Path, size: int = 4096) -> Iterator[bytes]:
    """A file's bytes in small chunks, as an HTTP upload arrives."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def add_files(staging: Staging, files: list[Path], names: list[str] | None = None) -> Staging:
    """Streams files into a staging under their own names (or `names`)."""
    for i, f in enumerate(files):
        staging.add_file(names[i] if names else f.name, chunks(f))
    return staging


def lora_files(d: Path) -> list[Path]:
    return [d / LORA_CONFIG, d / LORA_WEIGHTS]
