"""The tenants' adapters behind the API: resolving a request's model to what it runs on (the generation loads it:
serving.generation), uploads and their background compression, downloads, and letting go of versions that were
deleted or replaced.

Everything here that changes what is stored also frees the host copies and GPU slots that no new request will
use (through the generation, wherever they are held), so the routes make these changes through `Adapters`; reads of the catalog (listing, showing) go to the
registry directly. Disk and validation work runs in worker threads of its own; the event loop only awaits.
Over 400 lines: one concept, a tenant's adapter versions from upload to release (resolving, uploads and their
compression, downloads, letting go); the model work it starts lives in registry/ and serving.evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry import downloads
from registry.catalog import AdapterRecord, Registry, Tenant
from registry.deltas import Served
from registry.errors import DeltaError, NotFound, NotStored, RegistryError
from registry.fmdelta import FMDeltaError
from registry.loading import load_delta
from registry.recipe import Recipe
from registry.upload_formats import PEFT_FORMATS
from registry.uploads import Staging
from serving.engine.errors import TenantBusy
from serving.fair_queue import FairWorkQueue
from serving.generation import Generation, record_key
from serving.metrics import Metrics

log = logging.getLogger("deltaserve")

MAX_DOWNLOADS_PER_TENANT = 2
FIDELITY_MAX_TOKENS = 4096  # of held-out calibration text scored per version (three forms through the model)


@dataclass(frozen=True)
class ResolvedModel:
    """What a request runs on, for one tenant: the base, one version of an adapter (its `model` field), or a
    composition of versions of several (its `adapters` field)."""

    model_id: str
    kind: str  # "base" | "lora" | "ia3" | "bitdelta" | "composed"
    delta: Served | Any | None  # what the generation runs it on (serving.generation.Generation.served_for)
    records: tuple[AdapterRecord, ...] = ()  # the versions it runs on (held stored while it runs)

    @property
    def usage_name(self) -> str | None:
        """Whose usage it is: None for the base, the adapter's name, or a composition's names joined by "+"."""
        return "+".join(r.name for r in self.records) if self.records else None


class Adapters:
    def __init__(
        self, generation: Generation, registry: Registry, metrics: Metrics, *, model_id: str, max_upload_bytes: int,
        compressions_per_tenant: int,
    ):  # fmt: skip
        """generation: where requests run (it loads their deltas, and lets go of them). model_id: the base's name
        in the API. compressions_per_tenant: fine-tunes of one tenant waiting for compression; beyond: 429."""
        self.generation = generation
        self.base = generation.base
        self.registry = registry
        self.metrics = metrics
        self.model_id = model_id
        self.started = int(time.time())  # the base's `created`: when this server started serving it
        self.max_upload_bytes = max_upload_bytes
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
            return ResolvedModel(model, "base", None)
        record = self.registry.resolve(tenant.name, model)
        if record is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        served = await asyncio.get_running_loop().run_in_executor(self.workers, self.generation.served_for, record)
        return ResolvedModel(model, record.kind, served, (record,))

    async def resolve_composition(self, tenant: Tenant, parts: list[tuple[str, float]]) -> ResolvedModel:
        """The tenant's adapters of these (distinct) names, newest ready versions, with their weights, on the
        base. Only the tenant's own adapters are looked up: another tenant's name is NotFound, as a name that
        does not exist. The engine checks that its slots can hold them together (AdapterMismatch)."""
        records = []
        for name, _ in parts:
            record = self.registry.resolve(tenant.name, name)
            if record is None:
                raise NotFound(f"The adapter `{name}` does not exist.", param="adapters")
            records.append(record)
        loop = asyncio.get_running_loop()
        served = [await loop.run_in_executor(self.workers, self.generation.served_for, record) for record in records]
        composition = self.generation.compose([(s, weight) for s, (_, weight) in zip(served, parts)])
        return ResolvedModel(self.model_id, "composed", composition, tuple(records))

    def preload(self, ref: str) -> None:
        """Loads "tenant/adapter" into the host tier and a GPU slot before serving (left unpinned: it stays
        resident until the LRU needs its slot). Call before the engine thread starts."""
        tenant, _, name = ref.partition("/")
        record = self.registry.resolve(tenant, name)
        if record is None:
            raise NotFound(f"no ready adapter {ref!r} to preload", param="preload")
        self.generation.preload(record)

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
                "root": self.model_id, "parent": None, "max_model_len": self.base.max_model_len}  # fmt: skip

    def _adapter_card(self, rec: AdapterRecord) -> dict:
        return {"id": rec.name, "object": "model", "created": rec.created, "owned_by": rec.tenant,
                "root": f"sha256:{rec.sha256}", "parent": self.model_id, "max_model_len": self.base.max_model_len}  # fmt: skip

    # ---- versions in use, and letting go of them ---------------------------------------------------
    @contextlib.contextmanager
    def in_use(self, records: tuple[AdapterRecord, ...]) -> Iterator[None]:
        """A request runs on these versions: they stay stored until the request ends, and are collected then if
        newer versions replaced them meanwhile (none: the base, nothing to hold)."""
        with contextlib.ExitStack() as stack:
            for record in records:
                stack.enter_context(self._version_in_use(record))
            yield

    @contextlib.contextmanager
    def _version_in_use(self, record: AdapterRecord) -> Iterator[None]:
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
            if rec.sha256 is None or record_key(rec) in keep:
                continue
            self.generation.forget(rec)

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
        self._forget(replaced, keep={record_key(newest)} if newest is not None and newest.sha256 else set())

    # ---- uploads -----------------------------------------------------------------------------------
    def stage(self, tenant: Tenant | None = None) -> Staging:
        """A staging for an upload (of `tenant`: its storage quota then applies as the bytes arrive)."""
        return self.registry.stage(self.max_upload_bytes, tenant=tenant.name if tenant else None)

    async def commit_upload(self, tenant: Tenant, name: str, fmt: str, staging: Staging,
                            recipe: Recipe | None = None) -> AdapterRecord:  # fmt: skip
        """Validates the staged files against the base (in a worker thread) and stores them: a new version.
        A fine-tune is checked, recorded as "compressing" and compressed in the background (as `recipe` says)."""
        loop = asyncio.get_running_loop()
        spec, rank = self.base.spec, self.base.max_lora_rank
        delta = await loop.run_in_executor(self.upload_workers, staging.validate, fmt, spec, rank)
        if fmt == "finetune":
            return self._submit_compression(tenant, name, lambda record: self._compress(record, staging, recipe or Recipe()),
                                            on_refused=staging.discard)  # fmt: skip
        record = await loop.run_in_executor(
            self.upload_workers, self.registry.commit_adapter, tenant.name, name, fmt, staging, delta
        )
        await loop.run_in_executor(self.upload_workers, self._collect_replaced, tenant.name, name)
        return record

    def recompress(self, tenant: Tenant, name: str, recipe: Recipe) -> AdapterRecord:
        """A new version of the tenant's fine-tune `name`, compressed again from its stored upload as `recipe`
        says, in the background (no re-upload; the new version shares the stored upload). NotFound as for a
        request's model; NotStored unless its current version is a fine-tune whose upload is kept."""
        current = self.registry.resolve(tenant.name, name)
        if current is None:
            raise NotFound(f"adapter {name!r} not found", "name")
        if current.format != "finetune" or current.source_blob is None:
            raise NotStored(f"adapter {name!r} version {current.version} is "
                            + ("not a full fine-tune: only a fine-tune's kept upload can be compressed again"
                               if current.format != "finetune" else "a fine-tune whose upload is not kept; upload it again"),
                            "name")  # fmt: skip
        return self._submit_compression(tenant, name, lambda record: self._recompress(record, current, recipe))

    def _submit_compression(self, tenant: Tenant, name: str, work, on_refused=lambda: None) -> AdapterRecord:
        """A "compressing" version of `name`, and `work(record)` queued for the compression thread (fair between
        tenants, at most `per_tenant` of one tenant waiting: TenantBusy beyond, before a row is made)."""
        if self.compressor.waiting(tenant.name) >= self.compressor.per_tenant:
            raise TenantBusy(f"{self.compressor.waiting(tenant.name)} of the tenant's fine-tunes wait for "
                             f"compression (limit {self.compressor.per_tenant}); retry later")  # fmt: skip
        record = self.registry.create_pending(tenant.name, name, "finetune")
        try:
            self.compressor.submit(tenant.name, lambda: work(record))
        except TenantBusy:
            self.registry.fail_pending(record.id, "not compressed: too many of the tenant's fine-tunes waited")
            on_refused()
            raise
        return record

    def _compress(self, record: AdapterRecord, staging: Staging, recipe: Recipe) -> None:
        """Background: an uploaded fine-tune to its 1-bit delta (as `recipe` says), its upload kept losslessly."""
        from registry.checkpoint import Checkpoint  # only the compression thread needs these
        from registry.source_files import encode_upload

        source = None

        def keep_upload(progress) -> Path:
            nonlocal source
            source = self.registry.scratch_dir()
            encode_upload(staging.path, uploaded, Checkpoint(self.base.base_dir), source,
                          base_fingerprint=self.base.spec.fingerprint, progress=progress)  # fmt: skip
            return source

        uploaded = staging.files
        try:
            self._compress_into(record, staging, staging.path, recipe, keep_upload)
        finally:
            if source is not None:
                shutil.rmtree(source, ignore_errors=True)

    def _recompress(self, record: AdapterRecord, current: AdapterRecord, recipe: Recipe) -> None:
        """Background: the stored upload of `current` decoded into a scratch folder, compressed as `recipe` says."""
        from registry.checkpoint import Checkpoint
        from registry.source_files import CheckpointTensors

        staging, finetune = None, None
        try:
            staging, finetune = self.registry.stage(), self.registry.scratch_dir()
            source = self.registry.source_path(current)
            assert source is not None
            files = downloads.finetune_files(source, CheckpointTensors(Checkpoint(self.base.base_dir)),
                                             self.base.spec.fingerprint)  # fmt: skip
            try:
                for f in files:  # streamed to disk, one chunk at a time; each file checked against its sha256
                    with open(finetune / f.name, "wb") as out:
                        for chunk in f.chunks:
                            out.write(chunk)
            finally:
                downloads.close_all(files)
        except Exception as e:
            self._compression_failed(record, e, staging)
            if finetune is not None:
                shutil.rmtree(finetune, ignore_errors=True)
            return
        try:
            self._compress_into(record, staging, finetune, recipe, lambda progress: current.source_blob)
        finally:
            shutil.rmtree(finetune, ignore_errors=True)

    def _compress_into(self, record: AdapterRecord, staging: Staging, finetune: Path, recipe: Recipe, keep) -> None:
        """The 1-bit delta of the fine-tune in `finetune` written into `staging`, its fidelity measured when the
        recipe has calibration text, `keep(progress)` (the source to store: a folder or a stored blob's name), then
        the version completed; on any error it ends failed with a message for the tenant, never "compressing"."""
        from registry.compress import CompressOptions, compress

        reported = [0.0]

        def progress(fraction: float) -> None:  # every catalog write is synced: report in 5 % steps
            if fraction - reported[0] >= 0.05 or fraction >= 1.0:
                reported[0] = fraction
                self.registry.set_progress(record.id, min(fraction, 0.99))

        try:
            out = staging.path / "delta.bitdelta.safetensors"
            distill_text, held_out = recipe.split()
            distill = self._distill_config(recipe) if recipe.distill_steps else None
            # Half the work is the compression, half keeping the upload itself, losslessly, for downloads.
            compress(self.base.base_dir, finetune, out, CompressOptions(scale=recipe.scale), distill=distill,
                     calibration_text=distill_text, progress=lambda f: progress(0.5 * f))  # fmt: skip
            fidelity = self._fidelity(finetune, out, held_out, recipe) if held_out else None
            source = keep(lambda f: progress(0.5 + 0.5 * f))
            delta = load_delta(out, self.base.spec)
            staging.keep_only(out)
            self.registry.complete_pending(record.id, staging, delta, source=source, fidelity=fidelity)
            self._collect_replaced(record.tenant, record.name)
            self.metrics.uploads.labels("finetune", "ready").inc()
        except Exception as e:  # the record must end failed, never stay "compressing"
            self._compression_failed(record, e, staging)

    def _compression_failed(self, record: AdapterRecord, e: Exception, staging: Staging | None) -> None:
        log.warning("compression of %s failed: %s", record.id, e)
        # The tenant sees the typed errors' own messages, never a server path or a stack trace.
        message = e.message if isinstance(e, (DeltaError, RegistryError)) else "compression failed (internal error)"
        self.registry.fail_pending(record.id, message)
        if staging is not None:
            staging.discard()
        self.metrics.uploads.labels("finetune", "failed").inc()

    def _distill_config(self, recipe: Recipe):
        from registry.distill import DistillConfig

        return DistillConfig(steps=recipe.distill_steps, device=self.base.device)

    def _fidelity(self, finetune: Path, delta_file: Path, held_out: str, recipe: Recipe) -> str:
        """How close the 1-bit delta comes to the fine-tune on the held-out part of the tenant's calibration
        text (serving.evaluation, through the serving model): JSON text for the catalog."""
        import json

        from serving.evaluation import evaluate

        report = evaluate(self.base.base_dir, finetune, held_out, delta_path=delta_file,
                          device=self.base.device, max_tokens=FIDELITY_MAX_TOKENS)  # fmt: skip
        served = report.form("bitdelta_distilled")
        return json.dumps({"gain_kept": served.gain_kept, "top1_agreement": served.top1_agreement,
                           "perplexity": served.perplexity, "finetune_perplexity": report.form("finetune").perplexity,
                           "base_perplexity": report.form("base").perplexity, "held_out_tokens": report.tokens,
                           "scale": recipe.scale, "distill_steps": recipe.distill_steps})  # fmt: skip

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
        if record.format in PEFT_FORMATS:
            return downloads.peft_files(self.registry.blob_path(record))
        if record.format == "bitdelta":
            return downloads.bitdelta_files(self.registry.blob_path(record))
        source = self.registry.source_path(record)
        if source is None or self.base.base_dir is None:
            raise NotStored(f"adapter {record.name!r} version {record.version} is served from its 1-bit delta, but "
                            "its uploaded fine-tune is not kept (uploaded before deltaserve kept fine-tunes, or its "
                            "stored copy was lost); upload the fine-tune again to keep it", "name")  # fmt: skip
        from registry.checkpoint import Checkpoint
        from registry.source_files import CheckpointTensors

        try:
            return downloads.finetune_files(source, CheckpointTensors(Checkpoint(self.base.base_dir)),
                                            self.base.spec.fingerprint)  # fmt: skip
        except FMDeltaError as e:
            log.error("stored fine-tune of %s/%s v%d unreadable: %s", record.tenant, record.name, record.version, e)
            raise NotStored(f"adapter {record.name!r} version {record.version}'s stored fine-tune cannot be given "
                            f"back: {e}", "name") from None  # fmt: skip
