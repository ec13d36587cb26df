"""The catalog's and keys' small promises that mutation testing showed untested: ids, messages and params of
refusals, clamping, re-checks under the lock, file modes, and what an interrupted private write leaves."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from registry.catalog import Registry
from registry.errors import NotFound
from registry.keys import MAX_KEY_LENGTH, MIN_ADMIN_KEY_LENGTH, AdminKey, write_private
from tests.registry.assets import Assets
from tests.registry.test_catalog import commit, compressed

AD_ID = re.compile(r"ad-[0-9a-f]{24}")


def test_adapter_ids_are_ad_and_24_hex_digits(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    assert AD_ID.fullmatch(reg.create_pending("acme", "ft", "finetune").id)
    assert AD_ID.fullmatch(commit(reg, "acme", "bd", "bitdelta", assets.bd1, assets).id)


def test_refusals_name_what_and_which_param(reg: Registry) -> None:
    with pytest.raises(NotFound, match="tenant 'ghost' not found") as e:
        reg.delete_tenant("ghost")
    assert e.value.param == "name"
    reg.create_tenant("acme")
    with pytest.raises(NotFound, match="adapter 'ghost' not found") as e:
        reg.delete_adapter("acme", "ghost")
    assert e.value.param == "name"
    with pytest.raises(NotFound, match=r"adapter ad-0+ not found \(deleted\?\)") as e:
        reg.set_progress("ad-" + "0" * 24, 0.5)
    assert e.value.param == "id"
    p = reg.create_pending("acme", "ft", "finetune")
    with pytest.raises(ValueError, match="^progress is NaN$"):
        reg.set_progress(p.id, float("nan"))
    with pytest.raises(Exception, match="adapter name"):  # the name is checked as an adapter's, before any row
        reg.create_pending("acme", "../x", "finetune")
    with pytest.raises(NotFound, match="^tenant 'ghost' not found$") as e:
        reg.create_pending("ghost", "ft", "finetune")
    assert e.value.param == "tenant"


@pytest.mark.parametrize("given, kept", [(1.5, 1.0), (-0.5, 0.0), (0.25, 0.25)])
def test_progress_is_clamped_to_0_1(reg: Registry, given: float, kept: float) -> None:
    reg.create_tenant("acme")
    p = reg.create_pending("acme", "ft", "finetune")
    reg.set_progress(p.id, given)
    assert reg.get_adapter("acme", "ft").progress == kept  # type: ignore[union-attr]


def test_complete_pending_re_checks_under_the_lock(reg: Registry, assets: Assets, monkeypatch) -> None:
    """A delete that lands while the staged data is being hashed (outside the lock) stores nothing."""
    reg.create_tenant("acme")
    p = reg.create_pending("acme", "ft", "finetune")
    st, delta = compressed(reg, assets.bd1, assets)
    prepare = reg.store.prepare

    def prepare_then_delete(*args):
        out = prepare(*args)
        reg.delete_adapter("acme", "ft")
        return out

    monkeypatch.setattr(reg.store, "prepare", prepare_then_delete)
    with pytest.raises(NotFound):
        reg.complete_pending(p.id, st, delta)  # type: ignore[arg-type]
    assert list(reg.blobs.rglob("*/*/*")) == [] and reg.get_adapter("acme", "ft") is None


def test_an_older_version_still_compressing_is_never_collected(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    pending = reg.create_pending("acme", "x", "finetune")  # version 1, compressing
    newer = commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)  # version 2, ready
    assert reg.collect_versions("acme", "x") == []
    assert [r.id for r in reg.list_versions("acme", "x")] == [pending.id, newer.id]


def test_a_registry_folder_is_made_with_its_parents_and_private(tmp_path: Path) -> None:
    root = tmp_path / "new" / "deeper" / "reg"
    Registry(root).close()
    assert root.is_dir() and stat.S_IMODE(root.stat().st_mode) == 0o700


def test_admin_key_length_bounds(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        shortest = "k" * MIN_ADMIN_KEY_LENGTH
        assert reg.ensure_admin_key(shortest) is None and reg.is_admin(shortest)
        with pytest.raises(ValueError, match=f"at least {MIN_ADMIN_KEY_LENGTH} printable ASCII characters"):
            reg.ensure_admin_key("k" * (MIN_ADMIN_KEY_LENGTH - 1))
        longest = "L" * MAX_KEY_LENGTH
        reg.ensure_admin_key(longest)
        assert reg.is_admin(longest) and not reg.is_admin(longest + "L")


def test_a_generated_admin_key_has_256_bits_and_an_existing_file_is_made_private(tmp_path: Path) -> None:
    admin = AdminKey(tmp_path)
    key = admin.ensure(None)
    assert key is not None and re.fullmatch(r"ds-admin-[A-Za-z0-9_-]{43}", key)
    os.chmod(admin.path, 0o644)
    assert AdminKey(tmp_path).ensure(None) is None
    assert stat.S_IMODE(admin.path.stat().st_mode) == 0o600
    assert admin.path.read_bytes() == (__import__("hashlib").sha256(key.encode()).hexdigest() + "\n").encode("ascii")


def test_write_private_is_atomic_and_leaves_nothing_when_it_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "secret"
    write_private(target, b"one")
    assert target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]

    def failing_replace(src, dst):
        assert Path(src).parent == tmp_path and Path(src).name.startswith(".secret.") and src.endswith(".tmp")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_private(target, b"two")
    assert target.read_bytes() == b"one" and sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


@pytest.mark.parametrize("blob", ["../x", "lora/ab/" + "0" * 64 + "/..", "other/00/" + "0" * 64, ""])
def test_the_blob_store_refuses_names_that_are_not_blobs(reg: Registry, blob: str) -> None:
    with pytest.raises(ValueError, match=f"^malformed blob path {re.escape(repr(blob))}$"):
        reg.store.path(blob)
    assert not reg.store.has(blob)


def test_the_disk_reserve_is_private_and_a_failed_allocation_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    from registry.fsync import DiskReserve

    reserve = DiskReserve(tmp_path / "reserve.bin", 4096)
    reserve.ensure()
    assert stat.S_IMODE(reserve.path.stat().st_mode) == 0o600 and reserve.path.stat().st_size == 4096
    reserve.path.unlink()

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    reserve.ensure()  # best effort: no reserve, no error, no empty file
    assert not reserve.path.exists()


def test_the_disk_reserve_never_follows_a_link_planted_at_its_path(tmp_path: Path) -> None:
    from registry.fsync import DiskReserve

    target = tmp_path / "elsewhere"
    (tmp_path / "reserve.bin").symlink_to(target)  # dangling: exists() is False
    DiskReserve(tmp_path / "reserve.bin", 4096).ensure()
    assert not target.exists()


def test_an_admin_key_file_of_other_bytes_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "admin_key.sha256").write_bytes(b"\xff\xfe" + b"a" * 62 + b"\n")
    with pytest.raises(ValueError, match="does not hold a sha256 hex digest; delete it to generate a new admin key"):
        AdminKey(tmp_path).ensure(None)


def test_a_full_disk_while_placing_a_blob_is_insufficient_storage(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    from registry.errors import InsufficientStorage

    payload = tmp_path / "payload"
    payload.write_bytes(b"x")

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(InsufficientStorage, match="^the registry's disk is full; the upload was not stored$"):
        reg.store.place(payload, "bitdelta", "ab" * 32)


def test_a_blob_whose_clean_up_fails_is_still_removed_and_the_next_open_clears_it(tmp_path: Path, monkeypatch) -> None:
    import shutil

    root = tmp_path / "reg"
    reg = Registry(root)
    blob = "lora/ab/" + "ab" * 32
    (root / "blobs" / blob).mkdir(parents=True)
    (root / "blobs" / blob / "adapter_model.safetensors").write_bytes(b"x")
    real_rmtree = shutil.rmtree

    def failing_rmtree(path, ignore_errors=False, **kwargs):  # a file the process may not remove
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    reg.store.remove(blob)  # the blob is gone from the store; its bytes wait in tmp/
    assert not reg.store.has(blob) and any((root / "tmp").iterdir())
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    reg.close()
    Registry(root).close()
    assert not any((root / "tmp").iterdir())


def test_opening_sweeps_what_is_not_a_blob(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry(root).close()
    stray_file = root / "blobs" / "lora" / "stray"  # a file where a shard folder belongs
    stray_file.write_bytes(b"?")
    orphan = root / "blobs" / "bitdelta" / "ab" / ("ab" * 32)  # a blob no row references
    orphan.parent.mkdir()
    orphan.write_bytes(b"?")
    Registry(root).close()
    assert not stray_file.exists() and not orphan.exists() and not orphan.parent.exists()


def test_a_catalog_of_a_newer_schema_is_refused_and_the_folder_released(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "reg"
    Registry(root).close()
    db = sqlite3.connect(root / "catalog.sqlite3")
    db.execute("PRAGMA user_version=99")
    db.close()
    for _ in range(2):  # the lock and the file descriptors went with the refusal: a second try gets the same answer
        with pytest.raises(RuntimeError, match="schema version 99; this deltaserve reads 5"):
            Registry(root)
