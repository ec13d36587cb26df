"""PEFT (IA)^3 adapter directories (CONTRACT §4): strict validation against the base, then an Ia3Delta.

A directory holds `adapter_config.json` (peft_type "IA3") and `adapter_model.safetensors` with one key
`base_model.model.<module path>.ia3_l` per target projection: shape [out, 1] for a projection whose output it
scales, [1, in] for a feedforward one (PEFT's `feedforward_modules`, whose input it scales).

Which projections are feedforward comes from `feedforward_modules` when it is a list of names (a module is
feedforward when its path ends with one of them, PEFT's test); when it is a regex string it is not
evaluated (untrusted), and each vector's shape says instead, refused where it cannot (a square projection).
A vector's shape must agree with its role either way. Options that change what the adapter computes and
that deltaserve does not implement (fan_in_fan_out, modules_to_save) are refused by name, as is any option
this module does not know set to a non-default value.

Identity: Ia3Delta.sha256 is the adapter directory's (registry.peft_dir.adapter_sha256).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from registry.deltas import BaseSpec, Ia3Delta
from registry.errors import AdapterMismatch
from registry.peft_dir import WEIGHTS_FILE, adapter_sha256, check_files, module_of_key, read_config
from registry.safetensors_io import check_finite, load_tensors, read_header

SUFFIX = ".ia3_l"
_REFUSED_OPTIONS = {
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
}
# Options that do not change what a saved adapter computes, plus those read below.
_HANDLED_OPTIONS = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights",
    }
)  # fmt: skip
MAX_VECTOR_MAGNITUDE = 1e4  # |l| this large is no trained scaling: it would blow activations up


def _is_set(value: object) -> bool:
    return value not in (None, False, "", [], {}, ())


def _names(option: str, value: object) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise AdapterMismatch(f"{option} must be a list of module names or a string, got {value!r}", param=option)
    return value


def _parse_config(config: dict[str, Any]) -> list[str] | str | None:
    """Checks every option; returns feedforward_modules (a list of names, a regex string or None)."""
    kind = config.get("peft_type")
    if kind != "IA3":
        raise AdapterMismatch(f"peft_type {kind!r} is not an (IA)^3 adapter (peft_type IA3)", param="peft_type")
    for option, what in _REFUSED_OPTIONS.items():
        if _is_set(config.get(option)):
            raise AdapterMismatch(f"{what} is not supported (adapter option {option}={config[option]!r})", param=option)
    for option, value in config.items():
        if option not in _HANDLED_OPTIONS and option not in _REFUSED_OPTIONS and _is_set(value):
            raise AdapterMismatch(f"unsupported adapter option {option}={value!r}", param=option)
    _names("target_modules", config.get("target_modules"))
    return _names("feedforward_modules", config.get("feedforward_modules"))


def _is_feedforward(module: str, feedforward: list[str] | str | None, shape: tuple[int, ...], key: str,
                    out_f: int, in_f: int) -> bool:  # fmt: skip
    if isinstance(feedforward, list):
        return any(module.endswith(t) for t in feedforward)  # PEFT's test, exactly (no '.' boundary)
    if feedforward is None:
        return False
    if out_f == in_f:
        raise AdapterMismatch(
            f"tensor {key}: feedforward_modules is a pattern ({feedforward!r}), which deltaserve does not evaluate, "
            f"and {module} is square, so its shape cannot say whether it is feedforward: give feedforward_modules "
            "as a list of module names",
            param="feedforward_modules",
        )
    return shape == (1, in_f)


def load_ia3_dir(path: str | os.PathLike[str], spec: BaseSpec) -> Ia3Delta:
    """Validates a PEFT (IA)^3 directory against the base and loads it: float32 CPU vectors by module path.

    Raises UnsupportedFormat for a missing directory, config or weights file, a config that is not a JSON
    object, or a malformed safetensors file; PickleRefused for pickle weights; AdapterMismatch (naming the
    option, key or tensor) for another peft_type, a refused or unknown option, a key that is not an `ia3_l`
    of a projection of the base, a shape that is not its role's ([out, 1], or [1, in] when feedforward), a
    non-float dtype, NaN/Inf or a magnitude above MAX_VECTOR_MAGNITUDE, or no vectors at all.
    """
    config_path, weights_path = check_files(Path(path), "(IA)^3 adapter")
    config_bytes, config = read_config(config_path)
    feedforward_option = _parse_config(config)
    header, _ = read_header(weights_path)
    if not header:
        raise AdapterMismatch(f"{WEIGHTS_FILE} holds no tensors", param=WEIGHTS_FILE)
    modules: dict[str, tuple[str, bool]] = {}  # module -> (key, feedforward)
    for key, info in header.items():
        module = module_of_key(key, SUFFIX, spec.projections, "(IA)^3 vector")
        if not info.dtype.is_floating_point:
            raise AdapterMismatch(f"tensor {key} has dtype {info.dtype}; (IA)^3 vectors must be floating point", param=key)
        out_f, in_f = spec.projection_shape(module)
        ff = _is_feedforward(module, feedforward_option, tuple(info.shape), key, out_f, in_f)
        expected = (1, in_f) if ff else (out_f, 1)
        if tuple(info.shape) != expected:
            role = "a feedforward module's [1, in]" if ff else "[out, 1] (it scales the output)"
            raise AdapterMismatch(
                f"tensor {key} has shape {list(info.shape)}, expected {list(expected)}: {role} "
                f"of projection [out={out_f}, in={in_f}]",
                param=key,
            )
        modules[module] = (key, ff)

    raw = load_tensors(weights_path)
    vectors: dict[str, torch.Tensor] = {}
    for module in sorted(modules):
        key, _ = modules[module]
        v = raw.pop(key).to(torch.float32).flatten().contiguous()
        check_finite(key, v)
        peak = float(v.abs().max())
        if peak > MAX_VECTOR_MAGNITUDE:
            raise AdapterMismatch(
                f"tensor {key} scales by up to {peak:.3g}, above the limit of {MAX_VECTOR_MAGNITUDE:g}", param=key
            )
        vectors[module] = v
    feedforward = frozenset(m for m, (_, ff) in modules.items() if ff)
    return Ia3Delta(sha256=adapter_sha256(config_bytes, weights_path), vectors=vectors, feedforward=feedforward)
