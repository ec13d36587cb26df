"""The argument checks every delta op makes before it runs (deltakernels/__init__.py's check_* helpers as the ops use
them): each refusal names the op and the argument, and a tensor on another device is refused whichever it is.

The kernels would otherwise read another device's memory, or a wrong dtype's bytes, without a word.
"""

import dataclasses
from collections.abc import Callable

import pytest
import torch

from deltakernels import cpu_extension
from deltakernels.bitdelta import BLOCKED16, ROWS, bitdelta_apply_cpu, bitdelta_apply_ref
from deltakernels.lora import (
    lora_apply_cpu,
    lora_apply_ref,
    lora_expand_cpu,
    lora_expand_ref,
    lora_shrink_cpu,
    lora_shrink_ref,
)
from deltakernels.segments import build_slot_tiles, copy_stage

IN_F, OUT_F, R_MAX, N_SLOTS = 24, 20, 4, 2
TILE_FIELDS = ("order", "tile_slot", "tile_start", "tile_rows")
needs_cpu_kernels = pytest.mark.skipif(cpu_extension.load() is None, reason="CPU kernels not built here")


def _bitdelta_args(layout) -> dict[str, torch.Tensor]:
    signs = torch.stack([layout.to_slot(torch.zeros(OUT_F, 3, dtype=torch.uint8)) for _ in range(N_SLOTS)])
    return {"y": torch.zeros(3, OUT_F), "x": torch.zeros(3, IN_F), "signs": signs, "scales": torch.zeros(N_SLOTS, OUT_F)}


def _lora_args() -> dict[str, torch.Tensor]:
    return {
        "y": torch.zeros(3, OUT_F),
        "x": torch.zeros(3, IN_F),
        "a": torch.zeros(N_SLOTS, R_MAX, IN_F),
        "bt": torch.zeros(N_SLOTS, R_MAX, OUT_F),
        "scaling": torch.ones(N_SLOTS),
        "ranks": torch.full((N_SLOTS,), R_MAX, dtype=torch.int32),
        "buf": torch.zeros(3, R_MAX),
    }


# (op, its arguments in call order, the arguments it takes by name, the float arguments it checks)
OPS: list[tuple[Callable[..., None], tuple[str, ...], Callable[[], dict[str, torch.Tensor]], tuple[str, ...]]] = [
    (bitdelta_apply_ref, ("y", "x", "signs", "scales"), lambda: _bitdelta_args(ROWS), ("y", "x")),
    (bitdelta_apply_cpu, ("y", "x", "signs", "scales"), lambda: _bitdelta_args(BLOCKED16), ("y", "x")),
    (lora_shrink_ref, ("buf", "x", "a", "ranks"), _lora_args, ("x", "a")),
    (lora_shrink_cpu, ("buf", "x", "a", "ranks"), _lora_args, ("x", "a")),
    (lora_expand_ref, ("y", "buf", "bt", "scaling", "ranks"), _lora_args, ("y", "bt")),
    (lora_expand_cpu, ("y", "buf", "bt", "scaling", "ranks"), _lora_args, ("y", "bt")),
    (lora_apply_ref, ("y", "x", "a", "bt", "scaling", "ranks"), _lora_args, ("y", "x", "a", "bt")),
    (lora_apply_cpu, ("y", "x", "a", "bt", "scaling", "ranks"), _lora_args, ("y", "x", "a", "bt")),
]


def _call(op, names, args, tiles) -> None:
    positional = [args[n] for n in names]
    if op.__name__.startswith("lora_apply"):
        op(*positional, tiles, args["buf"])
    else:
        op(*positional, tiles)


def _params():
    for op, names, make, floats in OPS:
        marks = [needs_cpu_kernels] if op.__name__.endswith("_cpu") else []
        yield pytest.param(op, names, make, floats, id=op.__name__, marks=marks)


@pytest.mark.parametrize(("op", "names", "make", "floats"), list(_params()))
def test_every_argument_on_another_device_is_refused_by_name(op, names, make, floats):
    tiles = build_slot_tiles([0, -1, 1], [1, 1, 1])
    _call(op, names, make(), tiles)  # the arguments as made are accepted
    every = names + (("buf",) if op.__name__.startswith("lora_apply") else ())
    for name in every:
        args = make()
        args[name] = args[name].to("meta")
        with pytest.raises(ValueError, match=rf"^{op.__name__}: all tensors must be on one device, got .*\b{name} on meta"):
            _call(op, names, args, tiles)
    for field in TILE_FIELDS:
        moved = dataclasses.replace(tiles, **{field: getattr(tiles, field).to("meta")})
        with pytest.raises(ValueError, match=rf"^{op.__name__}: all tensors must be on one device, got .*tiles\.{field} on meta"):
            _call(op, names, make(), moved)


@pytest.mark.parametrize(("op", "names", "make", "floats"), list(_params()))
def test_a_float_argument_of_the_wrong_kind_is_refused_by_name(op, names, make, floats):
    tiles = build_slot_tiles([0, -1, 1], [1, 1, 1])
    for name in floats:
        args = make()
        args[name] = args[name].to(torch.int32)
        with pytest.raises(ValueError, match=rf"^{op.__name__}: {name} must be float32, bfloat16 or float16, got torch.int32$"):
            _call(op, names, args, tiles)
        args = make()
        args[name] = args[name][0]
        with pytest.raises(ValueError, match=rf"^{op.__name__}: {name} must have {make()[name].dim()} dimensions"):
            _call(op, names, args, tiles)


@pytest.mark.parametrize("op", [bitdelta_apply_ref, pytest.param(bitdelta_apply_cpu, marks=needs_cpu_kernels)])
def test_bitdelta_refuses_x_and_y_of_different_dtypes_or_rows(op):
    layout = BLOCKED16 if op is bitdelta_apply_cpu else ROWS
    tiles = build_slot_tiles([0, -1, 1], [1, 1, 1])
    args = _bitdelta_args(layout)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: x and y must have one dtype, got x torch.bfloat16 and y torch.float32$"):
        op(args["y"], args["x"].bfloat16(), args["signs"], args["scales"], tiles)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: x has 4 rows but y has 3$"):
        op(args["y"], torch.zeros(4, IN_F), args["signs"], args["scales"], tiles)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: scales must be torch.float32 \[2, {OUT_F}\], got torch.bfloat16"):
        op(args["y"], args["x"], args["signs"], args["scales"].bfloat16(), tiles)
    wrong = ROWS if layout is BLOCKED16 else BLOCKED16  # the other kernel's sign pool
    with pytest.raises(ValueError, match=rf"^{op.__name__}: signs must be torch.uint8"):
        op(args["y"], args["x"], _bitdelta_args(wrong)["signs"], args["scales"], tiles)


def test_copy_stage_gives_a_flat_array_of_the_dtype_on_the_device():
    stage = copy_stage("meta")
    for values in ([[1, 2], [3, 4]], torch.tensor([[1, 2], [3, 4]], dtype=torch.int64)):
        out = stage(torch.tensor(values) if isinstance(values, list) else values, torch.int32)
        assert (out.device.type, out.dtype, tuple(out.shape)) == ("meta", torch.int32, (4,))
    on_cpu = copy_stage("cpu")([5, 6, 7], torch.int32)
    assert on_cpu.dtype == torch.int32 and on_cpu.tolist() == [5, 6, 7]


LORA_OPS = [op for op, *_ in OPS if op.__name__.startswith("lora")]


@pytest.mark.parametrize("op", [pytest.param(op, id=op.__name__, marks=[needs_cpu_kernels] if op.__name__.endswith("_cpu")
                                             else []) for op in LORA_OPS])  # fmt: skip
def test_lora_refuses_a_scratch_or_rank_table_of_the_wrong_shape_by_name(op):
    op_names = next(names for o, names, *_ in OPS if o is op)
    tiles = build_slot_tiles([0, -1, 1], [1, 1, 1])
    for name, wrong, expected in (("buf", torch.zeros(3, R_MAX + 1), rf"torch.float32 \[3, {R_MAX}\]"),
                                  ("buf", torch.zeros(3, R_MAX, dtype=torch.bfloat16), rf"torch.float32 \[3, {R_MAX}\]"),
                                  ("ranks", torch.full((N_SLOTS + 1,), 1, dtype=torch.int32), rf"torch.int32 \[{N_SLOTS}\]"),
                                  ("ranks", torch.full((N_SLOTS,), 1, dtype=torch.int64), rf"torch.int32 \[{N_SLOTS}\]")):  # fmt: skip
        args = _lora_args()
        args[name] = wrong
        with pytest.raises(ValueError, match=rf"^{op.__name__}: {name} must be {expected}, got"):
            _call(op, op_names, args, tiles)


def test_the_cpu_backend_takes_any_cpu_device_and_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch):
    import deltakernels
    from deltakernels import select_delta_ops

    if cpu_extension.load() is not None:
        for device in ("cpu", "cpu:0", torch.device("cpu", 0)):
            assert select_delta_ops("cpu", device).name == "cpu"
    monkeypatch.setattr(deltakernels, "_cpu_module", None)
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    monkeypatch.setitem(cpu_extension._state, "reason", "no compiler")
    with pytest.raises(RuntimeError, match=r"^the compiled CPU delta kernels are unavailable here \(no compiler\)$"):
        select_delta_ops("cpu", "cpu")


@needs_cpu_kernels
def test_the_cpu_kernels_load_on_their_first_call(monkeypatch: pytest.MonkeyPatch):
    import deltakernels

    monkeypatch.setattr(deltakernels, "_cpu_module", None)  # as in a fresh process that picked no backend yet
    args, tiles = _lora_args(), build_slot_tiles([0, -1, 1], [1, 1, 1])
    lora_shrink_cpu(args["buf"], args["x"], args["a"], args["ranks"], tiles)
    assert deltakernels._cpu_module is not None
