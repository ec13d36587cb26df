"""LoRA deltas for a batch of many tenants: shrink (x @ A.T into a float32 buffer) then expand (buffer @ B.T into y).

The slot pool stores every slot at the pool's largest rank r_max: A as [S, r_max, in] and B transposed as
[S, r_max, out] (so a rank-r slot reads r contiguous rows of each), rows at and past the slot's rank zero.
Ranks 1..r_max are mixed freely in one batch; the kernels loop over the rank in blocks and skip the padding.

Over 400 lines: one op family in its three backends (Triton kernels and launchers, the CPU kernels' wrappers, the
torch references) with the checks they share, as each kernel file here; split by backend, a kernel would live
apart from the reference it is tested against.
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

try:
    import triton
    import triton.language as tl

    from deltakernels.triton_common import autotuned, launch, mma, pruner, tile_rows
except ImportError:  # the torch references still work without triton
    triton = None

# Fixed launch configurations used in Triton's interpreter (autotuned on GPUs).
_SHRINK_INTERPRET_CONFIG = {"BLOCK_R": 16, "BLOCK_K": 32}
_EXPAND_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_R": 16}

if triton is not None:

    @triton.jit
    def _lora_shrink_kernel(
        buf_ptr,
        x_ptr,
        a_ptr,
        ranks_ptr,
        order_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_rows_ptr,
        in_features,
        r_max,
        tiles_bucket,  # only an autotune key
        stride_bm,
        stride_br,
        stride_xm,
        stride_xk,
        stride_as,
        stride_ar,
        stride_ak,
        PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        TILE_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program: one tile (<= TILE_M rows of one slot) x BLOCK_R rank columns, computed transposed:
        # accT[r, m] = sum_k a[slot, r, k] * x[row_m, k]. Rank blocks at or past the slot's rank read nothing
        # and store zeros.
        pid_r = tl.program_id(1)
        slot, n_rows, rows, row_mask = tile_rows(order_ptr, tile_slot_ptr, tile_start_ptr, tile_rows_ptr,
                                                 tl.program_id(0), TILE_M)  # fmt: skip
        if n_rows == 0:  # a padding tile of a fixed-size (CUDA-graph) launch: nothing to read or write
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), r_max)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)

        xt_ptrs = x_ptr + offs_k[:, None] * stride_xk + rows[None, :] * stride_xm
        a_ptrs = a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
        k_end = tl.where(pid_r * BLOCK_R < rank, in_features, 0)
        acc = tl.zeros((BLOCK_R, TILE_M), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            k_mask = offs_k < in_features - k0
            xt = tl.load(xt_ptrs, mask=k_mask[:, None] & row_mask[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc = mma(a, xt, acc, PRECISION, UPCAST_DOT)
            xt_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak

        bt_ptrs = buf_ptr + offs_r[:, None] * stride_br + rows[None, :] * stride_bm
        tl.store(bt_ptrs, acc, mask=(offs_r[:, None] < r_max) & row_mask[None, :])

    @triton.jit
    def _lora_expand_kernel(
        y_ptr,
        buf_ptr,
        bt_ptr,
        scaling_ptr,
        ranks_ptr,
        order_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_rows_ptr,
        out_features,
        r_max,
        tiles_bucket,  # only an autotune key
        stride_ym,
        stride_yn,
        stride_bm,
        stride_br,
        stride_ts,
        stride_tr,
        stride_tn,
        PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        TILE_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # One program: one tile x BLOCK_N output features, transposed:
        # accT[n, m] = sum_{r < rank} bt[slot, r, n] * buf[row_m, r]; then y[row_m, n] += scaling * accT[n, m].
        pid_n = tl.program_id(1)
        slot, n_rows, rows, row_mask = tile_rows(order_ptr, tile_slot_ptr, tile_start_ptr, tile_rows_ptr,
                                                 tl.program_id(0), TILE_M)  # fmt: skip
        if n_rows == 0:  # a padding tile of a fixed-size (CUDA-graph) launch: nothing to read or write
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot), r_max)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < out_features
        offs_r = tl.arange(0, BLOCK_R)

        bufT_ptrs = buf_ptr + offs_r[:, None] * stride_br + rows[None, :] * stride_bm
        btT_ptrs = bt_ptr + slot * stride_ts + offs_n[:, None] * stride_tn + offs_r[None, :] * stride_tr
        acc = tl.zeros((BLOCK_N, TILE_M), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r_mask = offs_r < rank - r0
            bufT = tl.load(bufT_ptrs, mask=r_mask[:, None] & row_mask[None, :], other=0.0)
            btT = tl.load(btT_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            bufT = bufT.to(btT.dtype)  # the buffer is float32; the MMA runs in the weights' dtype
            acc = mma(btT, bufT, acc, PRECISION, UPCAST_DOT)
            bufT_ptrs += BLOCK_R * stride_br
            btT_ptrs += BLOCK_R * stride_tr

        scaling = tl.load(scaling_ptr + slot)
        yt_ptrs = y_ptr + offs_n[:, None] * stride_yn + rows[None, :] * stride_ym
        mask = n_mask[:, None] & row_mask[None, :]
        yt = tl.load(yt_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scaling
        tl.store(yt_ptrs, yt.to(y_ptr.dtype.element_ty), mask=mask)

    _prune_shrink_configs = pruner(BLOCK_R=("r_max", 16), BLOCK_K=("in_features", 64))
    _prune_expand_configs = pruner(BLOCK_R=("r_max", 16), BLOCK_N=("out_features", 32))
    _lora_shrink_tuned = autotuned(
        _lora_shrink_kernel,
        ("BLOCK_R", "BLOCK_K"),
        [(16, 128, 4, 4), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (32, 256, 4, 3), (32, 512, 8, 3),
         (64, 128, 4, 3), (64, 256, 8, 3)],
        key=["in_features", "r_max", "tiles_bucket"],
        prune=_prune_shrink_configs,
        restore=["buf_ptr"],
    )  # fmt: skip
    _lora_expand_tuned = autotuned(
        _lora_expand_kernel,
        ("BLOCK_N", "BLOCK_R"),
        [(32, 16, 4, 3), (64, 16, 4, 3), (64, 32, 4, 3), (128, 16, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3),
         (256, 16, 8, 3), (256, 32, 8, 3)],
        key=["out_features", "r_max", "tiles_bucket"],
        prune=_prune_expand_configs,
        restore=["y_ptr"],  # the kernel adds into y: the autotuner's benchmark runs must not
    )  # fmt: skip


def _check_pool_args(op: str, ranks: torch.Tensor, n_slots: int) -> None:
    check_tensor(op, "ranks", ranks, torch.int32, (n_slots,))


def _check_shrink_args(
    op: str, buf: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, tiles: SlotTiles
) -> None:
    check_float(op, "x", x, 2)
    check_float(op, "a", a, 3)
    if a.dtype != x.dtype:
        raise ValueError(f"{op}: a and x must have one dtype, got a {a.dtype} and x {x.dtype}")
    n_slots, r_max, in_f = a.shape
    if in_f != x.shape[1]:
        raise ValueError(f"{op}: a is [S, r_max, {in_f}] but x has {x.shape[1]} columns")
    check_tensor(op, "buf", buf, torch.float32, (x.shape[0], r_max))
    _check_pool_args(op, ranks, n_slots)
    check_same_device(op, tiles, buf=buf, x=x, a=a, ranks=ranks)
    check_tiles(op, tiles, x.shape[0], n_slots)


def _check_expand_args(
    op: str,
    y: torch.Tensor,
    buf: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
) -> None:
    check_float(op, "y", y, 2)
    check_float(op, "bt", bt, 3)
    if bt.dtype != y.dtype:
        raise ValueError(f"{op}: bt and y must have one dtype, got bt {bt.dtype} and y {y.dtype}")
    n_slots, r_max, out_f = bt.shape
    if out_f != y.shape[1]:
        raise ValueError(f"{op}: bt is [S, r_max, {out_f}] but y has {y.shape[1]} columns")
    check_tensor(op, "buf", buf, torch.float32, (y.shape[0], r_max))
    check_tensor(op, "scaling", scaling, torch.float32, (n_slots,))
    _check_pool_args(op, ranks, n_slots)
    check_same_device(op, tiles, y=y, buf=buf, bt=bt, scaling=scaling, ranks=ranks)
    check_tiles(op, tiles, y.shape[0], n_slots)


def lora_shrink(buf: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, tiles: SlotTiles) -> None:  # pragma: no mutate block (a Triton launch: see [tool.mutmut])
    """First half of LoRA for a batch of many tenants (Triton): each row's projection onto its slot's A.

    Semantics:  buf[i, r] = x[i] @ a[s, r]  for r < ranks[s], and 0 for ranks[s] <= r < r_max,
                for every row i of a tile of slot s (float32 accumulation). Rows in no tile are untouched.
    Args:  buf: [N, r_max] float32, written (caller-owned scratch, reused across calls).
           x: [N, in] float32/bfloat16/float16.  a: [S, r_max, in], x's dtype, the slot pool of A matrices
           (rows at and past a slot's rank are never read).  ranks: [S] int32, each slot's rank (1..r_max).
           tiles: SlotTiles of the batch (deltakernels/segments.py), on x's device.
    """
    _check_shrink_args("lora_shrink", buf, x, a, ranks, tiles)
    check_triton_device("lora_shrink", x)
    if triton is None:
        raise RuntimeError("lora_shrink needs triton; use lora_shrink_ref (select_delta_ops('torch'))")
    if tiles.empty or buf.shape[1] == 0:
        return
    in_f, r_max = x.shape[1], a.shape[1]
    args = (
        buf, x, a, ranks,
        tiles.order, tiles.tile_slot, tiles.tile_start, tiles.tile_rows,
        in_f, r_max, tiles_bucket(tiles.num_tiles),
        buf.stride(0), buf.stride(1), x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
    )  # fmt: skip
    consts = {"PRECISION": dot_precision(x.dtype), "UPCAST_DOT": upcast_dot(x.dtype), "TILE_M": TILE_ROWS}
    launch(_lora_shrink_kernel, _lora_shrink_tuned, _SHRINK_INTERPRET_CONFIG,
           lambda meta: (tiles.num_tiles, triton.cdiv(r_max, meta["BLOCK_R"])), args, consts)  # fmt: skip


def lora_expand(
    y: torch.Tensor,
    buf: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
) -> None:  # pragma: no mutate block (a Triton launch: see [tool.mutmut])
    """Second half of LoRA for a batch of many tenants (Triton): adds each row's expansion through its slot's B.

    Semantics:  y[i] += scaling[s] * (buf[i, :ranks[s]] @ bt[s, :ranks[s], :])   for every row i of a tile
                of slot s; buf is cast to bt's dtype for the product, accumulated in float32, added to y in
                float32, cast back. Rows in no tile are untouched.
    Args:  y: [N, out] float32/bfloat16/float16, updated in place.  buf: [N, r_max] float32 (lora_shrink's).
           bt: [S, r_max, out], y's dtype, the slot pool of B transposed.  scaling: [S] float32.
           ranks: [S] int32, each slot's rank (1..r_max).  tiles: SlotTiles of the batch, on y's device.
    """
    _check_expand_args("lora_expand", y, buf, bt, scaling, ranks, tiles)
    check_triton_device("lora_expand", y)
    if triton is None:
        raise RuntimeError("lora_expand needs triton; use lora_expand_ref (select_delta_ops('torch'))")
    if tiles.empty or y.shape[1] == 0:
        return
    out_f, r_max = y.shape[1], bt.shape[1]
    args = (
        y, buf, bt, scaling, ranks,
        tiles.order, tiles.tile_slot, tiles.tile_start, tiles.tile_rows,
        out_f, r_max, tiles_bucket(tiles.num_tiles),
        y.stride(0), y.stride(1), buf.stride(0), buf.stride(1), bt.stride(0), bt.stride(1), bt.stride(2),
    )  # fmt: skip
    consts = {"PRECISION": dot_precision(y.dtype), "UPCAST_DOT": upcast_dot(y.dtype), "TILE_M": TILE_ROWS}
    launch(_lora_expand_kernel, _lora_expand_tuned, _EXPAND_INTERPRET_CONFIG,
           lambda meta: (tiles.num_tiles, triton.cdiv(out_f, meta["BLOCK_N"])), args, consts)  # fmt: skip


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
    buf: torch.Tensor,
) -> None:  # pragma: no mutate block (a Triton launch: see [tool.mutmut])
    """LoRA for a batch of many tenants (Triton): lora_shrink into buf, then lora_expand into y.

    Semantics:  y[i] += scaling[s] * ((x[i] @ a[s, :ranks[s]].T) @ bt[s, :ranks[s], :])   for every row i of
                a tile of slot s. Rows in no tile are untouched (in y and in buf).
    Args:  y: [N, out], updated in place.  x: [N, in], y's dtype.  a: [S, r_max, in].  bt: [S, r_max, out].
           scaling: [S] float32.  ranks: [S] int32.  tiles: SlotTiles.  buf: [N, r_max] float32 scratch.
    """
    lora_shrink(buf, x, a, ranks, tiles)
    lora_expand(y, buf, bt, scaling, ranks, tiles)


def lora_shrink_cpu(buf: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, tiles: SlotTiles) -> None:
    """lora_shrink with the compiled CPU kernel (deltakernels/csrc/lora_cpu.cpp): one call for every tenant of the
    step, each slot's A read once for all of its rows.

    Semantics and arguments: as lora_shrink, on CPU tensors.
    """
    _check_shrink_args("lora_shrink_cpu", buf, x, a, ranks, tiles)
    if tiles.empty or buf.shape[1] == 0:
        return
    call_cpu_kernel("lora_shrink", buf, x.contiguous(), a.contiguous(), ranks, tiles.order, tiles.ranges)


def lora_expand_cpu(
    y: torch.Tensor,
    buf: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
) -> None:
    """lora_expand with the compiled CPU kernel (deltakernels/csrc/lora_cpu.cpp): each slot's B read once.

    Semantics and arguments: as lora_expand, on CPU tensors.
    """
    _check_expand_args("lora_expand_cpu", y, buf, bt, scaling, ranks, tiles)
    if tiles.empty or y.shape[1] == 0:
        return
    call_cpu_kernel("lora_expand", y, buf.contiguous(), bt.contiguous(), scaling, ranks, tiles.order, tiles.ranges)


def lora_apply_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
    buf: torch.Tensor,
) -> None:
    """lora_apply with the compiled CPU kernel: shrink and expand in one pass per tenant (its A then its B),
    one call for every tenant of the step.

    Semantics and arguments: as lora_apply, on CPU tensors (buf is written as lora_shrink writes it).
    """
    _check_shrink_args("lora_apply_cpu", buf, x, a, ranks, tiles)
    _check_expand_args("lora_apply_cpu", y, buf, bt, scaling, ranks, tiles)
    if tiles.empty or buf.shape[1] == 0:
        return
    call_cpu_kernel("lora_apply", y, x.contiguous(), a.contiguous(), bt.contiguous(), scaling, ranks, tiles.order,
                    tiles.ranges, buf)  # fmt: skip


def _within_rank(t: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """t [r_max, d] as float32 with the rows at and past `rank` (a device scalar) zeroed: never read (no sync)."""
    rows = torch.arange(t.shape[0], device=t.device)
    return torch.where((rows < rank)[:, None], t.float(), 0.0)


def lora_shrink_ref(buf: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, tiles: SlotTiles) -> None:
    """Pure-torch lora_shrink, same semantics and arguments: one product per distinct slot over its rows
    (no host sync).

    Semantics:  buf[i, r] = x[i] @ a[s, r] for r < ranks[s], 0 past it, for every row i of a tile of slot s.
    Args:  as lora_shrink.
    """
    _check_shrink_args("lora_shrink_ref", buf, x, a, ranks, tiles)
    _shrink_ref(buf, x, a, ranks, tiles)


def _shrink_ref(buf: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, tiles: SlotTiles) -> None:
    for s, start, end in tiles.slot_ranges:
        rows = tiles.order[start:end].long()
        buf[rows] = x.index_select(0, rows).float() @ _within_rank(a[s], ranks[s]).T


def lora_expand_ref(
    y: torch.Tensor,
    buf: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
) -> None:
    """Pure-torch lora_expand, same semantics and arguments: one product per distinct slot over its rows
    (no host sync).

    Semantics:  y[i] += scaling[s] * (buf[i, :ranks[s]] @ bt[s, :ranks[s], :])   for every row i of a tile of
                slot s (buf rounded to bt's dtype first, as the kernel does).
    Args:  as lora_expand.
    """
    _check_expand_args("lora_expand_ref", y, buf, bt, scaling, ranks, tiles)
    _expand_ref(y, buf, bt, scaling, ranks, tiles)


def _expand_ref(
    y: torch.Tensor, buf: torch.Tensor, bt: torch.Tensor, scaling: torch.Tensor, ranks: torch.Tensor, tiles: SlotTiles
) -> None:
    for s, start, end in tiles.slot_ranges:
        rows = tiles.order[start:end].long()
        w = _within_rank(buf.index_select(0, rows).T.to(bt.dtype), ranks[s]).T  # [rows, r_max], past the rank 0
        delta = (w @ _within_rank(bt[s], ranks[s])) * scaling[s]
        y[rows] = (y.index_select(0, rows).float() + delta).to(y.dtype)


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scaling: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SlotTiles,
    buf: torch.Tensor,
) -> None:
    """Pure-torch lora_apply, same semantics and arguments: lora_shrink_ref then lora_expand_ref, every argument
    checked before buf is written (as lora_apply_cpu)."""
    _check_shrink_args("lora_apply_ref", buf, x, a, ranks, tiles)
    _check_expand_args("lora_apply_ref", y, buf, bt, scaling, ranks, tiles)
    _shrink_ref(buf, x, a, ranks, tiles)
    _expand_ref(y, buf, bt, scaling, ranks, tiles)


# (lora_shrink, lora_expand, lora_apply) per backend (deltakernels.select_delta_ops picks one).
IMPLEMENTATIONS = {
    "triton": (lora_shrink, lora_expand, lora_apply),
    "cpu": (lora_shrink_cpu, lora_expand_cpu, lora_apply_cpu),
    "torch": (lora_shrink_ref, lora_expand_ref, lora_apply_ref),
}
