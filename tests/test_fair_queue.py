"""Background jobs (fine-tune compressions) shared among tenants: round-robin, a bound per tenant."""

from __future__ import annotations

import threading

import pytest

from serving.engine.errors import TenantBusy
from serving.fair_queue import FairWorkQueue


def test_round_robin_among_tenants_and_a_bound_per_tenant() -> None:
    gate = threading.Event()
    order: list[str] = []
    done = threading.Event()
    q = FairWorkQueue(per_tenant=3)
    q.submit("first", gate.wait)  # holds the worker while the queues fill
    for i in range(3):
        q.submit("flood", lambda i=i: order.append(f"flood{i}"))
    with pytest.raises(TenantBusy, match="3 jobs waiting"):
        q.submit("flood", lambda: None)  # a fourth waiting job of one tenant is refused
    q.submit("light", lambda: order.append("light0"))
    q.submit("light", lambda: order.append("light1"))
    q.submit("light", done.set)
    assert q.waiting("flood") == 3 and q.waiting("light") == 3
    gate.set()
    assert done.wait(5)
    # the light tenant's jobs are not stuck behind the whole flood: they take turns
    assert order == ["flood0", "light0", "flood1", "light1", "flood2"]
    q.stop()


def test_a_failing_job_does_not_stop_the_queue() -> None:
    q = FairWorkQueue(per_tenant=2)
    ran = threading.Event()

    def boom():
        raise RuntimeError("boom")

    q.submit("a", boom)
    q.submit("a", ran.set)
    assert ran.wait(5)
    q.stop()
