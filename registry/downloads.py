"""Giving a stored version back as it was uploaded: its files, streamed as one tar archive.

A LoRA gives back its directory's two files, a 1-bit delta its one file (as DELTA_FILE_NAME: the registry keeps
a delta's bytes, not the name it was uploaded under), a full fine-tune its original config.json and safetensors
files, decoded from the lossless containers of its source blob (registry.source_files) against the served base.
Every file is opened before the first byte is sent, so deleting or replacing the version meanwhile cannot cut a
download short (the open files stay readable). Nothing is ever held whole in memory: a tar member is a header,
then the file's chunks as they are read or decoded.

The archive is a POSIX (pax) tar of plain files with no directories; each member's pax header
`DELTASERVE.sha256` carries the file's sha256, so a client checks every file as it writes it
(`deltaserve adapters pull` does). A fine-tune's file is decoded and checked as it streams: a stored file that
does not decode to its recorded sha256 ends the stream before its last chunk (the response is then short of its
Content-Length), never with wrong bytes delivered whole. No torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from registry import fmdelta
from registry.upload_formats import LORA_CONFIG, LORA_WEIGHTS

SHA256_PAX_KEY = "DELTASERVE.sha256"
DELTA_FILE_NAME = "bitdelta.safetensors"
_READ = 1 << 20
_BLOCK = tarfile.BLOCKSIZE


@dataclass
class StoredFile:
    """One file of a download: its name, size and sha256, and its bytes (an iterator over a file opened already;
    close() releases it if the download never reads it)."""

    name: str
    size: int
    sha256: str
    chunks: Iterator[bytes]
    close: Callable[[], None]


def _plain(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(_READ):
            yield chunk


def _sha256(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_READ):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def plain_file(name: str, path: Path) -> StoredFile:
    """A stored file given back as it is (hashed now, read again as it streams)."""
    f = open(path, "rb")  # noqa: SIM115  (closed by the iterator, or by close())
    try:
        digest, size = _sha256(f), Path(path).stat().st_size
    except BaseException:
        f.close()
        raise
    return StoredFile(name, size, digest, _plain(f), f.close)


def decoded_file(name: str, size: int, sha256: str, container: Path, base: fmdelta.BaseTensors,
                 base_fingerprint: str) -> StoredFile:  # fmt: skip
    """A fine-tune's file decoded from its container against the base as it streams (fmdelta.decode checks its
    size and sha256 before the last chunk); the container is opened now."""
    f = open(container, "rb")  # noqa: SIM115  (closed by the iterator, or by close())

    def chunks() -> Iterator[bytes]:
        with f:
            yield from fmdelta.decode(f, base, base_fingerprint=base_fingerprint)

    return StoredFile(name, size, sha256, chunks(), f.close)


def finetune_files(source: Path, base: fmdelta.BaseTensors, base_fingerprint: str) -> list[StoredFile]:
    """A fine-tune's uploaded files from its source blob (registry.source_files). FMDeltaError when the blob is
    unreadable or was stored against another base than `base_fingerprint` (nothing is sent then)."""
    from registry.source_files import CONTAINER_SUFFIX, read_manifest  # torch (the base's checkpoint): not at import

    stored_base, files = read_manifest(source)
    if stored_base != base_fingerprint:
        raise fmdelta.FMDeltaError(f"the fine-tune was stored against base {stored_base}, and this server serves "
                                   f"{base_fingerprint}: serve that base to download it")  # fmt: skip
    return _all_or_none([
        lambda sf=sf: decoded_file(sf.name, sf.size, sf.sha256, source / (sf.name + CONTAINER_SUFFIX), base,
                                   base_fingerprint)
        for sf in files
    ])  # fmt: skip


def peft_files(blob: Path) -> list[StoredFile]:
    return _all_or_none([lambda: plain_file(LORA_CONFIG, blob / LORA_CONFIG),
                         lambda: plain_file(LORA_WEIGHTS, blob / LORA_WEIGHTS)])  # fmt: skip


def bitdelta_files(blob: Path) -> list[StoredFile]:
    return [plain_file(DELTA_FILE_NAME, blob)]


def _all_or_none(openers: list[Callable[[], StoredFile]]) -> list[StoredFile]:
    """Opens every file, or none: those already open are closed when one fails."""
    out: list[StoredFile] = []
    try:
        for op in openers:
            out.append(op())
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(files: list[StoredFile]) -> None:
    for sf in files:
        with contextlib.suppress(Exception):
            sf.close()


def _header(sf: StoredFile, mtime: int) -> bytes:
    info = tarfile.TarInfo(sf.name)
    info.size, info.mode, info.mtime, info.type = sf.size, 0o644, mtime, tarfile.REGTYPE
    info.pax_headers = {SHA256_PAX_KEY: sf.sha256}
    return info.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> int:
    return -size % _BLOCK


@dataclass
class TarStream:
    """A tar archive of `files`, its exact size known before the first byte (the response's Content-Length)."""

    files: list[StoredFile]
    mtime: int
    on_close: Callable[[], None] = lambda: None  # called once, when the stream is closed or has ended

    def __post_init__(self) -> None:
        self._closed = False
        self._headers = [_header(sf, self.mtime) for sf in self.files]
        self.size = sum(len(h) + sf.size + _padding(sf.size) for h, sf in zip(self._headers, self.files)) + 2 * _BLOCK

    def __iter__(self) -> Iterator[bytes]:
        try:
            for header, sf in zip(self._headers, self.files):
                yield header
                sent = 0
                for chunk in sf.chunks:
                    sent += len(chunk)
                    if sent > sf.size:
                        raise fmdelta.FMDeltaError(f"{sf.name} is longer than its recorded {sf.size} bytes")
                    yield chunk
                if sent != sf.size:
                    raise fmdelta.FMDeltaError(f"{sf.name} gave {sent} of its recorded {sf.size} bytes")
                yield b"\0" * _padding(sf.size)
            yield b"\0" * (2 * _BLOCK)
        finally:
            self.close()

    def close(self) -> None:
        """Releases every file (idempotent): the stream's end, or a download given up."""
        if self._closed:
            return
        self._closed = True
        close_all(self.files)
        self.on_close()
