"""1-bit deltas: the slot pools' sign layouts and the batched multi-tenant apply.

Signs arrive packed as the file format has them (formats/signs.py, CONTRACT §4).
"""

from __future__ import annotations

import torch

from deltakernels import (
    call_cpu_kernel,
    check_float,
    check_same_device,
    check_tensor,
    check_tiles,
    check_triton_device,
    dot_precision,
    tiles_bucket,
    upcast_dot,
)
from deltakernels.segments import TILE_ROWS, SlotTiles
from formats.signs import ROWS, SignLayout, pack_signs, packed_width, unpack_signs  # noqa: F401  (re-exported)

try:
    import triton
    import triton.language as tl

    from deltakernels.triton_common import autotuned, launch, mma, pruner, tile_rows
except ImportError:  # the torch references still work without triton
    triton = None

# The CPU kernel's slot-pool layout ("blocked16"): the sign bytes of 16 consecutive output rows side by side, so
# one 16-byte load holds the same input columns of 16 outputs (deltakernels/csrc/bitdelta_cpu.cpp explains why).
SIGN_BLOCK = 16


def interleave_signs(packed: torch.Tensor) -> torch.Tensor:
    """The contract's packed signs in the blocked16 layout: a byte transpose, no bit moves.

    Args:  packed: [..., out, W] uint8 (CONTRACT §4 layout).
    Returns: [..., ceil(out/16), W, 16] uint8 where [..., b, k, i] = packed[..., 16b + i, k] (0 for rows >= out).
    """
    *lead, out_f, width = packed.shape
    blocks = -(-out_f // SIGN_BLOCK)
    padded = packed.new_zeros(*lead, blocks * SIGN_BLOCK, width)
    padded[..., :out_f, :] = packed
    return padded.view(*lead, blocks, SIGN_BLOCK, width).transpose(-1, -2).contiguous()


def deinterleave_signs(blocked: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of interleave_signs: [..., ceil(out/16), W, 16] -> [..., out, W]."""
    *lead, blocks, width, block = blocked.shape
    return blocked.transpose(-1, -2).reshape(*lead, blocks * block, width)[..., :out_features, :]


# The CPU kernels' slot pools: [S, ceil(out/16), ceil(in/8), 16].
BLOCKED16 = SignLayout(
    "blocked16",
    lambda n_slots, out_f, in_f: (n_slots, -(-out_f // SIGN_BLOCK), packed_width(in_f), SIGN_BLOCK),
    interleave_signs,
)


# ---------------------------------------------------------------------------------------------------------------
# Batched multi-tenant apply: y[i] += scale[s] * (x[i] @ sign[s].T) for the rows of every tile of slot s.
# ---------------------------------------------------------------------------------------------------------------

# (bit pattern of -1.0, bit index of the sign) per activation dtype: the kernel builds +-1 by flipping the sign
# bit of -1.0 instead of converting integers to floats (conversions are slow on GPUs). float32 works in int32
# (0xBF800000 as a signed int) so no constant leaves the int32 range.
_NEG_ONE_BITS = {torch.float32: (0xBF800000 - (1 << 32), 31), torch.bfloat16: (0xBF80, 15), torch.float16: (0xBC00, 15)}

# The fixed launch configuration used in Triton's interpreter (autotuned on GPUs).
_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64}

if triton is not None:

    @triton.jit
    def _bitdelta_apply_kernel(  # over 60 lines: one Triton program, its arguments one per line
        y_ptr,
        x_ptr,
        signs_ptr,
        scales_ptr,
        order_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_rows_ptr,
        in_features,
        out_features,
        packed_cols,
        tiles_bucket,  # only an autotune key: few tiles want narrower N blocks than many
        stride_ym,
        stride_yn,
        stride_xm,
        stride_xk,
        stride_ss,
        stride_so,
        stride_sk,
        stride_cs,
        stride_co,
        NEG_ONE: tl.constexpr,
        SIGN_BIT: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        TILE_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program: one tile (<= TILE_M rows of one slot) x BLOCK_N output features. It streams the slot's
        # packed signs for those features once, as bytes, and computes the transposed product
        # accT[n, m] = sum_k sign[n, k] * x[row_m, k] (the wide dimension on the MMA's M side).
        pid_n = tl.program_id(1)
        slot, n_rows, rows, row_mask = tile_rows(order_ptr, tile_slot_ptr, tile_start_ptr, tile_rows_ptr,
                                                 tl.program_id(0), TILE_M)  # fmt: skip
        if n_rows == 0:  # a padding tile of a fixed-size (CUDA-graph) launch: nothing to read or write
            return

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < out_features
        BLOCK_KB: tl.constexpr = BLOCK_K // 8
        offs_kb = tl.arange(0, BLOCK_KB)
        offs_k = tl.arange(0, BLOCK_K)

        if SIGN_BIT == 31:
            shifts = 31 - tl.arange(0, 8)
            neg_one = tl.full((1, 1, 1), NEG_ONE, tl.int32)
            sign_bit = tl.full((1, 1, 1), -(1 << 31), tl.int32)
        else:
            shifts = (15 - tl.arange(0, 8)).to(tl.uint16)
            neg_one = tl.full((1, 1, 1), NEG_ONE, tl.uint16)
            sign_bit = tl.full((1, 1, 1), 1 << 15, tl.uint16)

        # x is read transposed, [BLOCK_K, TILE_M]; padding columns (k >= in) and absent rows read as 0, so the
        # padding bits of the last byte contribute nothing whatever sign they decode to.
        xt_ptrs = x_ptr + offs_k[:, None] * stride_xk + rows[None, :] * stride_xm
        s_ptrs = signs_ptr + slot * stride_ss + offs_n[:, None] * stride_so + offs_kb[None, :] * stride_sk
        acc = tl.zeros((BLOCK_N, TILE_M), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            xt = tl.load(xt_ptrs, mask=(offs_k[:, None] < in_features - k0) & row_mask[None, :], other=0.0)
            packed = tl.load(s_ptrs, mask=n_mask[:, None] & (offs_kb[None, :] < packed_cols - k0 // 8), other=0)
            # bit j of byte kb -> column 8*kb + j: move it to the float's sign position, flip -1.0's sign with it.
            if SIGN_BIT == 31:
                wide = packed.to(tl.int32)
            else:
                wide = packed.to(tl.uint16)
            bits = ((wide[:, :, None] << shifts[None, None, :]) & sign_bit) ^ neg_one  # [BLOCK_N, BLOCK_KB, 8]
            sign = tl.reshape(bits, (BLOCK_N, BLOCK_K)).to(xt.dtype, bitcast=True)
            acc = mma(sign, xt, acc, PRECISION, UPCAST_DOT)
            xt_ptrs += BLOCK_K * stride_xk
            s_ptrs += BLOCK_KB * stride_sk

        scale = tl.load(scales_ptr + slot * stride_cs + offs_n * stride_co, mask=n_mask, other=0.0)
        yt_ptrs = y_ptr + offs_n[:, None] * stride_yn + rows[None, :] * stride_ym
        mask = n_mask[:, None] & row_mask[None, :]
        yt = tl.load(yt_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scale[:, None]
        tl.store(yt_ptrs, yt.to(y_ptr.dtype.element_ty), mask=mask)

    _prune_bitdelta_configs = pruner(BLOCK_K=("in_features", 64), BLOCK_N=("out_features", 32))
    _bitdelta_apply_tuned = autotuned(
        _bitdelta_apply_kernel,
        ("BLOCK_N", "BLOCK_K"),
        [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (32, 512, 4, 3), (64, 128, 4, 4),
         (64, 256, 4, 3), (64, 256, 8, 3), (64, 512, 8, 3), (128, 128, 8, 3), (128, 256, 8, 3)],
        key=["in_features", "out_features", "tiles_bucket"],
        prune=_prune_bitdelta_configs,
        restore=["y_ptr"],  # the kernel adds into y: the autotuner's benchmark runs must not
    )  # fmt: skip


def _check_bitdelta_args(
    op: str,
    y: torch.Tensor,
    x: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    tiles: SlotTiles,
    layout: SignLayout,
) -> None:
    """The checks every bitdelta_apply implementation makes; `layout` is the sign pool's (its kernel's)."""
    check_float(op, "y", y, 2)
    check_float(op, "x", x, 2)
    if x.dtype != y.dtype:
        raise ValueError(f"{op}: x and y must have one dtype, got x {x.dtype} and y {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    in_f, out_f = x.shape[1], y.shape[1]
    check_tensor(op, "signs", signs, torch.uint8, (None, *layout.pool_shape(1, out_f, in_f)[1:]))
    n_slots = signs.shape[0]
    check_tensor(op, "scales", scales, torch.float32, (n_slots, out_f))
    check_same_device(op, tiles, y=y, x=x, signs=signs, scales=scales)
    check_tiles(op, tiles, y.shape[0], n_slots)


def bitdelta_apply(
    y: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, tiles: SlotTiles
) -> None:  # pragma: no mutate block (a Triton launch: see [tool.mutmut])
    """Adds every row's 1-bit delta to y, reading each tile's packed signs once (Triton).

    Semantics:  y[i] += scales[s] * (x[i] @ unpack(signs[s]).T)   for every row i of a tile of slot s
                i.e. y[i, o] += scales[s, o] * sum_k x[i, k] * (2 * bit(signs[s, o, k // 8], k % 8) - 1).
                Accumulated in float32, added to y in float32, cast back. Rows in no tile are untouched.
    Args:  y: [N, out] float32/bfloat16/float16, updated in place.  x: [N, in], y's dtype.
           signs: [S, out, ceil(in/8)] uint8, the slot pool in the contract's bit layout (bit j, least
           significant first, of byte k is column 8k+j; 1 = +1; padding bits 0).
           scales: [S, out] float32 (a per-matrix scale is broadcast to all rows by the caller).
           tiles: SlotTiles of the batch (deltakernels/segments.py), on y's device.
    """
    _check_bitdelta_args("bitdelta_apply", y, x, signs, scales, tiles, ROWS)
    check_triton_device("bitdelta_apply", y)
    if triton is None:
        raise RuntimeError("bitdelta_apply needs triton; use bitdelta_apply_ref (select_delta_ops('torch'))")
    if tiles.empty or y.shape[1] == 0:
        return
    in_f, out_f = x.shape[1], y.shape[1]
    neg_one, sign_bit = _NEG_ONE_BITS[x.dtype]
    args = (
        y, x, signs, scales,
        tiles.order, tiles.tile_slot, tiles.tile_start, tiles.tile_rows,
        in_f, out_f, signs.shape[2], tiles_bucket(tiles.num_tiles),
        y.stride(0), y.stride(1), x.stride(0), x.stride(1),
        signs.stride(0), signs.stride(1), signs.stride(2), scales.stride(0), scales.stride(1),
    )  # fmt: skip
    consts = {"NEG_ONE": neg_one, "SIGN_BIT": sign_bit, "PRECISION": dot_precision(x.dtype), "TILE_M": TILE_ROWS}
    consts["UPCAST_DOT"] = upcast_dot(x.dtype)
    launch(_bitdelta_apply_kernel, _bitdelta_apply_tuned, _INTERPRET_CONFIG,
           lambda meta: (tiles.num_tiles, triton.cdiv(out_f, meta["BLOCK_N"])), args, consts)  # fmt: skip


def bitdelta_apply_cpu(
    y: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, tiles: SlotTiles
) -> None:
    """Adds every row's 1-bit delta to y with the compiled CPU kernel (deltakernels/csrc/bitdelta_cpu.cpp): lookup
    tables over groups of 4 sign bits, each distinct slot's signs read once, never unpacked.

    Semantics:  as bitdelta_apply (float32 accumulation, added to y in float32, cast back).
    Args:  as bitdelta_apply, on CPU tensors, except the sign pool's layout:
           signs: [S, ceil(out/16), ceil(in/8), 16] uint8, the contract's signs in the blocked16 layout
           (interleave_signs: byte [s, b, k, i] is byte k of output row 16b + i).
    """
    _check_bitdelta_args("bitdelta_apply_cpu", y, x, signs, scales, tiles, BLOCKED16)
    if tiles.empty or y.shape[1] == 0:
        return
    call_cpu_kernel("bitdelta_apply", y, x.contiguous(), signs.contiguous(), scales.contiguous(), tiles.order, tiles.ranges)


def bitdelta_apply_ref(
    y: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, tiles: SlotTiles
) -> None:
    """Pure-torch bitdelta_apply, same semantics and arguments: per distinct slot, its signs unpacked once and one
    matrix product over that slot's rows (no host sync; cost grows with the slots' signs, not rows x slots).

    Semantics:  y[i] += scales[s] * (x[i] @ unpack(signs[s]).T)   for every row i of a tile of slot s.
    Args:  as bitdelta_apply.
    """
    _check_bitdelta_args("bitdelta_apply_ref", y, x, signs, scales, tiles, ROWS)
    for s, start, end in tiles.slot_ranges:
        rows = tiles.order[start:end].long()
        delta = (x.index_select(0, rows).float() @ unpack_signs(signs[s], x.shape[1]).T) * scales[s]
        y[rows] = (y.index_select(0, rows).float() + delta).to(y.dtype)


# bitdelta_apply and its slot pool's sign layout per backend (deltakernels.select_delta_ops picks one).
IMPLEMENTATIONS = {
    "triton": (bitdelta_apply, ROWS),
    "cpu": (bitdelta_apply_cpu, BLOCKED16),
    "torch": (bitdelta_apply_ref, ROWS),
}
