"""A CPU engine's resident memory stays flat: oneDNN's caches bounded, freed heap handed back now and then."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from serving.engine.async_engine import EngineLoop
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.host_memory import CACHE_ENV, HeapTrimmer, bound_onednn_caches
from serving.engine.sampling_params import SamplingParams
from serving.models.tenant_layers import cpu_weight_packing_available
from tests.helpers import make_model_dir


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_trimmer_trims_at_most_once_per_interval():
    clock, calls = FakeClock(), []
    heap = HeapTrimmer(interval_s=30.0, trim=lambda: calls.append(clock.t), clock=clock)
    heap.after_step()  # right after start: nothing to hand back yet
    clock.t += 29.9
    heap.after_step()
    assert calls == []
    clock.t += 0.2
    heap.after_step()
    heap.after_step()  # the same instant: not twice
    assert calls == [130.1] and heap.trims == 1
    clock.t += 30.0
    heap.after_step()
    assert calls == [130.1, 160.1] and heap.trims == 2


def test_trimmer_without_malloc_trim_does_nothing():
    heap = HeapTrimmer(interval_s=0.0, trim=None)
    heap._trim = None  # a C library without malloc_trim (musl, macOS)
    heap.after_step()
    assert not heap.available and heap.trims == 0


def test_glibc_trim_is_found_here():
    assert HeapTrimmer().available  # CI and the supported servers run glibc


def test_cache_bounds_leave_an_operators_setting_alone(monkeypatch):
    monkeypatch.setenv(CACHE_ENV[0], "7")
    monkeypatch.delenv(CACHE_ENV[1], raising=False)
    assert bound_onednn_caches(64) == {CACHE_ENV[0]: "7", CACHE_ENV[1]: "64"}


_SHAPES = """
import ctypes, os, random, sys
import torch
from serving.engine.host_memory import bound_onednn_caches
if sys.argv[1] == "bounded":
    bound_onednn_caches(16)
def rss_mb():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1408, 512), 32)
rng = random.Random(0)
def calls(n):
    for _ in range(n):
        torch.ops.mkldnn._linear_pointwise(torch.randn(rng.randint(1, 600), 512), w, None, "none", [], "")
calls(100)
before = rss_mb()
calls(300)
print(rss_mb() - before)
"""


@pytest.mark.skipif(not cpu_weight_packing_available(), reason="no oneDNN packed linear in this torch")
def test_bounded_caches_keep_memory_flat_under_new_batch_shapes():
    # A fresh process: the caches' sizes are read when the process creates its first oneDNN primitive.
    growth = {}
    env = {k: v for k, v in os.environ.items() if k not in CACHE_ENV}  # an engine of this process set them
    for mode in ("bounded", "default"):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SHAPES), mode], capture_output=True, text=True,
                             timeout=300, check=True, env=env)  # fmt: skip
        growth[mode] = int(out.stdout.split()[-1])
    # measured: default +60-100 MB for 300 calls of new row counts (one cache entry each), bounded 0-2 MB
    assert growth["bounded"] <= 8, growth
    assert growth["default"] >= 30, growth  # the test measures something: unbounded caches do grow


def test_engine_loop_of_a_cpu_engine_trims_after_steps(tmp_path):
    base = make_model_dir(tmp_path / "base", arch="llama")
    engine = LLMEngine.from_model_dir(base, EngineConfig(device="cpu", dtype="float32", kernel_backend="torch",
                                                         max_model_len=64, max_num_batched_tokens=64))  # fmt: skip
    loop = EngineLoop(engine)
    assert loop.heap is not None and loop.heap.available
    calls = []
    loop.heap = HeapTrimmer(interval_s=0.0, trim=lambda: calls.append(1))

    async def one_request():
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        return [o async for o in loop.stream("r1", [1, 2, 3], params, None, "t")]

    loop.start()
    try:
        asyncio.run(one_request())
    finally:
        loop.stop(timeout=30)
    assert len(calls) >= 3  # one after each step that ran


def test_the_real_trim_is_glibcs_and_the_default_interval_is_30_s():
    from serving.engine.host_memory import _glibc_malloc_trim

    trim = _glibc_malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim")
    assert trim() in (0, 1)  # malloc_trim's own answer: whether it handed memory back
    assert HeapTrimmer().interval_s == 30.0


def test_no_trimmer_when_the_c_library_cannot_be_found(monkeypatch):
    import ctypes.util

    from serving.engine.host_memory import _glibc_malloc_trim

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # no libc to name (a static build)
    assert _glibc_malloc_trim() is None and not HeapTrimmer().available
