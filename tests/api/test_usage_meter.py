"""serving.usage.UsageMeter on its own: counts batched per tenant, model and hour, written by its thread, at stop,
and kept when a write fails (a full disk) until the next one succeeds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from registry.catalog import Registry
from registry.errors import InsufficientStorage
from serving.metrics import Metrics
from serving.usage import UsageMeter

T0 = 1_764_547_200.0


def _total(reg: Registry) -> tuple[int, int, int]:
    rows = reg.usage(tenant=None, start=0, end=int(T0) + 86400, granularity="hour")
    return tuple(sum(getattr(r, k) for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens"))


def test_counts_are_written_by_the_thread_and_at_stop(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        reg.create_tenant("acme")
        meter = UsageMeter(reg, Metrics(), flush_seconds=0.05, clock=lambda: T0 + 10)
        meter.start()
        meter.record("acme", None, 5, 7)
        meter.record("acme", None, 1, 1)
        deadline = time.time() + 10
        while _total(reg) != (2, 6, 8):
            assert time.time() < deadline, "the thread never wrote"
            time.sleep(0.02)
        meter.flush_seconds = 3600  # the thread waits; only stop() writes what follows
        time.sleep(0.1)
        meter.record("acme", "german", 2, 3)
        meter.stop()
        assert _total(reg) == (3, 8, 11)
        assert [(r.adapter, r.period_start) for r in reg.usage(tenant="acme", start=0, end=int(T0) + 86400,
                                                                granularity="hour")] == [(None, T0), ("german", T0)]


def test_a_failed_write_keeps_the_counts_for_the_next_one(tmp_path: Path, monkeypatch) -> None:
    with Registry(tmp_path / "reg") as reg:
        reg.create_tenant("acme")
        meter = UsageMeter(reg, Metrics(), clock=lambda: T0)
        meter.record("acme", None, 5, 7)
        real = reg.add_usage

        def full(counts):
            raise InsufficientStorage("the registry's disk is full; nothing was changed")

        monkeypatch.setattr(reg, "add_usage", full)
        with pytest.raises(InsufficientStorage):
            meter.flush()
        meter.record("acme", None, 1, 1)
        monkeypatch.setattr(reg, "add_usage", real)
        meter.flush()
        assert _total(reg) == (2, 6, 8)
        meter.flush()  # nothing twice
        assert _total(reg) == (2, 6, 8)
