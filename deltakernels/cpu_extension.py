"""The compiled CPU delta kernels (sources in deltakernels/csrc/): built once per machine, loaded by the "cpu" backend.

`python -m deltakernels.cpu_extension` builds them (scripts/setup.sh does, and the Dockerfile); `load()` returns the
module, building it first if this machine has no build yet, or None when that cannot be done — then the engine
uses the torch references, and one log line says why. The build goes to a cache directory named after a hash of
the sources, the flags and the torch version, so an edited source or another torch never loads a stale build:
`$DELTASERVE_KERNEL_CACHE`, else `~/.cache/deltaserve/kernels`. `DELTASERVE_CPU_KERNELS=0` turns them off.

The code is compiled for the baseline x86-64 (or any other) ISA; the AVX-512 and AVX2 paths are compiled per
function and chosen at run time (`isa()`), so a build also runs on a machine without them, on the portable paths.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger("deltaserve.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("common.cpp", "bitdelta_cpu.cpp", "lora_cpu.cpp", "module.cpp")
HEADERS = ("delta_cpu.h",)
CFLAGS = ("-O3", "-fopenmp", "-std=c++17")
LDFLAGS = ("-fopenmp",)

_state: dict[str, object] = {}  # "module": the loaded module or None, "reason": why it is None


def cache_root() -> Path:
    env = os.environ.get("DELTASERVE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deltaserve" / "kernels"


def build_name() -> str:
    """deltaserve_cpu_<hash>: the hash covers the sources, headers, flags, torch version and Python ABI."""
    import torch

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode() + b"\0" + torch.__version__.encode() + b"\0")
    h.update(sys.implementation.cache_tag.encode())
    return f"deltaserve_cpu_{h.hexdigest()[:16]}"


def _built_library(build_dir: Path, name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        path = build_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _import_library(name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401  (the extension links against torch's libraries)

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False) -> ModuleType:
    """Compiles the extension into the cache (a no-op when this exact build exists) and returns it.

    Raises: whatever the compiler or torch's build helper raises (no compiler, no ninja, a compile error).
    """
    name = build_name()
    build_dir = cache_root() / name
    found = _built_library(build_dir, name)
    if found is not None:
        return _import_library(name, found)
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        verbose=verbose,
    )


def load() -> ModuleType | None:
    """The compiled kernels, or None (logged once, with the reason) when they cannot be built or loaded here."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    module: ModuleType | None = None
    if os.environ.get("DELTASERVE_CPU_KERNELS", "1") == "0":
        reason = "DELTASERVE_CPU_KERNELS=0"
    else:
        name = build_name()
        prebuilt = _built_library(cache_root() / name, name) is not None
        if not prebuilt:
            log.warning("building the CPU delta kernels for this machine (once, about a minute) in %s", cache_root())
        try:
            module = build()
            reason = ""
        except Exception as exc:  # any failure to build or load means: use the references
            detail = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {detail[-1] if detail else ''}"
    if module is None:
        log.warning("CPU delta kernels unavailable (%s); using the slower torch reference kernels", reason)
    _state["module"], _state["reason"] = module, reason
    return module


def unavailable_reason() -> str:
    """Why load() returned None ('' when it did not, or was not called)."""
    return str(_state.get("reason", ""))


def main() -> int:
    """`python -m deltakernels.cpu_extension`: builds the kernels for this machine and prints where and which ISA."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = build(verbose="--verbose" in sys.argv)
    except Exception as exc:
        print(f"deltaserve: the CPU delta kernels could not be built ({type(exc).__name__}: {exc}); "
              "the engine will use the torch reference kernels on CPU", file=sys.stderr)  # fmt: skip
        return 1
    print(f"deltaserve: CPU delta kernels built in {cache_root() / build_name()} (this CPU runs {module.isa()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
