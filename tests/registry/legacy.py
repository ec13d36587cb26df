"""Catalogs as a deltaserve from before Alembic wrote them, for the tests of their migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from registry.database import ALEMBIC_SQLITE_VERSION


def make_pre_alembic(catalog: Path) -> sqlite3.Connection:
    """Turns a closed catalog made by this deltaserve into one of schema 4 as the last pre-Alembic deltaserve left
    it (no Alembic table, no leases, no catalog_info, no `lease` column; PRAGMA user_version 4), every row kept.
    Returns an open connection for the caller to turn it older still (close it). The folder's catalog_id file,
    which such a deltaserve did not write, goes too."""
    (catalog.parent / "catalog_id").unlink()
    db = sqlite3.connect(catalog)
    db.executescript("DROP TABLE deltaserve_schema_version; DROP TABLE leases; DROP TABLE catalog_info; "
                     "ALTER TABLE adapters DROP COLUMN lease; PRAGMA user_version=4;")  # fmt: skip
    return db


def assert_current(catalog: Path) -> None:
    """The catalog is at this deltaserve's newest revision."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import registry.database as database

    config = Config()
    config.set_main_option("script_location", str(Path(database.__file__).parent / "migrations"))
    db = sqlite3.connect(catalog)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == ALEMBIC_SQLITE_VERSION
        (revision,) = db.execute("SELECT version_num FROM deltaserve_schema_version").fetchone()
        assert revision == ScriptDirectory.from_config(config).get_current_head()
    finally:
        db.close()
