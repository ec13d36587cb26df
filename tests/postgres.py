"""A real PostgreSQL server for the tests (Debian's `postgresql` package, which scripts/setup.sh installs where it
can): started once per test session in a private folder, a fresh database per test. Where the server programs are
missing, or cannot be started, the tests that need it skip and say why."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1 (trust authentication, fsync off: a test server), stopped by `stop()`."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's server programs (pg_ctl, initdb) are not installed: "
                               "apt-get install postgresql")  # fmt: skip
        self.folder = Path(tempfile.mkdtemp(prefix="deltaserve-pg-"))
        self.data = self.folder / "data"
        # PostgreSQL refuses to run as root: as root, the server runs as the package's `postgres` user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.folder, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        log = self.folder / "server.log"
        self._run([str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"])
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c max_connections=200"
        self._pg_ctl = str(bin_dir / "pg_ctl")
        self._run([self._pg_ctl, "-D", str(self.data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"])

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self._as + argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} failed: {done.stderr.strip() or done.stdout.strip()}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import sqlalchemy

        name = "t_" + secrets.token_hex(6)
        engine = sqlalchemy.create_engine(self.url().replace("postgresql://", "postgresql+psycopg://"),
                                          isolation_level="AUTOCOMMIT")  # fmt: skip
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([self._pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
