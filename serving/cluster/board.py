"""The cluster's notice board (one Ray actor): versions to let go of, and what each replica reports of itself.

Ray Serve's handles reach *a* replica, not every one; what every replica must hear goes here instead. The ingress
posts each deleted or replaced version; every replica reads what it has not seen yet, about once a second, and
frees its host copy and GPU slot (serving.generation.LocalGeneration.forget). Replicas post their engine's metrics
there too, and the ingress's /metrics exports them with a `replica` label (serving.cluster.metrics).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from serving.cluster.refs import DeltaRef

BOARD_NAME = "deltaserve-board"
KEEP_NOTICES = 100_000  # older ones are dropped; a replica that missed some starts over (Board.notices_since)
REPORT_TTL_S = 5.0  # a replica silent this long (it reports every second) is gone: killed, or restarted


class Board:
    def __init__(self) -> None:
        # A board Ray restarts starts empty: its epoch tells readers their sequence numbers are the old board's.
        self.epoch = secrets.token_hex(8)
        self._notices: list[DeltaRef] = []
        self._first = 0  # the sequence number of _notices[0]
        self._reports: dict[str, tuple[float, Any]] = {}

    # ---- versions to let go of ---------------------------------------------------------------------
    def forget(self, refs: list[DeltaRef]) -> int:
        """Posts versions no new request will use; returns the sequence number after them."""
        self._notices.extend(refs)
        if len(self._notices) > KEEP_NOTICES:
            drop = len(self._notices) - KEEP_NOTICES
            del self._notices[:drop]
            self._first += drop
        return self._first + len(self._notices)

    def head(self) -> tuple[str, int]:
        """(epoch, the next sequence number): where a new reader starts (what is posted before it never reached it)."""
        return self.epoch, self._first + len(self._notices)

    def notices_since(self, epoch: str, seen: int) -> tuple[str, int, list[DeltaRef], bool]:
        """(epoch, the next sequence number, the notices from `seen` on, whether the reader may have missed some:
        dropped before it read them, or posted to a board that has since restarted. It then lets go of every copy
        it holds, since it cannot tell which it should have freed)."""
        if epoch != self.epoch:
            return self.epoch, self._first + len(self._notices), list(self._notices), True
        missed = seen < self._first
        start = max(seen, self._first) - self._first
        return self.epoch, self._first + len(self._notices), self._notices[start:], missed

    # ---- replicas' reports -------------------------------------------------------------------------
    def report(self, replica: str, snapshot: Any) -> None:
        self._reports[replica] = (time.time(), snapshot)

    def reports(self) -> dict[str, Any]:
        """The latest report of each replica heard from in the last REPORT_TTL_S seconds."""
        now = time.time()
        for replica in [r for r, (t, _) in self._reports.items() if now - t > REPORT_TTL_S]:
            del self._reports[replica]
        return {replica: snapshot for replica, (_, snapshot) in self._reports.items()}


class RecentlyForgotten:
    """A replica's memory of the keys the board told it to let go of, for `ttl` seconds. A request the ingress
    resolved just before a delete can reach the replica after the notice and load the delta again (its blob may
    live on, shared by content); when that request ends, its copies are let go of again rather than left to the
    LRU. Thread-safe: the board reader adds, requests ask."""

    def __init__(self, ttl: float = 60.0, clock=time.monotonic):
        self.ttl, self.clock = ttl, clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            self._until[key] = now + self.ttl
            for k in [k for k, t in self._until.items() if t < now]:
                del self._until[k]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            until = self._until.get(key)
            return until is not None and until >= self.clock()

