"""The registry's storage: tenants, their API keys and their adapters, in one directory.

Layout of `root`:
    catalog.sqlite3      SQLite (WAL, foreign keys, synchronous=FULL): tenants, adapter versions, token usage
    blobs/               the content-addressed blob store (registry.blob_store)
    tmp/                 staging directories of uploads in progress (registry.uploads.Staging), and blobs
                         on their way out
    admin_key.sha256     the hash of the admin key (registry.keys, mode 0600)
    reserve.bin          space given up on a full disk so that deletes can still be written (registry.fsync)
    registry.lock        held (flock) by the one process that has the registry open

Guarantees:
- Secrets: API keys are stored only as sha256 hashes (registry.keys); a key is shown once, when created,
  and never logged.
- Isolation: every adapter call is scoped by tenant; another tenant's adapter is indistinguishable from a
  missing one (None / NotFound with the same message). Ids (random, opaque) are used only by the
  background compression calls (`set_progress`, `complete_pending`, `fail_pending`), never with an id a
  user sent.
- Durability: a blob is written in tmp/, fsynced, renamed into blobs/ (same filesystem), its directory
  fsynced, and only then is the catalog row inserted, in a transaction (the LAST step). Deleting removes the
  rows first, then the blobs no row references any more. So a crash at any moment leaves either no row or
  a row whose blob is complete; `Registry.__init__` then clears tmp/, marks "compressing" rows as failed
  and removes blobs no row references.
- Threads: one SQLite connection guarded by one lock; heavy work (fsync, hashing) happens outside it.
- Processes: one process at a time (an exclusive flock on registry.lock; a second opener gets
  RegistryBusy), because opening recovers (clears tmp/, fails pending rows) as if the last user had died.

This module imports no torch: deltas are duck-typed (`.kind`, `.sha256`, `.rank` of registry.deltas).
It is one concept, the catalog of tenants and adapter versions, and over 400 lines because each operation's
durability and isolation promise is spelled out where it is kept; the blobs, keys and disk reserve it uses live
in registry.blob_store, registry.keys and registry.fsync.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from registry import usage as usage_table
from registry.blob_store import BlobStore
from registry.errors import InsufficientStorage, NameTaken, NotFound, NotStored, is_disk_full
from registry.fsync import DiskReserve
from registry.keys import AdminKey, hash_key, is_sha256_hex, new_tenant_key, plausible_key
from registry.names import validate_name
from registry.upload_formats import DEFAULT_MAX_UPLOAD_BYTES, check_format
from registry.uploads import Staging
from registry.usage import UsageCount, UsageKey, UsageRow

if TYPE_CHECKING:
    from registry.deltas import Delta

STATUSES = ("ready", "compressing", "failed")
INTERRUPTED = "interrupted by a restart; upload again"
MISSING_BLOB = "the stored adapter data is missing; upload again"
MAX_ERROR_LENGTH = 4000
RESERVE_BYTES = 16 << 20  # given up on a full disk so that deletes (SQLite's journal) can still be written
_SCHEMA_VERSION = 4  # 2: the usage table; 3: a fine-tune's stored upload; 4: the "ia3" format (older catalogs
_READABLE_VERSIONS = (0, 1, 2, 3, _SCHEMA_VERSION)  # gain all when opened). 0: a new file
_V3_COLUMNS = (("source_blob", "TEXT"), ("source_bytes", "INTEGER"), ("fidelity", "TEXT"))  # schema 3

_ADAPTERS_COLUMNS_SQL = """
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    format     TEXT NOT NULL CHECK (format IN ('lora', 'ia3', 'bitdelta', 'finetune')),
    version    INTEGER NOT NULL CHECK (version >= 1),
    sha256     TEXT,
    status     TEXT NOT NULL CHECK (status IN ('ready', 'compressing', 'failed')),
    progress   REAL NOT NULL,
    error      TEXT,
    created    INTEGER NOT NULL,
    size_bytes INTEGER,
    rank       INTEGER,
    blob       TEXT,
    source_blob  TEXT,
    source_bytes INTEGER,
    fidelity     TEXT,
    UNIQUE (tenant, name, version),
    CHECK ((status = 'ready') = (blob IS NOT NULL))
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name     TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    created  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (""" + _ADAPTERS_COLUMNS_SQL + """);
CREATE INDEX IF NOT EXISTS adapters_blob ON adapters(blob);
CREATE INDEX IF NOT EXISTS adapters_source_blob ON adapters(source_blob);
""" + usage_table.SCHEMA
_STORED_BYTES = "COALESCE(SUM(size_bytes + COALESCE(source_bytes, 0)), 0)"
_COLUMNS = ("id, tenant, name, format, version, sha256, status, progress, error, created, size_bytes, rank, blob, "
            "source_blob, source_bytes, fidelity")


class RegistryBusy(RuntimeError):
    """Another process has this registry directory open."""


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


def _next_version(db: sqlite3.Connection, tenant: str, name: str) -> int:
    """The version a new upload of `tenant`'s `name` gets (inside the inserting transaction); NotFound if
    the tenant does not exist."""
    if not db.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone():
        raise NotFound(f"tenant {tenant!r} not found", "tenant")
    (latest,) = db.execute(
        "SELECT COALESCE(MAX(version), 0) FROM adapters WHERE tenant=? AND name=?", (tenant, name)
    ).fetchone()
    return latest + 1


def _blobs_of(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[str]:
    """Every blob (deltas and stored uploads) of the rows `where` selects."""
    rows = db.execute(f"SELECT blob, source_blob FROM adapters WHERE {where}", args).fetchall()
    return sorted({b for row in rows for b in row if b is not None})


def blob_kind(format: str) -> str:
    """The kind of stored delta an upload format becomes: "lora" -> "lora", "ia3" -> "ia3", "bitdelta" and "finetune"
    (compressed to a 1-bit delta) -> "bitdelta"."""
    return "bitdelta" if check_format(format) in ("bitdelta", "finetune") else format


def _now() -> int:
    return int(time.time())


class Registry:
    """Tenants, keys and adapter versions stored under one directory (see the module docstring).

    root:             the registry directory (created, mode 0700, if missing).
    max_upload_bytes: the default cap on one upload's total size (`stage`).

    Opening recovers from a crash of the previous process: tmp/ is emptied, "compressing" rows become
    "failed" ("interrupted by a restart; upload again"), "ready" rows whose blob is gone become "failed",
    and blobs no row references are removed. Close with `close()` (or use it as a context manager).
    Raises RegistryBusy if another process has the directory open.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        tenant_quota_bytes: int | None = None,
    ):
        """tenant_quota_bytes: the stored bytes one tenant may hold (its adapters' versions), None: no quota."""
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self.tenant_quota_bytes = tenant_quota_bytes
        self._lock = threading.RLock()
        self._lock_fd = -1  # -1: closed (or not open yet)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # also an existing registry's (the admin key's hash and tenants' blobs are here)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        fd = os.open(self.root / "registry.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RegistryBusy(f"registry {self.root} is in use by another process") from None
        db: sqlite3.Connection | None = None
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(mode=0o700)
            self.store = BlobStore(self.blobs, graveyard=self.tmp)
            db = self._connect(self.root / "catalog.sqlite3")
            self._db = db
            self._lock_fd = fd
            self._recover()
            self.admin_key = AdminKey(self.root)
            self.reserve = DiskReserve(self.root / "reserve.bin", RESERVE_BYTES)
            self.reserve.ensure()
        except BaseException:
            self._lock_fd = -1
            if db is not None:
                db.close()
            os.close(fd)
            raise

    # --- opening, closing -------------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # create it private
        os.close(fd)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=10000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in _READABLE_VERSIONS:
            db.close()
            raise RuntimeError(f"{path} has catalog schema version {version}; this deltaserve reads {_SCHEMA_VERSION}")
        if version in (1, 2):  # before the schema's indexes name the new columns
            have = {row[1] for row in db.execute("PRAGMA table_info(adapters)")}
            for column, sql_type in _V3_COLUMNS:
                if column not in have:
                    db.execute(f"ALTER TABLE adapters ADD COLUMN {column} {sql_type}")
        if version in (1, 2, 3):
            Registry._widen_format_check(db)
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        return db

    @staticmethod
    def _widen_format_check(db: sqlite3.Connection) -> None:
        """Schema 4 allows format 'ia3': SQLite cannot change a CHECK in place, so the adapters table is
        rebuilt in one transaction (SQLite's documented procedure: new table, copy, drop, rename); every row
        and column stays as it was. Foreign keys are off meanwhile so that the drop cascades nowhere."""
        db.execute("PRAGMA foreign_keys=OFF")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("CREATE TABLE adapters_v4 (" + _ADAPTERS_COLUMNS_SQL + ")")
                columns = ", ".join(row[1] for row in db.execute("PRAGMA table_info(adapters)"))
                db.execute(f"INSERT INTO adapters_v4 ({columns}) SELECT {columns} FROM adapters")
                db.execute("DROP TABLE adapters")
                db.execute("ALTER TABLE adapters_v4 RENAME TO adapters")
                db.execute("PRAGMA user_version=4")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.execute("PRAGMA foreign_keys=ON")

    def _recover(self) -> None:
        with self._lock, self._tx() as db:
            db.execute("UPDATE adapters SET status='failed', error=? WHERE status='compressing'", (INTERRUPTED,))
            for row_id, blob in db.execute("SELECT id, blob FROM adapters WHERE status='ready'").fetchall():
                if not self.store.has(blob):
                    db.execute(
                        "UPDATE adapters SET status='failed', error=?, blob=NULL WHERE id=?", (MISSING_BLOB, row_id)
                    )
            # A lost stored upload leaves its version served (its 1-bit delta is there); only its download goes.
            lost = [(row_id,) for row_id, source in
                    db.execute("SELECT id, source_blob FROM adapters WHERE source_blob IS NOT NULL").fetchall()
                    if not self.store.has(source)]  # fmt: skip
            db.executemany("UPDATE adapters SET source_blob=NULL, source_bytes=NULL WHERE id=?", lost)
        with self._lock:
            referenced = {b for (b,) in self._db.execute("SELECT blob FROM adapters WHERE blob IS NOT NULL UNION "
                                                         "SELECT source_blob FROM adapters WHERE source_blob IS NOT NULL")}  # fmt: skip
            self.store.sweep(referenced)

    def close(self) -> None:
        """Closes the catalog and releases the directory for another process. Idempotent."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._db.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __del__(self) -> None:
        # A Registry dropped without close() (e.g. `Registry(root).ensure_admin_key(k)`) must not keep the
        # directory locked against the next one.
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (the caller holds self._lock)."""
        if self._lock_fd < 0:
            raise ValueError("the registry is closed")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # after SQLITE_FULL SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if is_disk_full(e):
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise InsufficientStorage("the registry's disk is full; nothing was changed") from None
            raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._lock_fd < 0:
                raise ValueError("the registry is closed")
            return self._db.execute(sql, args).fetchall()

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
                    db.execute(
                        "INSERT INTO tenants (name, key_hash, created) VALUES (?, ?, ?)",
                        (name, hash_key(key), tenant.created),
                    )
            except sqlite3.IntegrityError:
                raise NameTaken(f"tenant {name!r} already exists", "name") from None
        return tenant, key

    def get_tenant(self, name: str) -> Tenant | None:
        """The tenant of this name, or None."""
        rows = self._query("SELECT name, created FROM tenants WHERE name=?", (name,))
        return Tenant(*rows[0]) if rows else None

    def list_tenants(self) -> list[Tenant]:
        """All tenants, by name."""
        return [Tenant(*r) for r in self._query("SELECT name, created FROM tenants ORDER BY name")]

    def delete_tenant(self, name: str) -> None:
        """Deletes a tenant, its key and all its adapters (their blobs when no other row uses them).
        Background compressions of its adapters then fail with NotFound. Raises NotFound if absent. Its token
        usage is kept for billing, under a name no tenant can take (registry.usage.retired_name).
        Works on a full disk (the reserve is given up for it)."""
        self.reserve.run(self._delete_tenant, name)

    def _delete_tenant(self, name: str) -> None:
        with self._lock:
            with self._tx() as db:
                blobs = _blobs_of(db, "tenant=?", (name,))
                db.execute("DELETE FROM adapters WHERE tenant=?", (name,))
                if db.execute("DELETE FROM tenants WHERE name=?", (name,)).rowcount == 0:
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
            marks = ", ".join("?" * len(names))
            live = {n for (n,) in db.execute(f"SELECT name FROM tenants WHERE name IN ({marks})", names)}
            usage_table.add(db, {k: c for k, c in counts.items() if k[0] in live})

    def usage(
        self, *, tenant: str | None, start: int, end: int, granularity: str = "day", adapter: str | None = None
    ) -> list[UsageRow]:
        """Usage rows per period of `granularity` ("hour" or "day", UTC) overlapping [start, end); tenant None:
        every tenant's, the retired ones' too; adapter "" : the base model only."""
        with self._lock:
            if self._lock_fd < 0:
                raise ValueError("the registry is closed")
            return usage_table.query(self._db, tenant=tenant, adapter=adapter, start=start, end=end,
                                     granularity=granularity)  # fmt: skip

    def top_tenants(self, n: int, since: int) -> list[str]:
        """The n live tenants that used the most tokens since `since` (unix seconds)."""
        with self._lock:
            if self._lock_fd < 0:
                raise ValueError("the registry is closed")
            return usage_table.top_tenants(self._db, n, since)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose API key this is, else None (never raises for a malformed key; never logs it).
        Looks the key's sha256 up and compares it with hmac.compare_digest."""
        if not plausible_key(key):
            return None
        assert key is not None
        digest = hash_key(key)
        rows = self._query("SELECT name, created, key_hash FROM tenants WHERE key_hash=?", (digest,))
        if not rows or not hmac.compare_digest(rows[0][2], digest):
            return None
        return Tenant(rows[0][0], rows[0][1])

    # --- staging and committing -------------------------------------------------------------------------

    def stage(self, max_bytes: int | None = None, *, format: str | None = None, tenant: str | None = None) -> Staging:
        """A fresh, private staging directory under root/tmp for one upload (or one compression's
        output). max_bytes: cap on the upload's total size (default: the registry's max_upload_bytes).
        format: the upload format if already known (file names are then checked against it as they
        arrive; otherwise `Staging.validate` checks them against the format it is given). tenant: whose
        upload it is: with a quota, the upload stops (InsufficientStorage) once it cannot fit what is left.
        Raises InsufficientStorage when the disk is too full for even the staging directory."""
        if self._lock_fd < 0:
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
        """A fresh private directory under root/tmp, on the blob store's filesystem (emptied at every opening),
        for data written for the store, e.g. a fine-tune's stored upload before `complete_pending` moves it in."""
        if self._lock_fd < 0:
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
        if besides is None:
            rows = self._query(f"SELECT {_STORED_BYTES} FROM adapters WHERE tenant=? AND blob IS NOT NULL", (tenant,))
        else:
            rows = self._query(f"SELECT {_STORED_BYTES} FROM adapters WHERE tenant=? AND blob IS NOT NULL AND name<>?",
                               (tenant, besides))  # fmt: skip
        return int(rows[0][0])

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
        rows = self._query(f"SELECT {_COLUMNS} FROM adapters WHERE id=?", (row_id,))
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
        The staged data is checked against the delta and made durable without the lock; then, under it,
        `recheck()` (what may have changed meanwhile), the quota, the blob placed (or an identical one reused),
        and `write_row(db, blob, size, rank, source_blob, source_bytes)` in one transaction, LAST (the blobs are
        collected again if it fails). source: a fine-tune's stored upload (a directory made with `scratch_dir`),
        stored beside the delta as a "source" blob, or the name of one stored already (a re-compression of it:
        NotStored if it is gone meanwhile). The staging is discarded."""
        kind, tenant, name = record
        self._check_delta(kind, delta)
        payload, size = self.store.prepare(staging, kind, delta.sha256)
        src = self.store.prepare_dir(source, "source") if isinstance(source, Path) else None
        rank = getattr(delta, "rank", None) if kind == "lora" else None
        with self._lock:
            recheck()
            kept = self._kept_source(source) if isinstance(source, str) else None
            source_size = src[1] if src else kept
            self._check_quota(tenant, name, size + (source_size or 0))
            blob = self.store.place(payload, kind, delta.sha256)
            placed = [blob]
            try:
                source_blob = self.store.place(src[0], "source", src[2]) if src else (source if kept is not None else None)
                placed.append(source_blob)
                with self._tx() as db:
                    write_row(db, blob, size, rank, source_blob, source_size)
            except BaseException:
                self._gc([b for b in placed if b is not None])
                raise
        staging.discard()

    def _kept_source(self, blob: str) -> int:
        """The stored size of a source blob that a row references still (the caller holds the lock)."""
        row = self._db.execute("SELECT source_bytes FROM adapters WHERE source_blob=? LIMIT 1", (blob,)).fetchone()
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

        def insert(db: sqlite3.Connection, blob: str, size: int, rank: int | None, *_no_source: object) -> None:
            db.execute(
                f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'ready', 1.0, NULL, ?, ?, ?, ?, NULL, NULL, NULL)",
                (row_id, tenant, name, format, _next_version(db, tenant, name), delta.sha256, _now(), size, rank,
                 blob),
            )  # fmt: skip

        self._store(staging, delta, (kind, tenant, name), insert)
        return self._stored_row(row_id)

    def create_pending(self, tenant: str, name: str, format: str) -> AdapterRecord:
        """Creates the next version of `tenant`'s adapter `name` with status "compressing", progress 0 and
        no data yet (a fine-tune compressed in the background; then complete_pending or fail_pending).
        `resolve` keeps answering the previous ready version meanwhile. Raises InvalidName,
        UnsupportedFormat (format), NotFound (no such tenant)."""
        validate_name("adapter", name)
        check_format(format)
        row_id = "ad-" + secrets.token_hex(12)
        with self._lock, self._tx() as db:
            db.execute(
                f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, 'compressing', 0.0, NULL, ?, NULL, NULL, NULL, "
                "NULL, NULL, NULL)",
                (row_id, tenant, name, format, _next_version(db, tenant, name), _now()),
            )
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
                db.execute("UPDATE adapters SET progress=? WHERE id=?", (progress, id))

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

        def update(db: sqlite3.Connection, blob: str, size: int, rank: int | None, source_blob: str | None,
                   source_bytes: int | None) -> None:  # fmt: skip
            cur = db.execute(
                "UPDATE adapters SET status='ready', progress=1.0, error=NULL, sha256=?, size_bytes=?, "
                "rank=?, blob=?, source_blob=?, source_bytes=?, fidelity=? WHERE id=? AND status='compressing'",
                (delta.sha256, size, rank, blob, source_blob, source_bytes, fidelity, id),
            )
            assert cur.rowcount == 1, "row changed while the lock was held"

        try:
            self._store(staging, delta, (record.kind, record.tenant, record.name), update,
                        recheck=lambda: self._pending(id), source=source)  # fmt: skip
        finally:  # moved into the store, or not needed: an identical stored upload was reused, or it failed
            if isinstance(source, Path):
                shutil.rmtree(source, ignore_errors=True)
        return self._stored_row(id)

    def fail_pending(self, id: str, error: str) -> bool:
        """Marks a "compressing" adapter "failed" with `error` (what the tenant sees; at most 4000
        characters are kept). Returns False, changing nothing, if the adapter is gone or not compressing."""
        with self._lock, self._tx() as db:
            cur = db.execute(
                "UPDATE adapters SET status='failed', error=? WHERE id=? AND status='compressing'",
                (str(error)[:MAX_ERROR_LENGTH], id),
            )
            return cur.rowcount == 1

    # --- reading and deleting adapters --------------------------------------------------------------------

    def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        """The newest version of `tenant`'s adapter `name`, whatever its status; None if there is none
        (or it is another tenant's)."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters WHERE tenant=? AND name=? ORDER BY version DESC LIMIT 1", (tenant, name)
        )
        return AdapterRecord(*rows[0]) if rows else None

    def resolve(self, tenant: str, name: str) -> AdapterRecord | None:
        """The newest READY version of `tenant`'s adapter `name` (what new requests use), else None.
        A newer version still compressing, or failed, does not hide it."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters WHERE tenant=? AND name=? AND status='ready' "
            "ORDER BY version DESC LIMIT 1",
            (tenant, name),
        )
        return AdapterRecord(*rows[0]) if rows else None

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """The newest version of each of `tenant`'s adapters (whatever its status), by name."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters AS a WHERE tenant=? AND version = "
            "(SELECT MAX(version) FROM adapters AS b WHERE b.tenant = a.tenant AND b.name = a.name) ORDER BY name",
            (tenant,),
        )
        return [AdapterRecord(*r) for r in rows]

    def list_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every stored version of `tenant`'s adapter `name`, oldest first ([] if none)."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM adapters WHERE tenant=? AND name=? ORDER BY version", (tenant, name)
        )
        return [AdapterRecord(*r) for r in rows]

    def list_tenant_versions(self, tenant: str) -> list[AdapterRecord]:
        """Every stored version of every adapter of `tenant`, by name then version ([] if none)."""
        rows = self._query(f"SELECT {_COLUMNS} FROM adapters WHERE tenant=? ORDER BY name, version", (tenant,))
        return [AdapterRecord(*r) for r in rows]

    def delete_adapter(self, tenant: str, name: str) -> None:
        """Deletes every version of `tenant`'s adapter `name` (rows first, then the blobs no other row
        uses). A compression in progress then fails with NotFound. Raises NotFound(param "name") if
        there is none, the same whether it never existed or is another tenant's. Works on a full disk
        (deleting is how space is freed: the reserve is given up for it)."""
        self.reserve.run(self._delete_adapter, tenant, name)

    def _delete_adapter(self, tenant: str, name: str) -> None:
        with self._lock:
            with self._tx() as db:
                blobs = _blobs_of(db, "tenant=? AND name=?", (tenant, name))
                if db.execute("DELETE FROM adapters WHERE tenant=? AND name=?", (tenant, name)).rowcount == 0:
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
                        db.executemany("DELETE FROM adapters WHERE id=?", [(r.id,) for r in old])
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
        """Removes the given blobs that no row references (the caller holds the lock)."""
        for blob in blobs:
            used = "SELECT 1 FROM adapters WHERE blob=? OR source_blob=? LIMIT 1"
            if not self._db.execute(used, (blob, blob)).fetchone():
                self.store.remove(blob)
