"""Everything behind the HTTP API: the engine thread, the registry, the host tier, background compression.

The API (serving/api) talks to a `Backend` only through plain Python values (strings, token ids,
SamplingParams, output records), so it never imports torch. Model work runs in the engine thread; disk
and validation work in worker threads; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from registry.catalog import AdapterRecord, Registry, Tenant
from registry.deltas import Delta, delta_key
from registry.errors import DeltaError, NotFound, RegistryError
from registry.host_tier import HostTier
from registry.loading import load_delta
from registry.uploads import Staging
from serving.engine.async_engine import EngineLoop
from serving.engine.engine import LLMEngine, RequestOutput
from serving.engine.errors import Overloaded, TenantBusy
from serving.engine.sampling_params import SamplingParams
from serving.fair_queue import FairWorkQueue
from serving.metrics import Metrics

log = logging.getLogger("deltaserve")


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's `model` field names, for one tenant: the base, or one version of an adapter."""

    model_id: str
    kind: str  # "base" | "lora" | "bitdelta"
    delta: Delta | None
    record: AdapterRecord | None


@dataclass(frozen=True)
class BackendConfig:
    max_pending: int = 256  # requests queued or running; beyond: 503 overloaded
    tenant_max_concurrent: int = 64  # one tenant's requests at once; beyond: 429
    host_cache_bytes: int = 4 << 30
    max_upload_bytes: int = 2 << 30
    drain_timeout: float = 30.0
    compressions_per_tenant: int = 2  # fine-tunes of one tenant waiting for compression; beyond: 429


class Backend:
    def __init__(self, engine: LLMEngine, registry: Registry, metrics: Metrics, config: BackendConfig | None = None):
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.config = config or BackendConfig()
        self.tokenizer = engine.tokenizer
        self.model_id = engine.model.config.name
        self.max_model_len = engine.max_model_len
        self.host_tier = HostTier(self.config.host_cache_bytes, lambda event, s: self._tier_event("host", event, s))
        engine.observe_slots(lambda event, s: self._tier_event("gpu", event, s))  # the engine thread reports
        self.loop = EngineLoop(engine, self.config.max_pending, on_step=self._observe_step)
        # Loading a requested delta from disk (the request path) and validating uploads run in pools of their own,
        # so that uploads, however many or heavy, never make another tenant's request wait for a worker.
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltaserve-io")
        self.upload_workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltaserve-upload")
        self.compressor = FairWorkQueue(self.config.compressions_per_tenant, name="deltaserve-compress")
        self._record_pins: dict[str, int] = {}  # adapter version id -> requests running on it (_in_flight_lock)
        self._init_tokenizing()
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
        metrics.slots_in_use.labels("gpu_lora").set_function(lambda: engine.stats().slots_in_use["lora"])
        metrics.slots_in_use.labels("gpu_bitdelta").set_function(lambda: engine.stats().slots_in_use["bitdelta"])
        metrics.slots_in_use.labels("host").set_function(lambda: self.host_tier.num_items)
        for tier, n in (("gpu_lora", engine.config.lora_slots), ("gpu_bitdelta", engine.config.bitdelta_slots)):
            metrics.slots_total.labels(tier).set(n)

    # ---- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.loop.start()
        self.started = True

    def stop(self) -> None:
        self.loop.stop(timeout=5)
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.upload_workers.shutdown(wait=False, cancel_futures=True)
        self.compressor.stop()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        return self.loop.alive

    @property
    def ready(self) -> bool:
        return self.started and self.healthy and not self.draining

    @property
    def num_pending(self) -> int:
        return self.loop.num_pending

    def preload(self, ref: str) -> None:
        """Loads "tenant/adapter" into the host tier and a GPU slot before serving (left unpinned: it stays
        resident until the LRU needs its slot). Call before start()."""
        assert not self.started, "preload runs before the engine thread owns the slot pool"
        tenant, _, name = ref.partition("/")
        record = self.registry.resolve(tenant, name)
        if record is None:
            raise NotFound(f"no ready adapter {ref!r} to preload", param="preload")
        self.engine.preload(self._load_record(record))

    # ---- models ------------------------------------------------------------------------------------
    async def resolve(self, tenant: Tenant, model: str) -> ResolvedModel:
        """The base or the tenant's adapter of that name (newest ready version); NotFound otherwise, the
        same for a name that does not exist and for another tenant's adapter."""
        if model == self.model_id:
            return ResolvedModel(model, "base", None, None)
        record = self.registry.resolve(tenant.name, model)
        if record is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        delta = await asyncio.get_running_loop().run_in_executor(self.workers, self._load_record, record)
        return ResolvedModel(model, delta.kind, delta, record)

    def _load_record(self, record: AdapterRecord) -> Delta:
        assert record.sha256 is not None

        def load() -> Delta:
            delta = load_delta(self.registry.blob_path(record), self.engine.spec, self.engine.config.max_lora_rank)
            return dataclasses.replace(delta, owner=record.tenant)

        return self.host_tier.get(self._key(record), load)

    @staticmethod
    def _key(record: AdapterRecord) -> str:
        """The key its delta has in the host tier and the GPU slots."""
        assert record.sha256 is not None
        return delta_key(record.tenant, record.kind, record.sha256)

    def _forget(self, records: list[AdapterRecord], keep: set[str] = frozenset()) -> None:
        """Frees the host copies and GPU slots of versions no new request will use (running ones finish first)."""
        for rec in records:
            if rec.sha256 is None or self._key(rec) in keep:
                continue
            self.host_tier.discard(self._key(rec))
            self.loop.forget(rec.kind, self._key(rec))

    def delete_adapter(self, tenant: Tenant, name: str) -> None:
        versions = self.registry.list_versions(tenant.name, name)
        self.registry.delete_adapter(tenant.name, name)
        self._forget(versions)

    def delete_tenant(self, name: str) -> None:
        """Deletes a tenant, its key and its adapters, and frees their host copies and GPU slots (those its
        running requests use when they end). NotFound if there is no such tenant."""
        versions = self.registry.list_tenant_versions(name)
        self.registry.delete_tenant(name)
        self._forget(versions)

    def list_models(self, tenant: Tenant) -> list[dict]:
        created = int(time.time())
        models = [{"id": self.model_id, "object": "model", "created": created, "owned_by": "deltaserve", "parent": None}]
        for rec in self.registry.list_adapters(tenant.name):
            if rec.status == "ready":
                models.append(
                    {"id": rec.name, "object": "model", "created": rec.created, "owned_by": tenant.name, "parent": self.model_id}
                )
        return models

    # ---- tokens ------------------------------------------------------------------------------------
    # Tokenizing is CPU work: a few MB of prompt take seconds. Texts up to INLINE_CHARS are tokenized on the event
    # loop (milliseconds); longer ones in a pool of their own (the tokenizer releases the GIL, so the loop and
    # every stream keep running), at most TOKENIZE_QUEUE at once (beyond: 503), so a flood of huge prompts never
    # delays other tenants' small ones. A text too long to fit the context in any tokenization is refused first,
    # without being tokenized (max_prompt_chars).
    INLINE_CHARS = 16384
    TOKENIZE_QUEUE = 8

    def _init_tokenizing(self) -> None:
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltaserve-tokenize")
        self._tokenizing = 0
        vocab = self.tokenizer.get_vocab()
        # No token covers more characters of text than its own string has (byte-level BPE: one per byte;
        # SentencePiece: its pieces); x2 for normalizers that merge characters.
        self.max_token_chars = max((len(t) for t in vocab), default=1)
        self.max_prompt_chars = 2 * self.max_token_chars * self.max_model_len
        specials = set(self.tokenizer.all_special_tokens) | {
            t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
        }
        self._control_strings = sorted((t for t in specials if t), key=len, reverse=True)

    async def _tokenize(self, fn, *args) -> list[int]:
        size = sum(len(a) if isinstance(a, str) else sum(len(m["content"]) for m in a) for a in args)
        if size <= self.INLINE_CHARS:
            return fn(*args)
        if self._tokenizing >= self.TOKENIZE_QUEUE:
            raise Overloaded(f"{self._tokenizing} long prompts are being tokenized; retry shortly")
        self._tokenizing += 1  # the event loop is single-threaded: no lock needed
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)
        finally:
            self._tokenizing -= 1

    async def encode(self, text: str) -> list[int]:
        return await self._tokenize(self.tokenizer.encode, text)

    async def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The base tokenizer's chat template, with the assistant turn opened. Message contents are text: a
        control token spelled inside one (e.g. "</s><|system|>") is tokenized as the characters it is made of,
        never as the control token, so a user cannot forge another role's turn."""
        return await self._tokenize(self._chat_ids, messages)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if not any(c in m["content"] for m in messages for c in self._control_strings):
            return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        # Render with a marker in place of each content, so the template's own text and the contents can be
        # tokenized apart: the template's with its control tokens, the contents as plain text.
        markers = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = tok.apply_chat_template([{**m, "content": mk} for m, mk in zip(messages, markers)],
                                         add_generation_prompt=True, tokenize=False)  # fmt: skip
        real = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pieces: list[tuple[str, bool]] = []
        rest = marked
        for m, mk in zip(messages, markers):
            before, found, rest = rest.partition(mk)
            if not found:
                raise ValueError("the chat template does not place every message's content as it is")
            pieces += [(before, False), (m["content"], True)]
        pieces.append((rest, False))
        if "".join(p for p, _ in pieces) != real:
            raise ValueError("the chat template changes message contents; control-token text cannot be escaped")
        ids: list[int] = []
        for text, is_content in pieces:
            if text:
                ids += tok.encode(text, add_special_tokens=False, split_special_tokens=is_content)
        return ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

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
        record = resolved.record
        if record is not None:  # the version stays stored while a request runs on it (see _collect_replaced)
            with self._in_flight_lock:
                self._record_pins[record.id] = self._record_pins.get(record.id, 0) + 1
        try:
            request_id = uuid.uuid4().hex
            async for out in self.loop.stream(request_id, prompt, params, resolved.delta, tenant.name):
                yield out
        finally:
            with self._in_flight_lock:
                self._in_flight[tenant.name] -= 1
                last = False
                if record is not None:
                    self._record_pins[record.id] -= 1
                    last = not self._record_pins[record.id]
                    if last:
                        del self._record_pins[record.id]
            if last:
                newest = self.registry.resolve(record.tenant, record.name)
                if newest is None or newest.id != record.id:  # replaced (or deleted) while it ran: collect it
                    self.upload_workers.submit(self._collect_replaced, record.tenant, record.name)

    # ---- uploads -----------------------------------------------------------------------------------
    def stage(self, tenant: Tenant | None = None) -> Staging:
        """A staging for an upload (of `tenant`: its storage quota then applies as the bytes arrive)."""
        return self.registry.stage(self.config.max_upload_bytes, tenant=tenant.name if tenant else None)

    def _collect_replaced(self, tenant: str, name: str) -> None:
        """Deletes the versions a newer one replaced, except those running requests still use (their last
        request collects them when it ends), and frees the host copies and GPU slots of every replaced version
        (a slot in use is freed when its last request ends). The one place a replaced version is let go of;
        runs in a worker thread and never raises (stored versions stay, and the next collection takes them)."""
        with self._in_flight_lock:
            keep = set(self._record_pins)
        newest, replaced = None, []
        try:
            newest = self.registry.resolve(tenant, name)
            if newest is not None:
                replaced = [r for r in self.registry.list_versions(tenant, name) if r.version < newest.version]
            self.registry.collect_versions(tenant, name, keep=keep)
        except Exception as e:  # a full disk, a closed registry at shutdown: nothing is lost by waiting
            log.warning("replaced versions of %s/%s not collected yet: %s", tenant, name, e)
        # The same content uploaded again is the newest version's delta too: it stays resident.
        self._forget(replaced, keep={self._key(newest)} if newest is not None else set())

    async def commit_upload(self, tenant: Tenant, name: str, fmt: str, staging: Staging) -> AdapterRecord:
        """Validates the staged files against the base (in a worker thread) and stores them: a new version.
        A fine-tune is checked, recorded as "compressing" and compressed in the background."""
        loop = asyncio.get_running_loop()
        spec, rank = self.engine.spec, self.engine.config.max_lora_rank
        delta = await loop.run_in_executor(self.upload_workers, staging.validate, fmt, spec, rank)
        if fmt == "finetune":
            if self.compressor.waiting(tenant.name) >= self.compressor.per_tenant:  # before a row is made
                raise TenantBusy(f"{self.compressor.waiting(tenant.name)} of the tenant's fine-tunes wait for "
                                 f"compression (limit {self.compressor.per_tenant}); retry later")  # fmt: skip
            record = self.registry.create_pending(tenant.name, name, fmt)
            try:
                self.compressor.submit(tenant.name, lambda: self._compress(record, staging))
            except TenantBusy:
                self.registry.fail_pending(record.id, "not compressed: too many of the tenant's fine-tunes waited")
                raise
            return record
        record = await loop.run_in_executor(
            self.upload_workers, self.registry.commit_adapter, tenant.name, name, fmt, staging, delta
        )
        await loop.run_in_executor(self.upload_workers, self._collect_replaced, tenant.name, name)
        return record

    def _compress(self, record: AdapterRecord, staging: Staging) -> None:
        """Background: BitDelta compression of an uploaded fine-tune against the served base."""
        from registry.compress import compress  # only the compression thread needs it

        reported = [0.0]

        def progress(fraction: float) -> None:  # every catalog write is synced: report in 5 % steps
            if fraction - reported[0] >= 0.05 or fraction >= 1.0:
                reported[0] = fraction
                self.registry.set_progress(record.id, min(fraction, 0.99))

        try:
            out = staging.path / "delta.bitdelta.safetensors"
            compress(self.engine.base_dir, staging.path, out, progress=progress)
            delta = load_delta(out, self.engine.spec)
            staging.keep_only(out)
            self.registry.complete_pending(record.id, staging, delta)
            self._collect_replaced(record.tenant, record.name)
            self.metrics.uploads.labels("finetune", "ready").inc()
        except Exception as e:  # the record must end failed, never stay "compressing"
            log.warning("compression of %s failed: %s", record.id, e)
            # The tenant sees the typed errors' own messages, never a server path or a stack trace.
            message = e.message if isinstance(e, (DeltaError, RegistryError)) else "compression failed (internal error)"
            self.registry.fail_pending(record.id, message)
            staging.discard()
            self.metrics.uploads.labels("finetune", "failed").inc()

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
