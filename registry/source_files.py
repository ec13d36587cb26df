"""A fine-tune's uploaded files, stored losslessly against the served base (registry.fmdelta's containers).

`encode_file` writes one uploaded file as a container: a safetensors file's float tensors that the base has with
the same name, dtype and shape are delta-coded against the base's, every other byte (headers, integer tensors,
tensors the base lacks, JSON files) is stored zstd-compressed as it is. `decode_file` streams the original bytes
back. The base is read through memory maps of its safetensors files, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry import fmdelta
from registry.checkpoint import Checkpoint
from registry.errors import InvalidName
from registry.safetensors_io import read_header
from registry.upload_formats import check_file_name

_WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}  # torch dtype names of the delta-coded floats


class CheckpointTensors:
    """fmdelta.BaseTensors over a base checkpoint: a tensor's bytes as a read-only memory map of its file."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def tensor_bytes(self, name: str) -> np.ndarray:
        info = self.checkpoint.info(name)  # KeyError for a tensor the base lacks
        if info.nbytes == 0:
            return np.zeros(0, np.uint8)
        return np.memmap(self.checkpoint.file_of(name), dtype=np.uint8, mode="r", offset=info.start,
                         shape=(info.nbytes,))  # fmt: skip


def _width(dtype: object) -> int:
    return _WIDTH.get(str(dtype).removeprefix("torch."), 0)


def regions(path: str | os.PathLike[str], base: Checkpoint) -> list[fmdelta.Region]:
    """The byte regions of a file for fmdelta.encode: a safetensors file's header raw, each tensor delta-coded
    when the base has it with the same dtype and shape and it is a float type, else raw. Any other file: raw."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return [fmdelta.Region(0, size)]
    tensors, _ = read_header(path)  # validated at upload: the tensors tile the data section
    out: list[fmdelta.Region] = []
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].start):
        if info.start > cursor:
            out.append(fmdelta.Region(cursor, info.start))
        width = _width(info.dtype)
        same = name in base and base.info(name).dtype == info.dtype and base.info(name).shape == info.shape
        if width and same and info.nbytes:
            out.append(fmdelta.Region(info.start, info.end, name, width))
        elif info.nbytes:
            out.append(fmdelta.Region(info.start, info.end))
        cursor = info.end
    if cursor < size:
        out.append(fmdelta.Region(cursor, size))
    return _merge_raw(out)


def _merge_raw(rs: list[fmdelta.Region]) -> list[fmdelta.Region]:
    """Adjacent raw regions as one (fewer, larger zstd frames)."""
    out: list[fmdelta.Region] = []
    for r in rs:
        if out and r.base is None and out[-1].base is None:
            out[-1] = fmdelta.Region(out[-1].start, r.end)
        else:
            out.append(r)
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def encode_file(path: str | os.PathLike[str], base: Checkpoint, out: str | os.PathLike[str], *,
                base_fingerprint: str, level: int = fmdelta.LEVEL) -> str:  # fmt: skip
    """Writes `path` as a container at `out`; returns the original file's sha256."""
    path = Path(path)
    digest = sha256_of(path)
    with open(path, "rb") as src, open(out, "wb") as dst:
        fmdelta.encode(src, regions(path, base), CheckpointTensors(base), dst, size=path.stat().st_size,
                       sha256=digest, base_fingerprint=base_fingerprint, level=level)  # fmt: skip
    return digest


def decode_file(container: str | os.PathLike[str], base: Checkpoint, *, base_fingerprint: str | None = None) -> Iterator[bytes]:
    """The original file's bytes, streamed (fmdelta.decode: checked against its size and sha256 at the end)."""
    with open(container, "rb") as f:
        yield from fmdelta.decode(f, CheckpointTensors(base), base_fingerprint=base_fingerprint)


# ---- a fine-tune's whole upload, stored as one source blob --------------------------------------------------
SOURCE_FORMAT = "deltaserve.source"
SOURCE_VERSION = 1
MANIFEST = "manifest.json"  # the blob's identity is the sha256 of this file's bytes (registry.blob_store)
CONTAINER_SUFFIX = ".fmd"
_MAX_MANIFEST = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    """One uploaded file of a stored fine-tune: its name as uploaded, its size and sha256."""

    name: str
    size: int
    sha256: str


def encode_upload(upload: str | os.PathLike[str], names: list[str], base: Checkpoint, out: str | os.PathLike[str], *,
                  base_fingerprint: str, progress: Callable[[float], None] | None = None) -> str:  # fmt: skip
    """Writes the files `names` of the upload directory `upload` into the directory `out` (made if missing,
    else empty): one container
    <name>.fmd each, and manifest.json listing them (name, size, sha256) with the base's fingerprint. Returns
    the manifest's sha256. progress(fraction of the upload's bytes done) after each file."""
    upload, out = Path(upload), Path(out)
    out.mkdir(mode=0o700, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    total = sum((upload / n).stat().st_size for n in names) or 1
    done, files = 0, []
    for name in sorted(names):
        digest = encode_file(upload / name, base, out / (name + CONTAINER_SUFFIX), base_fingerprint=base_fingerprint)
        size = (upload / name).stat().st_size
        files.append({"name": name, "size": size, "sha256": digest})
        done += size
        if progress is not None:
            progress(done / total)
    manifest = {"format": SOURCE_FORMAT, "version": SOURCE_VERSION, "base": base_fingerprint, "files": files}
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    (out / MANIFEST).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(source: str | os.PathLike[str]) -> tuple[str, list[SourceFile]]:
    """(the base fingerprint, the files) of a stored source blob. Raises FMDeltaError for a manifest that is
    malformed, names a file that is not a plain name, or whose container is missing."""
    source = Path(source)
    try:
        with open(source / MANIFEST, "rb") as f:
            data = json.loads(f.read(_MAX_MANIFEST + 1)[: _MAX_MANIFEST + 1])
        ok = (isinstance(data, dict) and data.get("format") == SOURCE_FORMAT
              and data.get("version") == SOURCE_VERSION and isinstance(data.get("base"), str)
              and isinstance(data.get("files"), list))  # fmt: skip
        files = [SourceFile(str(e["name"]), int(e["size"]), str(e["sha256"])) for e in data["files"]] if ok else []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fmdelta.FMDeltaError(f"the stored fine-tune's manifest is unreadable ({e})") from None
    if not ok:
        raise fmdelta.FMDeltaError(f"the stored fine-tune's manifest is not a {SOURCE_FORMAT} v{SOURCE_VERSION} one")
    for sf in files:
        if not _is_plain(sf.name) or not (source / (sf.name + CONTAINER_SUFFIX)).is_file():
            raise fmdelta.FMDeltaError(f"the stored fine-tune's manifest names {sf.name!r}, which it does not hold")
    return data["base"], files


def source_sha256(source: str | os.PathLike[str]) -> str:
    """The identity of a stored source blob: the sha256 of its manifest's bytes."""
    return sha256_of(Path(source) / MANIFEST)


def _is_plain(name: str) -> bool:
    try:
        check_file_name(name)
    except InvalidName:
        return False
    return True
