"""The tenants' adapters behind the API: resolving a request's model to a loaded delta, the host-memory tier,
uploads and their background compression, and letting go of versions that were deleted or replaced.

Everything here that changes what is stored also frees the host copies and GPU slots that no new request will
use, so the routes make these changes through `Adapters`; reads of the catalog (listing, showing) go to the
registry directly. Disk and validation work runs in worker threads of its own; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from registry import downloads
from registry.catalog import AdapterRecord, Registry, Tenant
from registry.deltas import Delta, delta_key
from registry.errors import DeltaError, NotFound, NotStored, RegistryError
from registry.fmdelta import FMDeltaError
from registry.host_tier import HostTier, TierObserver
from registry.loading import load_delta
from registry.uploads import Staging
from serving.engine.async_engine import EngineLoop
from serving.engine.engine import LLMEngine
from serving.engine.errors import TenantBusy
from serving.fair_queue import FairWorkQueue
from serving.metrics import Metrics

log = logging.getLogger("deltaserve")

MAX_DOWNLOADS_PER_TENANT = 2


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's `model` field names, for one tenant: the base, or one version of an adapter."""

    model_id: str
    kind: str  # "base" | "lora" | "bitdelta"
    delta: Delta | None
    record: AdapterRecord | None


class Adapters:
    def __init__(
        self, engine: LLMEngine, registry: Registry, loop: EngineLoop, metrics: Metrics, *, model_id: str,
        host_cache_bytes: int, max_upload_bytes: int, compressions_per_tenant: int, host_observer: TierObserver,
    ):  # fmt: skip
        """loop: the engine thread, which owns the GPU slots (deltas are let go of through it). model_id: the
        base's name in the API.
        compressions_per_tenant: fine-tunes of one tenant waiting for compression; beyond: 429."""
        self.engine = engine
        self.registry = registry
        self.loop = loop
        self.metrics = metrics
        self.model_id = model_id
        self.started = int(time.time())  # the base's `created`: when this server started serving it
        self.max_upload_bytes = max_upload_bytes
        self.host_tier = HostTier(host_cache_bytes, host_observer)
        # Loading a requested delta from disk (the request path) and validating uploads run in pools of their own,
        # so that uploads, however many or heavy, never make another tenant's request wait for a worker.
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltaserve-io")
        self.upload_workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltaserve-upload")
        self.compressor = FairWorkQueue(compressions_per_tenant, name="deltaserve-compress")
        self._record_pins: dict[str, int] = {}  # adapter version id -> requests running on it (_pins_lock)
        self._pins_lock = threading.Lock()
        self._downloads: dict[str, int] = {}  # tenant -> downloads streaming now (_pins_lock)

    def stop(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.upload_workers.shutdown(wait=False, cancel_futures=True)
        self.compressor.stop()

    # ---- resolving and loading ---------------------------------------------------------------------
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

    def preload(self, ref: str) -> None:
        """Loads "tenant/adapter" into the host tier and a GPU slot before serving (left unpinned: it stays
        resident until the LRU needs its slot). Call before the engine thread starts."""
        tenant, _, name = ref.partition("/")
        record = self.registry.resolve(tenant, name)
        if record is None:
            raise NotFound(f"no ready adapter {ref!r} to preload", param="preload")
        self.engine.preload(self._load_record(record))

    def _load_record(self, record: AdapterRecord) -> Delta:
        assert record.sha256 is not None

        def load() -> Delta:
            delta = load_delta(self.registry.blob_path(record), self.engine.spec, self.engine.config.max_lora_rank)
            return dataclasses.replace(delta, owner=record.tenant)

        key = self._key(record)
        # Every request looks its delta up here, but one already in a GPU slot needs no host copy to load: its
        # hit is not counted, or the host tier's hit ratio would sit near 1 and say nothing. What is counted:
        # of the deltas a request found without a GPU slot, the share already in host memory (not read from disk).
        return self.host_tier.get(key, load, count_hit=not self.engine.holds_delta(record.kind, key))

    @staticmethod
    def _key(record: AdapterRecord) -> str:
        """The key its delta has in the host tier and the GPU slots."""
        assert record.sha256 is not None
        return delta_key(record.tenant, record.kind, record.sha256)

    def list_models(self, tenant: Tenant) -> list[dict]:
        """The model cards a tenant sees (serving.api.schemas.ModelObject): the base, then its ready adapters."""
        ready = [rec for rec in self.registry.list_adapters(tenant.name) if rec.status == "ready"]
        return [self._base_card()] + [self._adapter_card(rec) for rec in ready]

    def model_card(self, tenant: Tenant, model: str) -> dict:
        """One model card: the base or the tenant's ready adapter; NotFound as for a request's `model`."""
        if model == self.model_id:
            return self._base_card()
        record = self.registry.resolve(tenant.name, model)
        if record is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        return self._adapter_card(record)

    def _base_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "deltaserve",
                "root": self.model_id, "parent": None, "max_model_len": self.engine.max_model_len}  # fmt: skip

    def _adapter_card(self, rec: AdapterRecord) -> dict:
        return {"id": rec.name, "object": "model", "created": rec.created, "owned_by": rec.tenant,
                "root": f"sha256:{rec.sha256}", "parent": self.model_id, "max_model_len": self.engine.max_model_len}  # fmt: skip

    # ---- versions in use, and letting go of them ---------------------------------------------------
    @contextlib.contextmanager
    def in_use(self, record: AdapterRecord | None) -> Iterator[None]:
        """A request runs on this version: it stays stored until the request ends, and is collected then if a
        newer version replaced it meanwhile (None: the base, nothing to hold)."""
        if record is None:
            yield
            return
        with self._pins_lock:
            self._record_pins[record.id] = self._record_pins.get(record.id, 0) + 1
        try:
            yield
        finally:
            with self._pins_lock:
                self._record_pins[record.id] -= 1
                last = not self._record_pins[record.id]
                if last:
                    del self._record_pins[record.id]
            if last:
                newest = self.registry.resolve(record.tenant, record.name)
                if newest is None or newest.id != record.id:  # replaced (or deleted) while it ran: collect it
                    self.upload_workers.submit(self._collect_replaced, record.tenant, record.name)

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

    def _collect_replaced(self, tenant: str, name: str) -> None:
        """Deletes the versions a newer one replaced, except those running requests still use (their last
        request collects them when it ends), and frees the host copies and GPU slots of every replaced version
        (a slot in use is freed when its last request ends). The one place a replaced version is let go of;
        runs in a worker thread and never raises (stored versions stay, and the next collection takes them)."""
        with self._pins_lock:
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

    # ---- uploads -----------------------------------------------------------------------------------
    def stage(self, tenant: Tenant | None = None) -> Staging:
        """A staging for an upload (of `tenant`: its storage quota then applies as the bytes arrive)."""
        return self.registry.stage(self.max_upload_bytes, tenant=tenant.name if tenant else None)

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
        from registry.checkpoint import Checkpoint  # only the compression thread needs these
        from registry.compress import compress
        from registry.source_files import encode_upload

        reported = [0.0]

        def progress(fraction: float) -> None:  # every catalog write is synced: report in 5 % steps
            if fraction - reported[0] >= 0.05 or fraction >= 1.0:
                reported[0] = fraction
                self.registry.set_progress(record.id, min(fraction, 0.99))

        source = None
        try:
            uploaded = staging.files
            out = staging.path / "delta.bitdelta.safetensors"
            # Half the work is the compression, half keeping the upload itself, losslessly, for downloads.
            compress(self.engine.base_dir, staging.path, out, progress=lambda f: progress(0.5 * f))
            source = self.registry.scratch_dir()
            encode_upload(staging.path, uploaded, Checkpoint(self.engine.base_dir), source,
                          base_fingerprint=self.engine.spec.fingerprint, progress=lambda f: progress(0.5 + 0.5 * f))  # fmt: skip
            delta = load_delta(out, self.engine.spec)
            staging.keep_only(out)
            self.registry.complete_pending(record.id, staging, delta, source=source)
            self._collect_replaced(record.tenant, record.name)
            self.metrics.uploads.labels("finetune", "ready").inc()
        except Exception as e:  # the record must end failed, never stay "compressing"
            log.warning("compression of %s failed: %s", record.id, e)
            # The tenant sees the typed errors' own messages, never a server path or a stack trace.
            message = e.message if isinstance(e, (DeltaError, RegistryError)) else "compression failed (internal error)"
            self.registry.fail_pending(record.id, message)
            staging.discard()
            if source is not None:
                shutil.rmtree(source, ignore_errors=True)
            self.metrics.uploads.labels("finetune", "failed").inc()

    # ---- downloads ---------------------------------------------------------------------------------
    def download(self, tenant: Tenant, name: str) -> downloads.TarStream:
        """The files of the tenant's adapter `name` (its newest ready version) as they were uploaded, as a tar
        stream (registry.downloads), every file opened already. Call in a worker thread (a LoRA's files are
        hashed first); close the stream when done (it is closed when iterated to its end). NotFound as for a
        request's model; NotStored for a fine-tune whose upload is not kept (or kept against another base);
        TenantBusy beyond MAX_DOWNLOADS_PER_TENANT streaming at once (decoding a fine-tune takes CPU: one
        tenant's downloads must not take it all)."""
        record = self.registry.resolve(tenant.name, name)
        if record is None:
            raise NotFound(f"adapter {name!r} not found", "name")
        with self._pins_lock:
            if self._downloads.get(tenant.name, 0) >= MAX_DOWNLOADS_PER_TENANT:
                raise TenantBusy(f"{MAX_DOWNLOADS_PER_TENANT} of the tenant's downloads are streaming; retry when "
                                 "one has ended")  # fmt: skip
            self._downloads[tenant.name] = self._downloads.get(tenant.name, 0) + 1
        try:
            files = self._stored_files(record)
        except BaseException:
            self._download_ended(tenant.name)
            raise
        return downloads.TarStream(files, record.created, on_close=lambda: self._download_ended(tenant.name))

    def _download_ended(self, tenant: str) -> None:
        with self._pins_lock:
            self._downloads[tenant] -= 1
            if not self._downloads[tenant]:
                del self._downloads[tenant]

    def _stored_files(self, record: AdapterRecord) -> list[downloads.StoredFile]:
        if record.format == "lora":
            return downloads.lora_files(self.registry.blob_path(record))
        if record.format == "bitdelta":
            return downloads.bitdelta_files(self.registry.blob_path(record))
        source = self.registry.source_path(record)
        if source is None or self.engine.base_dir is None:
            raise NotStored(f"adapter {record.name!r} version {record.version} is served from its 1-bit delta, but "
                            "its uploaded fine-tune is not kept (uploaded before deltaserve kept fine-tunes, or its "
                            "stored copy was lost); upload the fine-tune again to keep it", "name")  # fmt: skip
        from registry.checkpoint import Checkpoint
        from registry.source_files import CheckpointTensors

        try:
            return downloads.finetune_files(source, CheckpointTensors(Checkpoint(self.engine.base_dir)),
                                            self.engine.spec.fingerprint)  # fmt: skip
        except FMDeltaError as e:
            log.error("stored fine-tune of %s/%s v%d unreadable: %s", record.tenant, record.name, record.version, e)
            raise NotStored(f"adapter {record.name!r} version {record.version}'s stored fine-tune cannot be given "
                            f"back: {e}", "name") from None  # fmt: skip
