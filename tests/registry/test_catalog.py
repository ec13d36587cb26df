"""registry.catalog: tenants and keys, adapter versions, tenant isolation, blob store, crash recovery."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from registry.blob_store import content_sha256
from registry.catalog import INTERRUPTED, MISSING_BLOB, RESERVE_BYTES, AdapterRecord, Registry
from registry.deltas import Delta
from registry.errors import InvalidName, NameTaken, NotFound, UnsupportedFormat
from registry.loading import load_delta
from registry.names import validate_name
from serving.api.schemas import AdapterObject
from tests.registry.assets import Assets, add_files, lora_files

REPO = Path(__file__).resolve().parents[2]


def commit(reg: Registry, tenant: str, name: str, fmt: str, src: Path, assets: Assets) -> AdapterRecord:
    """Uploads a LoRA directory or a 1-bit delta file as the HTTP layer does: stage, validate, commit."""
    with reg.stage(format=fmt) as st:
        add_files(st, lora_files(src) if fmt == "lora" else [src])
        delta = st.validate(fmt, assets.spec, max_lora_rank=16)
        assert delta is not None
        return reg.commit_adapter(tenant, name, fmt, st, delta)


def compressed(reg: Registry, src: Path, assets: Assets) -> tuple[object, Delta]:
    """A staging holding a 1-bit delta as a background compression leaves it, and its delta."""
    st = reg.stage()
    shutil.copy(src, st.path / "delta.safetensors")
    return st, load_delta(st.path / "delta.safetensors", assets.spec)


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# --- names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A-1.b_c", "7up", "x" * 64, "v1.2"])
def test_valid_names(name: str) -> None:
    assert validate_name("adapter", name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "a\\b", ".hidden", ".", "..", "a..b", "x" * 65, "é", "caf\u00e9", "\u0430dmin", "a b",
     "a\n", "a\x00", "-a", "_a", "a:b", "a%2fb"],
)  # fmt: skip
def test_invalid_names(reg: Registry, name: str) -> None:
    with pytest.raises(InvalidName) as e:
        validate_name("tenant", name)
    assert e.value.param == "name"
    with pytest.raises(InvalidName):
        reg.create_tenant(name)
    reg.create_tenant("t")
    with pytest.raises(InvalidName):
        reg.create_pending("t", name, "finetune")
    assert reg.list_tenants()[0].name == "t" and reg.list_adapters("t") == []
    with pytest.raises(InvalidName):
        validate_name("adapter", 5)  # type: ignore[arg-type]


# --- tenants and keys --------------------------------------------------------------------------------------


def test_tenants_create_list_delete(reg: Registry) -> None:
    a, key_a = reg.create_tenant("acme")
    b, key_b = reg.create_tenant("beta")
    assert a.name == "acme" and abs(a.created - time.time()) < 60
    assert key_a.startswith("ds-") and len(key_a) == 3 + 43 and key_a != key_b
    assert [t.name for t in reg.list_tenants()] == ["acme", "beta"]
    with pytest.raises(NameTaken) as e:
        reg.create_tenant("acme")
    assert e.value.param == "name"
    assert reg.authenticate(key_a) == a and reg.authenticate(key_b) == b
    reg.delete_tenant("acme")
    assert [t.name for t in reg.list_tenants()] == ["beta"]
    assert reg.authenticate(key_a) is None, "a deleted tenant's key stops working"
    with pytest.raises(NotFound):
        reg.delete_tenant("acme")
    _, key_a2 = reg.create_tenant("acme")  # the name is free again, with a new key
    assert reg.authenticate(key_a) is None and reg.authenticate(key_a2).name == "acme"  # type: ignore[union-attr]


@pytest.mark.parametrize("key", [None, "", "ds-", "ds-wrong", "x" * 10_000, "Bearer ds-abc", "\x00"])
def test_authenticate_wrong_keys(reg: Registry, key: str | None) -> None:
    reg.create_tenant("acme")
    assert reg.authenticate(key) is None
    assert not reg.is_admin(key)


def test_keys_stored_only_hashed(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        admin = reg.ensure_admin_key(None)
        keys = [reg.create_tenant(f"t{i}")[1] for i in range(3)]
        given = "given-admin-key-0123456789"
        reg.ensure_admin_key(given)
        assert admin is not None
        secrets_ = [admin, given, *keys]
        for key in secrets_:  # while open (WAL not checkpointed) and after closing
            for f in all_files(root):
                assert key.encode() not in f.read_bytes(), f"plaintext key in {f}"
    for f in all_files(root):
        data = f.read_bytes()
        for key in secrets_:
            assert key.encode() not in data
    with Registry(root) as reg:
        assert reg.authenticate(keys[0]).name == "t0"  # type: ignore[union-attr]


def test_admin_key_generated_stored_0600_and_reused(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        assert not reg.is_admin("anything-at-all-long-enough"), "no admin key before ensure_admin_key"
        key = reg.ensure_admin_key(None)
        assert key is not None and key.startswith("ds-admin-")
        assert reg.is_admin(key) and not reg.is_admin(key + "x") and not reg.is_admin(key[:-1])
        path = root / "admin_key.sha256"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE((root / "catalog.sqlite3").stat().st_mode) == 0o600
        _, tenant_key = reg.create_tenant("acme")
        assert not reg.is_admin(tenant_key) and reg.authenticate(key) is None
    with Registry(root) as reg:
        assert reg.ensure_admin_key(None) is None, "reused, not regenerated (nothing printed)"
        assert reg.is_admin(key)
    with Registry(root) as reg:
        given = "operator-chosen-admin-key"
        assert reg.ensure_admin_key(given) is None
        assert reg.is_admin(given) and not reg.is_admin(key), "a given key replaces the generated one"
        assert stat.S_IMODE((root / "admin_key.sha256").stat().st_mode) == 0o600
        for bad in ["", "short", "has space in it, long enough"]:
            with pytest.raises(ValueError):
                reg.ensure_admin_key(bad)
        assert reg.is_admin(given)
    with Registry(root) as reg:
        assert reg.is_admin(given), "known to a registry opened later, before ensure_admin_key"
        assert reg.ensure_admin_key(None) is None and reg.is_admin(given)
    (root / "admin_key.sha256").write_text("garbage")
    with Registry(root) as reg:
        assert not reg.is_admin(given)
        with pytest.raises(ValueError, match="delete it"):
            reg.ensure_admin_key(None)
        assert reg.ensure_admin_key(given) is None and reg.is_admin(given), "a given key repairs the file"


def test_dropped_registry_releases_the_directory(tmp_path: Path) -> None:
    key = Registry(tmp_path / "reg").ensure_admin_key(None)  # never closed explicitly
    with Registry(tmp_path / "reg") as reg:
        assert key is not None and reg.is_admin(key)


def test_a_registry_that_fails_to_open_leaves_no_lease_nor_folder(tmp_path: Path, monkeypatch) -> None:
    """A failure late in opening (here the disk reserve) gives its lease back and removes its tmp/ folder at once
    (the next opener must not wait for it to expire); the half-made object, when collected, changes nothing."""
    import gc

    import registry.catalog as catalog

    def no_reserve(*args, **kwargs):
        raise OSError("no room for the reserve")

    monkeypatch.setattr(catalog, "DiskReserve", no_reserve)
    with pytest.raises(OSError, match="no room"):
        Registry(tmp_path / "reg")
    gc.collect()  # the half-made Registry's __del__ has run by now
    monkeypatch.undo()
    with Registry(tmp_path / "reg") as reg:
        assert reg.other_processes() == []
        assert [p.name for p in (tmp_path / "reg" / "tmp").iterdir()] == [reg.lease]



def test_catalog_imports_no_torch() -> None:
    code = "import sys, registry.catalog, registry.uploads, registry.names; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- adapters ------------------------------------------------------------------------------------------


def test_commit_and_api_object(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    rec = commit(reg, "acme", "support", "lora", assets.lora, assets)
    api = AdapterObject.of(rec)  # the HTTP shape of a record (serving/api/schemas.py)
    assert set(api) == {"id", "name", "format", "version", "sha256", "status", "progress", "error", "created",
                        "size_bytes", "rank", "source_bytes", "fidelity"}  # fmt: skip
    assert api["name"] == "support" and api["format"] == "lora" and api["version"] == 1
    assert api["status"] == "ready" and api["progress"] == 1.0 and api["error"] is None and api["rank"] == 4
    assert api["source_bytes"] is None and "source_blob" not in api  # the blob names stay internal
    assert rec.id.startswith("ad-") and rec.kind == "lora"
    path = reg.blob_path(rec)
    assert path.is_dir() and path.parent.parent.name == "lora" and path.name == rec.sha256
    assert api["size_bytes"] == sum(p.stat().st_size for p in path.iterdir())
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert load_delta(path, assets.spec).sha256 == rec.sha256 == content_sha256("lora", path)
    assert list(reg.tmp.iterdir()) == [], "staging consumed"

    bd = commit(reg, "acme", "bd", "bitdelta", assets.bd1, assets)
    path = reg.blob_path(bd)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o400
    assert load_delta(path, assets.spec).sha256 == bd.sha256 == content_sha256("bitdelta", path)
    assert bd.rank is None and bd.size_bytes == path.stat().st_size
    assert [r.name for r in reg.list_adapters("acme")] == ["bd", "support"]


def test_versions_and_resolve(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    v1 = commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)
    v2 = commit(reg, "acme", "x", "lora", assets.lora, assets)
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("acme", "x") == v2 == reg.get_adapter("acme", "x")

    v3 = reg.create_pending("acme", "x", "finetune")
    assert (v3.version, v3.status, v3.progress, v3.sha256, v3.blob) == (3, "compressing", 0.0, None, None)
    assert reg.get_adapter("acme", "x") == v3
    assert reg.resolve("acme", "x") == v2, "a pending newer version does not hide the ready one"
    assert [r.version for r in reg.list_adapters("acme")] == [3]
    with pytest.raises(ValueError):
        reg.blob_path(v3)
    reg.set_progress(v3.id, 0.5)
    assert reg.get_adapter("acme", "x").progress == 0.5  # type: ignore[union-attr]

    st, delta = compressed(reg, assets.bd2, assets)
    done = reg.complete_pending(v3.id, st, delta)  # type: ignore[arg-type]
    assert (done.status, done.progress, done.sha256, done.kind) == ("ready", 1.0, delta.sha256, "bitdelta")
    assert reg.resolve("acme", "x") == done and not st.path.exists()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not compressing"):
        reg.set_progress(v3.id, 0.7)

    v4 = reg.create_pending("acme", "x", "finetune")
    assert reg.fail_pending(v4.id, "the fine-tune lacks tensor model.norm.weight")
    assert not reg.fail_pending(v4.id, "again"), "only a compressing adapter can fail"
    got = reg.get_adapter("acme", "x")
    assert got is not None and (got.version, got.status, got.error) == (4, "failed", got.error)
    assert "model.norm.weight" in (got.error or "")
    assert reg.resolve("acme", "x") == done, "a failed newer version does not hide the ready one"
    assert [r.version for r in reg.list_versions("acme", "x")] == [1, 2, 3, 4]

    reg.delete_adapter("acme", "x")
    assert reg.get_adapter("acme", "x") is None and reg.resolve("acme", "x") is None
    assert commit(reg, "acme", "x", "bitdelta", assets.bd1, assets).version == 1


def test_pending_then_deleted(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    p = reg.create_pending("acme", "ft", "finetune")
    reg.delete_adapter("acme", "ft")
    with pytest.raises(NotFound):
        reg.set_progress(p.id, 0.3)  # the compression learns it can stop
    st, delta = compressed(reg, assets.bd1, assets)
    with pytest.raises(NotFound):
        reg.complete_pending(p.id, st, delta)  # type: ignore[arg-type]
    assert not reg.fail_pending(p.id, "x")
    st.discard()  # type: ignore[attr-defined]
    assert all_files(reg.blobs) == [] and list(reg.tmp.iterdir()) == []


def test_tenant_isolation(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("a")
    reg.create_tenant("b")
    rec = commit(reg, "a", "secret", "lora", assets.lora, assets)
    pending = reg.create_pending("a", "pending", "finetune")
    for name in ["secret", "pending"]:
        assert reg.get_adapter("b", name) is None
        assert reg.resolve("b", name) is None
        assert reg.list_versions("b", name) == []
    assert reg.list_adapters("b") == []
    with pytest.raises(NotFound) as other:
        reg.delete_adapter("b", "secret")
    with pytest.raises(NotFound) as missing:
        reg.delete_adapter("b", "never-existed-name")
    assert type(other.value) is type(missing.value) and other.value.param == missing.value.param == "name"
    assert str(other.value).replace("secret", "N") == str(missing.value).replace("never-existed-name", "N")
    own = commit(reg, "b", "secret", "bitdelta", assets.bd1, assets)
    assert own.version == 1, "versions are per tenant"
    assert reg.resolve("a", "secret") == rec and reg.get_adapter("a", "pending") == pending
    reg.delete_adapter("b", "secret")
    assert reg.resolve("a", "secret") == rec
    with pytest.raises(NotFound):
        reg.create_pending("nobody", "x", "finetune")
    with pytest.raises(NotFound):
        commit(reg, "nobody", "x", "bitdelta", assets.bd2, assets)
    assert not list(reg.blobs.rglob(content_sha256("bitdelta", assets.bd2))), "no blob left by the refused commit"


def test_dedup_and_gc(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("a")
    reg.create_tenant("b")
    ra = commit(reg, "a", "x", "bitdelta", assets.bd1, assets)
    rb = commit(reg, "b", "y", "bitdelta", assets.bd1, assets)
    ra2 = commit(reg, "a", "x", "bitdelta", assets.bd1, assets)  # identical re-upload: v2, same blob
    assert ra.blob == rb.blob == ra2.blob and ra2.version == 2
    assert len(all_files(reg.blobs)) == 1
    lo = commit(reg, "a", "l", "lora", assets.lora, assets)
    assert len(all_files(reg.blobs)) == 3
    reg.delete_adapter("a", "x")
    assert reg.blob_path(rb).is_file(), "still used by b"
    reg.delete_adapter("b", "y")
    assert not reg.blob_path(rb).exists()
    assert reg.blob_path(lo).is_dir()
    commit(reg, "b", "l", "lora", assets.lora, assets)
    reg.delete_tenant("a")
    assert reg.blob_path(lo).is_dir(), "b's identical adapter keeps it"
    reg.delete_tenant("b")
    assert all_files(reg.blobs) == [] and list(reg.tmp.iterdir()) == []


def test_commit_checks_the_delta_against_the_data(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("a")
    st = add_files(reg.stage(format="bitdelta"), [assets.bd1])
    delta = st.validate("bitdelta", assets.spec)
    assert delta is not None
    with pytest.raises(ValueError, match="expected a lora delta"):
        reg.commit_adapter("a", "x", "lora", st, delta)
    with pytest.raises(ValueError, match="create_pending"):
        reg.commit_adapter("a", "x", "finetune", st, delta)
    with pytest.raises(UnsupportedFormat):
        reg.commit_adapter("a", "x", "gguf", st, delta)
    f = st.path / assets.bd1.name
    f.write_bytes(f.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="does not match|not the delta"):
        reg.commit_adapter("a", "x", "bitdelta", st, delta)
    assert reg.list_adapters("a") == [] and all_files(reg.blobs) == []


def test_concurrent_commits_get_distinct_versions(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("a")
    errors: list[BaseException] = []

    def worker(src: Path, fmt: str) -> None:
        try:
            for _ in range(3):
                commit(reg, "a", "x", fmt, src, assets)
                reg.authenticate("ds-nope")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=a) for a in [(assets.bd1, "bitdelta"), (assets.bd2, "bitdelta"),
                                                                  (assets.lora, "lora"), (assets.lora2, "lora")]]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.version for r in reg.list_versions("a", "x")] == list(range(1, 13))
    assert len(list(reg.blobs.glob("*/*/*"))) == 4


def test_recovery_on_open(tmp_path: Path, assets: Assets) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.create_tenant("a")
        keep = commit(reg, "a", "keep", "lora", assets.lora, assets)
        gone = commit(reg, "a", "gone", "bitdelta", assets.bd1, assets)
        pending = reg.create_pending("a", "ft", "finetune")
        stale = reg.stage(format="finetune")
        stale.add_file("config.json", iter([b"{}"]))
        gone_path = reg.blob_path(gone)
    # what a crash leaves: a staging, a blob renamed in without its row, a ready row whose blob vanished
    orphan = root / "blobs" / "bitdelta" / "ab" / ("ab" * 32)
    orphan.parent.mkdir()
    orphan.write_bytes(b"orphan")
    os.unlink(gone_path)
    with Registry(root) as reg:
        assert list(reg.tmp.iterdir()) == []
        assert not orphan.exists() and not orphan.parent.exists()
        p = reg.get_adapter("a", "ft")
        assert p is not None and (p.id, p.status, p.error) == (pending.id, "failed", INTERRUPTED)
        g = reg.get_adapter("a", "gone")
        assert g is not None and (g.status, g.error, g.blob) == ("failed", MISSING_BLOB, None)
        assert reg.resolve("a", "keep") == keep and reg.blob_path(keep).is_dir()


# --- crash safety -----------------------------------------------------------------------------------------

CHILD = r"""
import random, sys
from pathlib import Path
from registry.blob_store import content_sha256
from registry.catalog import Registry
from registry.errors import NotFound

class FakeDelta:  # the catalog only reads .kind, .sha256 and .rank
    def __init__(self, kind, sha256, rank=None):
        self.kind, self.sha256, self.rank = kind, sha256, rank

root, seed, log = Path(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
rng = random.Random(seed)
pool = [rng.randbytes(rng.randrange(1, 300_000)) for _ in range(3)]
reg = Registry(root)
log.write("open\n")
while True:
    name = f"n{rng.randrange(5)}"
    if rng.random() < 0.15:
        log.write(f"try-del {name}\n")
        try:
            reg.delete_adapter("t", name)
        except NotFound:
            pass
        continue
    data = rng.choice(pool) if rng.random() < 0.3 else rng.randbytes(rng.randrange(1, 300_000))
    kind = rng.choice(["lora", "bitdelta"])
    pending = reg.create_pending("t", name, "finetune") if rng.random() < 0.3 else None
    if pending is not None:
        kind = "bitdelta"
        reg.set_progress(pending.id, 0.5)
    st = reg.stage()
    if kind == "lora":
        st.add_file("adapter_config.json", [b'{"r": %d}' % rng.randrange(100)])
        st.add_file("adapter_model.safetensors", [data[i:i + 65536] for i in range(0, len(data), 65536)])
        payload = st.path
    else:
        st.add_file("delta.safetensors", [data[i:i + 65536] for i in range(0, len(data), 65536)])
        payload = st.path / "delta.safetensors"
    delta = FakeDelta(kind, content_sha256(kind, payload), 4 if kind == "lora" else None)
    if pending is not None:
        rec = reg.complete_pending(pending.id, st, delta)
    else:
        rec = reg.commit_adapter("t", name, kind, st, delta)
    log.write(f"ok {rec.id} {name} {rec.sha256}\n")
"""


def _check_consistent(reg: Registry, baseline: dict[str, AdapterRecord], assets: Assets) -> list[AdapterRecord]:
    """Every row's blob exists and holds what its sha256 says; no orphan blob; tmp/ empty; baseline intact."""
    rows = [r for t in reg.list_tenants() for n in {a.name for a in reg.list_adapters(t.name)}
            for r in reg.list_versions(t.name, n)]  # fmt: skip
    referenced = set()
    for r in rows:
        assert r.status in ("ready", "failed"), r
        if r.status == "failed":
            assert r.error == INTERRUPTED and r.blob is None, r
            continue
        path = reg.blob_path(r)
        assert content_sha256(r.kind, path) == r.sha256, f"blob of {r} is not what its row says"
        referenced.add(r.blob)
    on_disk = {str(p.relative_to(reg.blobs)) for p in reg.blobs.glob("*/*/*")}
    assert on_disk == referenced, "orphan blobs"
    assert list(reg.tmp.iterdir()) == []
    for name, rec in baseline.items():
        assert reg.resolve("base", name) == rec
        assert load_delta(reg.blob_path(rec), assets.spec).sha256 == rec.sha256
    return rows


def test_kill_9_while_committing(tmp_path: Path, assets: Assets) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.create_tenant("base")
        reg.create_tenant("t")
        baseline = {
            "l": commit(reg, "base", "l", "lora", assets.lora, assets),
            "b": commit(reg, "base", "b", "bitdelta", assets.bd1, assets),
        }
    rng = random.Random(1234)
    acked: dict[str, tuple[str, str]] = {}  # id -> (name, sha256) of commits the child reported done
    maybe_deleted: set[str] = set()  # acked ids of a name whose deletion may have happened before the kill
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    deadline = time.monotonic() + 25
    rounds = 0
    total_rows = 0
    while rounds < 8 and time.monotonic() < deadline:
        rounds += 1
        log = tmp_path / f"child{rounds}.log"
        log.touch()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(rounds), str(log)], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            t0 = time.monotonic()
            if rounds % 3:  # mostly kill while committing, sometimes while it starts or recovers
                while "open" not in log.read_text() and child.poll() is None and time.monotonic() - t0 < 20:
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.6))
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            if child.stderr:
                child.stderr.close()
        for line in log.read_text().splitlines():
            parts = line.split()
            if parts[0] == "ok":
                acked[parts[1]] = (parts[2], parts[3])
            elif parts[0] == "try-del":
                maybe_deleted.update(i for i, (n, _) in acked.items() if n == parts[1])
        with Registry(root) as reg:
            rows = _check_consistent(reg, baseline, assets)
            by_id = {r.id: r for r in rows}
            for i, (n, sha) in list(acked.items()):
                if i in maybe_deleted and i not in by_id:
                    del acked[i]
                    continue
                assert i in by_id and by_id[i].sha256 == sha, f"acknowledged commit {i} ({n}) lost"
            maybe_deleted.clear()
            total_rows = len(rows)
    assert rounds >= 4
    assert total_rows > 2 or acked, "the child never got to commit anything"


def test_every_registry_folder_is_private(tmp_path: Path, assets: Assets) -> None:
    # Tenants' blobs and the key hashes live here: no folder may be readable by other users, whatever the umask,
    # also in a registry made before (its folders are tightened when it is opened).
    old_umask = os.umask(0o022)
    try:
        with Registry(tmp_path / "reg") as reg:
            reg.create_tenant("acme")
            commit(reg, "acme", "support", "lora", assets.lora, assets)
            commit(reg, "acme", "bd", "bitdelta", assets.bd1, assets)
        (tmp_path / "reg" / "blobs").chmod(0o755)
        with Registry(tmp_path / "reg") as reg:
            folders = [tmp_path / "reg"] + [p for p in (tmp_path / "reg").rglob("*") if p.is_dir()]
            assert len(folders) >= 6
            loose = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders if stat.S_IMODE(p.stat().st_mode) != 0o700}
            assert not loose, loose
    finally:
        os.umask(old_umask)


# ---- storage: quotas, replaced versions, a full disk ----


def test_a_tenant_quota_bounds_what_it_stores(tmp_path: Path, assets: Assets) -> None:
    from registry.errors import InsufficientStorage

    size = assets.bd1.stat().st_size
    with Registry(tmp_path / "reg", tenant_quota_bytes=2 * size + size // 2) as reg:
        for t in ("acme", "other"):
            reg.create_tenant(t)
        commit(reg, "acme", "a", "bitdelta", assets.bd1, assets)
        commit(reg, "acme", "b", "bitdelta", assets.bd1, assets)  # each version counts, shared content too
        assert reg.tenant_usage("acme") == 2 * size
        with pytest.raises(InsufficientStorage, match="over its quota") as refused:
            commit(reg, "acme", "c", "bitdelta", assets.bd1, assets)
        assert refused.value.param == "files"  # the 507 names the upload's files
        commit(reg, "acme", "a", "bitdelta", assets.bd1, assets)  # a new version of a replaces the old one
        commit(reg, "other", "c", "bitdelta", assets.bd1, assets)  # quotas are per tenant
        assert [r.version for r in reg.collect_versions("acme", "a")] == [1]
        # an upload stops as soon as it cannot fit what is left, while it streams
        staging = reg.stage(tenant="acme")
        assert staging.quota_bytes == size // 2
        with pytest.raises(InsufficientStorage, match="quota"):
            staging.add_file("d.safetensors", iter([b"\0" * size]))
        assert staging.discarded


def test_replaced_versions_are_collected_unless_in_use(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    v1 = commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)
    v2 = commit(reg, "acme", "x", "bitdelta", assets.bd2, assets)
    v3 = commit(reg, "acme", "x", "lora", assets.lora, assets)
    pending = reg.create_pending("acme", "x", "finetune")  # still compressing: never collected
    removed = reg.collect_versions("acme", "x", keep={v2.id})  # v2 is in use by a running request
    assert [r.id for r in removed] == [v1.id]
    assert [r.id for r in reg.list_versions("acme", "x")] == [v2.id, v3.id, pending.id]
    assert not reg.blob_path(v1).exists() and reg.blob_path(v2).exists()
    assert [r.id for r in reg.collect_versions("acme", "x")] == [v2.id]  # its request ended
    assert not reg.blob_path(v2).exists() and reg.blob_path(v3).exists()
    assert reg.resolve("acme", "x").id == v3.id
    assert reg.collect_versions("acme", "nothing") == []


def test_a_full_disk_is_507_and_deletes_still_work(tmp_path: Path, assets: Assets) -> None:
    from registry.errors import InsufficientStorage
    from tests.helpers import fill_disk, small_filesystem

    with small_filesystem(tmp_path / "disk", 24) as disk, Registry(disk / "reg") as reg:
        reg.create_tenant("acme")
        kept = commit(reg, "acme", "kept", "bitdelta", assets.bd1, assets)
        gone = commit(reg, "acme", "gone", "lora", assets.lora, assets)
        filler = fill_disk(disk)
        with pytest.raises(InsufficientStorage):
            for i in range(100):  # tenants are tiny rows: the catalog fills up within a few
                reg.create_tenant(f"t{i}")
        with pytest.raises(InsufficientStorage):
            commit(reg, "acme", "new", "bitdelta", assets.bd2, assets)
        reg.delete_adapter("acme", "gone")  # the way to free space must work on a full disk
        assert reg.get_adapter("acme", "gone") is None and not reg.blob_path(gone).exists()
        assert reg.resolve("acme", "kept").id == kept.id and load_delta(reg.blob_path(kept), assets.spec)
        assert not list(reg.tmp.iterdir())  # nothing half-written left behind
        filler.unlink()
        commit(reg, "acme", "new", "bitdelta", assets.bd2, assets)  # space again: writes work again
    with small_filesystem(tmp_path / "disk2", 24) as disk, Registry(disk / "reg") as reg:
        assert (disk / "reg" / "reserve.bin").stat().st_size == RESERVE_BYTES
