"""The host-memory tier between the blob store on disk and the GPU slots: loaded deltas, LRU by bytes.

A delta is immutable and keyed by owner/kind/sha256 (registry.deltas), so a cached copy is never stale; a
new version of an adapter is a new key, and tenants never share a copy. Entries that running requests hold stay alive through those references even when
evicted here, so eviction never disturbs a running request.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from registry.deltas import Delta

# (event, seconds): event is "hit", "miss", "load" or "evict"; seconds is the load time for "load".
TierObserver = Callable[[str, float], None]


class HostTier:
    def __init__(self, capacity_bytes: int, observer: TierObserver | None = None):
        self.capacity_bytes = capacity_bytes
        self.observer = observer or (lambda event, seconds: None)
        self._items: OrderedDict[str, Delta] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def num_items(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keys(self) -> list[str]:
        """The cached deltas' keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, key: str, load: Callable[[], Delta], count_hit: bool = True) -> Delta:
        """The cached delta of `key`, or `load()` it (once, even when several threads ask at the same time).
        count_hit=False: a hit is not reported (the caller needed no copy from this tier: the delta sits in a
        GPU slot already); a miss always is, since it reads the delta from disk."""
        with self._lock:
            delta = self._items.get(key)
            if delta is not None:
                self._items.move_to_end(key)
                if count_hit:
                    self.observer("hit", 0.0)
                return delta
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                delta = self._items.get(key)
                if delta is not None:  # another thread loaded it while we waited
                    self._items.move_to_end(key)
                    if count_hit:
                        self.observer("hit", 0.0)
                    return delta
            self.observer("miss", 0.0)
            t0 = time.perf_counter()
            delta = load()
            self.observer("load", time.perf_counter() - t0)
            with self._lock:
                self._loading.pop(key, None)
                self._insert(key, delta)
            return delta

    def discard(self, key: str) -> None:
        with self._lock:
            delta = self._items.pop(key, None)
            if delta is not None:
                self._bytes -= delta.nbytes

    def _insert(self, key: str, delta: Delta) -> None:
        self._items[key] = delta
        self._bytes += delta.nbytes
        while self._bytes > self.capacity_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
            self.observer("evict", 0.0)
