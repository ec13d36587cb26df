"""Delta kernels (the only package that imports triton) and the start-up choice between Triton and torch.

The engine calls `select_delta_ops()` once at start-up and keeps the returned `DeltaOps`; tests force a
backend with `select_delta_ops("torch")` or `select_delta_ops("triton")` (DESIGN, style point 6).

The package is called `deltakernels`, not `kernels`: transformers depends on Hugging Face's own `kernels`
package (hub kernels) and imports it at start-up, so a top-level `kernels` of ours would shadow it and break
every transformers import. Importing this package stays cheap (no triton, no torch): the engine's config reads
BACKENDS from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from deltakernels.segments import SlotTiles
    from formats.signs import SignLayout

BACKENDS = ("auto", "triton", "cpu", "torch")

# How a backend's 1-bit slot pool lays out the packed signs (a formats.signs.SignLayout): ROWS is the contract's
# own [S, out, ceil(in/8)]; deltakernels.bitdelta.BLOCKED16 interleaves 16 output rows, [S, ceil(out/16), ceil(in/8),
# 16], for the CPU kernel's table lookups. The slot pool stores signs in the layout of the backend that reads them.


@dataclass(frozen=True)
class DeltaOps:
    """The delta ops of one backend; every field has the signature of the op of the same name in deltakernels/."""

    name: str
    bitdelta_apply: Callable[..., None]
    lora_shrink: Callable[..., None]
    lora_expand: Callable[..., None]
    lora_apply: Callable[..., None]  # lora_shrink then lora_expand (the CPU kernels do both in one pass)
    sign_layout: SignLayout  # importing kernels stays light: the layouts come with the ops (they need torch)


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_cpu_module: Any = None


def cpu_kernels() -> Any:
    """The compiled CPU kernels module (deltakernels/cpu_extension.py); RuntimeError when this machine has none."""
    global _cpu_module
    if _cpu_module is None:
        from deltakernels import cpu_extension

        _cpu_module = cpu_extension.load()
        if _cpu_module is None:
            raise RuntimeError(
                f"the compiled CPU delta kernels are unavailable here ({cpu_extension.unavailable_reason()})"
            )
    return _cpu_module


def call_cpu_kernel(name: str, out: torch.Tensor, *args: Any) -> None:
    """Runs compiled kernel `name`(out, *args), which updates `out` in place. The kernels read rows with unit
    column stride: a strided `out` goes through a contiguous copy that is written back (inputs are the caller's
    to pass contiguous)."""
    kernel = getattr(_cpu_module or cpu_kernels(), name)
    if out.stride(-1) == 1:
        kernel(out, *args)
        return
    tmp = out.contiguous()
    kernel(tmp, *args)
    out.copy_(tmp)


def select_delta_ops(backend: str = "auto", device: Any = None) -> DeltaOps:
    """Picks the implementation of the delta ops; call once at start-up.

    Args:  backend: "triton" (the Triton kernels: needs CUDA, or TRITON_INTERPRET=1 for CPU tensors),
           "cpu" (the compiled CPU kernels of deltakernels/csrc, built by scripts/setup.sh), "torch" (the pure-torch
           references, any device), or "auto": triton when the tensors will live on a CUDA device and triton
           imports; on the CPU the compiled kernels, or the references (with one log line saying why) when this
           machine cannot build them.
           device: where the engine keeps its tensors (None: CUDA when available); "auto" never picks
           triton for a CPU engine on a GPU machine.
    Raises: ValueError for an unknown backend name; RuntimeError when "triton" or "cpu" cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown delta-kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = _auto_backend(device)
    _check_backend_runs_here(backend, device)
    from deltakernels import bitdelta, lora

    bitdelta_apply, sign_layout = bitdelta.IMPLEMENTATIONS[backend]
    lora_shrink, lora_expand, lora_apply = lora.IMPLEMENTATIONS[backend]
    return DeltaOps(backend, bitdelta_apply, lora_shrink, lora_expand, lora_apply, sign_layout)


def _auto_backend(device: Any) -> str:
    """select_delta_ops' "auto": triton for a CUDA engine when it imports, else the CPU kernels when they build."""
    import torch

    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda:
        return "triton" if triton_available() else "torch"
    from deltakernels import cpu_extension

    return "cpu" if cpu_extension.load() is not None else "torch"


def _check_backend_runs_here(backend: str, device: Any) -> None:
    """Raises RuntimeError, saying why, when `backend`'s kernels cannot run on `device` on this machine."""
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("delta-kernel backend 'triton' requested but triton is not installed")
        import torch

        if not torch.cuda.is_available() and not triton_interpreting():
            raise RuntimeError(
                "delta-kernel backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                "imported, to run the kernels on CPU tensors in Triton's interpreter); use backend 'torch' or 'auto'"
            )
    elif backend == "cpu":
        if device is not None and str(device).split(":")[0] != "cpu":
            raise RuntimeError(f"delta-kernel backend 'cpu' runs on CPU tensors, not on {device}")
        cpu_kernels()  # raises with the reason when they cannot be built here


# ---- launcher checks shared by the kernel files (plain Python: clear ValueErrors before any launch) ----

FLOAT_DTYPES_DOC = "float32, bfloat16 or float16"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands of `dtype`: exact math for float32 (TF32 would drop 13 mantissa bits)."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """True when tl.dot operands of `dtype` must be cast to float32 first: Triton's interpreter multiplies the
    raw bit patterns of bfloat16 operands (triton-lang/triton#11584, "not supported yet"). The products of
    bfloat16 values are exact in float32, so the result matches the GPU's bfloat16 MMA with float32 accumulation.
    """
    import torch

    return dtype == torch.bfloat16 and triton_interpreting()


def check_float(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    """Raises ValueError unless `t` is a float32/bfloat16/float16 tensor with `ndim` dimensions."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: {name} must be {FLOAT_DTYPES_DOC}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_tensor(op: str, name: str, t: Any, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    """Raises ValueError unless `t` has `dtype` and `shape` (None = any size on that dimension)."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    # The message is only built on failure: these checks run before every kernel launch.
    if t.dtype != dtype or t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must be {dtype} {want}, got {t.dtype} {list(t.shape)}")


def check_same_device(op: str, tiles: SlotTiles, **tensors: torch.Tensor) -> None:
    """Raises ValueError unless all tensors and the tile arrays are on one device."""
    named = {
        **tensors,
        "tiles.order": tiles.order,
        "tiles.tile_slot": tiles.tile_slot,
        "tiles.tile_start": tiles.tile_start,
        "tiles.tile_rows": tiles.tile_rows,
    }
    device = tiles.order.device
    if all(t.device == device for t in named.values()):
        return
    listing = ", ".join(f"{name} on {t.device}" for name, t in named.items())
    raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_triton_device(op: str, t: torch.Tensor) -> None:
    """Raises ValueError unless a Triton kernel can read `t`: on a CUDA device, or anywhere in the interpreter."""
    if t.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors, got {t.device} (use the torch backend for other devices, "
            "or TRITON_INTERPRET=1 to run the kernel on CPU tensors)"
        )


def check_tiles(op: str, tiles: SlotTiles, n_rows: int, n_slots: int) -> None:
    """Host-side sanity checks of a SlotTiles against a batch of `n_rows` rows and a pool of `n_slots` slots.

    No device sync: the device arrays' values are not read (tiles.slots, on the host, is checked instead). The
    arrays' dtypes and the tile count are checked once, when the SlotTiles is made.
    """
    if tiles.order.shape[0] > n_rows:
        raise ValueError(f"{op}: tiles cover {tiles.order.shape[0]} rows but the batch has only {n_rows}")
    if tiles.slots and (tiles.slots[0] < 0 or tiles.slots[-1] >= n_slots):
        raise ValueError(f"{op}: tiles use slots {tiles.slots[0]}..{tiles.slots[-1]} but the pool has {n_slots} slots")


def tiles_bucket(num_tiles: int) -> int:
    """Coarse tile count for the kernels' autotune keys: 1, 2, 4, ..., 64 (few tiles want narrower blocks)."""
    return min(64, 1 << max(0, num_tiles - 1).bit_length())
