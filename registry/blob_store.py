"""The content-addressed blob store of a registry: the stored deltas' data, one blob per distinct content.

Layout of `root` (the registry's blobs/):
    <kind>/<h2>/<sha256>   <kind> is "lora" or "ia3" (a PEFT directory holding adapter_config.json and
                           adapter_model.safetensors), "bitdelta" (one file) or "source" (a fine-tune's uploaded
                           files stored losslessly: a directory of registry.source_files containers and their
                           manifest.json); <sha256> is the delta's identity (registry.deltas: `Delta.sha256`), or
                           for "source" the manifest's sha256; <h2> its first two hex digits. Blob files are
                           read-only (0400).

A blob enters by a rename from staging (same filesystem) and leaves by a rename into the graveyard folder
(the registry's tmp/) before it is deleted, so a half-written or half-deleted blob is never under `root`, where
an identical upload would reuse it. Which blobs are still referenced is the catalog's business, not this one's.
No torch at import time.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from registry.errors import InsufficientStorage, is_disk_full
from registry.fsync import fsync_dir
from registry.upload_formats import LORA_CONFIG, LORA_WEIGHTS, PEFT_FORMATS
from registry.uploads import Staging

KINDS = ("lora", "ia3", "bitdelta", "source")
_BLOB_RE = re.compile(r"(lora|ia3|bitdelta|source)/([0-9a-f]{2})/([0-9a-f]{64})")


def content_sha256(kind: str, path: str | os.PathLike[str]) -> str:
    """The identity of stored delta data, computed from disk exactly as registry.deltas defines it:
    "bitdelta": sha256 of the file's bytes; "lora" and "ia3" (a PEFT directory): sha256 of
    u64le(len(adapter_config.json)) + adapter_config.json + adapter_model.safetensors; "source" (a directory):
    sha256 of its manifest.json."""
    from registry.peft_dir import adapter_sha256  # torch: not for the API process's imports
    from registry.safetensors_io import sha256_file

    path = Path(path)
    if kind == "bitdelta":
        return sha256_file(path)
    if kind == "source":
        from registry.source_files import source_sha256

        return source_sha256(path)
    if kind in PEFT_FORMATS:
        return adapter_sha256((path / LORA_CONFIG).read_bytes(), path / LORA_WEIGHTS)
    raise ValueError(f"unknown delta kind {kind!r}")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def blob_path(root: Path, blob: str) -> Path:
    """Where blob `blob` (as the catalog names it: "<kind>/<h2>/<sha256>") is under the blobs folder `root`;
    ValueError for a malformed name, so that no name reaches outside `root`. Readers without the catalog (a
    cluster's engine replicas) find blobs through this too."""
    if not _BLOB_RE.fullmatch(blob):
        raise ValueError(f"malformed blob path {blob!r}")
    return root / blob


def open_store(root: Path, graveyard: Path, url: str | None = None) -> BlobStore:
    """The registry's blob store: the folder `root` itself (url None: a local or shared filesystem), or an
    S3-compatible bucket (url "s3://bucket/prefix", registry.s3_store) cached in `root`."""
    if url is None:
        return BlobStore(root, graveyard)
    from registry.s3_store import S3BlobStore

    return S3BlobStore(url, root, graveyard)


def blob_reader(root: Path, url: str | None = None) -> Callable[[str], Path]:
    """For readers without the catalog (a cluster's engine replicas): blob name -> a local path of its data. With
    a bucket, blobs are fetched into `root` (this machine's cache) through a private folder beside it
    (<registry>/incoming/, on the same filesystem; removed when the process exits)."""
    if url is None:
        return lambda blob: blob_path(root, blob)
    import atexit

    incoming = root.parent / "incoming" / f"{os.getpid()}-{secrets.token_hex(4)}"
    incoming.mkdir(mode=0o700, parents=True)
    atexit.register(shutil.rmtree, incoming, True)
    return open_store(root, incoming, url).path


class BlobStore:
    """root: the blobs folder (created, mode 0700). graveyard: a folder on the same filesystem where blobs
    are renamed to before they are deleted."""

    def __init__(self, root: Path, graveyard: Path):
        self.root = root
        self.graveyard = graveyard
        for folder in [root] + [root / kind for kind in KINDS]:
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)  # mkdir's mode does not apply to an existing folder

    @staticmethod
    def prepare(staging: Staging, kind: str, sha256: str) -> tuple[Path, int]:
        """Flushes the staged data to disk, makes its files read-only and checks that its content is `sha256`.
        Returns (payload path, size in bytes). Reads all the data: call it without the catalog's lock."""
        payload = staging.payload(kind)
        staging.fsync()
        for f in [payload] if payload.is_file() else list(payload.iterdir()):
            os.chmod(f, 0o400)
        actual = content_sha256(kind, payload)
        if actual != sha256:
            raise ValueError(f"the staged data has sha256 {actual}, not the delta's {sha256}: was it changed?")
        return payload, _size(payload)

    @staticmethod
    def prepare_dir(path: Path, kind: str) -> tuple[Path, int, str]:
        """Flushes a directory written for the store (a "source" blob) to disk and makes its files read-only.
        Returns (path, size in bytes, content sha256). Reads all the data: call it without the catalog's lock."""
        for f in sorted(path.iterdir()):
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(f, 0o400)
        fsync_dir(path)
        return path, _size(path), content_sha256(kind, path)

    @staticmethod
    def holds_blobs(root: Path) -> bool:
        """Whether the blobs folder `root` holds any blob (its empty kind and shard folders do not count)."""
        return any(blob.exists() for kind in KINDS for blob in (root / kind).glob("??/*"))

    def claim(self, catalog_id: str) -> None:
        """Binds the store to its catalog where the store can say so (a bucket: registry.s3_store); the folder's
        binding is the registry's catalog_id file."""

    def upload(self, payload: Path, kind: str, sha256: str) -> None:
        """Sends a prepared payload ahead of `place`, before the catalog's lock: a local store has nothing to send."""

    def present(self, blobs: set[str]) -> set[str]:
        """Which of these blob names are in the store (one look at the store for all of them)."""
        return {b for b in blobs if self.has(b)}

    def place(self, payload: Path, kind: str, sha256: str) -> str:
        """Moves a prepared payload into the store, or keeps the identical blob already there (dedup).
        Returns the blob's name (its path relative to `root`)."""
        blob = f"{kind}/{sha256[:2]}/{sha256}"
        dest = self.root / blob
        if os.path.lexists(dest):
            return blob
        shard = dest.parent
        try:
            if not shard.is_dir():
                shard.mkdir(mode=0o700)
                fsync_dir(shard.parent)
            os.rename(payload, dest)
            fsync_dir(shard)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.lexists(dest):
                return blob  # placed meanwhile by another process of this machine (the same content)
            if is_disk_full(e):
                raise InsufficientStorage("the registry's disk is full; the upload was not stored") from None
            raise
        return blob

    def path(self, blob: str) -> Path:
        """Where a blob is (ValueError for a malformed name: the catalog never stores one)."""
        return blob_path(self.root, blob)

    def has(self, blob: str) -> bool:
        """Whether `blob` is a well-formed name whose data is in the store."""
        return _BLOB_RE.fullmatch(blob) is not None and os.path.lexists(self.root / blob)

    def remove(self, blob: str) -> None:
        """Removes a blob (nothing if it is not there)."""
        path = self.path(blob)
        if os.path.lexists(path):
            self._remove_path(path)

    def sweep(self, referenced: set[str]) -> None:
        """Removes every blob not in `referenced`, and anything under `root` that is not a blob (after a crash)."""
        for kind in KINDS:
            for shard in sorted((self.root / kind).iterdir()):
                entries = sorted(shard.iterdir()) if shard.is_dir() and not shard.is_symlink() else []
                for entry in entries:
                    if f"{kind}/{shard.name}/{entry.name}" not in referenced:
                        self._remove_path(entry)
                if not shard.is_dir() or shard.is_symlink():
                    self._remove_path(shard)
                elif not any(shard.iterdir()):
                    shard.rmdir()

    def _remove_path(self, path: Path) -> None:
        grave = self.graveyard / f"gc-{secrets.token_hex(8)}"  # a rename, no new folder: works on a full disk too
        os.rename(path, grave)
        fsync_dir(path.parent)
        if grave.is_dir() and not grave.is_symlink():
            shutil.rmtree(grave, ignore_errors=True)
        else:
            grave.unlink(missing_ok=True)
