"""Does a delta's size fit the base? Deltas whose magnitudes are absurd against the served base are refused.

A 1-bit scale of 3e38 is finite, so it passes every format check, yet it is no fine-tune: it turns the tenant's
activations into Inf/NaN. Such values must never get as far as the GPU. A real fine-tune moves weights by a
fraction of their size; the limits below are orders of magnitude above that (so no genuine fine-tune trips them)
and orders of magnitude below what overflows:

  1-bit scale of projection P           <= SCALE_LIMIT x max|W_P|
  LoRA: scaling * |B|_F * |A|_F          <= LORA_LIMIT x |W_P|_F   (an upper bound of |scaling * B @ A|_F)
  a replacement tensor: max|R|           <= REPLACEMENT_LIMIT x max(max|base|, 1)

The base's statistics are measured once when the engine loads it (`measure`) and carried in BaseSpec.magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from registry.errors import AdapterMismatch

SCALE_LIMIT = 10.0
LORA_LIMIT = 100.0
REPLACEMENT_LIMIT = 100.0


@dataclass(frozen=True)
class Magnitude:
    """max |x| and the Frobenius norm of one base tensor."""

    max_abs: float
    frobenius: float


def measure(tensors: Mapping[str, torch.Tensor]) -> dict[str, Magnitude]:
    """The magnitudes of every floating-point tensor (float32 math; one device->host copy for all)."""
    names = [n for n, t in tensors.items() if t.is_floating_point() and t.numel() and not t.is_mkldnn]
    if not names:
        return {}
    stats = torch.stack(
        [torch.stack([tensors[n].detach().abs().amax().float(), tensors[n].detach().float().norm()]) for n in names]
    ).tolist()
    return {n: Magnitude(float(m), float(f)) for n, (m, f) in zip(names, stats)}


def _refuse(what: str, value: float, limit: float, base: str, param: str) -> AdapterMismatch:
    return AdapterMismatch(
        f"{what} is {value:.3g}, over {limit:.3g} ({base} of the base): too large to be a fine-tune of this base",
        param=param,
    )


def check_bitdelta(
    projections: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    replacements: Mapping[str, torch.Tensor],
    magnitudes: Mapping[str, Magnitude],
) -> None:
    """Raises AdapterMismatch when a scale or a replacement is absurd against the base (module docstring)."""
    for path, (_, scale) in projections.items():
        base = magnitudes.get(path + ".weight")
        if base is None:
            continue
        biggest = float(scale.abs().max()) if scale.numel() else 0.0
        limit = SCALE_LIMIT * base.max_abs
        if biggest > limit:
            raise _refuse(f"{path}.scale: its largest value", biggest, limit,
                          f"{SCALE_LIMIT:g}x the largest weight {base.max_abs:.3g}", f"{path}.scale")  # fmt: skip
    check_replacements(replacements, magnitudes)


def check_replacements(replacements: Mapping[str, torch.Tensor], magnitudes: Mapping[str, Magnitude]) -> None:
    for name, tensor in replacements.items():
        base = magnitudes.get(name)
        if base is None or not tensor.numel():
            continue
        biggest = float(tensor.detach().abs().max())
        limit = REPLACEMENT_LIMIT * max(base.max_abs, 1.0)
        if biggest > limit:
            raise _refuse(f"{name}: its largest value", biggest, limit,
                          f"{REPLACEMENT_LIMIT:g}x max(1, the base's largest value {base.max_abs:.3g})", name)  # fmt: skip


def check_lora(
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float, magnitudes: Mapping[str, Magnitude]
) -> None:
    """Raises AdapterMismatch when some module's scaling * B @ A could be absurd against its base weight."""
    if not math.isfinite(scaling):
        raise AdapterMismatch(f"the LoRA scaling {scaling!r} is not finite", param="lora_alpha")
    for path, (a, b) in weights.items():
        base = magnitudes.get(path + ".weight")
        if base is None:
            continue
        bound = abs(scaling) * float(a.float().norm()) * float(b.float().norm())
        limit = LORA_LIMIT * base.frobenius
        if not bound <= limit:  # also refuses a NaN bound
            raise _refuse(f"{path}: scaling x |B|_F x |A|_F", bound, limit,
                          f"{LORA_LIMIT:g}x the weight's Frobenius norm {base.frobenius:.3g}", path)  # fmt: skip
