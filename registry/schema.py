"""The catalog's tables, once, for every database it runs on (SQLite by default, PostgreSQL for a shared registry).

This is the schema the code reads and writes through SQLAlchemy Core (registry.catalog, registry.usage); the
migrations in registry/migrations build it, revision by revision, on an empty database or an older catalog, and
a test holds the two together (what the migrations build is what these tables say).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

tenants = Table(
    "tenants", metadata,
    Column("name", Text, primary_key=True),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("created", BigInteger, nullable=False),
)  # fmt: skip

adapters = Table(
    "adapters", metadata,
    Column("id", Text, primary_key=True),
    Column("tenant", Text, ForeignKey("tenants.name", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("format", Text, CheckConstraint("format IN ('lora', 'ia3', 'bitdelta', 'finetune')"), nullable=False),
    Column("version", Integer, CheckConstraint("version >= 1"), nullable=False),
    Column("sha256", Text),
    Column("status", Text, CheckConstraint("status IN ('ready', 'compressing', 'failed')"), nullable=False),
    Column("progress", Float, nullable=False),
    Column("error", Text),
    Column("created", BigInteger, nullable=False),
    Column("size_bytes", BigInteger),
    Column("rank", Integer),
    Column("blob", Text),
    Column("source_blob", Text),
    Column("source_bytes", BigInteger),
    Column("fidelity", Text),
    # The process (a row of `leases`) compressing this version; when that process is gone, whoever opens the
    # registry next fails the row ("interrupted by a restart"). NULL for every other status.
    Column("lease", Text),
    UniqueConstraint("tenant", "name", "version"),
    CheckConstraint("(status = 'ready') = (blob IS NOT NULL)"),
    Index("adapters_blob", "blob"),
    Index("adapters_source_blob", "source_blob"),
)  # fmt: skip

usage = Table(
    "usage", metadata,
    Column("tenant", Text, primary_key=True),
    Column("adapter", Text, primary_key=True),
    Column("hour", BigInteger, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Index("usage_hour", "hour"),
)  # fmt: skip

# One row per process that has the registry open (registry.leases): it renews `expires` while it lives. What a
# process leaves behind (its staging folder under tmp/, the versions it was compressing) is cleaned up by another
# process only once its lease expired, so several processes (servers, ingresses) can share one registry.
leases = Table(
    "leases", metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    # Which processes this one can see by pid: the boot and the pid namespace. A lease of the same `pids` is dead
    # exactly when its process is gone (a server on this machine restarted after a kill -9), whatever its expiry;
    # another's when it expired. pid_started: the process's start (clock ticks after boot), so that a pid used
    # again by another process does not keep a dead lease alive.
    Column("pids", Text, nullable=False),
    Column("pid_started", BigInteger),
    Column("started", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=False),
)  # fmt: skip

# One row (id 1). catalog_id: this catalog's random identity, also written in the registry folder (and bucket) it
# goes with
# (registry.catalog refuses a folder of another catalog: opening sweeps blobs no row references, so a folder opened
# with the wrong catalog would lose them all). store_writes: a write transaction that places or removes blobs
# updates it first; on PostgreSQL that takes the row's lock until commit, so "is this blob still referenced? then
# remove it" in one process and "reuse this stored blob, insert its row" in another never interleave (on SQLite
# every write transaction is exclusive already).
catalog_info = Table(
    "catalog_info", metadata,
    Column("id", Integer, primary_key=True),
    Column("catalog_id", Text, nullable=False),
    Column("store_writes", BigInteger, nullable=False),
    # where this catalog's blobs are: an s3:// URL, or NULL for the registry folder's blobs/ (a shared filesystem
    # across machines). A registry opened with another blob store is refused: every row would look lost.
    Column("blob_store", Text),
)  # fmt: skip
