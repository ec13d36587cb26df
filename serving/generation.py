"""Where a request's tokens are generated: this process's engine thread (`LocalGeneration`), or engine replicas on
Ray Serve (serving.cluster.ClusterGeneration). The backend (serving.backend) and the adapters (serving.adapters)
use only this interface, so the API, its auth, uploads and errors are the same code in both.

A generation turns a stored adapter version into what a request runs on (`served_for`: here a delta loaded into the
host tier; in a cluster a reference a replica loads itself), streams a request's outputs, and lets go of versions
that were deleted or replaced (`forget`: everywhere a copy of them is held).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from registry.catalog import AdapterRecord
from registry.deltas import DELTA_KINDS, BaseSpec, Composition, Delta, Served, delta_key
from registry.host_tier import HostTier
from registry.loading import load_delta
from serving.engine.async_engine import EngineLoop
from serving.engine.engine import LLMEngine, RequestOutput
from serving.engine.sampling_params import Guide, SamplingParams
from serving.metrics import EngineMetrics

__all__ = ["BaseFacts", "Generation", "LocalGeneration", "record_key"]


class StoredDelta(Protocol):
    """A stored version's delta, as a registry.catalog.AdapterRecord names it (a cluster's replicas get only this)."""

    tenant: str
    sha256: str | None
    blob: str | None

    @property
    def kind(self) -> str: ...


def record_key(record: StoredDelta) -> str:
    """The key a stored version's delta has in the host tier and the GPU slots."""
    assert record.sha256 is not None
    return delta_key(record.tenant, record.kind, record.sha256)


@dataclass(frozen=True)
class BaseFacts:
    """What the API side needs to know of the served base and its engine, without holding its weights: uploads are
    checked against `spec`, fine-tunes compressed from `base_dir`, contexts bounded by `max_model_len`."""

    name: str  # the base's folder name (its model id unless --served-model-name)
    spec: BaseSpec
    max_lora_rank: int
    max_model_len: int
    base_dir: Path | None
    device: str  # "cpu" | "cuda": where compression and fidelity evaluation run
    slots: dict[str, int]  # GPU slots per delta kind (registry.deltas.DELTA_KINDS), per engine

    @classmethod
    def of(cls, engine: LLMEngine) -> BaseFacts:
        c = engine.config
        return cls(engine.model.config.name, engine.spec, c.max_lora_rank, engine.max_model_len, engine.base_dir,
                   engine.device.type, {kind: getattr(c, f"{kind}_slots") for kind in DELTA_KINDS})  # fmt: skip


class Generation(Protocol):
    """What the backend and the adapters use of wherever tokens are generated."""

    base: BaseFacts
    tokenizer: Any  # a transformers tokenizer of the base

    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def num_pending(self) -> int: ...
    @property
    def max_pending(self) -> int: ...
    def describe(self) -> str: ...
    def served_for(self, record: AdapterRecord) -> Any:
        """What a request on this version runs on (worker thread: it may read the version's blob)."""
    def compose(self, parts: list[tuple[Any, float]]) -> Any:
        """A composition of `served_for` results with their weights."""
    def preload(self, record: AdapterRecord) -> None: ...
    def forget(self, record: AdapterRecord) -> None:
        """Lets go of a deleted or replaced version everywhere it is held (requests running on it finish first)."""
    def compile_guide(self, guide: Guide, tenant: str) -> None: ...
    def stream(self, request_id: str, prompt: list[int], params: SamplingParams, served: Any,
               tenant: str) -> AsyncIterator[RequestOutput]: ...  # fmt: skip


class LocalGeneration:
    """One engine in this process: a thread runs its steps (EngineLoop); deltas come from the registry's blobs
    through a host-memory tier (bounded in bytes, LRU) into the engine's GPU slots."""

    def __init__(self, engine: LLMEngine, blob_path: Callable[[StoredDelta], Path], metrics: EngineMetrics, *,
                 max_pending: int, host_cache_bytes: int):  # fmt: skip
        """blob_path: where a stored version's data is (Registry.blob_path, or a replica's reader of the blobs).
        max_pending: requests queued or running at once (beyond: Overloaded). metrics: what this engine
        measures of itself (steps, queues, tiers), kept up to date from here."""
        self.engine = engine
        self.blob_path = blob_path
        self.metrics = metrics
        self.base = BaseFacts.of(engine)
        self.tokenizer = engine.tokenizer
        self.loop = EngineLoop(engine, max_pending, on_step=self._observe_step)
        self.host_tier = HostTier(host_cache_bytes, lambda event, s: self._tier_event("host", event, s))
        engine.observe_slots(lambda event, s: self._tier_event("gpu", event, s))  # the engine thread reports
        self._preemptions_seen = 0
        # State gauges are read when /metrics is scraped, so they are right even while the engine is idle
        # (e.g. just after an abort freed a disconnected client's KV blocks).
        m = metrics
        m.kv_usage.set_function(lambda: engine.stats().kv_usage)
        m.queue_length.set_function(lambda: engine.stats().num_waiting)
        m.running.set_function(lambda: engine.stats().num_running)
        for kind in DELTA_KINDS:
            m.slots_in_use.labels(f"gpu_{kind}").set_function(lambda k=kind: engine.stats().slots_in_use[k])
            m.slots_total.labels(f"gpu_{kind}").set(self.base.slots[kind])
        m.slots_in_use.labels("host").set_function(lambda: self.host_tier.num_items)
        m.host_bytes.set_function(lambda: self.host_tier.nbytes)
        m.host_capacity.set(self.host_tier.capacity_bytes)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(timeout=5)

    @property
    def alive(self) -> bool:
        return self.loop.alive

    @property
    def num_pending(self) -> int:
        return self.loop.num_pending

    @property
    def max_pending(self) -> int:
        """The bound on requests queued or running (beyond: Overloaded): --max-pending."""
        return self.loop.max_pending

    def describe(self) -> str:
        e, c = self.engine, self.engine.config
        return (f"from {e.base_dir} on {e.device} in {str(e.dtype).removeprefix('torch.')}; "
                f"delta kernels: {e.runner.ops.name}; GPU slots: {c.lora_slots} LoRA (rank <= {c.max_lora_rank}), "
                f"{c.bitdelta_slots} 1-bit, {c.ia3_slots} (IA)^3; host tier {self.host_tier.capacity_bytes >> 20} MB; KV "
                f"cache {e.blocks.num_blocks} blocks of {e.blocks.block_size} tokens; max_model_len {e.max_model_len}; "
                f"at most {c.max_num_seqs} sequences and {c.max_num_batched_tokens} tokens per step")  # fmt: skip

    # ---- what requests run on (worker threads) -----------------------------------------------------
    def served_for(self, record: StoredDelta) -> Delta:
        """The version's delta, from the host tier or read from its blob (validated against the base)."""

        def load() -> Delta:
            delta = load_delta(self.blob_path(record), self.base.spec, self.base.max_lora_rank)
            return dataclasses.replace(delta, owner=record.tenant)

        key = record_key(record)
        # Every request looks its delta up here, but one already in a GPU slot needs no host copy to load: its
        # hit is not counted, or the host tier's hit ratio would sit near 1 and say nothing. What is counted:
        # of the deltas a request found without a GPU slot, the share already in host memory (not read from disk).
        return self.host_tier.get(key, load, count_hit=not self.engine.holds_delta(record.kind, key))

    @staticmethod
    def compose(parts: list[tuple[Delta, float]]) -> Composition:
        return Composition(tuple(parts))

    def preload(self, record: StoredDelta) -> None:
        """Loads the version into the host tier and a GPU slot (left unpinned). Before start() only."""
        self.engine.preload(self.served_for(record))

    def forget(self, record: StoredDelta) -> None:
        """A deleted or replaced version: its host copy goes now, its GPU slot once no running request uses it."""
        key = record_key(record)
        self.host_tier.discard(key)
        self.loop.forget(record.kind, key)

    def forget_all(self) -> None:
        """Lets go of every delta held here (host copies now, GPU slots once no running request uses them)."""
        for key in self.host_tier.keys():  # noqa: SIM118 - a copy: discard edits the tier
            self.host_tier.discard(key)
        for kind in DELTA_KINDS:
            for key in self.engine.slots.resident(kind):
                if key:
                    self.loop.forget(kind, key)

    # ---- generation (event loop) -------------------------------------------------------------------
    def compile_guide(self, guide: Guide, tenant: str) -> None:
        """Compiles a structured-output grammar into the tenant's cache (call off the event loop)."""
        self.engine.compile_guide(guide, tenant)

    def stream(self, request_id: str, prompt: list[int], params: SamplingParams, served: Served | None,
               tenant: str) -> AsyncIterator[RequestOutput]:  # fmt: skip
        return self.loop.stream(request_id, prompt, params, served, tenant)

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
