"""Blobs in an S3-compatible store (registry.s3_store), shared by machines that each cache what they read: here two
registry folders (two machines' caches) on one PostgreSQL catalog and one bucket of moto's S3 server."""

from __future__ import annotations

import json

import pytest

import registry.s3_store as s3_store
from registry.blob_store import blob_reader, content_sha256
from registry.catalog import MISSING_BLOB, Registry
from registry.s3_store import S3BlobStore, parse_s3_url
from tests.registry.test_catalog import commit


@pytest.fixture
def shared(tmp_path, postgres, s3):
    return postgres.new_database(), s3.new_bucket()


def _objects(s3, url: str) -> list[str]:
    bucket, prefix = parse_s3_url(url)
    return sorted(o["Key"][len(prefix):] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def test_a_blob_stored_on_one_machine_is_read_on_another_and_a_delete_reaches_both(tmp_path, shared, s3, assets):
    catalog, bucket = shared
    with Registry(tmp_path / "m1", catalog=catalog, blob_store=bucket) as m1:
        m1.create_tenant("acme")
        lora = commit(m1, "acme", "support", "lora", assets.lora, assets)
        bd = commit(m1, "acme", "bd", "bitdelta", assets.bd1, assets)
        assert f"{lora.blob}.manifest" in _objects(s3, bucket) and bd.blob in _objects(s3, bucket)
        with Registry(tmp_path / "m2", catalog=catalog, blob_store=bucket) as m2:
            assert not (tmp_path / "m2" / "blobs" / lora.blob).exists()  # not cached there yet
            for record in (m2.resolve("acme", "support"), m2.resolve("acme", "bd")):
                path = m2.blob_path(record)  # fetched from the bucket into m2's cache, once
                assert path.is_relative_to(tmp_path / "m2" / "blobs")
                assert content_sha256(record.kind, path) == record.sha256
            # an engine replica on m2 reads through the same cache, without the catalog
            assert blob_reader(tmp_path / "m2" / "blobs", bucket)(bd.blob) == m2.blob_path(bd)
            m1.delete_adapter("acme", "bd")
            assert bd.blob not in _objects(s3, bucket) and not m1.store.has(bd.blob)
            assert not (tmp_path / "m1" / "blobs" / bd.blob).exists()
        assert (tmp_path / "m2" / "blobs" / bd.blob).exists()  # m2's copy waits for its next opening
        with Registry(tmp_path / "m2", catalog=catalog, blob_store=bucket):
            assert not (tmp_path / "m2" / "blobs" / bd.blob).exists()  # swept: no row references it
            assert (tmp_path / "m2" / "blobs" / lora.blob).exists()


def test_an_opening_registry_fails_the_versions_whose_blob_left_the_bucket(tmp_path, shared, s3, assets):
    catalog, bucket = shared
    root = tmp_path / "reg"
    with Registry(root, catalog=catalog, blob_store=bucket) as reg:
        reg.create_tenant("acme")
        gone = commit(reg, "acme", "gone", "bitdelta", assets.bd1, assets)
        kept = commit(reg, "acme", "kept", "lora", assets.lora, assets)
    b, prefix = parse_s3_url(bucket)
    s3.client().delete_object(Bucket=b, Key=prefix + gone.blob + ".manifest")
    with Registry(root, catalog=catalog, blob_store=bucket) as reg:
        record = reg.get_adapter("acme", "gone")
        assert (record.status, record.error, record.blob) == ("failed", MISSING_BLOB, None)  # type: ignore[union-attr]
        assert reg.resolve("acme", "kept") == kept


def test_the_sweep_spares_a_young_unreferenced_blob_and_removes_an_old_one(tmp_path, shared, s3, assets, monkeypatch):
    """A blob sent ahead of its commit is unreferenced for a moment: an opening registry elsewhere must not take it."""
    catalog, bucket = shared
    root = tmp_path / "reg"
    with Registry(root, catalog=catalog, blob_store=bucket) as reg:
        payload = tmp_path / "payload.safetensors"
        payload.write_bytes(assets.bd1.read_bytes())
        sha = content_sha256("bitdelta", payload)
        reg.store.upload(payload, "bitdelta", sha)  # sent, its commit not yet made
    blob = f"bitdelta/{sha[:2]}/{sha}"
    Registry(root, catalog=catalog, blob_store=bucket).close()
    assert blob + ".manifest" in _objects(s3, bucket)
    monkeypatch.setattr(s3_store, "SWEEP_GRACE_SECONDS", -60)  # as if an hour had passed without its commit
    Registry(root, catalog=catalog, blob_store=bucket).close()
    assert _objects(s3, bucket) == ["catalog_id"]


def test_a_blob_deleted_between_its_upload_and_its_commit_is_sent_again(tmp_path, shared, s3, assets, monkeypatch):
    catalog, bucket = shared
    with Registry(tmp_path / "reg", catalog=catalog, blob_store=bucket) as reg:
        reg.create_tenant("acme")
        real_upload = S3BlobStore.upload
        calls = []

        def upload_then_lose_it(store, payload, kind, sha256):  # another machine's delete of the same content
            real_upload(store, payload, kind, sha256)
            calls.append(kind)
            if len(calls) == 1:  # the upload ahead of the lock; what place() then sends again stays
                store.remove(f"{kind}/{sha256[:2]}/{sha256}")

        monkeypatch.setattr(S3BlobStore, "upload", upload_then_lose_it)
        record = commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)
        monkeypatch.undo()
        assert calls == ["bitdelta", "bitdelta"]
        assert reg.store.has(record.blob) and record.blob in _objects(s3, bucket)


def test_a_manifest_naming_a_file_outside_its_blob_is_refused(tmp_path, shared, s3):
    _, bucket = shared
    b, prefix = parse_s3_url(bucket)
    blob = "lora/ab/" + "ab" * 32
    s3.client().put_object(Bucket=b, Key=prefix + blob + ".manifest", Body=json.dumps({"files": ["../../x"], "size": 1}))
    store = S3BlobStore(bucket, tmp_path / "cache", tmp_path / "grave")
    (tmp_path / "grave").mkdir()
    with pytest.raises(ValueError, match="malformed member"):
        store.path(blob)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("url", ["s3://", "s3://UPPER/x", "http://bucket/x", "s3://bucket/../x", "s3://b"])
def test_bad_bucket_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_s3_url(url)


def test_a_blob_missing_a_file_behind_its_manifest_is_sent_whole_again(tmp_path, shared, s3, assets):
    """A removal under the lock can take files an upload ahead of it had just written (the same content, sent by
    another machine): the commit's check under the lock finds the hole and sends the blob again."""
    catalog, bucket = shared
    with Registry(tmp_path / "reg", catalog=catalog, blob_store=bucket) as reg:
        reg.create_tenant("acme")
        first = commit(reg, "acme", "x", "lora", assets.lora, assets)
        b, prefix = parse_s3_url(bucket)
        s3.client().delete_object(Bucket=b, Key=prefix + first.blob + "/adapter_model.safetensors")
        again = commit(reg, "acme", "z", "lora", assets.lora, assets)
        assert again.blob == first.blob and reg.store._complete(again.blob)
    with Registry(tmp_path / "other", catalog=catalog, blob_store=bucket) as other:
        assert content_sha256("lora", other.blob_path(again)) == again.sha256


def test_a_registry_opens_only_with_its_own_blob_store(tmp_path, postgres, s3, assets):
    """The catalog names its blob store and the bucket its catalog: opened with another, a registry would take every
    stored blob for lost, then for garbage; it refuses to open instead, and nothing is touched."""
    from registry.database import CatalogError

    catalog, bucket = postgres.new_database(), s3.new_bucket()
    with Registry(tmp_path / "m1", catalog=catalog, blob_store=bucket) as reg:
        reg.create_tenant("acme")
        stored = commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)
    with pytest.raises(CatalogError, match="keeps its blobs in s3://"):
        Registry(tmp_path / "m2", catalog=catalog)  # no --blob-store
    with pytest.raises(CatalogError, match="keeps its blobs in s3://"):
        Registry(tmp_path / "m2", catalog=catalog, blob_store=s3.new_bucket())
    fresh = postgres.new_database()
    with pytest.raises(CatalogError, match="belongs to another catalog"):
        Registry(tmp_path / "m3", catalog=fresh, blob_store=bucket)  # a new catalog, the old bucket
    Registry(tmp_path / "m3", catalog=fresh, blob_store=s3.new_bucket()).close()  # the refusal recorded nothing
    b, prefix = parse_s3_url(bucket)
    s3.client().delete_object(Bucket=b, Key=prefix + "catalog_id")
    with pytest.raises(CatalogError, match="holds blobs of a catalog it does not name"):
        Registry(tmp_path / "m4", catalog=postgres.new_database(), blob_store=bucket)
    assert stored.blob + ".manifest" in _objects(s3, bucket)  # nothing swept by the refused openings
    folder_catalog = postgres.new_database()
    with Registry(tmp_path / "shared", catalog=folder_catalog) as reg:  # blobs in its (shared) folder
        reg.create_tenant("acme")
        commit(reg, "acme", "x", "bitdelta", assets.bd1, assets)
    with pytest.raises(CatalogError, match="registry folder \\(no --blob-store\\)"):
        Registry(tmp_path / "shared", catalog=folder_catalog, blob_store=s3.new_bucket())
    with pytest.raises(CatalogError, match="mount the registry's shared folder here"):
        Registry(tmp_path / "unmounted", catalog=folder_catalog)  # a node without the shared mount
    with Registry(tmp_path / "shared", catalog=folder_catalog) as reg:
        assert reg.resolve("acme", "x").status == "ready"  # type: ignore[union-attr]


def test_a_damaged_object_is_never_cached_nor_served(tmp_path, shared, s3, assets):
    catalog, bucket = shared
    with Registry(tmp_path / "m1", catalog=catalog, blob_store=bucket) as m1:
        m1.create_tenant("acme")
        record = commit(m1, "acme", "x", "bitdelta", assets.bd1, assets)
    b, prefix = parse_s3_url(bucket)
    s3.client().put_object(Bucket=b, Key=prefix + record.blob, Body=b"not the delta")
    with Registry(tmp_path / "m2", catalog=catalog, blob_store=bucket) as m2:
        with pytest.raises(ValueError, match="does not hold what its name says"):
            m2.blob_path(record)
        assert not (tmp_path / "m2" / "blobs" / record.blob).exists()
