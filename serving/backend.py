"""Everything behind the HTTP API: the generation (an engine thread, or a cluster's replicas), the tenants'
adapters, tokenizing, metrics.

The API (serving/api) talks to a `Backend` only through plain Python values (strings, token ids,
SamplingParams, output records), so it never imports torch. Model work runs in the engine thread
(serving.generation) or the replicas (serving.cluster); disk and validation work in worker threads
(serving.adapters); long prompts in a pool of their own (serving.tokenizing); the event loop only awaits. This module owns generation: a tenant's concurrency limit and
the stream of one sequence.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from registry.catalog import Registry, Tenant
from serving.adapters import Adapters, ResolvedModel
from serving.engine.engine import RequestOutput
from serving.engine.errors import TenantBusy
from serving.engine.sampling_params import SamplingParams
from serving.generation import Generation
from serving.metrics import Metrics
from serving.tokenizing import Tokenizing
from serving.usage import UsageMeter

__all__ = ["Backend", "BackendConfig", "ResolvedModel"]


@dataclass(frozen=True)
class BackendConfig:
    tenant_max_concurrent: int = 64  # one tenant's requests at once; beyond: 429
    max_upload_bytes: int = 2 << 30
    drain_timeout: float = 30.0
    compressions_per_tenant: int = 2  # fine-tunes of one tenant waiting for compression; beyond: 429
    served_model_name: str | None = None  # the base's id in the API (None: its folder's name)
    metrics_top_tenants: int = 0  # tenants named in the usage metrics (the rest: `other`); 0: no tenant label


class Backend:
    def __init__(self, generation: Generation, registry: Registry, metrics: Metrics, config: BackendConfig | None = None):
        """generation: where tokens are generated (serving.generation.LocalGeneration, or a cluster's replicas)."""
        self.generation = generation
        self.registry = registry
        self.metrics = metrics
        self.config = config or BackendConfig()
        base = generation.base
        self.model_id = self.config.served_model_name or base.name
        self.max_model_len = base.max_model_len
        self.adapters = Adapters(
            generation, registry, metrics, model_id=self.model_id, max_upload_bytes=self.config.max_upload_bytes,
            compressions_per_tenant=self.config.compressions_per_tenant,
        )  # fmt: skip
        self.tokens = Tokenizing(generation.tokenizer, self.max_model_len)
        self.usage = UsageMeter(registry, metrics, top_tenants=self.config.metrics_top_tenants)
        self.draining = False
        self.started = False
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()
        metrics.pending.set_function(lambda: generation.num_pending)
        metrics.max_pending.set(generation.max_pending)
        metrics.engine_up.set_function(lambda: 1 if self.healthy else 0)

    # ---- life cycle --------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line for the start-up log: what is served, where, with which kernels, slots and tiers."""
        return f"serving {self.model_id} {self.generation.describe()}"

    def preload(self, ref: str) -> None:
        """Loads "tenant/adapter" onto the GPU before serving (Adapters.preload). Call before start()."""
        assert not self.started, "preload runs before the engine thread owns the slot pool"
        self.adapters.preload(ref)

    def start(self) -> None:
        self.generation.start()
        self.usage.start()
        self.started = True

    def stop(self) -> None:
        self.generation.stop()
        self.adapters.stop()
        self.tokens.stop()
        self.usage.stop()

    @property
    def healthy(self) -> bool:
        return self.generation.alive

    @property
    def ready(self) -> bool:
        return self.started and self.healthy and not self.draining

    @property
    def num_pending(self) -> int:
        return self.generation.num_pending

    # ---- generation --------------------------------------------------------------------------------
    async def generate(
        self, tenant: Tenant, resolved: ResolvedModel, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Streams one sequence's outputs. Raises Overloaded (503), TenantBusy (429), or the engine's
        validation errors before the first output."""
        with self._in_flight_lock:
            n = self._in_flight.get(tenant.name, 0)
            if n >= self.config.tenant_max_concurrent:
                raise TenantBusy(f"tenant has {n} requests in flight (limit {self.config.tenant_max_concurrent})")
            self._in_flight[tenant.name] = n + 1
        try:
            if params.guide is not None:  # compiled here, off the engine thread (a large schema takes long)
                await asyncio.to_thread(self.generation.compile_guide, params.guide, tenant.name)
            with self.adapters.in_use(resolved.records):
                request_id = uuid.uuid4().hex
                async for out in self.generation.stream(request_id, prompt, params, resolved.delta, tenant.name):
                    yield out
        finally:
            with self._in_flight_lock:
                self._in_flight[tenant.name] -= 1
