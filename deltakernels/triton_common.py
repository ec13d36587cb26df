"""What the Triton kernels of every op family share: reading a tile's rows, the MMA step, and the launch (a fixed
config in Triton's interpreter, else an autotuner whose candidates are pruned to the problem's size).

Imports triton (only deltakernels/ does); without it the names below that need it are absent and the launchers of
the op families raise before reaching them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from deltakernels import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references still work without triton
    triton = None

Grid = Callable[[dict[str, Any]], tuple[int, ...]]

if triton is not None:

    @triton.jit
    def tile_rows(order_ptr, tile_slot_ptr, tile_start_ptr, tile_rows_ptr, tile, TILE_M: tl.constexpr):
        """One tile of deltakernels/segments.py: (slot int64, n_rows, rows [TILE_M] int64, row_mask [TILE_M]).
        A padding tile (n_rows == 0, in fixed-size CUDA-graph launches) reads nothing: the caller returns."""
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        start = tl.load(tile_start_ptr + tile)
        n_rows = tl.load(tile_rows_ptr + tile)
        offs_m = tl.arange(0, TILE_M)
        row_mask = offs_m < n_rows
        rows = tl.load(order_ptr + start + offs_m, mask=row_mask, other=0).to(tl.int64)
        return slot, n_rows, rows, row_mask

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """acc + a @ b, accumulated in float32 (deltakernels.dot_precision, deltakernels.upcast_dot)."""
        if UPCAST_DOT:  # Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton#11584)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc


def pruner(**limits: tuple[str, int]) -> Callable[..., list]:
    """An autotuner's early_config_prune: keeps the candidates none of whose blocks is wider than the dimension
    it tiles, rounded up to a power of two (and at least a floor). `limits` maps a block parameter to (the
    kernel argument holding that dimension, the floor), e.g. BLOCK_K=("in_features", 64). When nothing fits,
    the first candidate (the narrowest) stays, so there is always one."""

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        bound = {block: max(floor, triton.next_power_of_2(named_args[arg])) for block, (arg, floor) in limits.items()}
        kept = [c for c in configs if all(c.kwargs[block] <= n for block, n in bound.items())]
        return kept or configs[:1]

    return prune


def autotuned(kernel, blocks: Sequence[str], table: Sequence[tuple[int, ...]], key: list[str], prune,
              restore: list[str]):  # fmt: skip
    """`kernel` behind an autotuner over `table` (rows of block sizes named by `blocks`, then num_warps and
    num_stages). `restore` names the outputs the kernel adds into: the autotuner's benchmark runs are undone."""
    configs = [
        triton.Config(dict(zip(blocks, row[: len(blocks)])), num_warps=row[-2], num_stages=row[-1]) for row in table
    ]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           restore_value=restore)(kernel)  # fmt: skip


def launch(kernel, tuned, interpret_config: dict[str, int], grid: Grid, args: tuple, consts: dict[str, Any]) -> None:
    """Runs `kernel` with `interpret_config` in Triton's interpreter (no autotuning there), else `tuned`, the
    same kernel autotuned. grid(meta) -> the launch grid for the block sizes in meta."""
    if triton_interpreting():
        kernel[grid(interpret_config)](*args, **consts, **interpret_config)
    else:
        tuned[grid](*args, **consts)
