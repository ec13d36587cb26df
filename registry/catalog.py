"""The registry's storage: tenants, their API keys and their adapters, in one directory.

Layout of `root`:
    catalog.sqlite3      SQLite (WAL, foreign keys, synchronous=FULL): tenants and adapter versions
    blobs/<kind>/<h2>/<sha256>
                         the content-addressed blob store; <kind> is "lora" (a directory holding
                         adapter_config.json and adapter_model.safetensors) or "bitdelta" (one file);
                         <sha256> is the delta's identity (registry.deltas: `Delta.sha256`), <h2> its first
                         two hex digits. Blob files are read-only (0400).
    tmp/                 staging directories of uploads in progress (registry.uploads.Staging)
    admin_key.sha256     the hash of the generated admin key (mode 0600), when one was generated
    registry.lock        held (flock) by the one process that has the registry open

Guarantees:
- Secrets: API keys are stored only as sha256 hashes (a key is 256 random bits, so a plain hash is
  enough); a key is shown once, when created, and never logged.
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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from registry.errors import InsufficientStorage, NameTaken, NotFound, is_disk_full
from registry.fsync import fsync_dir
from registry.names import validate_name
from registry.uploads import DEFAULT_MAX_UPLOAD_BYTES, LORA_CONFIG, LORA_WEIGHTS, Staging, check_format

if TYPE_CHECKING:
    from registry.deltas import Delta

STATUSES = ("ready", "compressing", "failed")
KINDS = ("lora", "bitdelta")
INTERRUPTED = "interrupted by a restart; upload again"
MISSING_BLOB = "the stored adapter data is missing; upload again"
MAX_ERROR_LENGTH = 4000
MIN_ADMIN_KEY_LENGTH = 16
ADMIN_KEY_FILE = "admin_key.sha256"
_MAX_KEY_LENGTH = 512
_SCHEMA_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOB_RE = re.compile(r"(lora|bitdelta)/([0-9a-f]{2})/([0-9a-f]{64})")
_ADMIN_KEY_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: a valid HTTP header token

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name     TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    created  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    format     TEXT NOT NULL CHECK (format IN ('lora', 'bitdelta', 'finetune')),
    version    INTEGER NOT NULL CHECK (version >= 1),
    sha256     TEXT,
    status     TEXT NOT NULL CHECK (status IN ('ready', 'compressing', 'failed')),
    progress   REAL NOT NULL,
    error      TEXT,
    created    INTEGER NOT NULL,
    size_bytes INTEGER,
    rank       INTEGER,
    blob       TEXT,
    UNIQUE (tenant, name, version),
    CHECK ((status = 'ready') = (blob IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS adapters_blob ON adapters(blob);
"""
_COLUMNS = "id, tenant, name, format, version, sha256, status, progress, error, created, size_bytes, rank, blob"


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
    format:    as uploaded: "lora", "bitdelta" or "finetune" (stored as a 1-bit delta once compressed).
    version:   1, 2, ... per (tenant, name); a new upload of a name gets the previous max + 1.
    sha256:    the delta's identity (bare hex), None until the data is stored.
    status:    "ready" (blob stored), "compressing" (background fine-tune compression), "failed".
    progress:  0..1 (1 when ready).  error: why it failed, else None.  created: unix seconds.
    size_bytes, rank: of the stored data (rank: LoRA only), None until stored.
    blob:      the blob's path relative to blobs/ (internal; `Registry.blob_path` gives the full path).
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

    @property
    def kind(self) -> str:
        """The stored delta's kind, which loader reads the blob: "lora" or "bitdelta"."""
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


def blob_kind(format: str) -> str:
    """The kind of stored delta an upload format becomes: "lora" -> "lora", "bitdelta" and "finetune"
    (compressed to a 1-bit delta) -> "bitdelta"."""
    return "lora" if check_format(format) == "lora" else "bitdelta"


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def content_sha256(kind: str, path: str | os.PathLike[str]) -> str:
    """The identity of stored delta data, computed from disk exactly as registry.deltas defines it:
    "bitdelta": sha256 of the file's bytes; "lora" (a directory): sha256 of
    u64le(len(adapter_config.json)) + adapter_config.json + adapter_model.safetensors."""
    from registry.lora_format import lora_sha256  # torch: not for the API process's imports
    from registry.safetensors_io import sha256_file

    path = Path(path)
    if kind == "bitdelta":
        return sha256_file(path)
    if kind == "lora":
        return lora_sha256((path / LORA_CONFIG).read_bytes(), path / LORA_WEIGHTS)
    raise ValueError(f"unknown delta kind {kind!r}")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


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
        self._admin_hash: str | None = None
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
            for folder in [self.blobs] + [self.blobs / kind for kind in KINDS]:
                folder.mkdir(mode=0o700, exist_ok=True)
                os.chmod(folder, 0o700)  # mkdir's mode does not apply to an existing folder
            db = self._connect(self.root / "catalog.sqlite3")
            self._db = db
            self._lock_fd = fd
            self._recover()
            self._admin_hash = self._read_admin_hash()
            self._ensure_reserve()
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
        if version not in (0, _SCHEMA_VERSION):
            db.close()
            raise RuntimeError(f"{path} has catalog schema version {version}; this deltaserve reads {_SCHEMA_VERSION}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        return db

    def _recover(self) -> None:
        with self._lock, self._tx() as db:
            db.execute("UPDATE adapters SET status='failed', error=? WHERE status='compressing'", (INTERRUPTED,))
            for row_id, blob in db.execute("SELECT id, blob FROM adapters WHERE status='ready'").fetchall():
                if not _BLOB_RE.fullmatch(blob) or not os.path.lexists(self.blobs / blob):
                    db.execute(
                        "UPDATE adapters SET status='failed', error=?, blob=NULL WHERE id=?", (MISSING_BLOB, row_id)
                    )
        with self._lock:
            referenced = {b for (b,) in self._db.execute("SELECT DISTINCT blob FROM adapters WHERE blob IS NOT NULL")}
            for kind in KINDS:
                for shard in sorted((self.blobs / kind).iterdir()):
                    entries = sorted(shard.iterdir()) if shard.is_dir() and not shard.is_symlink() else []
                    for entry in entries:
                        if f"{kind}/{shard.name}/{entry.name}" not in referenced:
                            self._remove_blob_path(entry)
                    if not shard.is_dir() or shard.is_symlink():
                        self._remove_blob_path(shard)
                    elif not any(shard.iterdir()):
                        shard.rmdir()

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
        """Sets up the admin key; returns the plaintext key only when it was generated now (print it once).

        given (from --admin-key or DELTASERVE_ADMIN_KEY): becomes the admin key; its sha256 (never the
        key) is stored in root/admin_key.sha256 (mode 0600), replacing any earlier one, so every Registry
        opened on this directory later recognises it, also without `given`. It must be at least 16
        printable ASCII characters without spaces (ValueError otherwise).
        Else, if root/admin_key.sha256 exists, the key it hashes is the admin key (ValueError if the file
        is not a sha256 hex digest). Else a key is generated ("ds-admin-" + 32 random bytes, urlsafe
        base64), its hash stored the same way, and the key returned.
        """
        path = self.root / ADMIN_KEY_FILE
        if given is not None:
            if len(given) < MIN_ADMIN_KEY_LENGTH or not _ADMIN_KEY_RE.fullmatch(given):
                raise ValueError(
                    f"the admin key must be at least {MIN_ADMIN_KEY_LENGTH} printable ASCII characters without spaces"
                )
            digest = _hash_key(given)
            if self._read_admin_hash() != digest:
                self._write_private(path, (digest + "\n").encode("ascii"))
            self._admin_hash = digest
            return None
        if path.exists():
            stored = self._read_admin_hash()
            if stored is None:
                raise ValueError(f"{path} does not hold a sha256 hex digest; delete it to generate a new admin key")
            os.chmod(path, 0o600)
            self._admin_hash = stored
            return None
        key = "ds-admin-" + secrets.token_urlsafe(32)
        self._write_private(path, (_hash_key(key) + "\n").encode("ascii"))
        self._admin_hash = _hash_key(key)
        return key

    def _read_admin_hash(self) -> str | None:
        """The stored admin key hash, or None if there is no file or it is not a sha256 hex digest."""
        try:
            stored = (self.root / ADMIN_KEY_FILE).read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        return stored if _HEX64.fullmatch(stored) else None

    def is_admin(self, key: str | None) -> bool:
        """Whether `key` is the admin key (constant-time comparison of hashes): the one stored in
        root/admin_key.sha256 when the registry was opened, or set by `ensure_admin_key`. False if none."""
        if self._admin_hash is None or not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
            return False
        return hmac.compare_digest(_hash_key(key), self._admin_hash)

    def _write_private(self, path: Path, data: bytes) -> None:
        """Writes a small file atomically with mode 0600 (temp file, fsync, rename, fsync directory)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)

    # --- tenants ----------------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """Creates a tenant; returns it and its API key ("ds-" + 32 random bytes, urlsafe base64), which
        is stored only as a hash: this is the only time it is seen. Raises InvalidName (bad name) or
        NameTaken (param "name") if the tenant exists."""
        validate_name("tenant", name)
        key = "ds-" + secrets.token_urlsafe(32)
        tenant = Tenant(name=name, created=_now())
        with self._lock:
            try:
                with self._tx() as db:
                    db.execute(
                        "INSERT INTO tenants (name, key_hash, created) VALUES (?, ?, ?)",
                        (name, _hash_key(key), tenant.created),
                    )
            except sqlite3.IntegrityError:
                raise NameTaken(f"tenant {name!r} already exists", "name") from None
        return tenant, key

    def list_tenants(self) -> list[Tenant]:
        """All tenants, by name."""
        return [Tenant(*r) for r in self._query("SELECT name, created FROM tenants ORDER BY name")]

    def delete_tenant(self, name: str) -> None:
        """Deletes a tenant, its key and all its adapters (their blobs when no other row uses them).
        Background compressions of its adapters then fail with NotFound. Raises NotFound if absent.
        Works on a full disk (the reserve is given up for it)."""
        self._with_reserve(self._delete_tenant, name)

    def _delete_tenant(self, name: str) -> None:
        with self._lock:
            with self._tx() as db:
                blobs = [
                    b
                    for (b,) in db.execute(
                        "SELECT DISTINCT blob FROM adapters WHERE tenant=? AND blob IS NOT NULL", (name,)
                    )
                ]
                db.execute("DELETE FROM adapters WHERE tenant=?", (name,))
                if db.execute("DELETE FROM tenants WHERE name=?", (name,)).rowcount == 0:
                    raise NotFound(f"tenant {name!r} not found", "name")
            self._gc(blobs)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose API key this is, else None (never raises for a malformed key; never logs it).
        Looks the key's sha256 up and compares it with hmac.compare_digest."""
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH:
            return None
        digest = _hash_key(key)
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

    def tenant_usage(self, tenant: str, *, besides: str | None = None) -> int:
        """The bytes a tenant's stored versions take (each version counted, shared content too); `besides`:
        leave out the older versions of that adapter name (a new version replaces them: they are collected)."""
        if besides is None:
            rows = self._query("SELECT COALESCE(SUM(size_bytes), 0) FROM adapters WHERE tenant=? AND blob IS NOT NULL",
                               (tenant,))  # fmt: skip
        else:
            rows = self._query("SELECT COALESCE(SUM(size_bytes), 0) FROM adapters WHERE tenant=? AND blob IS NOT NULL "
                               "AND name<>?", (tenant, besides))  # fmt: skip
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
        if not isinstance(delta.sha256, str) or not _HEX64.fullmatch(delta.sha256):
            raise ValueError(f"delta sha256 must be 64 lowercase hex digits, got {delta.sha256!r}")

    @staticmethod
    def _prepare(staging: Staging, kind: str, sha256: str) -> tuple[Path, int]:
        """Flushes the staged data to disk, makes its files read-only and checks that its content is
        `sha256`. Returns (payload path, size in bytes). Runs without the lock (it reads all the data)."""
        payload = staging.payload(kind)
        staging.fsync()
        for f in [payload] if payload.is_file() else list(payload.iterdir()):
            os.chmod(f, 0o400)
        actual = content_sha256(kind, payload)
        if actual != sha256:
            raise ValueError(f"the staged data has sha256 {actual}, not the delta's {sha256}: was it changed?")
        return payload, _size(payload)

    def _place_blob(self, payload: Path, kind: str, sha256: str) -> str:
        """Moves the payload into the blob store (or keeps the existing identical blob: dedup). The caller
        holds the lock. Returns the blob's relative path."""
        blob = f"{kind}/{sha256[:2]}/{sha256}"
        dest = self.blobs / blob
        if os.path.lexists(dest):
            return blob
        shard = dest.parent
        try:
            if not shard.is_dir():
                shard.mkdir(mode=0o700)
                fsync_dir(shard.parent)
            os.rename(payload, dest)
            fsync_dir(shard)
        except OSError as e:
            if is_disk_full(e):
                raise InsufficientStorage("the registry's disk is full; the upload was not stored") from None
            raise
        return blob

    def _row(self, row_id: str) -> AdapterRecord | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM adapters WHERE id=?", (row_id,))
        return AdapterRecord(*rows[0]) if rows else None

    def commit_adapter(self, tenant: str, name: str, format: str, staging: Staging, delta: Delta) -> AdapterRecord:
        """Stores a validated upload as the next version of `tenant`'s adapter `name`, status "ready".

        format: "lora" or "bitdelta" (a "finetune" goes through create_pending / complete_pending).
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
        self._check_delta(kind, delta)
        payload, size = self._prepare(staging, kind, delta.sha256)
        rank = getattr(delta, "rank", None) if kind == "lora" else None
        row_id = "ad-" + secrets.token_hex(12)
        with self._lock:
            self._check_quota(tenant, name, size)
            blob = self._place_blob(payload, kind, delta.sha256)
            try:
                with self._tx() as db:
                    db.execute(
                        f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'ready', 1.0, NULL, ?, ?, ?, ?)",
                        (row_id, tenant, name, format, _next_version(db, tenant, name), delta.sha256, _now(), size,
                         rank, blob),
                    )
            except BaseException:
                self._gc([blob])
                raise
        staging.discard()
        record = self._row(row_id)
        assert record is not None
        return record

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
                f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, 'compressing', 0.0, NULL, ?, NULL, NULL, NULL)",
                (row_id, tenant, name, format, _next_version(db, tenant, name), _now()),
            )
        record = self._row(row_id)
        assert record is not None
        return record

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

    def complete_pending(self, id: str, staging: Staging, delta: Delta) -> AdapterRecord:
        """Stores the result of a background compression (a BitDelta for a "finetune", loaded from the
        staging) and marks the adapter "ready" with progress 1; the staging is discarded. From now on
        `resolve` answers this version (unless a newer one is ready). Raises NotFound if the adapter (or
        its tenant) was deleted meanwhile (nothing is stored), ValueError if it is not compressing, for a
        delta of the wrong kind or staged data that does not match it."""
        record = self._pending(id)
        kind = record.kind
        self._check_delta(kind, delta)
        payload, size = self._prepare(staging, kind, delta.sha256)
        rank = getattr(delta, "rank", None) if kind == "lora" else None
        with self._lock:
            self._pending(id)
            self._check_quota(record.tenant, record.name, size)
            blob = self._place_blob(payload, kind, delta.sha256)
            try:
                with self._tx() as db:
                    cur = db.execute(
                        "UPDATE adapters SET status='ready', progress=1.0, error=NULL, sha256=?, size_bytes=?, "
                        "rank=?, blob=? WHERE id=? AND status='compressing'",
                        (delta.sha256, size, rank, blob, id),
                    )
                    assert cur.rowcount == 1, "row changed while the lock was held"
            except BaseException:
                self._gc([blob])
                raise
        staging.discard()
        done = self._row(id)
        assert done is not None
        return done

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
        self._with_reserve(self._delete_adapter, tenant, name)

    def _delete_adapter(self, tenant: str, name: str) -> None:
        with self._lock:
            with self._tx() as db:
                blobs = [
                    b
                    for (b,) in db.execute(
                        "SELECT DISTINCT blob FROM adapters WHERE tenant=? AND name=? AND blob IS NOT NULL",
                        (tenant, name),
                    )
                ]
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
                    self._gc([r.blob for r in old if r.blob is not None])
                return old

        return self._with_reserve(collect)

    # --- a full disk --------------------------------------------------------------------------------------

    RESERVE_BYTES = 16 << 20  # given up on a full disk so that deletes (SQLite's journal) can still be written

    @property
    def _reserve(self) -> Path:
        return self.root / "reserve.bin"

    def _ensure_reserve(self) -> None:
        """Keeps RESERVE_BYTES of the disk for the day it is full (best effort: nothing if there is no room)."""
        if self._reserve.exists():
            return
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, self.RESERVE_BYTES)
        except OSError:
            os.close(fd)
            self._reserve.unlink(missing_ok=True)
            return
        os.close(fd)

    def _with_reserve(self, fn, *args):
        """fn(*args); when the disk is full, once more after giving up the reserve (then kept again if it fits)."""
        try:
            return fn(*args)
        except InsufficientStorage:
            if not self._reserve.exists():
                raise
            self._reserve.unlink()
            try:
                return fn(*args)
            finally:
                self._ensure_reserve()

    def blob_path(self, record: AdapterRecord) -> Path:
        """Where a ready version's data is: a LoRA directory (kind "lora") or a 1-bit delta file
        (kind "bitdelta"), for registry.loading.load_delta. ValueError if it has no data (not ready)."""
        if record.blob is None:
            raise ValueError(f"adapter {record.name} version {record.version} is {record.status}: it has no data")
        if not _BLOB_RE.fullmatch(record.blob):
            raise ValueError(f"malformed blob path {record.blob!r}")
        return self.blobs / record.blob

    # --- garbage collection -------------------------------------------------------------------------------

    def _gc(self, blobs: list[str]) -> None:
        """Removes the given blobs that no row references (the caller holds the lock)."""
        for blob in blobs:
            if self._db.execute("SELECT 1 FROM adapters WHERE blob=? LIMIT 1", (blob,)).fetchone():
                continue
            path = self.blobs / blob
            if os.path.lexists(path):
                self._remove_blob_path(path)

    def _remove_blob_path(self, path: Path) -> None:
        """Removes a blob atomically: renamed into tmp/ first (so a half-deleted blob is never under
        blobs/, where an identical upload would reuse it), then deleted."""
        grave = self.tmp / f"gc-{secrets.token_hex(8)}"  # a rename, no new folder: works on a full disk too
        os.rename(path, grave)
        fsync_dir(path.parent)
        if grave.is_dir() and not grave.is_symlink():
            shutil.rmtree(grave, ignore_errors=True)
        else:
            grave.unlink(missing_ok=True)
