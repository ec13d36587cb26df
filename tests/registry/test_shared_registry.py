"""Several processes on one registry: one catalog (PostgreSQL here, as a cluster shares it; SQLite where a case
holds for both) and one blob folder. Leases say who is alive; nothing a live process holds is cleaned up under it,
and what a dead one left is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from registry.catalog import INTERRUPTED, Registry
from registry.database import CatalogError
from registry.schema import adapters, leases
from registry.usage import UsageCount
from tests.registry.test_catalog import commit

REPO = Path(__file__).resolve().parents[2]


def _wait(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_two_processes_see_each_others_tenants_versions_and_deletes(tmp_path, postgres, assets) -> None:
    url = postgres.new_database()
    with Registry(tmp_path / "reg", catalog=url) as a, Registry(tmp_path / "reg", catalog=url) as b:
        assert {p for _, p in a.other_processes()} == {os.getpid()} and len(b.other_processes()) == 1
        _, key = a.create_tenant("acme")
        assert b.authenticate(key).name == "acme"  # type: ignore[union-attr]
        v1 = commit(a, "acme", "support", "lora", assets.lora, assets)
        assert b.resolve("acme", "support") == v1
        v2 = commit(b, "acme", "support", "bitdelta", assets.bd1, assets)
        assert a.resolve("acme", "support") == v2 and v2.version == 2
        assert [r.id for r in a.collect_versions("acme", "support")] == [v1.id]
        assert not b.store.has(v1.blob) and b.store.has(v2.blob)
        b.delete_adapter("acme", "support")
        assert a.resolve("acme", "support") is None and not a.store.has(v2.blob)
        a.add_usage({("acme", None, 3600): UsageCount(1, 2, 3)})
        assert b.usage(tenant="acme", start=0, end=7200, granularity="hour")[0].total_tokens == 5


def test_versions_handed_out_by_two_processes_at_once_never_collide(tmp_path, postgres, assets) -> None:
    url = postgres.new_database()
    with Registry(tmp_path / "reg", catalog=url) as a, Registry(tmp_path / "reg", catalog=url) as b:
        a.create_tenant("acme")
        errors: list[BaseException] = []

        def upload(reg: Registry) -> None:
            try:
                for _ in range(4):
                    commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)
                for _ in range(40):  # fine-tunes' pending versions: no blob, so no store lock to queue them
                    reg.create_pending("acme", "ft", "finetune")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=upload, args=(r,)) for r in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [r.version for r in a.list_versions("acme", "x")] == list(range(1, 9))
        assert len({r.blob for r in a.list_versions("acme", "x")}) == 1  # one blob, reused by every version
        assert [r.version for r in b.list_versions("acme", "ft")] == list(range(1, 81))


CHILD = """
import sys, time
from registry.catalog import Registry
reg = Registry(sys.argv[1], catalog=sys.argv[2] or None)
pending = reg.create_pending("acme", "ft", "finetune")
stage = reg.stage()
(stage.path / "part").write_bytes(b"x" * 1000)
print(pending.id, reg.lease, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("catalog", ["sqlite", "postgresql"])
def test_a_process_killed_mid_compression_is_cleaned_up_by_the_one_still_running(tmp_path, postgres, catalog) -> None:
    """A kill -9 on this machine: the live process's lease keeper fails the dead one's version and removes its
    tmp/ folder within a renewal, without waiting for the lease to expire (it sees the pid is gone)."""
    url = postgres.new_database() if catalog == "postgresql" else ""
    root = tmp_path / "reg"
    with Registry(root, catalog=url or None, lease_seconds=600) as survivor:  # renewals every 200 s: none here
        survivor.create_tenant("acme")
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), url], cwd=REPO, stdout=subprocess.PIPE,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)  # fmt: skip
        try:
            row_id, lease = child.stdout.readline().split()  # type: ignore[union-attr]
            assert (root / "tmp" / lease).is_dir()
            survivor._reap()  # the child lives: nothing of it is touched
            assert survivor.get_adapter("acme", "ft").status == "compressing"  # type: ignore[union-attr]
            assert (root / "tmp" / lease).is_dir()
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            child.kill()
            child.wait()
            child.stdout.close()  # type: ignore[union-attr]
        survivor._reap()  # what its lease keeper does at every renewal
        record = survivor.get_adapter("acme", "ft")
        assert record is not None and (record.id, record.status, record.error) == (row_id, "failed", INTERRUPTED)
        assert not (root / "tmp" / lease).exists() and (root / "tmp" / survivor.lease).is_dir()
        assert survivor.other_processes() == []


def test_another_machines_process_is_taken_for_dead_only_once_its_lease_expired(tmp_path, postgres) -> None:
    url = postgres.new_database()
    root = tmp_path / "reg"
    with Registry(root, catalog=url, lease_seconds=0.6) as reg:  # its keeper renews and reaps every 0.2 s
        reg.create_tenant("acme")
        now = int(time.time())
        with reg._engine.begin() as db:  # a server elsewhere (another boot): its pid means nothing here
            db.execute(insert(leases).values(id="ls-elsewhere", host="other", pid=1, pids="another-boot/1",
                                             started=now, expires=now + 3))  # fmt: skip
            db.execute(insert(adapters).values(id="ad-x", tenant="acme", name="ft", format="finetune", version=1,
                                               status="compressing", progress=0.1, created=now, lease="ls-elsewhere"))  # fmt: skip
        (root / "tmp" / "ls-elsewhere").mkdir()
        time.sleep(1.0)  # several renewals of this process's lease: the other one has not expired
        assert reg.get_adapter("acme", "ft").status == "compressing"  # type: ignore[union-attr]
        assert (root / "tmp" / "ls-elsewhere").is_dir() and reg.other_processes() == [("other", 1)]
        with reg._engine.begin() as db:  # it stopped renewing: its lease runs out
            db.execute(update(leases).where(leases.c.id == "ls-elsewhere").values(expires=now - 1))
        assert _wait(lambda: reg.get_adapter("acme", "ft").status == "failed")  # type: ignore[union-attr]
        assert _wait(lambda: not (root / "tmp" / "ls-elsewhere").exists())
        assert reg.other_processes() == []
        with reg._engine.connect() as db:  # and this process's own lease was renewed all along
            assert db.execute(select(leases.c.expires).where(leases.c.id == reg.lease)).scalar_one() >= now


def test_closing_fails_its_own_compressions_and_gives_its_lease_back(tmp_path, postgres) -> None:
    url = postgres.new_database()
    with Registry(tmp_path / "reg", catalog=url) as other:
        reg = Registry(tmp_path / "reg", catalog=url)
        reg.create_tenant("acme")
        mine = reg.create_pending("acme", "ft", "finetune")
        folder = reg.tmp
        reg.close()
        record = other.get_adapter("acme", "ft")
        assert record is not None and (record.id, record.status, record.error) == (mine.id, "failed", INTERRUPTED)
        assert other.other_processes() == [] and not folder.exists()


def test_a_folder_opens_only_with_its_own_catalog_and_nothing_is_swept_otherwise(tmp_path, postgres, assets) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:  # its own SQLite catalog
        reg.create_tenant("acme")
        stored = commit(reg, "acme", "support", "lora", assets.lora, assets)
    with pytest.raises(CatalogError, match="belongs to another catalog"):
        Registry(root, catalog=postgres.new_database())  # an empty catalog would sweep every blob as unreferenced
    (root / "catalog_id").unlink()  # a folder of a deltaserve from before the file
    with pytest.raises(CatalogError, match="holds blobs of its own SQLite catalog"):
        Registry(root, catalog=postgres.new_database())
    with Registry(root) as reg:
        assert reg.resolve("acme", "support") == stored and reg.store.has(stored.blob)
    shared = tmp_path / "shared"
    url = postgres.new_database()
    Registry(shared, catalog=url).close()
    with pytest.raises(CatalogError, match="belongs to another catalog"):
        Registry(shared)  # a server started without --catalog on the shared folder
    with pytest.raises(CatalogError, match="belongs to another catalog"):
        Registry(shared, catalog=postgres.new_database())
    Registry(shared, catalog=url).close()


def test_a_catalog_of_a_newer_revision_is_refused(tmp_path, postgres) -> None:
    url = postgres.new_database()
    with Registry(tmp_path / "reg", catalog=url) as reg, reg._engine.begin() as db:
        db.exec_driver_sql("UPDATE deltaserve_schema_version SET version_num='9999'")
    with pytest.raises(CatalogError, match="revision 9999, written by a newer deltaserve"):
        Registry(tmp_path / "reg", catalog=url)


def test_an_unreachable_catalog_is_a_clear_error_without_its_password(tmp_path, postgres) -> None:
    url = f"postgresql://deltaserve:s3cret@127.0.0.1:{postgres.port + 1}/nothing"
    with pytest.raises(CatalogError, match="cannot open the catalog") as raised:
        Registry(tmp_path / "reg", catalog=url)
    assert "s3cret" not in str(raised.value)


def test_a_live_process_on_this_machine_is_never_taken_for_dead_and_a_reused_pid_keeps_no_lease_alive(tmp_path) -> None:
    """However late its renewal (a stall), a process that runs keeps its lease; a pid the dead process had, now
    another process's, does not."""
    from registry.catalog import _process_started

    with Registry(tmp_path / "reg", lease_seconds=600) as reg:
        reg.create_tenant("acme")
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            started = _process_started(sleeper.pid)
            now = int(time.time())
            with reg._engine.begin() as db:
                for lease, pid_started in (("ls-stalled", started), ("ls-reused", started - 1)):
                    db.execute(insert(leases).values(id=lease, host="here", pid=sleeper.pid, pids=reg._pids,
                                                     pid_started=pid_started, started=now, expires=now - 100))  # fmt: skip
                    db.execute(insert(adapters).values(id="ad-" + lease, tenant="acme", name=lease[3:],
                                                       format="finetune", version=1, status="compressing",
                                                       progress=0.0, created=now, lease=lease))  # fmt: skip
            reg._reap()
            assert reg.get_adapter("acme", "stalled").status == "compressing"  # type: ignore[union-attr]
            assert reg.get_adapter("acme", "reused").status == "failed"  # type: ignore[union-attr]
            assert reg.other_processes() == []  # expired: not counted as open, though not reaped
        finally:
            sleeper.kill()
            sleeper.wait()
        reg._reap()
        assert reg.get_adapter("acme", "stalled").status == "failed"  # type: ignore[union-attr]


def test_a_deltaserve_from_before_leases_and_this_one_never_share_a_folder(tmp_path) -> None:
    """The older one took registry.lock exclusively and recovered as if alone; this one holds it shared."""
    import fcntl

    root = tmp_path / "reg"
    Registry(root).close()
    fd = os.open(root / "registry.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what an older deltaserve holds while it runs
        with pytest.raises(CatalogError, match="open by an older deltaserve"):
            Registry(root)
        fcntl.flock(fd, fcntl.LOCK_UN)
        with Registry(root), pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and an older one cannot start beside this one
    finally:
        os.close(fd)


def test_a_registry_dropped_without_closing_gives_its_lease_back(tmp_path) -> None:
    import gc

    with Registry(tmp_path / "reg") as reg:
        Registry(tmp_path / "reg").ensure_admin_key(None)  # never closed: collected, its keeper thread lets go
        gc.collect()
        assert reg.other_processes() == []
