"""The host-memory tier on its own: LRU by bytes, refreshed on every hit, loads once under concurrency."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from registry.deltas import LoraDelta
from registry.host_tier import HostTier


def delta(name: str, nbytes: int = 1000) -> LoraDelta:
    a = torch.zeros(nbytes // 8)  # A and B of float32: nbytes in all
    b = torch.zeros(nbytes // 8)
    return LoraDelta(sha256=name, rank=1, scaling=1.0, weights={"p": (a, b)}, owner="t")


class Recorder:
    def __init__(self):
        self.events: list[str] = []
        self.seconds: list[float] = []

    def __call__(self, event: str, seconds: float) -> None:
        self.events.append(event)
        self.seconds.append(seconds)


def put(tier: HostTier, key: str, nbytes: int = 1000) -> LoraDelta:
    return tier.get(key, lambda: delta(key, nbytes))


def test_evicts_the_least_recently_used_when_over_capacity() -> None:
    rec = Recorder()
    tier = HostTier(capacity_bytes=3000, observer=rec)
    for k in "abc":
        put(tier, k)
    assert tier.nbytes == 3000 and rec.events.count("evict") == 0
    put(tier, "d")
    assert tier.nbytes == 3000 and tier.keys() == ["b", "c", "d"] and rec.events.count("evict") == 1
    loads = []
    tier.get("a", lambda: loads.append("a") or delta("a"))  # "a" was the oldest: evicted, loaded again
    assert loads == ["a"]


def test_a_hit_refreshes_the_lru_order() -> None:
    tier = HostTier(capacity_bytes=3000)
    for k in "abc":
        put(tier, k)
    first = put(tier, "a")  # a hit: "a" becomes the newest, "b" the oldest
    put(tier, "d")
    loads: list[str] = []
    again = tier.get("a", lambda: loads.append("a") or delta("a"))
    assert loads == [] and again is first  # still cached
    tier.get("b", lambda: loads.append("b") or delta("b"))
    assert loads == ["b"]  # "b" was evicted


def test_eviction_is_by_bytes_not_by_count() -> None:
    tier = HostTier(capacity_bytes=5000)
    put(tier, "small1", 1000)
    put(tier, "small2", 1000)
    put(tier, "big", 4000)  # 6000 > 5000: the oldest small one goes, not the newest
    assert tier.nbytes == 5000 and tier.num_items == 2
    loads: list[str] = []
    tier.get("small2", lambda: loads.append("small2") or delta("small2"))
    tier.get("small1", lambda: loads.append("small1") or delta("small1"))
    assert loads == ["small1"]


def test_one_delta_larger_than_the_tier_stays_alone() -> None:
    tier = HostTier(capacity_bytes=1000)
    put(tier, "a", 800)
    put(tier, "huge", 4000)
    assert tier.num_items == 1 and tier.nbytes == 4000  # kept (a running request needs it), the rest evicted


def test_discard_frees_its_bytes() -> None:
    tier = HostTier(capacity_bytes=3000)
    put(tier, "a", 1000)
    put(tier, "b", 1600)
    tier.discard("a")
    tier.discard("missing")
    assert tier.nbytes == 1600 and tier.num_items == 1
    loads: list[str] = []
    tier.get("a", lambda: loads.append("a") or delta("a"))
    assert loads == ["a"]


def test_hits_misses_loads_and_evictions_are_reported() -> None:
    rec = Recorder()
    tier = HostTier(capacity_bytes=2000, observer=rec)

    def slow_load():
        time.sleep(0.02)
        return delta("b")

    put(tier, "a")
    put(tier, "a")
    tier.get("b", slow_load)
    put(tier, "c")  # over capacity: "a" is evicted
    assert rec.events == ["miss", "load", "hit", "miss", "load", "miss", "load", "evict"]
    assert 0.02 <= rec.seconds[4] < 5.0  # a load reports how long it took; the other events report 0
    assert [t for i, t in enumerate(rec.seconds) if rec.events[i] != "load"] == [0.0] * 5


def test_concurrent_requests_load_once() -> None:
    rec = Recorder()
    tier = HostTier(capacity_bytes=10_000, observer=rec)
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_load() -> LoraDelta:
        calls.append(1)
        started.set()
        release.wait(5)
        return delta("a")

    got: list[LoraDelta] = []
    threads = [threading.Thread(target=lambda: got.append(tier.get("a", slow_load))) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(5)
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert sorted(rec.events) == ["hit", "hit", "hit", "load", "miss"]  # those that waited for the load hit
    assert rec.seconds[rec.events.index("hit")] == 0.0
    assert not tier._loading  # no per-key lock is left behind once loaded


def test_a_lookup_that_needs_no_host_copy_counts_no_hit() -> None:
    """count_hit=False (the delta sits in a GPU slot already): the hit goes unreported, so the host tier's hit
    ratio measures only lookups that needed it; a miss is still reported (it reads the disk), and the hit still
    refreshes the LRU order."""
    rec = Recorder()
    tier = HostTier(capacity_bytes=2000, observer=rec)
    put(tier, "a")
    put(tier, "b")
    rec.events.clear()
    assert tier.get("a", lambda: pytest.fail("a is cached"), count_hit=False).sha256 == "a"
    assert rec.events == []
    tier.get("c", lambda: delta("c"), count_hit=False)  # over capacity: "b", now the oldest, goes
    assert rec.events == ["miss", "load", "evict"]
    assert tier.keys() == ["a", "c"]
