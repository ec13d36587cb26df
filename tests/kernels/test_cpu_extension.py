"""Building and loading the compiled CPU kernels: a build keyed by its sources, and a clear fallback to the torch
references (one log line) where they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltakernels import cpu_extension

ROOT = Path(__file__).resolve().parents[2]

PROBE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.WARNING, format='LOG %(message)s')\n"
    "from deltakernels import select_delta_ops\n"
    "ops = select_delta_ops('auto', 'cpu')\n"
    "select_delta_ops('auto', 'cpu')  # a second start-up in the process: no second log line\n"
    "print('BACKEND', ops.name)\n"
)


def _probe(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_auto_uses_the_compiled_kernels_where_they_build() -> None:
    done = _probe({})
    assert done.returncode == 0, done.stderr
    assert "BACKEND cpu" in done.stdout
    assert "unavailable" not in done.stderr


def test_no_compiler_falls_back_to_the_references_with_one_log_line(tmp_path: Path) -> None:
    # An empty cache (nothing prebuilt) and a compiler that always fails: the engine must still start.
    done = _probe({"DELTASERVE_KERNEL_CACHE": str(tmp_path / "cache"), "CXX": "/bin/false", "CC": "/bin/false"})
    assert done.returncode == 0, done.stderr
    assert "BACKEND torch" in done.stdout
    lines = [ln for ln in done.stderr.splitlines() if "CPU delta kernels unavailable" in ln]
    assert len(lines) == 1, done.stderr
    assert "using the slower torch reference kernels" in lines[0]


def test_turned_off_by_the_environment() -> None:
    done = _probe({"DELTASERVE_CPU_KERNELS": "0"})
    assert done.returncode == 0, done.stderr
    assert "BACKEND torch" in done.stdout
    assert "DELTASERVE_CPU_KERNELS=0" in done.stderr


def test_explicit_cpu_backend_says_why_it_cannot_run() -> None:
    code = "from deltakernels import select_delta_ops\nselect_delta_ops('cpu')\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DELTASERVE_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "compiled CPU delta kernels are unavailable here (DELTASERVE_CPU_KERNELS=0)" in done.stderr


def test_the_build_is_named_after_its_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An edited source must never load a stale build: the build directory's name hashes every source.
    copy = tmp_path / "csrc"
    copy.mkdir()
    for name in cpu_extension.SOURCES + cpu_extension.HEADERS:
        (copy / name).write_bytes((cpu_extension.CSRC / name).read_bytes())
    monkeypatch.setattr(cpu_extension, "CSRC", copy)
    before = cpu_extension.build_name()
    assert before.startswith("deltaserve_cpu_")
    (copy / "lora_cpu.cpp").write_text((copy / "lora_cpu.cpp").read_text() + "\n// edited\n")
    assert cpu_extension.build_name() != before


def test_the_kernels_report_their_code_path() -> None:
    from deltakernels import cpu_kernels

    module = cpu_kernels()
    assert module.isa() in ("avx512", "avx2", "generic")
    for isa in ("generic", "avx2") if module.has_avx2() else ("generic",):
        module.set_isa(isa)
        try:
            assert module.isa() == isa
        finally:
            module.set_isa("auto")
    assert module.isa() == ("avx512" if module.has_avx512() else "avx2" if module.has_avx2() else "generic")
    with pytest.raises(RuntimeError, match="isa must be auto, avx512, avx2 or generic"):
        module.set_isa("sse2")
