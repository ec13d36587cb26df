"""Background jobs shared fairly among tenants: one worker thread, one queue per tenant, served round-robin.

A single first-in first-out queue lets one tenant's six fine-tunes delay everyone else's; here the worker takes
the next job of the next tenant in turn, and a tenant may have at most `per_tenant` jobs waiting (each holds
its upload on disk until it runs), beyond which `submit` refuses with TenantBusy (429).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable

from serving.engine.errors import TenantBusy

log = logging.getLogger("deltaserve")


class FairWorkQueue:
    def __init__(self, per_tenant: int, name: str = "deltaserve-jobs"):
        self.per_tenant = per_tenant
        self._queues: OrderedDict[str, deque[Callable[[], None]]] = OrderedDict()  # tenants in turn order
        self._cond = threading.Condition()
        self._stop = False
        self.running: str | None = None  # the tenant whose job runs now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, tenant: str, job: Callable[[], None]) -> None:
        """Queues job() for `tenant`; TenantBusy when the tenant already has per_tenant jobs waiting."""
        with self._cond:
            queue = self._queues.setdefault(tenant, deque())
            if len(queue) >= self.per_tenant:
                raise TenantBusy(f"the tenant has {len(queue)} jobs waiting (limit {self.per_tenant}); retry later")
            queue.append(job)
            self._cond.notify()

    def waiting(self, tenant: str) -> int:
        with self._cond:
            return len(self._queues.get(tenant, ()))

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _next(self) -> tuple[str, Callable[[], None]] | None:
        with self._cond:
            while not self._stop and not any(self._queues.values()):
                self._cond.wait()
            if self._stop:
                return None
            tenant = next(t for t, q in self._queues.items() if q)
            job = self._queues[tenant].popleft()
            self._queues.move_to_end(tenant)  # its next job waits for every other tenant's turn
            self.running = tenant
            return tenant, job

    def _run(self) -> None:
        while (item := self._next()) is not None:
            tenant, job = item
            try:
                job()
            except Exception:  # a job reports its own failures; one that raises must not stop the others
                log.exception("background job of tenant %s failed", tenant)
            finally:
                with self._cond:
                    self.running = None
