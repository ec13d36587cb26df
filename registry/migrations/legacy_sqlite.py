"""SQLite catalogs written before the catalog moved to Alembic (PRAGMA user_version 1 to 4) are brought to schema 4,
which revision 0001 is, and then go on with Alembic. Nothing else ever writes these steps again.

Schema 2 added the usage table, 3 a fine-tune's stored upload (three columns), 4 the "ia3" format (a wider CHECK,
which SQLite cannot change in place: the table is rebuilt, SQLite's documented procedure).
"""

from __future__ import annotations

import sqlite3

LAST_LEGACY_VERSION = 4
_V3_COLUMNS = (("source_blob", "TEXT"), ("source_bytes", "INTEGER"), ("fidelity", "TEXT"))
_ADAPTERS_V4 = """
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
_USAGE_V2 = """
CREATE TABLE IF NOT EXISTS usage (
    tenant            TEXT NOT NULL,
    adapter           TEXT NOT NULL,
    hour              INTEGER NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant, adapter, hour)
);
CREATE INDEX IF NOT EXISTS usage_hour ON usage(hour);
CREATE INDEX IF NOT EXISTS adapters_blob ON adapters(blob);
CREATE INDEX IF NOT EXISTS adapters_source_blob ON adapters(source_blob);
"""


def upgrade_to_v4(db: sqlite3.Connection, version: int) -> None:
    """Brings a catalog of legacy schema `version` (1 to 4) to schema 4, every row kept (autocommit connection)."""
    if version in (1, 2):
        have = {row[1] for row in db.execute("PRAGMA table_info(adapters)")}
        for column, sql_type in _V3_COLUMNS:
            if column not in have:
                db.execute(f"ALTER TABLE adapters ADD COLUMN {column} {sql_type}")
    if version in (1, 2, 3):
        db.execute("PRAGMA foreign_keys=OFF")  # so that dropping the old table cascades nowhere
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("CREATE TABLE adapters_v4 (" + _ADAPTERS_V4 + ")")
                columns = ", ".join(row[1] for row in db.execute("PRAGMA table_info(adapters)"))
                db.execute(f"INSERT INTO adapters_v4 ({columns}) SELECT {columns} FROM adapters")
                db.execute("DROP TABLE adapters")
                db.execute("ALTER TABLE adapters_v4 RENAME TO adapters")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.execute("PRAGMA foreign_keys=ON")
    db.executescript(_USAGE_V2)
    db.execute(f"PRAGMA user_version={LAST_LEGACY_VERSION}")
