"""The catalog's database: one SQLAlchemy engine for SQLite (the single-machine default, a file in the registry
folder) or PostgreSQL (a registry shared by several servers), its schema brought up to date by Alembic.

Why these rules live here and nowhere else:
- SQLite: WAL, synchronous=FULL (a committed row survives a power cut), foreign keys on, a 10 s busy timeout; a
  write transaction starts with BEGIN IMMEDIATE, so two writers (threads or processes) queue instead of one failing
  on a read-to-write lock upgrade. The file is created private (0600).
- PostgreSQL: through psycopg 3; migrations hold a transaction-scoped advisory lock, so processes starting at once
  migrate one after the other.
- Migrations (registry/migrations, Alembic) are the one way the schema changes, the same revisions for both.
  A SQLite catalog from before Alembic (PRAGMA user_version 1-4) goes through registry.migrations.legacy_sqlite
  first; a migrated SQLite file says user_version 5 so that a deltaserve from before refuses it instead of
  misreading it. A catalog of a revision this deltaserve does not know (a newer one) is refused.
- A URL's password is never shown (`display_url`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, exc, inspect, make_url, text
from sqlalchemy.engine import URL

from registry.migrations.legacy_sqlite import LAST_LEGACY_VERSION, upgrade_to_v4

ALEMBIC_SQLITE_VERSION = 5  # PRAGMA user_version of a SQLite catalog that Alembic manages
_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x64656C7461  # pg_advisory_xact_lock key of the migrations ("delta")
_LEGACY_BASELINE = "0001"  # the revision a pre-Alembic catalog of schema 4 is
# Alembic's own table, under a name of ours: a database shared with another Alembic-managed application keeps both
VERSION_TABLE = "deltaserve_schema_version"


class CatalogError(RuntimeError):
    """A catalog this deltaserve cannot open: written by a newer deltaserve, or another registry folder's."""


def epoch_now(db: Connection) -> int:
    """The database's clock, unix seconds: leases are written and compared by one clock, whatever the machines'."""
    if db.dialect.name == "postgresql":
        return int(db.execute(text("SELECT CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)")).scalar_one())
    return int(db.execute(text("SELECT CAST(strftime('%s', 'now') AS INTEGER)")).scalar_one())


def sqlite_url(path: Path) -> str:
    return URL.create("sqlite", database=str(path)).render_as_string()


def display_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def connect(url: str) -> Engine:
    """The engine of the catalog at `url` ("sqlite:///path" or "postgresql://user@host/db"), migrated to the
    schema this deltaserve writes. Raises CatalogError for a catalog it cannot read, ValueError for a URL of
    another database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("a SQLite catalog needs a file")
        _prepare_sqlite_file(path)
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 10.0})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    elif parsed.get_backend_name() == "postgresql":
        if parsed.get_driver_name() in ("", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")  # the driver deltaserve depends on
        engine = create_engine(parsed, pool_pre_ping=True)
    else:
        raise ValueError(f"catalog {display_url(url)}: only sqlite:/// and postgresql:// catalogs are supported")
    try:
        migrate(engine)
    except exc.OperationalError as e:  # e.g. no server there: said without the URL's password
        engine.dispose()
        raise CatalogError(f"cannot open the catalog {display_url(url)}: {str(e.orig).strip()}") from None
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextlib.contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """One write transaction (BEGIN IMMEDIATE on SQLite), committed when the block ends, rolled back if it raises."""
    with engine.connect() as conn:
        conn.execution_options(deltaserve_write=True)
        with conn.begin():
            yield conn


def migrate(engine: Engine) -> None:
    """Brings the catalog to the newest revision, in one transaction (nothing changes if a step fails)."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    with write(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = conn
        config.attributes["version_table"] = VERSION_TABLE
        current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        if current is None and conn.dialect.name == "sqlite" and inspect(conn).has_table("adapters"):
            command.stamp(config, _LEGACY_BASELINE)  # a SQLite catalog of schema 4, from before Alembic
        elif current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
            raise CatalogError(f"the catalog is at schema revision {current}, written by a newer deltaserve; "
                                     f"this one reads up to {script.get_current_head()}")  # fmt: skip
        command.upgrade(config, "head")
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA user_version={ALEMBIC_SQLITE_VERSION}")


def _prepare_sqlite_file(path: Path) -> None:
    """Creates the file private, refuses a catalog of an unknown schema version and brings a pre-Alembic one to
    schema 4 (legacy_sqlite), before the engine opens it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (*range(LAST_LEGACY_VERSION + 1), ALEMBIC_SQLITE_VERSION):
            raise CatalogError(f"{path} has catalog schema version {version}; this deltaserve reads "
                                     f"{ALEMBIC_SQLITE_VERSION}")  # fmt: skip
        if 1 <= version <= LAST_LEGACY_VERSION:
            upgrade_to_v4(db, version)
    finally:
        db.close()


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    dbapi_connection.isolation_level = None  # transactions start where _sqlite_begin says, not where pysqlite guesses
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000"):
        dbapi_connection.execute(f"PRAGMA {pragma}")


def _sqlite_begin(conn: Connection) -> None:
    # A write transaction takes the write lock at once; a read needs no transaction (one statement, read in
    # autocommit: nothing to roll back, one statement less per lookup).
    if conn.get_execution_options().get("deltaserve_write"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
