"""A fine-tune's upload kept losslessly beside its 1-bit delta (schema 3): stored, counted, shared, collected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from registry.catalog import Registry
from registry.checkpoint import Checkpoint
from registry.errors import InsufficientStorage
from registry.loading import load_delta
from registry.source_files import encode_upload, read_manifest
from tests.registry.assets import Assets
from tests.registry.legacy import assert_current, make_pre_alembic


def pending_parts(reg: Registry, assets: Assets, delta_file: Path):
    """What a background compression hands complete_pending: a staging with the 1-bit delta, and the upload
    (here the base's own files, as a fine-tune that changed nothing) encoded in a scratch directory."""
    st = reg.stage()
    shutil.copy(delta_file, st.path / "delta.safetensors")
    source = reg.scratch_dir()
    names = sorted(p.name for p in assets.model.iterdir() if p.suffix in (".json", ".safetensors"))
    encode_upload(assets.model, names, Checkpoint(assets.model), source, base_fingerprint=assets.spec.fingerprint)
    return st, load_delta(st.path / "delta.safetensors", assets.spec), source, names


def source_blobs(reg: Registry) -> list[Path]:
    return sorted(p for p in (reg.root / "blobs" / "source").glob("*/*"))


def test_a_finetunes_upload_is_kept_counted_shared_and_collected(reg: Registry, assets: Assets) -> None:
    reg.create_tenant("acme")
    v1 = reg.create_pending("acme", "ft", "finetune")
    st, delta, source, names = pending_parts(reg, assets, assets.bd1)
    done = reg.complete_pending(v1.id, st, delta, source=source)
    assert not source.exists()  # moved into the store
    stored = reg.source_path(done)
    assert stored is not None and source_blobs(reg) == [stored]
    assert [f.name for f in read_manifest(stored)[1]] == names
    assert done.source_bytes == sum(p.stat().st_size for p in stored.iterdir()) > 0
    assert reg.tenant_usage("acme") == done.size_bytes + done.source_bytes

    v2 = reg.create_pending("acme", "ft", "finetune")  # the same upload again: one stored copy for both
    st, delta, source, _ = pending_parts(reg, assets, assets.bd2)
    again = reg.complete_pending(v2.id, st, delta, source=source)
    assert again.source_blob == done.source_blob and not source.exists()
    reg.collect_versions("acme", "ft")  # v1 replaced: its stored upload stays, v2 uses it
    assert source_blobs(reg) == [stored]
    reg.delete_adapter("acme", "ft")
    assert source_blobs(reg) == [] and reg.tenant_usage("acme") == 0


def test_a_stored_upload_over_the_quota_fails_the_version_and_leaves_nothing(tmp_path: Path, assets: Assets) -> None:
    with Registry(tmp_path / "reg", tenant_quota_bytes=assets.bd1.stat().st_size + 100) as reg:
        reg.create_tenant("acme")
        pending = reg.create_pending("acme", "ft", "finetune")
        st, delta, source, _ = pending_parts(reg, assets, assets.bd1)
        with pytest.raises(InsufficientStorage, match="over its quota"):
            reg.complete_pending(pending.id, st, delta, source=source)
        assert not source.exists() and source_blobs(reg) == [] and reg.tenant_usage("acme") == 0
        assert reg.get_adapter("acme", "ft").status == "compressing"  # the caller fails it, with the message


def test_opening_forgets_a_lost_stored_upload_and_sweeps_a_stray_one(tmp_path: Path, assets: Assets) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.create_tenant("acme")
        pending = reg.create_pending("acme", "ft", "finetune")
        st, delta, source, _ = pending_parts(reg, assets, assets.bd1)
        stored = reg.source_path(reg.complete_pending(pending.id, st, delta, source=source))
    shutil.rmtree(stored)
    stray = root / "blobs" / "source" / "ab" / ("ab" + "0" * 62)
    stray.mkdir(parents=True)
    with Registry(root) as reg:
        record = reg.resolve("acme", "ft")
        assert record is not None and record.status == "ready"  # its 1-bit delta still serves
        assert (record.source_blob, record.source_bytes, reg.source_path(record)) == (None, None, None)
        assert not stray.exists()


def test_a_version_2_catalog_gains_the_stored_upload_columns(tmp_path: Path, assets: Assets) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.create_tenant("acme")
        pending = reg.create_pending("acme", "ft", "finetune")
    db = make_pre_alembic(root / "catalog.sqlite3")
    db.execute("DROP INDEX adapters_source_blob")
    db.execute("ALTER TABLE adapters DROP COLUMN source_blob")
    db.execute("ALTER TABLE adapters DROP COLUMN source_bytes")
    db.execute("ALTER TABLE adapters DROP COLUMN fidelity")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    with Registry(root) as reg:
        assert reg.get_adapter("acme", "ft").source_blob is None  # an interrupted compression, failed at opening
        pending = reg.create_pending("acme", "ft", "finetune")
        st, delta, source, _ = pending_parts(reg, assets, assets.bd1)
        assert reg.complete_pending(pending.id, st, delta, source=source).source_bytes > 0
    assert_current(root / "catalog.sqlite3")
