"""The 1-bit delta's packed signs (CONTRACT §4): `sign[o, k]` is a uint8 whose bit j (least significant first) is
input column 8k+j; bit 1 means +1, bit 0 means -1; padding bits are 0. Used by the file format, compression,
distillation and the kernels' references alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _bit_shifts(device: torch.device) -> torch.Tensor:
    """0..7 as uint8, made on `device` (no host-to-device copy inside a step)."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def packed_width(in_features: int) -> int:
    """Bytes per output row of a packed sign matrix: ceil(in/8)."""
    return (in_features + 7) // 8


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Packs a sign matrix into the contract's bit layout.

    Args:  positive: [out, in] bool, True where the sign is +1 (for a delta: `delta > 0`).
    Returns: [out, ceil(in/8)] uint8.
    """
    if positive.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D matrix, got shape {tuple(positive.shape)}")
    out_f, in_f = positive.shape
    width = packed_width(in_f)
    bits = torch.zeros(out_f, width * 8, dtype=torch.uint8, device=positive.device)
    bits[:, :in_f] = positive.to(torch.uint8)
    bits = bits.view(out_f, width, 8) << _bit_shifts(positive.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of pack_signs.

    Args:  packed: [out, ceil(in/8)] uint8.  in_features: the matrix's column count.
    Returns: [out, in_features] of `dtype`, every entry +1 or -1.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_width(in_features):
        raise ValueError(
            f"packed signs must be uint8 [out, {packed_width(in_features)}], got {packed.dtype} {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(-1) >> _bit_shifts(packed.device)) & 1
    bits = bits.reshape(packed.shape[0], -1)[:, :in_features]
    return bits.to(dtype) * 2 - 1


@dataclass(frozen=True)
class SignLayout:
    """How a slot pool holds packed signs for the kernels that read them (DeltaOps.sign_layout): the pool's
    shape and one slot's entry made from the file's [out, ceil(in/8)]."""

    name: str
    pool_shape: Callable[[int, int, int], tuple[int, ...]]  # (n_slots, out, in) -> the pool's shape
    to_slot: Callable[[torch.Tensor], torch.Tensor]  # [out, ceil(in/8)] -> one slot's entry


# The file's own layout, [S, out, ceil(in/8)] (the Triton kernels and the torch references read it).
ROWS = SignLayout("rows", lambda n_slots, out_f, in_f: (n_slots, out_f, packed_width(in_f)), lambda packed: packed)
