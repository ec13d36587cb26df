"""Shared pieces of the kernel tests (CPU under Triton's interpreter, and tests/gpu at real shapes).

Every kernel test compares an op against independent dense float32 math (no packing, no tiles), with one
tolerance table per dtype, over the tenant mixes below (punica's test_sgmv style).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from deltakernels import DeltaOps, cpu_kernels, select_delta_ops
from deltakernels.segments import SlotTiles, build_slot_tiles

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tolerances of an op's output against float32 math on the same (already rounded) inputs. bfloat16 allows for
# the output's rounding (Triton's interpreter truncates float32 -> bfloat16, one ulp = 2^-7 relative) and, for
# LoRA, for the float32 buffer rounded to the weights' dtype before the expand product.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


@dataclass(frozen=True)
class Mix:
    """A batch layout: sequence j has slot seq_slots[j] (-1 = no delta) and seq_lens[j] consecutive rows."""

    name: str
    seq_slots: tuple[int, ...]
    seq_lens: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        return sum(self.seq_lens)

    def row_slots(self) -> list[int]:
        return [s for s, n in zip(self.seq_slots, self.seq_lens) for _ in range(n)]

    def tiles(self, device: torch.device | str = "cpu") -> SlotTiles:
        return build_slot_tiles(self.seq_slots, self.seq_lens, device)


def _decode(name: str, slots: list[int]) -> Mix:
    return Mix(name, tuple(slots), (1,) * len(slots))


def _zipf_slots(n_rows: int, n_slots: int, seed: int, alpha: float = 1.2) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** alpha for k in range(n_slots)]
    return rng.choices(range(n_slots), weights=weights, k=n_rows)


def tenant_mixes(n_slots: int) -> list[Mix]:
    """The CPU test mixes over a pool of n_slots (>= 8) slots; small enough for Triton's interpreter."""
    assert n_slots >= 8
    return [
        _decode("distinct", list(range(n_slots))),
        _decode("zipf", _zipf_slots(24, n_slots, seed=1)),
        _decode("identical", [3] * 10),
        _decode("one_heavy", [2] * 34 + [0, 5, 7]),  # 34 rows of one slot: three tiles of slot 2
        _decode("interleaved_none", [0, -1, 1, -1, -1, 2, 0, -1, 6, 2, -1]),
        _decode("all_none", [-1] * 6),
        _decode("single_row", [4]),
        Mix("prefill", (1, -1, 4, 1, 0), (5, 3, 20, 2, 1)),  # a 20-row sequence spans two tiles
    ]


def decode_mix(n_rows: int, n_tenants: int) -> Mix:
    """n_rows decode rows shared round-robin by n_tenants slots 0..n_tenants-1 (benchmark and GPU layouts)."""
    return _decode(f"{n_rows}rows_{n_tenants}tenants", [i % n_tenants for i in range(n_rows)])


def random_signs(n_slots: int, out_f: int, in_f: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[S, out, in] float32 of +-1: the dense truth the packed signs are made from."""
    bits = torch.randint(0, 2, (n_slots, out_f, in_f), generator=generator)
    return bits.float() * 2 - 1


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """actual (any float dtype) against float32 `expected` with the tolerance of `dtype`."""
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def assert_untouched(after: torch.Tensor, before: torch.Tensor, row_slots: list[int]) -> None:
    """Rows without a delta (slot -1) are bit-for-bit unchanged."""
    rows = [i for i, s in enumerate(row_slots) if s < 0]
    if rows:
        assert torch.equal(after[rows], before[rows]), "rows with slot -1 were modified"


# The CPU-side backends every kernel test runs: the Triton kernels (interpreted here), the compiled CPU kernels on
# this CPU's best path and on their portable path, and the torch references.
BACKENDS = ("triton", "cpu", "cpu-avx2", "cpu-generic", "torch")


@contextmanager
def backend_ops(backend: str) -> Iterator[DeltaOps]:
    """The DeltaOps of a test backend; "cpu-avx2" and "cpu-generic" force that code path of the compiled kernels
    meanwhile ("cpu-avx2" skips on a CPU without AVX2; "cpu" is the best path this CPU has)."""
    if not backend.startswith("cpu"):
        yield select_delta_ops(backend)
        return
    ops = select_delta_ops("cpu")  # raises (fails the test) when the kernels cannot be built: setup.sh builds them
    if backend == "cpu":
        yield ops
        return
    module = cpu_kernels()
    isa = backend.removeprefix("cpu-")
    if isa == "avx2" and not module.has_avx2():
        pytest.skip("this CPU has no AVX2 + FMA")
    module.set_isa(isa)
    try:
        assert module.isa() == isa
        yield ops
    finally:
        module.set_isa("auto")


def pool_signs(ops: DeltaOps, signs: torch.Tensor) -> torch.Tensor:
    """A [S, out, W] contract-layout sign pool in the layout `ops` reads."""
    return ops.sign_layout.to_slot(signs)
