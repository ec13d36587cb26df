"""PEFT LoRA adapter directories (CONTRACT §4): strict validation against the base, then a LoraDelta.

A directory holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], for module paths
that are attention/MLP projections of the base. Per module, scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora, where `rank_pattern` / `alpha_pattern` override r / lora_alpha per
module exactly as PEFT matches them (first pattern P with `re.match(r"(.*\\.)?(P)$", module)`).

Every PEFT option that changes what the adapter computes and that deltaserve does not implement is
refused by name (AdapterMismatch), as is any option this module does not know that is set to a
non-default value. Pickle weights (`adapter_model.bin`) are refused (UnsupportedFormat), never loaded.

Identity: LoraDelta.sha256 is the adapter directory's (registry.peft_dir.adapter_sha256).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from registry.deltas import BaseSpec, LoraDelta
from registry.errors import AdapterMismatch
from registry.peft_dir import (
    KEY_PREFIX,
    WEIGHTS_FILE,
    adapter_sha256,
    check_files,
    read_config,
)
from registry.safetensors_io import check_finite, load_tensors, read_header

PROJECTION_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBEDDING_NAMES = frozenset({"embed_tokens", "lm_head"})
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"

# Options refused when set (not None / False / empty), with what they are.
_REFUSED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "lora_bias": "LoRA bias (lora_bias)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
}
# Options that do not change what a saved adapter computes (metadata, training or initialisation only),
# plus those read or checked below.
_HANDLED_OPTIONS = frozenset(
    {
        "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "target_modules",
        "init_lora_weights", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
        "lora_dropout", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layers_to_transform",
        "layers_pattern", "exclude_modules", "megatron_config", "megatron_core", "peft_version",
        "qalora_group_size", "ensure_weight_tying",
    }
)  # fmt: skip
# Initialisations after which the saved adapter is still relative to the unmodified base.
_SAFE_INITS: tuple[object, ...] = (True, False, "gaussian", "eva", "orthogonal")
_PATTERN_RE = re.compile(r"[A-Za-z0-9_.]{1,300}")
MAX_PATTERN_KEYS = 1024  # rank_pattern / alpha_pattern keys: one per projection of a 140-layer model fits


def _is_set(value: object) -> bool:
    return value not in (None, False, "", [], {}, ())


def _mismatch(message: str, param: str | None) -> AdapterMismatch:
    return AdapterMismatch(message, param=param)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _check_target_modules(target: object) -> None:
    if target is None or (isinstance(target, str) and target == "all-linear"):
        return
    if isinstance(target, str):
        # A regex: not evaluated (untrusted); the weight keys are checked instead.
        for emb in EMBEDDING_NAMES:
            if emb in target:
                raise _mismatch(
                    f"target_modules {target!r} targets {emb}: embedding LoRA is not supported", "target_modules"
                )
        return
    if not isinstance(target, list) or not all(isinstance(t, str) for t in target):
        raise _mismatch(f"target_modules must be a list of module names, got {target!r}", "target_modules")
    for t in target:
        last = t.rsplit(".", 1)[-1]
        if last in EMBEDDING_NAMES:
            raise _mismatch(f"target module {t!r}: embedding LoRA is not supported", "target_modules")
        if last not in PROJECTION_NAMES:
            raise _mismatch(
                f"target module {t!r} is not an attention/MLP projection ({', '.join(sorted(PROJECTION_NAMES))})",
                "target_modules",
            )


class _Pattern:
    """A rank_pattern / alpha_pattern, with PEFT's matching: the first key K (in order) for which
    re.match(rf"(.*\\.)?({K})$", module) holds. Keys are module names (letters, digits, '_', '.'), so K matches
    a module when it is the module's last components, each '.' of K matching any one character. Each key is
    prepared once (a plain suffix test when it has no '.'), never compiled per module: an upload's validation
    stays milliseconds whatever its config."""

    def __init__(self, pattern: dict[str, Any]):
        self._rules: list[tuple[Callable[[str], bool], Any]] = []
        for key, value in pattern.items():
            if "." in key:
                regex = re.compile(rf"(?:.*\.)?(?:{key})$")
                self._rules.append((lambda m, rx=regex: rx.match(m) is not None, value))
            else:
                self._rules.append((lambda m, k=key: m == k or m.endswith("." + k), value))

    def value(self, module: str, default: Any) -> Any:
        return next((v for matches, v in self._rules if matches(module)), default)


def _check_pattern(option: str, pattern: object, is_valid: Callable[[object], bool]) -> _Pattern:
    if pattern is None:
        return _Pattern({})
    if not isinstance(pattern, dict):
        raise _mismatch(f"{option} must be an object, got {pattern!r}", option)
    if len(pattern) > MAX_PATTERN_KEYS:
        raise _mismatch(f"{option} has {len(pattern)} keys, over the limit of {MAX_PATTERN_KEYS}", option)
    for key, value in pattern.items():
        if not _PATTERN_RE.fullmatch(key):
            raise _mismatch(
                f"{option} key {key!r} is not supported: only module names (letters, digits, '_', '.') are accepted",
                option,
            )
        if not is_valid(value):
            raise _mismatch(f"{option}[{key!r}] has invalid value {value!r}", option)
    return _Pattern(pattern)


def _parse_config(config: dict[str, Any]) -> dict[str, Any]:
    """Checks every option; returns r, lora_alpha, use_rslora, rank_pattern, alpha_pattern."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _mismatch(f"peft_type {peft_type!r} is not supported: only LORA adapters are", "peft_type")
    for option, what in _REFUSED_OPTIONS.items():
        if _is_set(config.get(option)):
            raise _mismatch(f"{what} is not supported (adapter option {option}={config[option]!r})", option)
    bias = config.get("bias", "none")
    if bias != "none":
        raise _mismatch(f"bias={bias!r} is not supported: only bias='none' adapters are", "bias")
    init = config.get("init_lora_weights", True)
    if not any(init is s or (isinstance(s, str) and init == s) for s in _SAFE_INITS):
        raise _mismatch(
            f"init_lora_weights={init!r} is not supported: such adapters are relative to a modified base "
            "(convert them to a plain LoRA first)",
            "init_lora_weights",
        )
    for option, value in config.items():
        if option not in _HANDLED_OPTIONS and option not in _REFUSED_OPTIONS and _is_set(value):
            raise _mismatch(f"unsupported adapter option {option}={value!r}", option)
    _check_target_modules(config.get("target_modules"))

    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _is_rank(r):
        raise _mismatch(f"r must be a positive integer, got {r!r}", "r")
    if not _is_number(alpha):
        raise _mismatch(f"lora_alpha must be a finite number, got {alpha!r}", "lora_alpha")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise _mismatch(f"use_rslora must be true or false, got {rslora!r}", "use_rslora")
    return {
        "r": r,
        "lora_alpha": float(alpha),
        "use_rslora": rslora,
        "rank_pattern": _check_pattern("rank_pattern", config.get("rank_pattern"), _is_rank),
        "alpha_pattern": _check_pattern("alpha_pattern", config.get("alpha_pattern"), _is_number),
    }


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _module_of_key(key: str, spec: BaseSpec) -> tuple[str, str]:
    """(module path, "A" | "B") of a weight key, or AdapterMismatch naming the key."""
    if "lora_magnitude_vector" in key:
        raise _mismatch(f"key {key}: DoRA (lora_magnitude_vector) is not supported", key)
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        raise _mismatch(f"key {key}: embedding LoRA is not supported", key)
    touched = EMBEDDING_NAMES.intersection(key.split("."))
    if touched:
        raise _mismatch(f"key {key}: adapters may not change {min(touched)}: embedding LoRA is not supported", key)
    if key.endswith(_SUFFIX_A):
        module, which = key[: -len(_SUFFIX_A)], "A"
    elif key.endswith(_SUFFIX_B):
        module, which = key[: -len(_SUFFIX_B)], "B"
    else:
        raise _mismatch(f"key {key} is not a lora_A/lora_B weight of a projection", key)
    if not module.startswith(KEY_PREFIX):
        raise _mismatch(f"key {key} does not start with {KEY_PREFIX!r} as PEFT saves keys", key)
    module = module[len(KEY_PREFIX) :]
    if module not in spec.projections:
        raise _mismatch(f"key {key}: {module} is not an attention/MLP projection of the base", key)
    return module, which


def load_lora_dir(path: str | os.PathLike[str], spec: BaseSpec, max_rank: int | None = None) -> LoraDelta:
    """Validates a PEFT LoRA directory against the base and loads it.

    Returns a LoraDelta with float32 CPU weights {module path: (A [r_m, in], B [out, r_m])}, rank = the
    largest r_m, and one `scaling` (the config's lora_alpha / r, or / sqrt(r) with use_rslora; 1.0 if that
    is 0): modules whose own scaling differs (rank_pattern / alpha_pattern) have the ratio folded into B,
    so W' = W + scaling * B @ A holds for every module.

    Raises UnsupportedFormat for a missing directory, config or weights file, a pickle weights file,
    a config that is not a JSON object, or a malformed safetensors file; AdapterMismatch (naming the
    option, key or tensor) for everything listed in the module docstring and: a key that is not a
    lora_A/lora_B of a projection of the base, a module with A or B missing, a rank above max_rank,
    a wrong shape (expected and actual named), a non-float dtype, NaN/Inf, or no weights at all.
    """
    config_path, weights_path = check_files(Path(path), "LoRA adapter")
    config_bytes, opts = _read_config(config_path)
    header, _ = read_header(weights_path)
    if not header:
        raise _mismatch(f"{WEIGHTS_FILE} holds no tensors", WEIGHTS_FILE)
    keys: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
    for key in header:
        module, which = _module_of_key(key, spec)
        keys.setdefault(module, {})[which] = key
    ranks = {module: _check_module(module, keys[module], header, opts, spec, max_rank) for module in sorted(keys)}

    scaling = _scaling(opts["lora_alpha"], opts["r"], opts["use_rslora"]) or 1.0
    raw = load_tensors(weights_path)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in sorted(keys):
        a_key, b_key = keys[module]["A"], keys[module]["B"]
        a = raw.pop(a_key).to(torch.float32).contiguous()
        b = raw.pop(b_key).to(torch.float32).contiguous()
        check_finite(a_key, a)
        check_finite(b_key, b)
        alpha_m = float(opts["alpha_pattern"].value(module, opts["lora_alpha"]))
        ratio = _scaling(alpha_m, ranks[module], opts["use_rslora"]) / scaling
        if ratio != 1.0:
            b = b * ratio
            check_finite(b_key, b)
        weights[module] = (a, b)

    return LoraDelta(sha256=lora_sha256(config_bytes, weights_path), rank=max(ranks.values()), scaling=scaling, weights=weights)


def _read_config(config_path: Path) -> tuple[bytes, dict]:
    """adapter_config.json's bytes (part of the identity) and its parsed options."""
    config_bytes, config = read_config(config_path)
    return config_bytes, _parse_config(config)


def _check_module(module: str, pair: dict[str, str], header, opts: dict, spec: BaseSpec, max_rank: int | None) -> int:
    """One module's A and B, from the header alone: both there, float, of its rank's shapes. Returns the rank."""
    for which in ("A", "B"):
        if which not in pair:
            missing = KEY_PREFIX + module + (_SUFFIX_A if which == "A" else _SUFFIX_B)
            raise _mismatch(f"module {module} has no lora_{which} weight ({missing} is missing)", missing)
    r_m = opts["rank_pattern"].value(module, opts["r"])
    if max_rank is not None and r_m > max_rank:
        raise _mismatch(f"module {module} has LoRA rank {r_m}, above this server's max rank {max_rank}", "rank")
    out_f, in_f = spec.projection_shape(module)
    for which, expected in (("A", (r_m, in_f)), ("B", (out_f, r_m))):
        key = pair[which]
        info = header[key]
        if not info.dtype.is_floating_point:
            raise _mismatch(f"tensor {key} has dtype {info.dtype}; LoRA weights must be floating point", key)
        if info.shape != expected:
            raise _mismatch(
                f"tensor {key} has shape {list(info.shape)}, expected {list(expected)} "
                f"(rank {r_m}, projection [out={out_f}, in={in_f}])",
                key,
            )
    return r_m


lora_sha256 = adapter_sha256  # a LoRA's identity: registry.peft_dir's, as for every PEFT directory
