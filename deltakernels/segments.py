"""Rows of a batch grouped by delta slot: the metadata every delta kernel launches over.

Built once per engine step on the host (the scheduler knows each row's slot without a device sync),
copied to the device once, and shared by every layer of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# Puts host values on the device as a 1-D tensor: the engine passes one that writes into its one per-step transfer
# (serving/engine/staging.py); None means a copy of its own.
Stage = Callable[[Sequence[int], torch.dtype], torch.Tensor]


def copy_stage(device: torch.device | str) -> Stage:
    """A Stage that copies each array on its own (tests, tools, anything outside an engine step)."""

    def stage(values: Sequence[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        return t.to(dtype).reshape(-1).to(device, non_blocking=True)

    return stage

# Rows of one slot handled by one program of a delta kernel. tl.dot needs at least 16 rows, and a decode
# step rarely has more than 16 rows of one tenant, so one tile usually covers a whole tenant.
TILE_ROWS = 16


@dataclass(frozen=True)
class SlotTiles:
    """The rows with a delta (slot >= 0), sorted by slot, cut into tiles of at most TILE_ROWS rows of one slot.

    order:      [R] int32   row indices of the batch with slot >= 0, grouped by slot (stable within a slot).
    tile_slot:  [T] int32   the slot of each tile.
    tile_start: [T] int32   where each tile starts in `order`.
    tile_rows:  [T] int32   how many rows each tile has (1..TILE_ROWS).
    num_tiles:  T, a host int so launches need no device sync.
    slots:      the distinct slots, on the host, ascending (for torch loops and metrics).
    slot_ranges: for each distinct slot, (slot, start, end): its rows are `order[start:end]` (host ints),
                 consecutive ranges covering `order` in ascending slot order.
    ranges:      slot_ranges as a host int64 tensor [n, 3], for the compiled CPU kernels (built once per step).
    """

    order: torch.Tensor
    tile_slot: torch.Tensor
    tile_start: torch.Tensor
    tile_rows: torch.Tensor
    num_tiles: int
    slots: tuple[int, ...]
    slot_ranges: tuple[tuple[int, int, int], ...] = ()
    ranges: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.int64))

    def __post_init__(self) -> None:
        for name in ("order", "tile_slot", "tile_start", "tile_rows"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.dim() != 1:
                raise ValueError(f"tiles.{name} must be int32 [*], got {t.dtype} {list(t.shape)}")
        if self.tile_slot.shape[0] != self.num_tiles:
            raise ValueError(f"tiles.num_tiles is {self.num_tiles} but tiles.tile_slot has {self.tile_slot.shape[0]}")

    @property
    def empty(self) -> bool:
        return self.num_tiles == 0


def build_slot_tiles(
    seq_slots: Sequence[int],
    seq_lens: Sequence[int],
    device: torch.device | str = "cpu",
    stage: Stage | None = None,
    pad_to: int | None = None,
) -> SlotTiles:
    """Tiles for a batch laid out sequence after sequence: sequence j owns `seq_lens[j]` consecutive rows.

    seq_slots[j] is the slot of sequence j, -1 for base only. For a decode step every length is 1.
    stage: how the arrays reach `device` (default: one copy of their own).
    pad_to: for launches of a fixed size (a CUDA graph replays the grid it captured): when the batch has any
    tile, `order` and the tile arrays are padded to pad_to entries, the extra tiles empty (0 rows, slot 0), which
    the kernels skip. The host-side `slots` and `slot_ranges` describe the real rows only.
    Over 60 lines: most of it is this description of the layout the kernels rely on.
    """
    if len(seq_slots) != len(seq_lens):
        raise ValueError(f"seq_slots has {len(seq_slots)} entries, seq_lens {len(seq_lens)}")
    starts: list[int] = []
    offset = 0
    for n in seq_lens:
        starts.append(offset)
        offset += n
    by_slot: dict[int, list[int]] = {}
    for j, slot in enumerate(seq_slots):
        if slot >= 0 and seq_lens[j] > 0:
            by_slot.setdefault(slot, []).append(j)
    order: list[int] = []
    tile_slot: list[int] = []
    tile_start: list[int] = []
    tile_rows: list[int] = []
    slot_ranges: list[tuple[int, int, int]] = []
    for slot in sorted(by_slot):
        first = len(order)
        for j in by_slot[slot]:
            order.extend(range(starts[j], starts[j] + seq_lens[j]))
        slot_ranges.append((slot, first, len(order)))
        for t0 in range(first, len(order), TILE_ROWS):
            tile_slot.append(slot)
            tile_start.append(t0)
            tile_rows.append(min(TILE_ROWS, len(order) - t0))
    if pad_to is not None and tile_slot:
        if pad_to < max(len(order), len(tile_slot)):
            raise ValueError(f"pad_to={pad_to} is below the batch's {len(order)} rows or {len(tile_slot)} tiles")
        extra = pad_to - len(tile_slot)
        tile_start.extend([len(order)] * extra)
        tile_slot.extend([0] * extra)  # a slot every pool has: reading it stays in bounds
        tile_rows.extend([0] * extra)
        order.extend([0] * (pad_to - len(order)))  # covered by no tile: never read
    # One array for all four (a single transfer even without a shared stage).
    packed = (stage or copy_stage(device))(order + tile_slot + tile_start + tile_rows, torch.int32)
    r, t = len(order), len(tile_slot)
    return SlotTiles(
        order=packed[:r],
        tile_slot=packed[r : r + t],
        tile_start=packed[r + t : r + 2 * t],
        tile_rows=packed[r + 2 * t :],
        num_tiles=t,
        slots=tuple(sorted(by_slot)),
        slot_ranges=tuple(slot_ranges),
        ranges=torch.tensor(slot_ranges, dtype=torch.int64).reshape(-1, 3),
    )
