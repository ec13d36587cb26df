"""The delta kernels on a CUDA GPU at Llama-7B projection sizes in bfloat16 (skipped without a GPU).

Each shape's first call autotunes (the autotuner restores y between its trial runs): the dense comparisons
below also check that a first, autotuning call adds the delta exactly once.
"""

from __future__ import annotations

import pytest
import torch

from deltakernels import select_delta_ops
from deltakernels.bitdelta import packed_width, unpack_signs
from deltakernels.lora import lora_apply, lora_apply_ref
from tests.kernels import Mix, assert_close, assert_untouched, decode_mix

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPE = torch.bfloat16
MIXES = [
    decode_mix(32, 1),
    decode_mix(32, 8),
    decode_mix(32, 32),
    Mix("prefill_and_decode", (0, -1, 1, 2, -1, 1), (300, 7, 40, 1, 1, 1)),
    Mix("interleaved_none", (3, -1, 5, -1, 3, 6, -1), (1, 1, 1, 1, 1, 1, 1)),
]
N_SLOTS = 32
BACKENDS = ("triton", "torch")


def _bitdelta_problem(mix: Mix, in_f: int, out_f: int, seed: int = 0):
    gen = torch.Generator(DEV).manual_seed(seed)
    signs = torch.randint(0, 256, (N_SLOTS, out_f, packed_width(in_f)), dtype=torch.uint8, device=DEV, generator=gen)
    if in_f % 8:
        signs[:, :, -1] &= (1 << (in_f % 8)) - 1
    scales = torch.rand(N_SLOTS, out_f, device=DEV, generator=gen) * 0.01 + 0.001
    x = torch.randn(mix.n_rows, in_f, device=DEV, generator=gen).to(DTYPE)
    y = torch.randn(mix.n_rows, out_f, device=DEV, generator=gen).to(DTYPE)
    return signs, scales, x, y


def _bitdelta_dense(y, x, signs, scales, row_slots: list[int]) -> torch.Tensor:
    expected = y.float().clone()
    slots_of = torch.tensor(row_slots, device=DEV)
    for s in sorted({s for s in row_slots if s >= 0}):
        rows = (slots_of == s).nonzero().flatten()
        w = scales[s][:, None] * unpack_signs(signs[s], x.shape[1])  # [out, in] float32
        expected[rows] += x[rows].float() @ w.T
    return expected


@pytest.mark.parametrize("in_f,out_f", [(4096, 4096), (4096, 11008), (11008, 4096), (4100, 4103)])
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitdelta_apply_gpu(backend: str, mix: Mix, in_f: int, out_f: int) -> None:
    signs, scales, x, y = _bitdelta_problem(mix, in_f, out_f)
    before = y.clone()
    select_delta_ops(backend).bitdelta_apply(y, x, signs, scales, mix.tiles(DEV))
    assert_close(y, _bitdelta_dense(before, x, signs, scales, mix.row_slots()), DTYPE, f"{backend} {mix.name}")
    assert_untouched(y, before, mix.row_slots())


RANKS = [8, 16, 64, 128] * (N_SLOTS // 4)


def _lora_problem(mix: Mix, in_f: int, out_f: int, r_max: int = 128, seed: int = 0):
    gen = torch.Generator(DEV).manual_seed(seed)
    a = torch.zeros(N_SLOTS, r_max, in_f, device=DEV)
    bt = torch.zeros(N_SLOTS, r_max, out_f, device=DEV)
    for s, r in enumerate(RANKS):
        a[s, :r] = torch.randn(r, in_f, device=DEV, generator=gen) / in_f**0.5
        bt[s, :r] = torch.randn(r, out_f, device=DEV, generator=gen) / r**0.5
    scaling = torch.rand(N_SLOTS, device=DEV, generator=gen) + 0.5
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEV)
    x = torch.randn(mix.n_rows, in_f, device=DEV, generator=gen).to(DTYPE)
    y = torch.randn(mix.n_rows, out_f, device=DEV, generator=gen).to(DTYPE)
    return a.to(DTYPE), bt.to(DTYPE), scaling, ranks, x, y


@pytest.mark.parametrize("in_f,out_f", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_apply_gpu(backend: str, mix: Mix, in_f: int, out_f: int) -> None:
    a, bt, scaling, ranks, x, y = _lora_problem(mix, in_f, out_f)
    buf = torch.empty(mix.n_rows, a.shape[1], device=DEV)
    before = y.clone()
    apply = lora_apply if backend == "triton" else lora_apply_ref
    apply(y, x, a, bt, scaling, ranks, mix.tiles(DEV), buf)
    expected = before.float().clone()
    for i, s in enumerate(mix.row_slots()):
        if s >= 0:
            r = RANKS[s]
            h = (x[i].float() @ a[s, :r].float().T).to(DTYPE).float()  # the buffer meets B in bfloat16
            expected[i] += scaling[s] * (h @ bt[s, :r].float())
    assert_close(y, expected, DTYPE, f"{backend} {mix.name}")
    assert_untouched(y, before, mix.row_slots())


def test_kernels_replay_in_a_cuda_graph() -> None:
    # The engine may capture decode steps in CUDA graphs: after a warm-up call (autotuning), the launches
    # capture and replay with no host sync, and a replay adds the deltas again.
    ops = select_delta_ops("triton")
    mix = decode_mix(32, 8)
    tiles = mix.tiles(DEV)
    signs, scales, x, y = _bitdelta_problem(mix, 4096, 4096, seed=1)
    a, bt, scaling, ranks, _, _ = _lora_problem(mix, 4096, 4096, seed=1)
    buf = torch.empty(mix.n_rows, a.shape[1], device=DEV)
    y_lora = y.clone()

    def step() -> None:
        ops.bitdelta_apply(y, x, signs, scales, tiles)
        ops.lora_shrink(buf, x, a, ranks, tiles)
        ops.lora_expand(y_lora, buf, bt, scaling, ranks, tiles)

    step()  # warm-up: compiles and autotunes outside the capture
    torch.cuda.synchronize()
    y0, y_lora0 = y.clone(), y_lora.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    y.copy_(y0)
    y_lora.copy_(y_lora0)
    graph.replay()
    torch.cuda.synchronize()
    y_eager, y_lora_eager = y0.clone(), y_lora0.clone()
    ops.bitdelta_apply(y_eager, x, signs, scales, tiles)
    ops.lora_shrink(buf, x, a, ranks, tiles)
    ops.lora_expand(y_lora_eager, buf, bt, scaling, ranks, tiles)
    assert torch.equal(y, y_eager)
    assert torch.equal(y_lora, y_lora_eager)
