"""Usage metering: each answered request's tokens, counted per tenant, adapter and hour, written to the catalog
(registry.usage) in batches, and optionally shown in Prometheus under a capped tenant label.

A request counts once it produced output (a refusal before its first token costs nothing): its prompts once each
(whatever `n`), the tokens it generated (also those of a client that went away before the end: they were
computed), as its response's `usage` says. Counts are kept in memory and written every `flush_seconds` by a
thread of their own (a write fsyncs: never on the event loop), at stop, and before a usage report is read; a
crash loses at most the last `flush_seconds`.

The Prometheus label (opt-in, `top_tenants` > 0) names the `top_tenants` tenants with the most tokens in the
last 24 hours, refreshed at each write; every other tenant is counted as `other`, so the number of series
stays bounded however many tenants there are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from registry.catalog import Registry
from registry.usage import UsageCount, UsageKey, hour_of
from serving.metrics import Metrics

log = logging.getLogger("deltaserve")
OTHER_TENANTS = "other"
TOP_WINDOW_SECONDS = 24 * 3600


class UsageMeter:
    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        top_tenants: int = 0,
        flush_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.metrics = metrics
        self.top_tenants = top_tenants
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._pending: dict[UsageKey, UsageCount] = {}
        self._lock = threading.Lock()  # guards _pending (event loop and flusher)
        self._write_lock = threading.Lock()  # one write at a time: a report reads after the last one
        self._labelled: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, tenant: str, adapter: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        """One request's usage (cheap: called on the event loop)."""
        key = (tenant, adapter, hour_of(self.clock()))
        with self._lock:
            self._pending.setdefault(key, UsageCount()).add(UsageCount(1, prompt_tokens, completion_tokens))
            label = tenant if tenant in self._labelled else OTHER_TENANTS
        if self.top_tenants:
            self.metrics.tenant_requests.labels(label).inc()
            self.metrics.tenant_tokens.labels(label, "prompt").inc(prompt_tokens)
            self.metrics.tenant_tokens.labels(label, "completion").inc(completion_tokens)

    def flush(self) -> None:
        """Writes what was recorded so far to the catalog (blocking: call from a thread)."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            try:
                self.registry.add_usage(pending)
            except Exception:
                with self._lock:  # kept for the next write (e.g. a full disk that frees up)
                    for key, count in pending.items():
                        self._pending.setdefault(key, UsageCount()).add(count)
                raise
            if self.top_tenants:
                top = set(self.registry.top_tenants(self.top_tenants, int(self.clock()) - TOP_WINDOW_SECONDS))
                with self._lock:
                    self._labelled = top

    # ---- the flusher thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.top_tenants:  # the label starts right after a restart, not after the first write
            self._labelled = set(self.registry.top_tenants(self.top_tenants, int(self.clock()) - TOP_WINDOW_SECONDS))
        self._thread = threading.Thread(target=self._run, name="deltaserve-usage", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - kept in memory and written at the next try
                log.exception("writing token usage to the catalog failed; it is kept for the next try")
