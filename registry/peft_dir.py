"""A PEFT adapter directory, whatever its peft_type (CONTRACT §4): its two files, its config, its identity.

A directory holds `adapter_config.json` and `adapter_model.safetensors` (weight keys prefixed
`base_model.model.`); `adapter_model.bin` (pickle) is refused by name and never loaded. The families that
read such a directory (registry.lora_format, registry.ia3_format) check the options and weights themselves.

Identity (a delta's sha256, bare hex): sha256 of
    u64-little-endian(len(config bytes)) || config bytes || weights file bytes
so that both files, and where one ends, are covered.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from registry.errors import AdapterMismatch, PickleRefused, UnsupportedFormat, is_pickle_name
from registry.safetensors_io import sha256_file
from registry.upload_formats import LORA_CONFIG as CONFIG_FILE
from registry.upload_formats import LORA_WEIGHTS as WEIGHTS_FILE

KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 256 << 10  # an adapter_config.json is a few KB; anything near this is no real config


def check_files(path: Path, what: str) -> tuple[Path, Path]:
    """(config path, weights path) of the adapter directory `path`; UnsupportedFormat / PickleRefused naming
    what is missing. what: the family in words ("LoRA adapter")."""
    if not path.is_dir():
        raise UnsupportedFormat(f"{what} {path} does not exist or is not a directory", param=str(path))
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise UnsupportedFormat(f"{what} directory has no {CONFIG_FILE}", param=CONFIG_FILE)
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if is_pickle_name(p.name))
        if pickles:
            raise PickleRefused(
                f"{what} weights are a pickle file ({', '.join(pickles)}); pickle files are never loaded: "
                f"save the adapter as {WEIGHTS_FILE} (save_pretrained(..., safe_serialization=True))",
                param=pickles[0],
            )
        raise UnsupportedFormat(f"{what} directory has no {WEIGHTS_FILE}", param=WEIGHTS_FILE)
    return config_path, weights_path


def read_config(config_path: Path) -> tuple[bytes, dict[str, Any]]:
    """adapter_config.json's bytes (part of the identity) and the JSON object they hold."""
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UnsupportedFormat(f"{CONFIG_FILE} is {size} bytes, over the limit of {MAX_CONFIG_BYTES}", param=CONFIG_FILE)
    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnsupportedFormat(f"{CONFIG_FILE} is not valid JSON: {e}", param=CONFIG_FILE) from e
    if not isinstance(config, dict):
        raise UnsupportedFormat(f"{CONFIG_FILE} must hold a JSON object", param=CONFIG_FILE)
    return config_bytes, config


def peft_type(path: str | os.PathLike[str]) -> object:
    """The peft_type an adapter directory's config names (for choosing its loader; the loader checks it)."""
    _, config = read_config(check_files(Path(path), "PEFT adapter")[0])
    return config.get("peft_type")


def module_of_key(key: str, suffix: str, projections: frozenset[str] | set[str], what: str) -> str:
    """The module path of weight key `base_model.model.<module><suffix>`, or AdapterMismatch naming the key
    when it is not of that form or the module is not a projection of the base."""
    if not key.endswith(suffix):
        raise AdapterMismatch(f"key {key} is not a {what} of a projection (…{suffix})", param=key)
    if not key.startswith(KEY_PREFIX):
        raise AdapterMismatch(f"key {key} does not start with {KEY_PREFIX!r} as PEFT saves keys", param=key)
    module = key[len(KEY_PREFIX) : -len(suffix)]
    if module not in projections:
        raise AdapterMismatch(f"key {key}: {module} is not an attention/MLP projection of the base", param=key)
    return module


def adapter_sha256(config_bytes: bytes, weights_path: str | os.PathLike[str]) -> str:
    """An adapter directory's identity (module docstring)."""
    return sha256_file(weights_path, prefix=struct.pack("<Q", len(config_bytes)) + config_bytes)
