"""LoRA shrink/expand (Triton, in the interpreter here) and their torch references against dense float32 math,
with ranks 1..128 mixed in one batch and rows without a delta interleaved."""

from __future__ import annotations

import pytest
import torch

from deltakernels.lora import (
    lora_expand,
    lora_expand_cpu,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_cpu,
    lora_shrink_ref,
)
from tests.kernels import BACKENDS, DTYPES, Mix, assert_close, assert_untouched, backend_ops, tenant_mixes

N_SLOTS = 8
R_MAX = 128
RANKS = (1, 3, 8, 16, 64, 128, 5, 32)  # slot s has rank RANKS[s]: every mix mixes ranks
MIXES = tenant_mixes(N_SLOTS)
IN_F, OUT_F = 37, 45  # not multiples of 8 nor of any block


def apply(backend: str, y, x, a, bt, scaling, ranks, tiles, buf) -> None:
    """LoRA as the layers run it (the backend's lora_apply), checked against its shrink then its expand."""
    y2, buf2 = y.clone(), buf.clone()
    with backend_ops(backend) as ops:
        ops.lora_apply(y, x, a, bt, scaling, ranks, tiles, buf)
        ops.lora_shrink(buf2, x, a, ranks, tiles)
        ops.lora_expand(y2, buf2, bt, scaling, ranks, tiles)
    assert torch.equal(y, y2) or torch.allclose(y, y2, rtol=0, atol=0, equal_nan=True), "lora_apply != shrink + expand"
    assert torch.equal(buf, buf2) or torch.allclose(buf, buf2, rtol=0, atol=0, equal_nan=True)


def _problem(mix: Mix, dtype: torch.dtype, in_f: int = IN_F, out_f: int = OUT_F, seed: int = 0, pad: float = 0.0):
    """A slot pool (rows past each slot's rank filled with `pad`), activations and a scratch buffer."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.full((N_SLOTS, R_MAX, in_f), pad)
    bt = torch.full((N_SLOTS, R_MAX, out_f), pad)
    for s, r in enumerate(RANKS):
        a[s, :r] = torch.randn(r, in_f, generator=gen) / in_f**0.5
        bt[s, :r] = torch.randn(r, out_f, generator=gen) / r**0.5
    scaling = torch.rand(N_SLOTS, generator=gen) + 0.5
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    x = torch.randn(mix.n_rows, in_f, generator=gen).to(dtype)
    y = torch.randn(mix.n_rows, out_f, generator=gen).to(dtype)
    buf = torch.full((mix.n_rows, R_MAX), 7.0)  # stale scratch contents
    return a.to(dtype), bt.to(dtype), scaling, ranks, x, y, buf


def _dense_shrink(x: torch.Tensor, a: torch.Tensor, row_slots: list[int]) -> dict[int, torch.Tensor]:
    """Row -> [r] float64 x[i] @ a[s, :r].T for the rows with a delta."""
    return {i: x[i].double() @ a[s, : RANKS[s]].double().T for i, s in enumerate(row_slots) if s >= 0}


def _dense_apply(y, x, a, bt, scaling, row_slots: list[int]) -> torch.Tensor:
    expected = y.double().clone()
    for i, h in _dense_shrink(x, a, row_slots).items():
        s = row_slots[i]
        expected[i] += float(scaling[s]) * (h @ bt[s, : RANKS[s]].double())
    return expected.float()


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_apply_matches_dense(backend: str, dtype: torch.dtype, mix: Mix) -> None:
    a, bt, scaling, ranks, x, y, buf = _problem(mix, dtype)
    before = y.clone()
    apply(backend, y, x, a, bt, scaling, ranks, mix.tiles(), buf)
    assert y.dtype == dtype
    assert_close(y, _dense_apply(before, x, a, bt, scaling, mix.row_slots()), dtype, f"{backend} {mix.name}")
    assert_untouched(y, before, mix.row_slots())


@pytest.mark.parametrize("mix", [m for m in MIXES if m.name in ("zipf", "interleaved_none", "prefill")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_shrink_fills_rank_columns_and_zeroes_the_rest(backend: str, dtype: torch.dtype, mix: Mix) -> None:
    a, _, _, ranks, x, _, buf = _problem(mix, dtype, seed=1)
    with backend_ops(backend) as ops:
        ops.lora_shrink(buf, x, a, ranks, mix.tiles())
    row_slots = mix.row_slots()
    for i, h in _dense_shrink(x, a, row_slots).items():
        r = RANKS[row_slots[i]]
        assert_close(buf[i, :r], h, dtype, f"row {i} rank {r}")
        assert torch.equal(buf[i, r:], torch.zeros(R_MAX - r)), f"row {i}: columns past rank {r} not zero"
    for i, s in enumerate(row_slots):
        if s < 0:
            assert torch.equal(buf[i], torch.full((R_MAX,), 7.0)), f"row {i} without a delta: buffer touched"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_expand_alone(backend: str, dtype: torch.dtype) -> None:
    # Expand from a given float32 buffer: columns past each rank hold garbage that must be ignored.
    mix = MIXES[1]  # zipf
    _, bt, scaling, ranks, _, y, _ = _problem(mix, dtype, seed=2)
    gen = torch.Generator().manual_seed(9)
    buf = torch.randn(mix.n_rows, R_MAX, generator=gen)
    before = y.clone()
    with backend_ops(backend) as ops:
        ops.lora_expand(y, buf, bt, scaling, ranks, mix.tiles())
    expected = before.double().clone()
    for i, s in enumerate(mix.row_slots()):
        r = RANKS[s]
        h = buf[i, :r].to(dtype).double()  # the product runs in the weights' dtype
        expected[i] += float(scaling[s]) * (h @ bt[s, :r].double())
    assert_close(y, expected.float(), dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_rows_past_the_rank_are_never_read(backend: str) -> None:
    # NaN in the padding rows of A and B^T: any read of them would poison the result.
    mix = MIXES[1]
    a, bt, scaling, ranks, x, y, buf = _problem(mix, torch.float32, seed=3, pad=float("nan"))
    before = y.clone()
    apply(backend, y, x, a, bt, scaling, ranks, mix.tiles(), buf)
    assert not torch.isnan(y).any() and not torch.isnan(buf).any()
    assert_close(y, _dense_apply(before, x, a, bt, scaling, mix.row_slots()), torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_larger_rank_pool_and_sizes(backend: str) -> None:
    # r_max above 128 (several rank blocks past the largest used rank), in/out spanning several blocks.
    mix = MIXES[4]  # interleaved_none
    in_f, out_f, r_max = 70, 100, 160
    gen = torch.Generator().manual_seed(4)
    ranks_list = [160, 1, 33, 2, 4, 8, 150, 16]
    a = torch.zeros(N_SLOTS, r_max, in_f)
    bt = torch.zeros(N_SLOTS, r_max, out_f)
    for s, r in enumerate(ranks_list):
        a[s, :r] = torch.randn(r, in_f, generator=gen) / in_f**0.5
        bt[s, :r] = torch.randn(r, out_f, generator=gen) / r**0.5
    a, bt = a.half(), bt.half()
    scaling = torch.rand(N_SLOTS, generator=gen)
    ranks = torch.tensor(ranks_list, dtype=torch.int32)
    x = torch.randn(mix.n_rows, in_f, generator=gen).half()
    y = torch.randn(mix.n_rows, out_f, generator=gen).half()
    buf = torch.empty(mix.n_rows, r_max)
    before = y.clone()
    apply(backend, y, x, a, bt, scaling, ranks, mix.tiles(), buf)
    expected = before.double().clone()
    for i, s in enumerate(mix.row_slots()):
        if s >= 0:
            h = (x[i].double() @ a[s].double().T).half().double()  # the buffer is rounded to fp16 for expand
            expected[i] += float(scaling[s]) * (h @ bt[s].double())
    assert_close(y, expected.float(), torch.float16, backend)
    assert_untouched(y, before, mix.row_slots())


@pytest.mark.parametrize("backend", ["cpu", "cpu-generic"])
@pytest.mark.parametrize("in_f,out_f,r_max", [(1024, 2816, 16), (2816, 1024, 64), (4100, 70, 16)])
def test_cpu_kernels_at_model_sizes(backend: str, in_f: int, out_f: int, r_max: int) -> None:
    # Real projection sizes (several work items per slot, long K loops), prefill and decode rows, ranks mixed.
    mix = Mix("prefill_decode", (0, 1, -1, 2, 3, 0), (9, 1, 2, 1, 1, 1))
    gen = torch.Generator().manual_seed(8)
    ranks_list = [r_max, 1, r_max // 2, 3]
    a, bt = torch.zeros(4, r_max, in_f), torch.zeros(4, r_max, out_f)
    for s, r in enumerate(ranks_list):
        a[s, :r] = torch.randn(r, in_f, generator=gen) / in_f**0.5
        bt[s, :r] = torch.randn(r, out_f, generator=gen) / r**0.5
    scaling, ranks = torch.rand(4, generator=gen), torch.tensor(ranks_list, dtype=torch.int32)
    x = torch.randn(mix.n_rows, in_f, generator=gen)
    y = torch.randn(mix.n_rows, out_f, generator=gen)
    expected, buf_ref, buf = y.clone(), torch.zeros(mix.n_rows, r_max), torch.zeros(mix.n_rows, r_max)
    lora_shrink_ref(buf_ref, x, a, ranks, mix.tiles())
    lora_expand_ref(expected, buf_ref, bt, scaling, ranks, mix.tiles())
    apply(backend, y, x, a, bt, scaling, ranks, mix.tiles(), buf)
    torch.testing.assert_close(buf, buf_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["kernel", "cpu", "ref"])
def test_lora_rejects_bad_arguments(which: str) -> None:
    shrink, expand = {
        "kernel": (lora_shrink, lora_expand),
        "cpu": (lora_shrink_cpu, lora_expand_cpu),
        "ref": (lora_shrink_ref, lora_expand_ref),
    }[which]
    mix = MIXES[0]
    a, bt, scaling, ranks, x, y, buf = _problem(mix, torch.bfloat16)
    tiles = mix.tiles()
    with pytest.raises(ValueError, match="a and x must have one dtype"):
        shrink(buf, x.float(), a, ranks, tiles)
    with pytest.raises(ValueError, match=r"a is \[S, r_max, 37\] but x has 36 columns"):
        shrink(buf, x[:, :36], a, ranks, tiles)
    with pytest.raises(ValueError, match=r"buf must be torch.float32 \[8, 128\]"):
        shrink(buf.bfloat16(), x, a, ranks, tiles)
    with pytest.raises(ValueError, match=r"ranks must be torch.int32 \[8\]"):
        shrink(buf, x, a, ranks.long(), tiles)
    with pytest.raises(ValueError, match=r"buf must be torch.float32 \[8, 128\], got torch.float32 \[8, 64\]"):
        expand(y, buf[:, :64], bt, scaling, ranks, tiles)
    with pytest.raises(ValueError, match=r"bt is \[S, r_max, 45\] but y has 44 columns"):
        expand(y[:, :44], buf, bt, scaling, ranks, tiles)
    with pytest.raises(ValueError, match=r"scaling must be torch.float32 \[8\]"):
        expand(y, buf, bt, scaling.bfloat16(), ranks, tiles)
    with pytest.raises(ValueError, match="tiles cover 8 rows but the batch has only 4"):
        expand(y[:4], buf[:4], bt, scaling, ranks, tiles)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_tiles_give_the_same_result(backend: str) -> None:
    # A fixed-size launch (CUDA graphs) pads the tiles with empty ones: the kernels must skip them.
    from deltakernels.segments import build_slot_tiles

    base = MIXES[4]  # padded as a graph pads it, with rows of no delta
    mix = Mix("padded", base.seq_slots + (-1,) * 5, base.seq_lens + (1,) * 5)
    a, bt, scaling, ranks, x, y, buf = _problem(mix, torch.float32, seed=5)
    padded = build_slot_tiles(mix.seq_slots, mix.seq_lens, pad_to=16)
    y_plain, y_padded, buf2 = y.clone(), y.clone(), buf.clone()
    apply(backend, y_plain, x, a, bt, scaling, ranks, mix.tiles(), buf)
    apply(backend, y_padded, x, a, bt, scaling, ranks, padded, buf2)
    assert torch.equal(y_padded, y_plain) and torch.equal(buf2, buf)


@pytest.mark.parametrize("which", ["kernel", "cpu", "ref"])
def test_refusals_name_the_op(which: str) -> None:
    names = {"kernel": ("lora_shrink", "lora_expand"), "cpu": ("lora_shrink_cpu", "lora_expand_cpu"),
             "ref": ("lora_shrink_ref", "lora_expand_ref")}[which]  # fmt: skip
    shrink, expand = {"kernel": (lora_shrink, lora_expand), "cpu": (lora_shrink_cpu, lora_expand_cpu),
                      "ref": (lora_shrink_ref, lora_expand_ref)}[which]  # fmt: skip
    mix = MIXES[0]
    a, bt, scaling, ranks, x, y, buf = _problem(mix, torch.float32)
    with pytest.raises(ValueError, match=rf"^{names[0]}: "):
        shrink(buf, x.double(), a, ranks, mix.tiles())
    with pytest.raises(ValueError, match=rf"^{names[1]}: "):
        expand(y, buf, bt, scaling.double(), ranks, mix.tiles())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_one_pool(backend: str) -> None:
    """r_max = 1 (every slot rank 1): the one rank column is computed, not skipped as if the pool were empty."""
    mix = MIXES[0]
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(N_SLOTS, 1, IN_F, generator=gen)
    bt = torch.randn(N_SLOTS, 1, OUT_F, generator=gen)
    scaling = torch.rand(N_SLOTS, generator=gen) + 0.5
    ranks = torch.ones(N_SLOTS, dtype=torch.int32)
    x = torch.randn(mix.n_rows, IN_F, generator=gen)
    y = torch.randn(mix.n_rows, OUT_F, generator=gen)
    buf = torch.full((mix.n_rows, 1), 7.0)
    before = y.clone()
    apply(backend, y, x, a, bt, scaling, ranks, mix.tiles(), buf)
    expected = before.double().clone()
    for i, s in enumerate(mix.row_slots()):
        if s >= 0:
            expected[i] += float(scaling[s]) * (x[i].double() @ a[s].double().T) @ bt[s].double()
    assert_close(y, expected.float(), torch.float32, backend)


def test_refusals_name_the_argument_and_check_every_device() -> None:
    mix = MIXES[0]
    a, bt, scaling, ranks, x, y, buf = _problem(mix, torch.float32)
    with pytest.raises(ValueError, match=r"^lora_shrink_ref: x must have 2 dimensions"):
        lora_shrink_ref(buf, x[0], a, ranks, mix.tiles())
    with pytest.raises(ValueError, match=r"^lora_expand_ref: y must have 2 dimensions"):
        lora_expand_ref(y[0], buf, bt, scaling, ranks, mix.tiles())
    with pytest.raises(ValueError, match=r"^lora_expand_ref: tiles cover"):
        lora_expand_ref(y[:4], buf[:4], bt, scaling, ranks, mix.tiles())
    with pytest.raises(ValueError, match=r"^lora_shrink_ref: all tensors must be on one device, got .*a on meta"):
        lora_shrink_ref(buf, x, a.to("meta"), ranks, mix.tiles())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_single_input_or_output_feature(backend: str) -> None:
    mix = MIXES[0]
    for in_f, out_f in ((1, OUT_F), (IN_F, 1)):  # a degenerate projection is still applied, not skipped
        a, bt, scaling, ranks, x, y, buf = _problem(mix, torch.float32, in_f=in_f, out_f=out_f)
        before = y.clone()
        apply(backend, y, x, a, bt, scaling, ranks, mix.tiles(), buf)
        assert_close(y, _dense_apply(before, x, a, bt, scaling, mix.row_slots()), torch.float32, f"{in_f}x{out_f}")
