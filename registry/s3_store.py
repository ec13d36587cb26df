"""Blobs in an S3-compatible bucket, shared by every machine of a registry; each machine keeps the blobs it read in
a cache (its registry folder's blobs/, the same layout as registry.blob_store), from which deltas are loaded.

Objects, under the URL's prefix (s3://BUCKET/PREFIX):
    <blob>              a file blob ("bitdelta")
    <blob>/<file>       a directory blob's files ("lora", "ia3": the PEFT directory; "source": a fine-tune's upload)
    <blob>.manifest     written LAST, once every file is there: {"files": [names] or null for a file blob,
                        "size": bytes}. A blob is in the store when its manifest is.
<blob> is the catalog's name ("<kind>/<h2>/<sha256>"): content-addressed, so an object is never rewritten with
other bytes, a cached copy is never stale, and an upload cut short is finished or redone by the next identical one.

The catalog serialises placing and removing blobs (registry.catalog's store lock); sending a blob's bytes happens
before that lock (`upload`), so a big upload does not hold up other tenants' commits. A blob sent but not yet
referenced (its commit is on its way) looks like garbage to an opening registry's sweep: the sweep leaves blobs
younger than SWEEP_GRACE_SECONDS alone, and `place`, under the lock, sends a blob again if a delete took it
meanwhile.

Where the endpoint and credentials come from: boto3's usual chain (AWS_ENDPOINT_URL for a non-AWS store such as
MinIO or Ceph, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role, AWS_REGION). Nothing here logs them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from registry.blob_store import _BLOB_RE, BlobStore, _size, blob_path, content_sha256
from registry.database import CatalogError

SWEEP_GRACE_SECONDS = 3600
_URL_RE = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?")


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix ending in "/" or empty) of "s3://bucket/prefix"; ValueError otherwise."""
    m = _URL_RE.fullmatch(url)
    if m is None:
        raise ValueError(f"{url!r} is not an s3://BUCKET[/PREFIX] URL")
    prefix = (m.group(2) or "").strip("/")
    if ".." in prefix.split("/"):
        raise ValueError(f"{url!r}: '..' in the prefix")
    return m.group(1), prefix + "/" if prefix else ""


class S3BlobStore(BlobStore):
    """url: "s3://bucket/prefix". cache: this machine's blobs folder. graveyard: a private folder on the cache's
    filesystem (downloads and removals pass through it). client: a boto3 S3 client (default: boto3's own)."""

    def __init__(self, url: str, cache: Path, graveyard: Path, client: Any = None):
        super().__init__(cache, graveyard)
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client

    # --- names -------------------------------------------------------------------------------------------

    def _key(self, blob: str, member: str | None = None) -> str:
        if not _BLOB_RE.fullmatch(blob):
            raise ValueError(f"malformed blob path {blob!r}")
        return self.prefix + blob + ("" if member is None else "/" + member)

    def _read(self, key: str) -> bytes | None:
        """An object's bytes, None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def _manifest(self, blob: str) -> dict[str, Any] | None:
        body = self._read(self._key(blob) + ".manifest")
        return None if body is None else json.loads(body)

    # --- the BlobStore interface -------------------------------------------------------------------------

    def claim(self, catalog_id: str) -> None:
        """The bucket's prefix names its catalog (object "catalog_id"): a bucket of another catalog, or one with
        blobs and no name, is refused (an opening registry would sweep its blobs as garbage)."""
        key = self.prefix + "catalog_id"
        body = self._read(key)
        owner = None if body is None else body.decode().strip()
        if owner is None:
            if next(iter(self._manifests()), None) is not None:
                raise CatalogError(f"{self.url} holds blobs of a catalog it does not name; give another prefix")
            self.client.put_object(Bucket=self.bucket, Key=key, Body=(catalog_id + "\n").encode())
        elif owner != catalog_id:
            raise CatalogError(f"{self.url} belongs to another catalog ({owner}); give the --catalog it was used with")

    def upload(self, payload: Path, kind: str, sha256: str) -> None:
        """Sends a prepared payload's bytes to the bucket (nothing if the blob is there already). Called before
        the catalog's lock; idempotent."""
        blob = f"{kind}/{sha256[:2]}/{sha256}"
        if self._manifest(blob) is not None:
            return
        files = None if payload.is_file() else sorted(p.name for p in payload.iterdir())
        if files is None:
            self.client.upload_file(str(payload), self.bucket, self._key(blob))
        else:
            for name in files:
                self.client.upload_file(str(payload / name), self.bucket, self._key(blob, name))
        manifest = json.dumps({"files": files, "size": _size(payload)}).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._key(blob) + ".manifest", Body=manifest)

    def place(self, payload: Path, kind: str, sha256: str) -> str:
        """Makes sure the blob is in the bucket (sent again if a delete took it since `upload`) and keeps the
        payload as this machine's cached copy. Under the catalog's store lock."""
        blob = f"{kind}/{sha256[:2]}/{sha256}"
        if not self._complete(blob):
            # Gone meanwhile, or a removal under the lock took files of it while an upload ahead wrote it: sent
            # whole again, its manifest last.
            self.client.delete_object(Bucket=self.bucket, Key=self._key(blob) + ".manifest")
            self.upload(payload, kind, sha256)
        if payload.exists():
            super().place(payload, kind, sha256)
        return blob

    def _complete(self, blob: str) -> bool:
        """Whether the blob's manifest and every file it names are in the bucket."""
        manifest = self._manifest(blob)
        if manifest is None:
            return False
        key = self._key(blob)
        if manifest["files"] is None:
            listed = {o["Key"] for o in self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=2)
                      .get("Contents", [])}  # fmt: skip
            return key in listed
        listed = {o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=key + "/") for o in page.get("Contents", [])}  # fmt: skip
        return all(self._key(blob, name) in listed for name in manifest["files"])

    def has(self, blob: str) -> bool:
        return _BLOB_RE.fullmatch(blob) is not None and self._manifest(blob) is not None

    def present(self, blobs: set[str]) -> set[str]:
        """One listing of the bucket's manifests instead of a request per blob (an opening registry checks all)."""
        return blobs & {name for name, _ in self._manifests()}

    def _manifests(self):
        """(blob name, last modified unix seconds) of every blob in the bucket under the prefix."""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                if name.endswith(".manifest") and _BLOB_RE.fullmatch(name.removesuffix(".manifest")):
                    yield name.removesuffix(".manifest"), obj["LastModified"].timestamp()

    def path(self, blob: str) -> Path:
        """This machine's copy of the blob, read from the bucket the first time. A blob not in the bucket: the
        path it would have, which does not exist (as the filesystem store answers)."""
        local = blob_path(self.root, blob)
        if os.path.lexists(local):
            return local
        manifest = self._manifest(blob)
        if manifest is None:
            return local
        fetched = self.graveyard / f"fetch-{secrets.token_hex(8)}"
        kind, _, sha256 = blob.split("/")
        if manifest["files"] is None:
            self.client.download_file(self.bucket, self._key(blob), str(fetched))
            os.chmod(fetched, 0o400)
        else:
            fetched.mkdir(mode=0o700)
            for name in manifest["files"]:
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"blob {blob}: malformed member {name!r} in its manifest")
                self.client.download_file(self.bucket, self._key(blob, name), str(fetched / name))
                os.chmod(fetched / name, 0o400)
        try:
            if content_sha256(kind, fetched) != sha256:  # a damaged or altered object is never cached, nor served
                raise ValueError(f"blob {blob} in {self.url} does not hold what its name says")
            local.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(fetched, local)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.lexists(local):
                raise
            # another process on this machine cached it meanwhile: the same bytes
        finally:
            if os.path.lexists(fetched):
                shutil.rmtree(fetched, ignore_errors=True) if fetched.is_dir() else fetched.unlink(missing_ok=True)
        return local

    def remove(self, blob: str) -> None:
        """Removes a blob from the bucket (its manifest first: from then on it is not there) and this machine's
        cached copy. Other machines' copies go with their next sweep (the catalog references them no more)."""
        key = self._key(blob)
        self.client.delete_object(Bucket=self.bucket, Key=key + ".manifest")
        self.client.delete_object(Bucket=self.bucket, Key=key)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key + "/"):
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
        super().remove(blob)

    def sweep(self, referenced: set[str]) -> None:
        """Removes the bucket's blobs no row references, once older than SWEEP_GRACE_SECONDS (a younger one may be
        on its way to being committed), and this machine's cached copies of unreferenced blobs."""
        cutoff = time.time() - SWEEP_GRACE_SECONDS
        for blob, modified in list(self._manifests()):
            if blob not in referenced and modified < cutoff:
                self.remove(blob)
        super().sweep(referenced)
