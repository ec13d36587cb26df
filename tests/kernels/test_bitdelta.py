"""1-bit deltas: the contract's bit layout, and bitdelta_apply (Triton, in the interpreter here) and its torch
reference against dense float32 math over tenant mixes. Also the start-up choice of backend."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltakernels import DeltaOps, select_delta_ops
from deltakernels.bitdelta import (
    bitdelta_apply,
    bitdelta_apply_cpu,
    bitdelta_apply_ref,
    deinterleave_signs,
    interleave_signs,
    pack_signs,
    packed_width,
    unpack_signs,
)
from deltakernels.segments import build_slot_tiles
from tests.kernels import (
    BACKENDS,
    DTYPES,
    Mix,
    assert_close,
    assert_untouched,
    backend_ops,
    pool_signs,
    random_signs,
    tenant_mixes,
)

N_SLOTS = 8
MIXES = tenant_mixes(N_SLOTS)
# (in, out): odd sizes (not multiples of 8 nor of the blocks), a multiple of 8 but not of the K block, exact blocks.
SHAPES = ((37, 45), (136, 33), (128, 64))


# ---- the contract's packed layout ----


def test_pack_layout_hand_example() -> None:
    # bit j (least significant first) of byte k is column 8k+j; 1 = +1; padding bits 0.
    positive = torch.zeros(3, 10, dtype=torch.bool)
    positive[0, [0, 3, 8]] = True  # byte0 = 0b00001001, byte1 = 0b01
    positive[1, :] = True  # byte0 = 0xFF, byte1 = 0b11 (the 6 padding bits stay 0)
    positive[2, [7, 9]] = True  # byte0 = 0b10000000, byte1 = 0b10
    expected = torch.tensor([[0x09, 0x01], [0xFF, 0x03], [0x80, 0x02]], dtype=torch.uint8)
    packed = pack_signs(positive)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, expected)
    unpacked = unpack_signs(expected, 10)
    assert torch.equal(unpacked, positive.float() * 2 - 1)


@pytest.mark.parametrize("in_f", [1, 7, 8, 9, 37, 64])
def test_pack_unpack_round_trip(in_f: int) -> None:
    gen = torch.Generator().manual_seed(in_f)
    positive = torch.rand(5, in_f, generator=gen) > 0.5
    packed = pack_signs(positive)
    assert packed.shape == (5, packed_width(in_f))
    assert torch.equal(unpack_signs(packed, in_f, torch.bfloat16), positive.to(torch.bfloat16) * 2 - 1)
    if in_f % 8:  # padding bits are 0
        assert int(packed[:, -1].max()) < (1 << (in_f % 8))


def test_unpack_rejects_a_wrong_width() -> None:
    with pytest.raises(ValueError, match="packed signs"):
        unpack_signs(torch.zeros(2, 3, dtype=torch.uint8), 37)


def test_blocked16_layout_hand_example() -> None:
    # [b, k, i] is byte k of output row 16b + i; rows past `out` are zero; the bytes themselves are unchanged.
    packed = torch.arange(18 * 3, dtype=torch.uint8).reshape(18, 3)  # 18 rows: two blocks, the second padded
    blocked = interleave_signs(packed)
    assert blocked.shape == (2, 3, 16)
    assert int(blocked[0, 2, 5]) == int(packed[5, 2]) and int(blocked[1, 0, 1]) == int(packed[17, 0])
    assert torch.equal(blocked[1, :, 2:], torch.zeros(3, 14, dtype=torch.uint8))
    assert torch.equal(deinterleave_signs(blocked, 18), packed)
    pool = torch.randint(0, 256, (4, 45, 5), dtype=torch.uint8)  # leading slot dimension
    assert torch.equal(deinterleave_signs(interleave_signs(pool), 45), pool)


# ---- bitdelta_apply against dense math ----


def _problem(mix: Mix, in_f: int, out_f: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dense = random_signs(N_SLOTS, out_f, in_f, gen)  # [S, out, in] +-1: the truth
    signs = torch.stack([pack_signs(d > 0) for d in dense])
    scales = torch.rand(N_SLOTS, out_f, generator=gen) * 0.05 + 0.01
    x = torch.randn(mix.n_rows, in_f, generator=gen).to(dtype)
    y = torch.randn(mix.n_rows, out_f, generator=gen).to(dtype)
    return dense, signs, scales, x, y


def _dense_expected(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, scales: torch.Tensor, row_slots: list[int]):
    """y + scale[s] * x @ sign[s].T row by row, in float64 from the dense +-1 matrices (no packing involved)."""
    expected = y.double().clone()
    for i, s in enumerate(row_slots):
        if s >= 0:
            expected[i] += (x[i].double() @ dense[s].double().T) * scales[s].double()
    return expected.float()


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitdelta_apply_matches_dense(backend: str, dtype: torch.dtype, mix: Mix, in_f: int, out_f: int) -> None:
    dense, signs, scales, x, y = _problem(mix, in_f, out_f, dtype)
    before = y.clone()
    with backend_ops(backend) as ops:
        ops.bitdelta_apply(y, x, pool_signs(ops, signs), scales, mix.tiles())
    assert y.dtype == dtype
    assert_close(y, _dense_expected(before, x, dense, scales, mix.row_slots()), dtype, f"{backend} {mix.name}")
    assert_untouched(y, before, mix.row_slots())


def test_bitdelta_apply_ref_equals_dense_matrix_product() -> None:
    # The reference is x @ (scale[:, None] * unpack(sign)).T for a batch of one slot.
    gen = torch.Generator().manual_seed(3)
    in_f, out_f, n = 53, 21, 6
    signs = torch.randint(0, 256, (1, out_f, packed_width(in_f)), dtype=torch.uint8, generator=gen)
    signs[0, :, -1] &= (1 << (in_f % 8)) - 1  # padding bits 0
    scales = torch.rand(1, out_f, generator=gen)
    x = torch.randn(n, in_f, generator=gen)
    y = torch.zeros(n, out_f)
    bitdelta_apply_ref(y, x, signs, scales, build_slot_tiles([0], [n]))
    torch.testing.assert_close(y, x @ (scales[0][:, None] * unpack_signs(signs[0], in_f)).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_bits_do_not_count_as_minus_one(backend: str) -> None:
    # Every sign +1: the delta is scale * sum(x). The last byte has 3 padding bits, all 0.
    in_f, out_f, n = 37, 5, 3
    signs = pack_signs(torch.ones(out_f, in_f, dtype=torch.bool))[None]
    assert int(signs[0, 0, -1]) == 0b11111
    scales = torch.full((1, out_f), 0.5)
    x = torch.randn(n, in_f)
    y = torch.zeros(n, out_f)
    with backend_ops(backend) as ops:
        ops.bitdelta_apply(y, x, pool_signs(ops, signs), scales, build_slot_tiles([0], [n]))
    torch.testing.assert_close(y, 0.5 * x.sum(dim=1, keepdim=True).expand(n, out_f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_bits_set_to_one_add_nothing(backend: str) -> None:
    # Files are checked for zero padding bits, but the kernels must not depend on it: a padding column has no input.
    in_f, out_f, n = 37, 20, 4
    positive = torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(5)) > 0.5
    clean = pack_signs(positive)[None]
    dirty = clean.clone()
    dirty[0, :, -1] |= 0b11100000  # the 3 padding bits of the last byte
    scales = torch.full((1, out_f), 0.25)
    x = torch.randn(n, in_f)
    tiles = build_slot_tiles([0], [n])
    with backend_ops(backend) as ops:
        y_clean, y_dirty = torch.zeros(n, out_f), torch.zeros(n, out_f)
        ops.bitdelta_apply(y_clean, x, pool_signs(ops, clean), scales, tiles)
        ops.bitdelta_apply(y_dirty, x, pool_signs(ops, dirty), scales, tiles)
    torch.testing.assert_close(y_dirty, y_clean, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "cpu-generic"])
@pytest.mark.parametrize("in_f,out_f", [(1024, 2816), (2816, 1024), (4100, 70)])
def test_cpu_kernel_at_model_sizes(backend: str, in_f: int, out_f: int) -> None:
    # Real projection sizes (several work items per slot, K loops of hundreds of bytes), prefill and decode rows.
    mix = Mix("prefill_decode", (0, 1, -1, 2, 3, 0), (9, 1, 2, 1, 1, 1))
    gen = torch.Generator().manual_seed(7)
    signs = torch.randint(0, 256, (4, out_f, packed_width(in_f)), dtype=torch.uint8, generator=gen)
    if in_f % 8:
        signs[:, :, -1] &= (1 << (in_f % 8)) - 1
    scales = torch.rand(4, out_f, generator=gen) * 0.01
    x = torch.randn(mix.n_rows, in_f, generator=gen)
    y = torch.randn(mix.n_rows, out_f, generator=gen)
    expected = y.clone()
    bitdelta_apply_ref(expected, x, signs, scales, mix.tiles())
    with backend_ops(backend) as ops:
        ops.bitdelta_apply(y, x, pool_signs(ops, signs), scales, mix.tiles())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_cpu_kernel_updates_strided_outputs_in_place() -> None:
    # y a column-strided view (its rows are not unit-stride): the kernel writes through a copy, exactly once.
    mix = MIXES[1]
    _, signs, scales, x, _ = _problem(mix, 37, 45, torch.float32)
    base = torch.randn(45, mix.n_rows)
    y = base.T  # [n_rows, 45], column stride n_rows
    expected = y.clone()
    bitdelta_apply_ref(expected, x, signs, scales, mix.tiles())
    with backend_ops("cpu") as ops:
        ops.bitdelta_apply(y, x, pool_signs(ops, signs), scales, mix.tiles())
    torch.testing.assert_close(base.T, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend: str) -> None:
    # y a column slice of a fused output (row stride != out), x a column slice, the pool one slice of a bigger one.
    mix = MIXES[4]  # interleaved_none
    in_f, out_f = 40, 24
    dense, signs, scales, x, y = _problem(mix, in_f, out_f, torch.float32, seed=5)
    y_big = torch.randn(mix.n_rows, out_f + 20)
    x_big = torch.randn(mix.n_rows, in_f + 9)
    x_big[:, 9:] = x
    y_view, x_view = y_big[:, 7 : 7 + out_f], x_big[:, 9:]
    before_big = y_big.clone()
    with backend_ops(backend) as ops:
        ops.bitdelta_apply(y_view, x_view, pool_signs(ops, signs), scales, mix.tiles())
    expected = _dense_expected(before_big[:, 7 : 7 + out_f], x, dense, scales, mix.row_slots())
    assert_close(y_view, expected, torch.float32, backend)
    assert torch.equal(y_big[:, :7], before_big[:, :7])
    assert torch.equal(y_big[:, 7 + out_f :], before_big[:, 7 + out_f :])


# ---- argument checks ----


def test_cpu_kernel_rejects_a_pool_in_the_wrong_layout() -> None:
    mix = MIXES[0]
    _, signs, scales, x, y = _problem(mix, 37, 45, torch.float32)
    with pytest.raises(ValueError, match=r"signs must be torch.uint8 \[\*, 3, 5, 16\]"):
        bitdelta_apply_cpu(y, x, signs, scales, mix.tiles())  # the contract's rows layout, not blocked16
    with pytest.raises(ValueError, match="pool has 4 slots"):
        bitdelta_apply_cpu(y, x, interleave_signs(signs[:4]), scales[:4], mix.tiles())


@pytest.mark.parametrize("op", [bitdelta_apply, bitdelta_apply_ref])
def test_bitdelta_apply_rejects_bad_arguments(op) -> None:
    mix = MIXES[0]
    _, signs, scales, x, y = _problem(mix, 37, 45, torch.float32)
    tiles = mix.tiles()
    with pytest.raises(ValueError, match="x and y must have one dtype"):
        op(y, x.half(), signs, scales, tiles)
    with pytest.raises(ValueError, match="signs must be torch.uint8"):
        op(y, x, signs.int(), scales, tiles)
    with pytest.raises(ValueError, match=r"signs must be torch.uint8 \[\*, 45, 4\], got torch.uint8 \[8, 45, 5\]"):
        op(y, x[:, :30], signs, scales, tiles)
    with pytest.raises(ValueError, match="scales must be torch.float32"):
        op(y, x, signs, scales.half(), tiles)
    with pytest.raises(ValueError, match="x has 7 rows but y has 8"):
        op(y, x[:7], signs, scales, tiles)
    with pytest.raises(ValueError, match="pool has 4 slots"):
        op(y, x, signs[:4], scales[:4], tiles)
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        op(y.double(), x.double(), signs, scales, tiles)


# ---- backend selection ----


def test_reference_signatures_match_the_kernels() -> None:
    from deltakernels import lora

    pairs = [(bitdelta_apply, bitdelta_apply_ref), (bitdelta_apply_cpu, bitdelta_apply_ref)] + [
        (getattr(lora, name), getattr(lora, f"{name}_ref")) for name in ("lora_shrink", "lora_expand", "lora_apply")
    ] + [(getattr(lora, f"{name}_cpu"), getattr(lora, f"{name}_ref")) for name in ("lora_shrink", "lora_expand", "lora_apply")]
    for kernel, ref in pairs:
        assert inspect.signature(kernel) == inspect.signature(ref), kernel.__name__


def test_select_delta_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltakernels import lora

    torch_ops = select_delta_ops("torch")
    assert isinstance(torch_ops, DeltaOps) and torch_ops.name == "torch"
    assert torch_ops.bitdelta_apply is bitdelta_apply_ref and torch_ops.lora_expand is lora.lora_expand_ref
    triton_ops = select_delta_ops("triton")  # allowed here: TRITON_INTERPRET=1 (tests/conftest.py)
    assert triton_ops.name == "triton" and triton_ops.bitdelta_apply is bitdelta_apply
    assert triton_ops.lora_shrink is lora.lora_shrink
    cpu_ops = select_delta_ops("cpu")
    assert cpu_ops.name == "cpu" and cpu_ops.bitdelta_apply is bitdelta_apply_cpu and cpu_ops.sign_layout.name == "blocked16"
    assert cpu_ops.lora_shrink is lora.lora_shrink_cpu and cpu_ops.lora_expand is lora.lora_expand_cpu
    assert cpu_ops.lora_apply is lora.lora_apply_cpu and torch_ops.lora_apply is lora.lora_apply_ref
    assert torch_ops.sign_layout.name == triton_ops.sign_layout.name == "rows"
    expected_auto = "triton" if torch.cuda.is_available() else "cpu"
    assert select_delta_ops().name == select_delta_ops("auto").name == expected_auto
    assert select_delta_ops("auto", "cpu").name == "cpu"  # a CPU engine, even on a GPU machine
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        select_delta_ops("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown delta-kernel backend"):
        select_delta_ops("cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match=r"needs a CUDA device \(or TRITON_INTERPRET=1 set before triton"):
            select_delta_ops("triton")


def test_every_backend_gives_all_of_its_own_ops() -> None:
    from deltakernels import lora

    for backend, suffix in (("triton", ""), ("cpu", "_cpu"), ("torch", "_ref")):
        ops = select_delta_ops(backend)
        assert ops.name == backend
        for name in ("lora_shrink", "lora_expand", "lora_apply"):
            assert getattr(ops, name) is getattr(lora, name + suffix), (backend, name)
        assert ops.bitdelta_apply.__name__ == "bitdelta_apply" + suffix


def test_auto_picks_by_the_engine_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import deltakernels
    from deltakernels import cpu_extension, triton_available

    # A CUDA engine gets the Triton kernels (allowed on this machine by the interpreter), or the references when
    # triton does not import; a CPU engine the compiled kernels, or the references when they cannot be built.
    assert select_delta_ops("auto", "cuda").name == ("triton" if triton_available() else "torch")
    assert select_delta_ops("auto", torch.device("cuda", 0)).name == select_delta_ops("auto", "cuda").name
    monkeypatch.setattr(deltakernels, "triton_available", lambda: False)
    assert select_delta_ops("auto", "cuda").name == "torch"
    assert select_delta_ops("auto", "cpu").name == "cpu"
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    assert select_delta_ops("auto", "cpu").name == "torch"


def test_the_interpreter_is_on_only_when_its_environment_variable_says_so(  # no "triton" in the name: mutmut runs -k "not triton"
    monkeypatch: pytest.MonkeyPatch) -> None:
    from deltakernels import triton_interpreting

    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_interpreting() is False
    for value, on in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreting() is on, value


def test_tl_dot_precision_is_exact_for_float32_and_tf32_otherwise() -> None:
    from deltakernels import dot_precision

    # The values Triton's tl.dot accepts as input_precision; "ieee" keeps float32 products exact.
    assert [dot_precision(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["ieee", "tf32", "tf32"]


def test_triton_launchers_refuse_cpu_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    mix = MIXES[0]
    _, signs, scales, x, y = _problem(mix, 37, 45, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bitdelta_apply(y, x, signs, scales, mix.tiles())


def test_importing_deltakernels_is_light_and_leaves_transformers_its_own_kernels_package() -> None:
    # transformers imports Hugging Face's `kernels` package at start-up (a dependency from 5.25): with our
    # repository first on sys.path, `kernels` must still be theirs (or absent), and ours imports no torch/triton.
    code = (
        "import sys, importlib.util, deltakernels\n"
        "from pathlib import Path\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'heavy import'\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or not spec.origin or Path(spec.origin).parents[1] != Path(sys.argv[1]), spec\n"
        "import transformers.integrations.hub_kernels\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_slot_tiles_are_checked_when_made() -> None:
    # The launchers trust a SlotTiles' dtypes and tile count (checked once, here), so a wrong one never launches.
    good = build_slot_tiles([0, 1, 1], [1, 1, 1])
    fields = {f: getattr(good, f) for f in ("order", "tile_slot", "tile_start", "tile_rows", "num_tiles", "slots")}
    with pytest.raises(ValueError, match=r"tiles.order must be int32 \[\*\], got torch.int64"):
        type(good)(**{**fields, "order": good.order.long()})
    with pytest.raises(ValueError, match="tiles.num_tiles is 5 but tiles.tile_slot has 2"):
        type(good)(**{**fields, "num_tiles": 5})
    assert good.ranges.tolist() == [[0, 0, 1], [1, 1, 3]] and good.ranges.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_tiles_give_the_same_result(backend: str) -> None:
    # A fixed-size launch (CUDA graphs) pads the tiles with empty ones: the kernels must skip them.
    base = MIXES[4]  # interleaved_none: 11 rows, 4 slots; padded as a graph pads it, with rows of no delta
    mix = Mix("padded", base.seq_slots + (-1,) * 5, base.seq_lens + (1,) * 5)
    _, signs, scales, x, y = _problem(mix, 37, 45, torch.float32, seed=6)
    padded = build_slot_tiles(mix.seq_slots, mix.seq_lens, pad_to=16)
    assert padded.num_tiles == 16 and padded.order.shape[0] == 16 and padded.tile_rows[-1].item() == 0
    assert padded.slot_ranges == mix.tiles().slot_ranges
    # the empty tiles name slot 0, there in any pool, so a kernel reading a tile's slot before its row count
    # stays in bounds
    assert set(padded.tile_slot[mix.tiles().num_tiles :].tolist()) == {0}
    y_plain, y_padded = y.clone(), y.clone()
    with backend_ops(backend) as ops:
        ops.bitdelta_apply(y_plain, x, pool_signs(ops, signs), scales, mix.tiles())
        ops.bitdelta_apply(y_padded, x, pool_signs(ops, signs), scales, padded)
    assert torch.equal(y_padded, y_plain)
    with pytest.raises(ValueError, match="pad_to=3 is below the batch's 6 rows or 4 tiles"):
        build_slot_tiles(mix.seq_slots, mix.seq_lens, pad_to=3)
    assert build_slot_tiles([-1, -1], [1, 1], pad_to=8).empty  # no delta row: nothing to pad


def test_the_gpu_kernels_are_unavailable_when_their_compiler_does_not_import(monkeypatch):
    import sys

    from deltakernels import triton_available

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert triton_available() is False


def test_tiles_bucket_is_a_power_of_two_up_to_64():
    from deltakernels import tiles_bucket

    assert [tiles_bucket(n) for n in (0, 1, 2, 3, 4, 5, 33, 64, 65, 1000)] == [1, 1, 2, 4, 4, 8, 64, 64, 64, 64]


def test_the_cpu_op_checks_name_it_and_every_tensor_device():
    from deltakernels.bitdelta import BLOCKED16, bitdelta_apply_cpu
    from deltakernels.segments import build_slot_tiles

    tiles = build_slot_tiles([0], [2])  # one sequence of 2 rows in slot 0
    y, x = torch.zeros(2, 16), torch.zeros(2, 8)
    signs = BLOCKED16.to_slot(torch.zeros(16, 1, dtype=torch.uint8)).unsqueeze(0)
    scales = torch.zeros(1, 16)
    with pytest.raises(ValueError, match=r"^bitdelta_apply_cpu: y must have 2 dimensions"):
        bitdelta_apply_cpu(y[0], x, signs, scales, tiles)
    for name in ("y", "x"):
        args = {"y": y, "x": x}
        args[name] = args[name].to("meta")
        with pytest.raises(ValueError, match=rf"all tensors must be on one device, got .*{name} on meta"):
            bitdelta_apply_cpu(args["y"], args["x"], signs, scales, tiles)


def test_a_gpu_kernel_on_cpu_tensors_says_how_to_run_it(monkeypatch):
    import deltakernels
    from deltakernels import check_triton_device

    monkeypatch.setattr(deltakernels, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors, got cpu \(use the torch backend for other devices, or TRITON_INTERPRET=1 to run the kernel on CPU tensors\)$"):
        check_triton_device("op", torch.zeros(1))
