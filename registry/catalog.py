"""The registry's storage: tenants, their API keys and their adapters: a catalog (a database) and a blob folder.

Layout of `root`:
    catalog.sqlite3      the catalog when no other database is given: SQLite (registry.database says how it is
                         opened); or PostgreSQL (`catalog="postgresql://..."`), shared by several servers, whose
                         `root` is then one shared folder too, or one folder per machine with the blobs in a
                         bucket. Tables: registry.schema.
    blobs/               the content-addressed blob store (registry.blob_store), or with `blob_store="s3://..."`
                         this machine's cache of the bucket's blobs (registry.s3_store)
    tmp/<lease>/         one private folder per process that has the registry open: staging directories of
                         uploads in progress (registry.uploads.Staging), and blobs on their way out
    admin_key.sha256     the hash of the admin key (registry.keys, mode 0600)
    reserve.bin          space given up on a full disk so that deletes can still be written (registry.fsync)
    catalog_id           the id of the catalog this folder belongs to (a folder opened with another is refused)
    registry.lock        held shared (flock) by every process that has the registry open, so that a deltaserve from
                         before leases, which took it exclusively, never runs beside them

Guarantees:
- Secrets: API keys are stored only as sha256 hashes (registry.keys); a key is shown once, when created,
  and never logged.
- Isolation: every adapter call is scoped by tenant; another tenant's adapter is indistinguishable from a
  missing one (None / NotFound with the same message). Ids (random, opaque) are used only by the
  background compression calls (`set_progress`, `complete_pending`, `fail_pending`), never with an id a
  user sent.
- Durability: a blob is written in tmp/, fsynced, renamed into blobs/ (same filesystem), its directory
  fsynced, and the catalog row is inserted in the transaction that placed it, which commits LAST. Deleting
  removes the rows first, then the blobs no row references any more. So a crash at any moment leaves either no
  row or a row whose blob is complete; opening then marks "ready" rows whose blob is gone as failed and removes
  blobs no row references.
- Threads: one lock per Registry around its writes (heavy work, fsync and hashing, happens outside it); reads and
  the lease's renewal take a pooled connection each, never waiting behind a write.
- Processes: any number may open one registry at once (servers on one machine, ingresses of a cluster sharing a
  PostgreSQL catalog and a blob folder). Each holds a lease (registry.schema.leases) that it renews while it lives
  and gives back when it closes; what a process leaves behind when it dies (its tmp/ folder, the versions it was
  compressing, failed as "interrupted by a restart") is cleaned up by the others: at once when it ran on the same
  machine and its process is gone, otherwise once its lease has expired; never while it runs. Placing and removing blobs is serialised across processes by the catalog (the store lock).

This module imports no torch: deltas are duck-typed (`.kind`, `.sha256`, `.rank` of registry.deltas).
It is one concept, the catalog of tenants and adapter versions, and over 400 lines because each operation's
durability and isolation promise is spelled out where it is kept; the database, schema, blobs, keys and disk
reserve it uses live in registry.database, registry.schema, registry.blob_store, registry.keys and registry.fsync.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, delete, exc, func, insert, or_, select, update

from registry import database
from registry import usage as usage_table
from registry.blob_store import BlobStore, open_store
from registry.errors import InsufficientStorage, NameTaken, NotFound, NotStored, is_disk_full
from registry.fsync import DiskReserve
from registry.keys import AdminKey, hash_key, is_sha256_hex, new_tenant_key, plausible_key, write_private
from registry.names import validate_name
from registry.schema import adapters, catalog_info, leases, tenants
from registry.upload_formats import DEFAULT_MAX_UPLOAD_BYTES, check_format
from registry.uploads import Staging
from registry.usage import UsageCount, UsageKey, UsageRow

if TYPE_CHECKING:
    from registry.deltas import Delta

log = logging.getLogger(__name__)

STATUSES = ("ready", "compressing", "failed")
INTERRUPTED = "interrupted by a restart; upload again"
MISSING_BLOB = "the stored adapter data is missing; upload again"
MAX_ERROR_LENGTH = 4000
RESERVE_BYTES = 16 << 20  # given up on a full disk so that deletes (the catalog's journal) can still be written
LEASE_SECONDS = 30  # a process that has not renewed its lease for this long is taken for dead
_RECORD_COLUMNS = (adapters.c.id, adapters.c.tenant, adapters.c.name, adapters.c.format, adapters.c.version,
                   adapters.c.sha256, adapters.c.status, adapters.c.progress, adapters.c.error, adapters.c.created,
                   adapters.c.size_bytes, adapters.c.rank, adapters.c.blob, adapters.c.source_blob,
                   adapters.c.source_bytes, adapters.c.fidelity)  # fmt: skip  # AdapterRecord's fields, in order
# The two lookups of every request (authenticate, resolve), built once: building a statement costs more than
# running it (bench/registry.py).
_BY_KEY_HASH = select(tenants.c.name, tenants.c.created, tenants.c.key_hash).where(
    tenants.c.key_hash == bindparam("digest"))  # fmt: skip
_NEWEST_READY = (select(*_RECORD_COLUMNS)
                 .where(adapters.c.tenant == bindparam("tenant"), adapters.c.name == bindparam("name"),
                        adapters.c.status == "ready")
                 .order_by(adapters.c.version.desc()).limit(1))  # fmt: skip
_STORED_BYTES = func.coalesce(func.sum(adapters.c.size_bytes + func.coalesce(adapters.c.source_bytes, 0)), 0)


@dataclass(frozen=True)
class Tenant:
    """A tenant: its name and creation time (unix seconds). Its key is never kept in plaintext."""

    name: str
    created: int


@dataclass(frozen=True)
class AdapterRecord:
    """One version of a tenant's adapter.

    id:        opaque, random ("ad-" + 24 hex digits), unique across tenants.
    format:    as uploaded: "lora", "ia3", "bitdelta" or "finetune" (stored as a 1-bit delta once compressed).
    version:   1, 2, ... per (tenant, name); a new upload of a name gets the previous max + 1.
    sha256:    the delta's identity (bare hex), None until the data is stored.
    status:    "ready" (blob stored), "compressing" (background fine-tune compression), "failed".
    progress:  0..1 (1 when ready).  error: why it failed, else None.  created: unix seconds.
    size_bytes, rank: of the stored data (rank: LoRA only), None until stored.
    blob:      the blob's path relative to blobs/ (internal; `Registry.blob_path` gives the full path).
    source_blob, source_bytes: a fine-tune's uploaded files, stored losslessly (registry.source_files), and
               their stored size; None for the other formats, before compression ends, or when lost.
    fidelity:  a fine-tune version's measured fidelity (JSON text, written by its compression), else None.
    """

    id: str
    tenant: str
    name: str
    format: str
    version: int
    sha256: str | None
    status: str
    progress: float
    error: str | None
    created: int
    size_bytes: int | None
    rank: int | None
    blob: str | None
    source_blob: str | None = None
    source_bytes: int | None = None
    fidelity: str | None = None  # JSON: how close a fine-tune's 1-bit delta came to it (serving.adapters)

    @property
    def kind(self) -> str:
        """The stored delta's kind, which loader reads the blob: "lora", "ia3" or "bitdelta"."""
        return blob_kind(self.format)


def _next_version(db: Connection, tenant: str, name: str) -> int:
    """The version a new upload of `tenant`'s `name` gets (inside the inserting transaction); NotFound if
    the tenant does not exist. The tenant's row is locked until the transaction ends (FOR UPDATE on PostgreSQL;
    on SQLite the write transaction is exclusive), so two processes never hand out the same version."""
    if db.execute(select(tenants.c.name).where(tenants.c.name == tenant).with_for_update()).first() is None:
        raise NotFound(f"tenant {tenant!r} not found", "tenant")
    latest = db.execute(select(func.coalesce(func.max(adapters.c.version), 0))
                        .where(adapters.c.tenant == tenant, adapters.c.name == name)).scalar_one()  # fmt: skip
    return int(latest) + 1


def _blobs_of(db: Connection, *where: Any) -> list[str]:
    """Every blob (deltas and stored uploads) of the rows `where` selects."""
    rows = db.execute(select(adapters.c.blob, adapters.c.source_blob).where(*where)).all()
    return sorted({b for row in rows for b in row if b is not None})


def _lock_store(db: Connection) -> None:
    """Takes the store lock for the rest of this write transaction (registry.schema.catalog_info says why)."""
    db.execute(update(catalog_info).where(catalog_info.c.id == 1).values(store_writes=catalog_info.c.store_writes + 1))


def blob_kind(format: str) -> str:
    """The kind of stored delta an upload format becomes: "lora" -> "lora", "ia3" -> "ia3", "bitdelta" and "finetune"
    (compressed to a 1-bit delta) -> "bitdelta"."""
    return "bitdelta" if check_format(format) in ("bitdelta", "finetune") else format


def _now() -> int:
    return int(time.time())


def _pid_space() -> str:
    """This machine's boot and this process's pid namespace: processes of the same value see each other's pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # the host name too: machines cloned from one snapshot may share a boot id
        return f"{socket.gethostname()}/{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc: no pid is ever taken for dead, leases only expire
        return f"unknown-{secrets.token_hex(8)}"


def _keep_lease(registry_ref: weakref.ref[Registry], closed: threading.Event, period: float) -> None:
    """The lease's keeper, a daemon thread: Registry._renew every `period` until the registry is closed or dropped."""
    while not closed.wait(period):
        registry = registry_ref()
        if registry is None:
            return
        try:
            registry._renew()
        except Exception:  # the catalog unreachable for a moment, or closed meanwhile: the next tick tries again
            if not closed.is_set():
                log.exception("registry: renewing the lease failed")
        finally:
            del registry


def _process_started(pid: int) -> int | None:
    """When process `pid` of this pid namespace started (clock ticks after boot), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command's closing parenthesis


def _process_gone(pid: int, started: int | None) -> bool:
    """Whether the process a lease of this machine names is gone (its pid unused, or used by a later process)."""
    now = _process_started(pid)
    return now is None or (started is not None and now != started)


class Registry:
    """Tenants, keys and adapter versions: a catalog and a blob folder (see the module docstring).

    root:             the registry directory (created, mode 0700, if missing): blobs, tmp/, the admin key.
    catalog:          the catalog's database URL ("postgresql://user@host/db"); None: root/catalog.sqlite3.
    blob_store:       "s3://bucket/prefix": blobs in an S3-compatible bucket, cached in root/blobs
                      (registry.s3_store); None: root/blobs is the store (local, or a shared filesystem).
    max_upload_bytes: the default cap on one upload's total size (`stage`).

    Opening takes a lease and cleans up after dead processes (see _reap): their tmp/ folders, their
    "compressing" rows (failed: "interrupted by a restart; upload again"); "ready" rows whose blob is gone become
    "failed", and blobs no row references are removed. Close with `close()` (or use it as a context manager): it
    fails this process's own compressions still running and gives the lease back.
    Raises database.CatalogError for a catalog written by a newer deltaserve.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        catalog: str | None = None,
        blob_store: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        tenant_quota_bytes: int | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ):
        """tenant_quota_bytes: the stored bytes one tenant may hold (its adapters' versions), None: no quota.
        lease_seconds: how long this process's lease lasts unrenewed (it is renewed every third of it)."""
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self.tenant_quota_bytes = tenant_quota_bytes
        self.lease_seconds = lease_seconds
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._closed.set()  # until the catalog is open: a half-made Registry's close() has nothing to give back
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # also an existing registry's (the admin key's hash and tenants' blobs are here)
        self.blobs = self.root / "blobs"
        self.catalog_url = catalog or database.sqlite_url(self.root / "catalog.sqlite3")
        # Shared with every process of this deltaserve; a deltaserve from before leases takes it exclusively and
        # recovers as if alone: the two must never run on one folder together.
        self._folder_lock = os.open(self.root / "registry.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._folder_lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._folder_lock)
            raise database.CatalogError(f"the registry folder {self.root} is open by an older deltaserve (one "
                                        "process per folder); stop it first") from None  # fmt: skip
        try:
            self._engine = database.connect(self.catalog_url)
        except BaseException:
            os.close(self._folder_lock)
            raise
        try:
            record_store = self._check_folder_matches(own_sqlite=catalog is None, blob_store=blob_store)
        except BaseException:
            self._engine.dispose()
            os.close(self._folder_lock)
            raise
        self._closed.clear()
        self.lease = "ls-" + secrets.token_hex(8)
        self._pids = _pid_space()
        try:
            with database.write(self._engine) as db:  # the lease first, then its folder: see _reap
                db.execute(insert(leases).values(self._lease_row(db)))
            self.tmp = self.root / "tmp" / self.lease
            self._make_tmp()
            self.store = open_store(self.blobs, self.tmp, blob_store)
            self.store.claim(self._catalog_id)  # a bucket of another catalog is refused before anything is swept
            if record_store:  # only once every check passed: a refused opening leaves the catalog as it was
                with database.write(self._engine) as db:
                    db.execute(update(catalog_info).where(catalog_info.c.id == 1, catalog_info.c.blob_store.is_(None))
                               .values(blob_store=blob_store))  # fmt: skip
            self._recover()
            self.admin_key = AdminKey(self.root)
            self.reserve = DiskReserve(self.root / "reserve.bin", RESERVE_BYTES)
            self.reserve.ensure()
        except BaseException:
            self._closed.set()
            with contextlib.suppress(Exception):
                self._give_back_lease()
            self._engine.dispose()
            os.close(self._folder_lock)
            raise
        # The keeper holds the Registry weakly: one dropped without close() is collected (and gives its lease back).
        self._renewer = threading.Thread(target=_keep_lease, args=(weakref.ref(self), self._closed, lease_seconds / 3),
                                         name=f"registry-lease-{self.lease}", daemon=True)  # fmt: skip
        self._renewer.start()

    # --- opening, closing, leases -------------------------------------------------------------------------

    def _check_folder_matches(self, own_sqlite: bool, blob_store: str | None) -> bool:
        """The folder, the catalog and the blob store belong together (registry.schema.catalog_info says why it
        matters: opening with the wrong one would take every stored blob for lost, then for garbage). The catalog
        names its blob store (set by its first opener while it stores nothing); the folder's `catalog_id` file names
        the catalog; a folder without one is taken only for the folder's own SQLite catalog, or when it holds no
        blob and the catalog's blobs are not meant to be in it (a bucket's cache), or the catalog stores nothing.
        Returns whether the catalog is yet to name `blob_store` (its caller records it once the store agrees)."""
        with self._engine.connect() as db:
            catalog_id, store = db.execute(select(catalog_info.c.catalog_id, catalog_info.c.blob_store)
                                           .where(catalog_info.c.id == 1)).one()  # fmt: skip
            stored = db.execute(select(adapters.c.id).where(adapters.c.blob.is_not(None)).limit(1)).first() is not None
            if store != blob_store and (stored or store is not None):
                raise database.CatalogError(
                    f"the catalog {database.display_url(self.catalog_url)} keeps its blobs in "
                    f"{store or 'the registry folder (no --blob-store)'}, not in "
                    f"{blob_store or 'the registry folder'}: give the --blob-store it was used with")
        self._catalog_id = catalog_id
        marker = self.root / "catalog_id"
        if marker.exists():
            folder_id = marker.read_text().strip()
            if folder_id != catalog_id:
                raise database.CatalogError(
                    f"the registry folder {self.root} belongs to another catalog ({folder_id or 'unreadable'}) than "
                    f"{database.display_url(self.catalog_url)} ({catalog_id}): give the --catalog it was used with")
            return store != blob_store
        if not own_sqlite:
            if BlobStore.holds_blobs(self.blobs):
                raise database.CatalogError(
                    f"the registry folder {self.root} holds blobs of its own SQLite catalog; it cannot be opened with "
                    f"{database.display_url(self.catalog_url)} (a new folder can)")
            if blob_store is None and stored:
                raise database.CatalogError(
                    f"the catalog {database.display_url(self.catalog_url)} stores adapters whose blobs are in its "
                    f"registry folder, and {self.root} is a new folder: mount the registry's shared folder here "
                    "(or keep the blobs in a bucket: --blob-store)")
        write_private(marker, (catalog_id + "\n").encode("ascii"))
        return store != blob_store

    def _expiry(self, db: Connection) -> int:
        """The lease's end, by the catalog's clock (every process compares leases with the same one)."""
        return database.epoch_now(db) + int(self.lease_seconds + 0.999)

    def _make_tmp(self) -> None:
        """This process's tmp/ folder, and tmp/ itself, private whatever the umask (again if another process
        that took this one for dead removed it)."""
        self.tmp.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.tmp.parent, 0o700)
        self.tmp.mkdir(mode=0o700, exist_ok=True)

    def _lease_row(self, db: Connection) -> dict[str, Any]:
        return {"id": self.lease, "host": socket.gethostname(), "pid": os.getpid(), "pids": self._pids,
                "pid_started": _process_started(os.getpid()), "started": _now(), "expires": self._expiry(db)}

    def _recover(self) -> None:
        """What opening checks: other processes' leftovers (_reap), lost blobs, unreferenced blobs."""
        self._reap()
        with self._lock, self._tx() as db:
            _lock_store(db)
            ready = db.execute(select(adapters.c.id, adapters.c.blob).where(adapters.c.status == "ready")).all()
            sources = db.execute(select(adapters.c.id, adapters.c.source_blob)
                                 .where(adapters.c.source_blob.is_not(None))).all()  # fmt: skip
            present = self.store.present({b for _, b in ready} | {s for _, s in sources})
            for row_id, blob in ready:
                if blob not in present:
                    db.execute(update(adapters).where(adapters.c.id == row_id)
                               .values(status="failed", error=MISSING_BLOB, blob=None))  # fmt: skip
            # A lost stored upload leaves its version served (its 1-bit delta is there); only its download goes.
            for row_id, source in sources:
                if source not in present:
                    db.execute(update(adapters).where(adapters.c.id == row_id)
                               .values(source_blob=None, source_bytes=None))  # fmt: skip
            # Under the store lock: every blob another process placed is referenced by its committed row already.
            referenced = {b for (b,) in db.execute(select(adapters.c.blob).where(adapters.c.blob.is_not(None))
                          .union(select(adapters.c.source_blob).where(adapters.c.source_blob.is_not(None))))}  # fmt: skip
            self.store.sweep(referenced)

    def _reap(self) -> None:
        """Cleans up after the processes that are gone: on this machine, those whose process no longer runs (at once,
        and never one that runs, however late its renewal); elsewhere, those whose lease expired. Fails the versions
        they were compressing (and any
        compressing row without a live lease, e.g. of a catalog from before leases), removes their tmp/ folders
        (and anything else in tmp/ that belongs to no live lease), forgets their leases."""
        tmp = self.root / "tmp"
        entries = list(tmp.iterdir()) if tmp.is_dir() else []  # listed BEFORE the live leases are read: a folder
        # is made after its lease is committed, so every folder listed here has its lease visible below
        with self._tx() as db:
            now = database.epoch_now(db)
            gone = [lease for lease, pids, pid, started, expires in db.execute(select(
                        leases.c.id, leases.c.pids, leases.c.pid, leases.c.pid_started, leases.c.expires))
                    if lease != self.lease and (_process_gone(pid, started) if pids == self._pids else expires < now)]  # fmt: skip
            db.execute(delete(leases).where(leases.c.id.in_(gone)))
            live = set(db.execute(select(leases.c.id)).scalars())
            # one statement: a lease (and its row) committed meanwhile by a process starting now is not taken for dead
            has_lease = select(leases.c.id).where(leases.c.id == adapters.c.lease).exists()
            db.execute(update(adapters).where(adapters.c.status == "compressing", ~has_lease)
                       .values(status="failed", error=INTERRUPTED, lease=None))  # fmt: skip
        for entry in entries:
            if entry.name not in live:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else \
                    entry.unlink(missing_ok=True)  # fmt: skip

    def _renew(self) -> None:
        """One tick of the lease's keeper (_keep_lease): renews the lease and cleans up after dead processes; a
        lease another process took for expired (this one stalled) is taken again. Without the process's lock, so
        that a write waiting for another process (the store lock) never holds the renewal up."""
        with self._tx() as db:
            renewed = db.execute(update(leases).where(leases.c.id == self.lease)
                                 .values(expires=self._expiry(db))).rowcount  # fmt: skip
            if renewed == 0:
                log.warning("registry: this process's lease %s had expired (a stall of over %s s?); taking it again",
                            self.lease, self.lease_seconds)  # fmt: skip
                db.execute(insert(leases).values(self._lease_row(db)))
        with self._lock:
            if not self._closed.is_set():
                self._make_tmp()
        self._reap()

    def _give_back_lease(self) -> None:
        """Fails this process's own compressions still running, removes its tmp/ folder and its lease."""
        with database.write(self._engine) as db:
            db.execute(update(adapters).where(adapters.c.status == "compressing", adapters.c.lease == self.lease)
                       .values(status="failed", error=INTERRUPTED, lease=None))  # fmt: skip
            db.execute(delete(leases).where(leases.c.id == self.lease))
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def other_processes(self) -> list[tuple[str, int]]:
        """(host, pid) of the other processes that have this registry open now (live leases but this one's)."""
        with self._reading() as db:
            rows = db.execute(select(leases.c.host, leases.c.pid).where(
                leases.c.id != self.lease, leases.c.expires >= database.epoch_now(db))).all()  # fmt: skip
        return [(host, int(pid)) for host, pid in rows]

    def close(self) -> None:
        """Fails this process's compressions still running, gives its lease back and closes the catalog.
        Idempotent."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            try:
                self._give_back_lease()
            except Exception:  # the lease then expires on its own and another process cleans up
                log.exception("registry: giving the lease back failed")
            finally:
                self._engine.dispose()
                os.close(self._folder_lock)

    def __del__(self) -> None:
        # A Registry dropped without close() (e.g. `Registry(root).ensure_admin_key(k)`) must not leave its
        # lease to expire: the next opener would wait for its compressions and folders.
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One write transaction; a full disk is InsufficientStorage."""
        if self._closed.is_set():
            raise ValueError("the registry is closed")
        try:
            with database.write(self._engine) as db:
                yield db
        except exc.OperationalError as e:
            if is_disk_full(e):
                raise InsufficientStorage("the registry's disk is full; nothing was changed") from None
            raise

    def _query(self, stmt: Any, params: dict[str, Any] | None = None) -> list[Any]:
        """One read, on a connection of its own (never behind the process's lock: a write waiting for another
        process must not hold up authentication)."""
        with self._reading() as db:
            return list(db.execute(stmt, params).all())

    # --- admin key ---------------------------------------------------------------------------------------

    def ensure_admin_key(self, given: str | None) -> str | None:
        """Sets up the admin key (registry.keys.AdminKey.ensure); returns the plaintext key only when it was
        generated now (print it once)."""
        return self.admin_key.ensure(given)

    def is_admin(self, key: str | None) -> bool:
        """Whether `key` is the admin key (constant-time comparison of hashes). False if there is none."""
        return self.admin_key.matches(key)

    # --- tenants ----------------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """Creates a tenant; returns it and its API key ("ds-" + 32 random bytes, urlsafe base64), which
        is stored only as a hash: this is the only time it is seen. Raises InvalidName (bad name) or
        NameTaken (param "name") if the tenant exists."""
        validate_name("tenant", name)
        key = new_tenant_key()
        tenant = Tenant(name=name, created=_now())
        with self._lock:
            try:
                with self._tx() as db:
                    db.execute(insert(tenants).values(name=name, key_hash=hash_key(key), created=tenant.created))
            except exc.IntegrityError:
                raise NameTaken(f"tenant {name!r} already exists", "name") from None
        return tenant, key

    def get_tenant(self, name: str) -> Tenant | None:
        """The tenant of this name, or None."""
        rows = self._query(select(tenants.c.name, tenants.c.created).where(tenants.c.name == name))
        return Tenant(*rows[0]) if rows else None

    def list_tenants(self) -> list[Tenant]:
        """All tenants, by name."""
        return [Tenant(*r) for r in self._query(select(tenants.c.name, tenants.c.created).order_by(tenants.c.name))]

    def delete_tenant(self, name: str) -> None:
        """Deletes a tenant, its key and all its adapters (their blobs when no other row uses them).
        Background compressions of its adapters then fail with NotFound. Raises NotFound if absent. Its token
        usage is kept for billing, under a name no tenant can take (registry.usage.retired_name).
        Works on a full disk (the reserve is given up for it)."""
        self.reserve.run(self._delete_tenant, name)

    def _delete_tenant(self, name: str) -> None:
        with self._lock:
            with self._tx() as db:
                blobs = _blobs_of(db, adapters.c.tenant == name)
                db.execute(delete(adapters).where(adapters.c.tenant == name))
                if db.execute(delete(tenants).where(tenants.c.name == name)).rowcount == 0:
                    raise NotFound(f"tenant {name!r} not found", "name")
                usage_table.retire(db, name, _now())
            self._gc(blobs)

    # --- token usage (registry.usage) --------------------------------------------------------------------

    def add_usage(self, counts: dict[UsageKey, UsageCount]) -> None:
        """Adds requests' usage to their (tenant, adapter, hour) rows, in one transaction. Usage of a tenant
        deleted meanwhile is dropped (its rows were retired with it)."""
        names = sorted({k[0] for k in counts})
        if not names:
            return
        with self._lock, self._tx() as db:
            # FOR KEY SHARE (PostgreSQL): a tenant deleted meanwhile waits for this, or this for its deletion, so
            # usage is never added under a name whose rows were just retired
            live = set(db.execute(select(tenants.c.name).where(tenants.c.name.in_(names))
                                  .with_for_update(key_share=True)).scalars())  # fmt: skip
            usage_table.add(db, {k: c for k, c in counts.items() if k[0] in live})

    def usage(
        self, *, tenant: str | None, start: int, end: int, granularity: str = "day", adapter: str | None = None
    ) -> list[UsageRow]:
        """Usage rows per period of `granularity` ("hour" or "day", UTC) overlapping [start, end); tenant None:
        every tenant's, the retired ones' too; adapter "" : the base model only."""
        with self._reading() as db:
            return usage_table.query(db, tenant=tenant, adapter=adapter, start=start, end=end, granularity=granularity)

    def top_tenants(self, n: int, since: int) -> list[str]:
        """The n live tenants that used the most tokens since `since` (unix seconds)."""
        with self._reading() as db:
            return usage_table.top_tenants(db, n, since)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose API key this is, else None (never raises for a malformed key; never logs it).
        Looks the key's sha256 up and compares it with hmac.compare_digest."""
        if not plausible_key(key):
            return None
        assert key is not None
        digest = hash_key(key)
        rows = self._query(_BY_KEY_HASH, {"digest": digest})
        if not rows or not hmac.compare_digest(rows[0][2], digest):
            return None
        return Tenant(rows[0][0], rows[0][1])

    # --- staging and committing -------------------------------------------------------------------------

    def stage(self, max_bytes: int | None = None, *, format: str | None = None, tenant: str | None = None) -> Staging:
        """A fresh, private staging directory under this process's tmp/ folder for one upload (or one
        compression's output). max_bytes: cap on the upload's total size (default: the registry's max_upload_bytes).
        format: the upload format if already known (file names are then checked against it as they
        arrive; otherwise `Staging.validate` checks them against the format it is given). tenant: whose
        upload it is: with a quota, the upload stops (InsufficientStorage) once it cannot fit what is left.
        Raises InsufficientStorage when the disk is too full for even the staging directory."""
        if self._closed.is_set():
            raise ValueError("the registry is closed")
        quota_left = None
        if tenant is not None and self.tenant_quota_bytes is not None:
            quota_left = max(0, self.tenant_quota_bytes - self.tenant_usage(tenant))
        try:
            path = tempfile.mkdtemp(prefix="stage-", dir=self.tmp)
        except OSError as e:
            if is_disk_full(e):
                raise InsufficientStorage("the registry's disk is full") from None
            raise
        return Staging(path, format=format, max_bytes=self.max_upload_bytes if max_bytes is None else max_bytes,
                       quota_bytes=quota_left)  # fmt: skip

    def scratch_dir(self) -> Path:
        """A fresh private directory under this process's tmp/ folder, on the blob store's filesystem (removed when
        the process closes the registry or dies), for data written for the store, e.g. a fine-tune's stored upload
        before `complete_pending` moves it in."""
        if self._closed.is_set():
            raise ValueError("the registry is closed")
        try:
            return Path(tempfile.mkdtemp(prefix="scratch-", dir=self.tmp))
        except OSError as e:
            if is_disk_full(e):
                raise InsufficientStorage("the registry's disk is full") from None
            raise

    def tenant_usage(self, tenant: str, *, besides: str | None = None) -> int:
        """The bytes a tenant's stored versions take, stored uploads of fine-tunes included (each version counted,
        shared content too); `besides`:
        leave out the older versions of that adapter name (a new version replaces them: they are collected)."""
        stmt = select(_STORED_BYTES).where(adapters.c.tenant == tenant, adapters.c.blob.is_not(None))
        if besides is not None:
            stmt = stmt.where(adapters.c.name != besides)
        return int(self._query(stmt)[0][0])

    def _check_quota(self, tenant: str, name: str, size: int) -> None:
        if self.tenant_quota_bytes is None:
            return
        used = self.tenant_usage(tenant, besides=name)
        if used + size > self.tenant_quota_bytes:
            raise InsufficientStorage(
                f"storing {size} bytes would put the tenant at {used + size} bytes, over its quota of "
                f"{self.tenant_quota_bytes} bytes; delete adapters to make room",
                "files",
            )

    @staticmethod
    def _check_delta(kind: str, delta: Delta) -> None:
        got = getattr(delta, "kind", None)
        if got != kind:
            raise ValueError(f"expected a {kind} delta, got {got!r}")
        if not is_sha256_hex(delta.sha256):
            raise ValueError(f"delta sha256 must be 64 lowercase hex digits, got {delta.sha256!r}")

    def _row(self, row_id: str) -> AdapterRecord | None:
        rows = self._query(select(*_RECORD_COLUMNS).where(adapters.c.id == row_id))
        return AdapterRecord(*rows[0]) if rows else None

    def _stored_row(self, row_id: str) -> AdapterRecord:
        record = self._row(row_id)
        assert record is not None, "a row written under the lock is gone"
        return record

    def _store(
        self, staging: Staging, delta: Delta, record: tuple[str, str, str], write_row: Callable[..., None],
        recheck: Callable[[], object] = lambda: None, source: Path | str | None = None,
    ) -> None:
        """The one way data enters the registry. record: (kind, tenant, name) of the version being stored.
        The staged data is checked against the delta and made durable without the lock; then, in one write
        transaction holding the store lock: `recheck()` (what may have changed meanwhile), the quota, the blob
        placed (or an identical one reused), and `write_row(db, blob, size, rank, source_blob, source_bytes)`,
        committed LAST (the blobs are collected again if it fails). source: a fine-tune's stored upload (a
        directory made with `scratch_dir`), stored beside the delta as a "source" blob, or the name of one stored
        already (a re-compression of it: NotStored if it is gone meanwhile). The staging is discarded."""
        kind, tenant, name = record
        self._check_delta(kind, delta)
        payload, size = self.store.prepare(staging, kind, delta.sha256)
        src = self.store.prepare_dir(source, "source") if isinstance(source, Path) else None
        self.store.upload(payload, kind, delta.sha256)  # a bucket's bytes are sent here, before the lock
        if src:
            self.store.upload(src[0], "source", src[2])
        rank = getattr(delta, "rank", None) if kind == "lora" else None
        with self._lock:
            placed: list[str] = []
            try:
                with self._tx() as db:
                    _lock_store(db)  # no other process removes a blob we reuse, nor races us for the quota
                    recheck()
                    kept = self._kept_source(db, source) if isinstance(source, str) else None
                    source_size = src[1] if src else kept
                    self._check_quota(tenant, name, size + (source_size or 0))
                    blob = self.store.place(payload, kind, delta.sha256)
                    placed.append(blob)
                    source_blob = self.store.place(src[0], "source", src[2]) if src else (source if kept is not None else None)
                    if src:
                        placed.append(source_blob)
                    write_row(db, blob, size, rank, source_blob, source_size)
            except BaseException:
                self._gc(placed)
                raise
        staging.discard()

    def _kept_source(self, db: Connection, blob: str) -> int:
        """The stored size of a source blob that a row references still (inside the storing transaction)."""
        row = db.execute(select(adapters.c.source_bytes).where(adapters.c.source_blob == blob).limit(1)).first()
        if row is None or not self.store.has(blob):
            raise NotStored("the stored fine-tune was deleted meanwhile; upload it again", "name")
        return int(row[0])

    def commit_adapter(self, tenant: str, name: str, format: str, staging: Staging, delta: Delta) -> AdapterRecord:
        """Stores a validated upload as the next version of `tenant`'s adapter `name`, status "ready".

        format: "lora", "ia3" or "bitdelta" (a "finetune" goes through create_pending / complete_pending).
        staging: holds what `delta` was loaded from (Staging.validate); its data is checked against
        delta.sha256, moved into the blob store (an identical blob is reused), and the staging is
        discarded. The catalog row is inserted last, in a transaction: version = previous max + 1.
        Raises InvalidName, UnsupportedFormat (format), NotFound (the tenant no longer exists),
        ValueError (a delta of another kind, or data that does not match it: caller bugs).
        """
        validate_name("adapter", name)
        kind = blob_kind(format)
        if format == "finetune":
            raise ValueError("a finetune upload is stored with create_pending and complete_pending")
        row_id = "ad-" + secrets.token_hex(12)

        def insert_row(db: Connection, blob: str, size: int, rank: int | None, *_no_source: object) -> None:
            db.execute(insert(adapters).values(
                id=row_id, tenant=tenant, name=name, format=format, version=_next_version(db, tenant, name),
                sha256=delta.sha256, status="ready", progress=1.0, created=_now(), size_bytes=size, rank=rank,
                blob=blob))  # fmt: skip

        self._store(staging, delta, (kind, tenant, name), insert_row)
        return self._stored_row(row_id)

    def create_pending(self, tenant: str, name: str, format: str) -> AdapterRecord:
        """Creates the next version of `tenant`'s adapter `name` with status "compressing", progress 0 and
        no data yet (a fine-tune compressed in the background by this process: then complete_pending or
        fail_pending; if the process dies first, it fails as "interrupted by a restart" once another process takes it
        for dead, see _reap).
        `resolve` keeps answering the previous ready version meanwhile. Raises InvalidName,
        UnsupportedFormat (format), NotFound (no such tenant)."""
        validate_name("adapter", name)
        check_format(format)
        row_id = "ad-" + secrets.token_hex(12)
        with self._lock, self._tx() as db:
            db.execute(insert(adapters).values(
                id=row_id, tenant=tenant, name=name, format=format, version=_next_version(db, tenant, name),
                status="compressing", progress=0.0, created=_now(), lease=self.lease))  # fmt: skip
        return self._stored_row(row_id)

    def _pending(self, row_id: str) -> AdapterRecord:
        record = self._row(row_id)
        if record is None:
            raise NotFound(f"adapter {row_id} not found (deleted?)", "id")
        if record.status != "compressing":
            raise ValueError(f"adapter {row_id} is {record.status}, not compressing")
        return record

    def set_progress(self, id: str, progress: float) -> None:
        """Records the progress (0..1, clamped) of a "compressing" adapter. Raises NotFound if it was
        deleted meanwhile (the compression can stop), ValueError if it is not compressing or for NaN."""
        progress = float(progress)
        if progress != progress:
            raise ValueError("progress is NaN")
        progress = min(1.0, max(0.0, progress))
        with self._lock:
            self._pending(id)
            with self._tx() as db:
                db.execute(update(adapters).where(adapters.c.id == id).values(progress=progress))

    def complete_pending(self, id: str, staging: Staging, delta: Delta, source: Path | str | None = None,
                         fidelity: str | None = None) -> AdapterRecord:
        """Stores the result of a background compression (a BitDelta for a "finetune", loaded from the
        staging) and marks the adapter "ready" with progress 1; the staging is discarded. source: the uploaded
        fine-tune stored losslessly (a directory of registry.source_files, made in `scratch_dir()`), kept
        beside the delta for downloads (and counted in the tenant's quota); it is moved or discarded. Or the
        source blob of the version this one re-compresses (`AdapterRecord.source_blob`), shared. fidelity: JSON
        text recorded with the version. From now on
        `resolve` answers this version (unless a newer one is ready). Raises NotFound if the adapter (or
        its tenant) was deleted meanwhile (nothing is stored), ValueError if it is not compressing, for a
        delta of the wrong kind or staged data that does not match it."""
        record = self._pending(id)

        def update_row(db: Connection, blob: str, size: int, rank: int | None, source_blob: str | None,
                       source_bytes: int | None) -> None:  # fmt: skip
            done = db.execute(update(adapters).where(adapters.c.id == id, adapters.c.status == "compressing").values(
                status="ready", progress=1.0, error=None, sha256=delta.sha256, size_bytes=size, rank=rank, blob=blob,
                source_blob=source_blob, source_bytes=source_bytes, fidelity=fidelity, lease=None))  # fmt: skip
            if done.rowcount != 1:  # failed meanwhile by another process that took this one for dead
                raise ValueError(f"adapter {id} is no longer compressing")

        try:
            self._store(staging, delta, (record.kind, record.tenant, record.name), update_row,
                        recheck=lambda: self._pending(id), source=source)  # fmt: skip
        finally:  # moved into the store, or not needed: an identical stored upload was reused, or it failed
            if isinstance(source, Path):
                shutil.rmtree(source, ignore_errors=True)
        return self._stored_row(id)

    def fail_pending(self, id: str, error: str) -> bool:
        """Marks a "compressing" adapter "failed" with `error` (what the tenant sees; at most 4000
        characters are kept). Returns False, changing nothing, if the adapter is gone or not compressing."""
        with self._lock, self._tx() as db:
            done = db.execute(update(adapters).where(adapters.c.id == id, adapters.c.status == "compressing")
                              .values(status="failed", error=str(error)[:MAX_ERROR_LENGTH], lease=None))  # fmt: skip
            return done.rowcount == 1

    # --- reading and deleting adapters --------------------------------------------------------------------

    def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        """The newest version of `tenant`'s adapter `name`, whatever its status; None if there is none
        (or it is another tenant's)."""
        rows = self._query(select(*_RECORD_COLUMNS).where(adapters.c.tenant == tenant, adapters.c.name == name)
                           .order_by(adapters.c.version.desc()).limit(1))  # fmt: skip
        return AdapterRecord(*rows[0]) if rows else None

    def resolve(self, tenant: str, name: str) -> AdapterRecord | None:
        """The newest READY version of `tenant`'s adapter `name` (what new requests use), else None.
        A newer version still compressing, or failed, does not hide it."""
        rows = self._query(_NEWEST_READY, {"tenant": tenant, "name": name})
        return AdapterRecord(*rows[0]) if rows else None

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """The newest version of each of `tenant`'s adapters (whatever its status), by name."""
        other = adapters.alias("other")
        newest = (select(func.max(other.c.version))
                  .where(other.c.tenant == adapters.c.tenant, other.c.name == adapters.c.name).scalar_subquery())  # fmt: skip
        rows = self._query(select(*_RECORD_COLUMNS).where(adapters.c.tenant == tenant, adapters.c.version == newest)
                           .order_by(adapters.c.name))  # fmt: skip
        return [AdapterRecord(*r) for r in rows]

    def list_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every stored version of `tenant`'s adapter `name`, oldest first ([] if none)."""
        rows = self._query(select(*_RECORD_COLUMNS).where(adapters.c.tenant == tenant, adapters.c.name == name)
                           .order_by(adapters.c.version))  # fmt: skip
        return [AdapterRecord(*r) for r in rows]

    def list_tenant_versions(self, tenant: str) -> list[AdapterRecord]:
        """Every stored version of every adapter of `tenant`, by name then version ([] if none)."""
        rows = self._query(select(*_RECORD_COLUMNS).where(adapters.c.tenant == tenant)
                           .order_by(adapters.c.name, adapters.c.version))  # fmt: skip
        return [AdapterRecord(*r) for r in rows]

    def delete_adapter(self, tenant: str, name: str) -> None:
        """Deletes every version of `tenant`'s adapter `name` (rows first, then the blobs no other row
        uses). A compression in progress then fails with NotFound. Raises NotFound(param "name") if
        there is none, the same whether it never existed or is another tenant's. Works on a full disk
        (deleting is how space is freed: the reserve is given up for it)."""
        self.reserve.run(self._delete_adapter, tenant, name)

    def _delete_adapter(self, tenant: str, name: str) -> None:
        where = (adapters.c.tenant == tenant, adapters.c.name == name)
        with self._lock:
            with self._tx() as db:
                blobs = _blobs_of(db, *where)
                if db.execute(delete(adapters).where(*where)).rowcount == 0:
                    raise NotFound(f"adapter {name!r} not found", "name")
            self._gc(blobs)

    def collect_versions(self, tenant: str, name: str, keep: set[str] = frozenset()) -> list[AdapterRecord]:
        """Deletes the versions of `tenant`'s adapter `name` that a newer ready version replaced (ready or
        failed ones; never one still compressing, nor those whose id is in `keep`: running requests use
        them) and the blobs no other row uses. Returns the deleted records."""

        def collect() -> list[AdapterRecord]:
            with self._lock:
                newest = self.resolve(tenant, name)
                if newest is None:
                    return []
                old = [r for r in self.list_versions(tenant, name)
                       if r.version < newest.version and r.status != "compressing" and r.id not in keep]  # fmt: skip
                if old:
                    with self._tx() as db:
                        db.execute(delete(adapters).where(adapters.c.id.in_([r.id for r in old]),
                                                          adapters.c.status != "compressing"))  # fmt: skip
                    self._gc([b for r in old for b in (r.blob, r.source_blob) if b is not None])
                return old

        return self.reserve.run(collect)

    def blob_path(self, record: AdapterRecord) -> Path:
        """Where a ready version's data is: a PEFT directory (kind "lora" or "ia3") or a 1-bit delta file
        (kind "bitdelta"), for registry.loading.load_delta. ValueError if it has no data (not ready)."""
        if record.blob is None:
            raise ValueError(f"adapter {record.name} version {record.version} is {record.status}: it has no data")
        return self.store.path(record.blob)

    def source_path(self, record: AdapterRecord) -> Path | None:
        """Where a fine-tune version's stored upload is (a registry.source_files directory); None if it has none."""
        return None if record.source_blob is None else self.store.path(record.source_blob)

    def _gc(self, blobs: list[str]) -> None:
        """Removes the given blobs that no row references, in a write transaction holding the store lock (so that
        no other process reuses one meanwhile); the caller holds self._lock."""
        if not blobs:
            return
        with self._tx() as db:
            _lock_store(db)
            for blob in blobs:
                used = select(adapters.c.id).where(or_(adapters.c.blob == blob, adapters.c.source_blob == blob))
                if db.execute(used.limit(1)).first() is None:
                    self.store.remove(blob)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        if self._closed.is_set():
            raise ValueError("the registry is closed")
        with self._engine.connect() as db:
            yield db
