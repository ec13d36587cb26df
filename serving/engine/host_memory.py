"""Keeping a CPU server's resident memory flat over days of traffic.

Two things grow a CPU engine's memory with every new batch shape although nothing leaks (measured with a
random mix of prompt lengths and batch sizes, `python -m loadtest.soak` for a real server):
  - oneDNN's primitive cache and ideep's computation cache (the packed-weight GEMMs of TenantLinear) keep one
    entry per (rows, weight shape) seen, up to 1,024 each by default, a few hundred KB per entry. Every prefill
    chunk of a new length adds one. Bounded here to CACHE_ENTRIES each: the recent decode shapes stay cached;
    a rare prefill length pays for one primitive creation instead of keeping it for ever.
  - glibc keeps freed heap pages mapped (activations of varying sizes fragment its arenas). `malloc_trim(0)`
    hands them back; HeapTrimmer calls it after a step at most every `interval_s` (it takes 20-50 ms on a 2 GB
    process, and the pages it returns are faulted in again when reused: rarely, or it would cost latency).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("deltaserve.engine")

CACHE_ENTRIES = 128
# The environment variables oneDNN and ideep read when their first primitive is created (not at import).
CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(entries: int = CACHE_ENTRIES) -> dict[str, str]:
    """Caps both caches at `entries` unless the operator set them. Takes effect only when called before the
    process runs its first oneDNN GEMM (the engine calls it before it packs the weights). Returns the values
    in force."""
    for name in CACHE_ENV:
        os.environ.setdefault(name, str(entries))
    return {name: os.environ[name] for name in CACHE_ENV}


def _glibc_malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back this way
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class HeapTrimmer:
    """Hands freed heap pages back to the system after an engine step, at most once every interval_s."""

    def __init__(self, interval_s: float = 30.0, trim: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.interval_s = interval_s
        self._trim = trim if trim is not None else _glibc_malloc_trim()
        self._clock = clock
        self._last = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_step(self) -> None:
        """Called by the engine thread after each step."""
        now = self._clock()
        if self._trim is None or now - self._last < self.interval_s:
            return
        self._trim()
        self._last = now
        self.trims += 1
