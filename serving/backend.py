"""Everything behind the HTTP API: the engine thread, the tenants' adapters, tokenizing, metrics.

The API (serving/api) talks to a `Backend` only through plain Python values (strings, token ids,
SamplingParams, output records), so it never imports torch. Model work runs in the engine thread; disk
and validation work in worker threads (serving.adapters); long prompts in a pool of their own
(serving.tokenizing); the event loop only awaits. This module owns generation: a tenant's concurrency limit and
the stream of one sequence.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from registry.catalog import Registry, Tenant
from registry.deltas import DELTA_KINDS
from serving.adapters import Adapters, ResolvedModel
from serving.engine.async_engine import EngineLoop
from serving.engine.engine import LLMEngine, RequestOutput
from serving.engine.errors import TenantBusy
from serving.engine.sampling_params import SamplingParams
from serving.metrics import Metrics
from serving.tokenizing import Tokenizing
from serving.usage import UsageMeter

__all__ = ["Backend", "BackendConfig", "ResolvedModel"]


@dataclass(frozen=True)
class BackendConfig:
    max_pending: int = 256  # requests queued or running; beyond: 503 overloaded
    tenant_max_concurrent: int = 64  # one tenant's requests at once; beyond: 429
    host_cache_bytes: int = 4 << 30
    max_upload_bytes: int = 2 << 30
    drain_timeout: float = 30.0
    compressions_per_tenant: int = 2  # fine-tunes of one tenant waiting for compression; beyond: 429
    served_model_name: str | None = None  # the base's id in the API (None: its folder's name)
    metrics_top_tenants: int = 0  # tenants named in the usage metrics (the rest: `other`); 0: no tenant label


class Backend:
    def __init__(self, engine: LLMEngine, registry: Registry, metrics: Metrics, config: BackendConfig | None = None):
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.config = config or BackendConfig()
        self.model_id = self.config.served_model_name or engine.model.config.name
        self.max_model_len = engine.max_model_len
        engine.observe_slots(lambda event, s: self._tier_event("gpu", event, s))  # the engine thread reports
        self.loop = EngineLoop(engine, self.config.max_pending, on_step=self._observe_step)
        self.adapters = Adapters(
            engine, registry, self.loop, metrics, model_id=self.model_id, host_cache_bytes=self.config.host_cache_bytes,
            max_upload_bytes=self.config.max_upload_bytes, compressions_per_tenant=self.config.compressions_per_tenant,
            host_observer=lambda event, s: self._tier_event("host", event, s),
        )  # fmt: skip
        self.tokens = Tokenizing(engine.tokenizer, self.max_model_len)
        self.usage = UsageMeter(registry, metrics, top_tenants=self.config.metrics_top_tenants)
        self.draining = False
        self.started = False
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()
        self._preemptions_seen = 0
        # State gauges are read when /metrics is scraped, so they are right even while the engine is idle
        # (e.g. just after an abort freed a disconnected client's KV blocks).
        metrics.kv_usage.set_function(lambda: engine.stats().kv_usage)
        metrics.queue_length.set_function(lambda: engine.stats().num_waiting)
        metrics.running.set_function(lambda: engine.stats().num_running)
        metrics.pending.set_function(lambda: self.loop.num_pending)
        metrics.max_pending.set(self.config.max_pending)
        metrics.engine_up.set_function(lambda: 1 if self.healthy else 0)
        for kind in DELTA_KINDS:
            metrics.slots_in_use.labels(f"gpu_{kind}").set_function(lambda k=kind: engine.stats().slots_in_use[k])
        metrics.slots_in_use.labels("host").set_function(lambda: self.adapters.host_tier.num_items)
        metrics.host_bytes.set_function(lambda: self.adapters.host_tier.nbytes)
        metrics.host_capacity.set(self.adapters.host_tier.capacity_bytes)
        for kind in DELTA_KINDS:
            metrics.slots_total.labels(f"gpu_{kind}").set(getattr(engine.config, f"{kind}_slots"))

    # ---- life cycle --------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line for the start-up log: what is served, where, with which kernels, slots and tiers."""
        e, c = self.engine, self.engine.config
        return (f"serving {self.model_id} from {e.base_dir} on {e.device} in {str(e.dtype).removeprefix('torch.')}; "
                f"delta kernels: {e.runner.ops.name}; GPU slots: {c.lora_slots} LoRA (rank <= {c.max_lora_rank}), "
                f"{c.bitdelta_slots} 1-bit, {c.ia3_slots} (IA)^3; host tier {self.config.host_cache_bytes >> 20} MB; KV cache "
                f"{e.blocks.num_blocks} blocks of {e.blocks.block_size} tokens; max_model_len {self.max_model_len}; "
                f"at most {c.max_num_seqs} sequences and {c.max_num_batched_tokens} tokens per step")  # fmt: skip

    def preload(self, ref: str) -> None:
        """Loads "tenant/adapter" onto the GPU before serving (Adapters.preload). Call before start()."""
        assert not self.started, "preload runs before the engine thread owns the slot pool"
        self.adapters.preload(ref)

    def start(self) -> None:
        self.loop.start()
        self.usage.start()
        self.started = True

    def stop(self) -> None:
        self.loop.stop(timeout=5)
        self.adapters.stop()
        self.tokens.stop()
        self.usage.stop()

    @property
    def healthy(self) -> bool:
        return self.loop.alive

    @property
    def ready(self) -> bool:
        return self.started and self.healthy and not self.draining

    @property
    def num_pending(self) -> int:
        return self.loop.num_pending

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
                await asyncio.to_thread(self.engine.compile_guide, params.guide, tenant.name)
            with self.adapters.in_use(resolved.records):
                request_id = uuid.uuid4().hex
                async for out in self.loop.stream(request_id, prompt, params, resolved.delta, tenant.name):
                    yield out
        finally:
            with self._in_flight_lock:
                self._in_flight[tenant.name] -= 1

    # ---- metrics (engine thread) -------------------------------------------------------------------
    def _observe_step(self, engine: LLMEngine, outputs: list[RequestOutput], seconds: float) -> None:
        m = self.metrics
        stats = engine.stats()
        m.step_time.observe(seconds)
        m.batch_size.observe(len(outputs))
        m.distinct_tenants.observe(stats.distinct_deltas_running)
        m.generation_tokens.inc(len(outputs))
        if stats.num_preemptions > self._preemptions_seen:
            m.preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions

    def _tier_event(self, tier: str, event: str, seconds: float) -> None:
        """A hit, miss, load or eviction of the host tier ("host") or of the GPU slots ("gpu")."""
        m = self.metrics
        {"hit": m.adapter_hits, "miss": m.adapter_misses, "evict": m.adapter_evictions, "load": m.adapter_loads}[event].labels(
            tier
        ).inc()
        if event == "load":
            m.adapter_load_seconds.labels(tier).observe(seconds)
