"""Lossless storage of a fine-tune's safetensors files as integer deltas against the base (FM-Delta's idea).

Most weights of a fine-tune differ from the base's in their low bits only. Each float tensor whose base has the
same name, dtype and shape is stored as: its bit patterns mapped to unsigned integers in the order of the floats
they encode, minus the base's (wrapping), zigzagged (small differences of either sign become small numbers), cut
into byte planes (the high planes of small numbers are nearly all zero), each plane compressed with zstd. Every
other byte of the file (the header, integer tensors, tensors the base lacks) is zstd-compressed as it is. So
decoding gives the original file byte for byte, given the same base, and both ways stream: a frame holds at most
CHUNK_BYTES of the file, and the base is read through memory maps, never as a whole.

Container (`deltaserve.fmdelta` v1), all integers little-endian:
    MAGIC (8 bytes), u32 n, n bytes of JSON {"format", "version", "size", "sha256", "base"} (the original file's
    size and sha256, the base's fingerprint), then frames, each starting with one byte:
    b"R" u64 size u64 clen, clen bytes       `size` bytes of the file, zstd-compressed
    b"D" u8 width u16 n, n bytes of the base tensor's name (UTF-8), u64 first u64 count, then `width` times
         u64 clen + clen bytes              elements [first, first + count) of that tensor: its byte planes,
                                             least significant first, each zstd-compressed
    b"E"                                     the end
The regions of a file are given by the caller (registry.source_files reads the safetensors header); this module
only knows byte ranges, element widths and base tensor names. No torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np
import zstandard

MAGIC = b"DSFMDLT1"
FORMAT = "deltaserve.fmdelta"
VERSION = 1
CHUNK_BYTES = 1 << 24  # of the original file per frame: bounds both sides' memory (a few times this)
LEVEL = 3  # zstd level: measured in bench/storage.py (higher levels buy little on the byte planes, and cost speed)
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {2: np.int16, 4: np.int32, 8: np.int64}
_MAX_HEADER = 1 << 16


class FMDeltaError(ValueError):
    """A stored file that does not decode (truncated, corrupted, or for another base)."""


@dataclass(frozen=True)
class Region:
    """Bytes [start, end) of the original file. base: the base tensor these bytes are the elements of (same dtype
    and shape), delta-coded against it; None: stored as they are. width: bytes per element (2, 4 or 8) when
    delta-coded."""

    start: int
    end: int
    base: str | None = None
    width: int = 0


class BaseTensors(Protocol):
    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of the base tensor `name` (uint8, e.g. a read-only np.memmap)."""
        ...


def _keys(bits: np.ndarray) -> np.ndarray:
    """Float bit patterns -> unsigned integers in the order of the floats (negative ones reversed)."""
    w = bits.dtype.itemsize * 8
    flip = np.negative(bits >> np.array(w - 1, bits.dtype))  # all ones if negative (wrapping), else 0
    flip |= np.array(1 << (w - 1), bits.dtype)  # ... else the sign bit
    flip ^= bits
    return flip


def _bits(keys: np.ndarray) -> np.ndarray:
    """The inverse of _keys."""
    w = keys.dtype.itemsize * 8
    flip = keys >> np.array(w - 1, keys.dtype)  # 1 for the keys of non-negative floats
    flip -= np.array(1, keys.dtype)  # ... then 0, else all ones (wrapping)
    flip |= np.array(1 << (w - 1), keys.dtype)
    flip ^= keys
    return flip


def _zigzag(d: np.ndarray) -> np.ndarray:
    """Wrapped unsigned differences -> unsigned integers, small for small differences of either sign."""
    w = d.dtype.itemsize * 8
    s = d.view(_INT[d.dtype.itemsize])
    z = s >> np.array(w - 1, s.dtype)  # arithmetic: all ones for negative differences
    z ^= s << np.array(1, s.dtype)
    return z.view(d.dtype)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    one = np.array(1, z.dtype)
    d = np.negative(z & one)  # all ones for odd codes (negative differences)
    d ^= z >> one
    return d


def encode_delta(ft: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The zigzagged integer differences of two arrays of float bit patterns (same unsigned dtype)."""
    d = _keys(ft)
    d -= _keys(base)  # wrapping
    return _zigzag(d)


def decode_delta(z: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The fine-tune's bit patterns from encode_delta's output and the base's."""
    k = _unzigzag(z)
    k += _keys(base)  # wrapping
    return _bits(k)


def encode(
    src: BinaryIO,
    regions: Sequence[Region],
    base: BaseTensors,
    out: BinaryIO,
    *,
    size: int,
    sha256: str,
    base_fingerprint: str,
    level: int = LEVEL,
) -> None:
    """Writes the container of one file to `out`. regions: the file's byte ranges in order, tiling [0, size)."""
    cursor = 0
    for r in regions:
        if r.start != cursor or r.end < r.start or (r.base is not None and (r.width not in _UINT or
                                                                           (r.end - r.start) % r.width)):  # fmt: skip
            raise ValueError(f"regions must tile the file in order with whole elements; got {r} at {cursor}")
        cursor = r.end
    if cursor != size:
        raise ValueError(f"regions cover {cursor} bytes of a {size}-byte file")
    header = json.dumps({"format": FORMAT, "version": VERSION, "size": size, "sha256": sha256,
                         "base": base_fingerprint}).encode()  # fmt: skip
    out.write(MAGIC + struct.pack("<I", len(header)) + header)
    cctx = zstandard.ZstdCompressor(level=level)
    for r in regions:
        if r.base is None:
            _encode_raw(src, r, cctx, out)
        else:
            _encode_tensor(src, r, base, cctx, out)
    out.write(b"E")


def _encode_raw(src: BinaryIO, r: Region, cctx: zstandard.ZstdCompressor, out: BinaryIO) -> None:
    src.seek(r.start)
    left = r.end - r.start
    while left:
        data = src.read(min(CHUNK_BYTES, left))
        if not data:
            raise ValueError("the file is shorter than its regions")
        left -= len(data)
        packed = cctx.compress(data)
        out.write(b"R" + struct.pack("<QQ", len(data), len(packed)) + packed)


def _encode_tensor(src: BinaryIO, r: Region, base: BaseTensors, cctx: zstandard.ZstdCompressor, out: BinaryIO) -> None:
    uint = _UINT[r.width]
    ref = base.tensor_bytes(r.base)
    count = (r.end - r.start) // r.width
    if ref.nbytes != r.end - r.start:
        raise ValueError(f"base tensor {r.base!r} has {ref.nbytes} bytes, the region {r.end - r.start}")
    name = r.base.encode()
    step = max(1, CHUNK_BYTES // r.width)
    src.seek(r.start)
    for first in range(0, count, step):
        n = min(step, count - first)
        data = src.read(n * r.width)
        if len(data) != n * r.width:
            raise ValueError("the file is shorter than its regions")
        z = encode_delta(np.frombuffer(data, dtype=uint), np.asarray(ref[first * r.width : (first + n) * r.width]).view(uint))
        planes = z.view(np.uint8).reshape(n, r.width).T  # [width, n]: plane 0 the least significant bytes
        out.write(b"D" + struct.pack("<BH", r.width, len(name)) + name + struct.pack("<QQ", first, n))
        for plane in planes:
            packed = cctx.compress(np.ascontiguousarray(plane).tobytes())
            out.write(struct.pack("<Q", len(packed)) + packed)


def read_header(inp: BinaryIO) -> dict:
    """The container's JSON header (the stream is then at the first frame). Raises FMDeltaError."""
    head = inp.read(len(MAGIC) + 4)
    if len(head) != len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
        raise FMDeltaError(f"not a {FORMAT} container")
    (n,) = struct.unpack("<I", head[len(MAGIC) :])
    if n > _MAX_HEADER:
        raise FMDeltaError("container header too long")
    try:
        header = json.loads(inp.read(n))
    except ValueError as e:
        raise FMDeltaError(f"container header is not JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise FMDeltaError(f"not a {FORMAT} v{VERSION} container")
    return header


def decode(inp: BinaryIO, base: BaseTensors, *, base_fingerprint: str | None = None) -> Iterator[bytes]:
    """Yields the original file's bytes, in order, in chunks of at most CHUNK_BYTES; the last chunk is yielded
    only once the whole file's size and sha256 are checked (FMDeltaError otherwise), so a consumer that writes
    the chunks as they come must treat a raised error as a failed copy. base_fingerprint: when given, a container
    made against another base is refused before anything is yielded."""
    header = read_header(inp)
    if base_fingerprint is not None and header["base"] != base_fingerprint:
        raise FMDeltaError(f"stored against base {header['base']}, not {base_fingerprint}")
    dctx = zstandard.ZstdDecompressor()
    digest, size, held = hashlib.sha256(), 0, b""
    for chunk in _frames(inp, base, dctx):
        digest.update(chunk)
        size += len(chunk)
        if held:
            yield held
        held = chunk
    if size != header["size"] or digest.hexdigest() != header["sha256"]:
        raise FMDeltaError("the stored file does not decode to its recorded size and sha256")
    if held:
        yield held


def _read(inp: BinaryIO, n: int) -> bytes:
    data = inp.read(n)
    if len(data) != n:
        raise FMDeltaError("truncated container")
    return data


def _unpack(dctx: zstandard.ZstdDecompressor, data: bytes, size: int) -> bytes:
    try:
        out = dctx.decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise FMDeltaError(f"corrupted frame ({e})") from None
    if len(out) != size:
        raise FMDeltaError("corrupted frame (wrong size)")
    return out


def _frames(inp: BinaryIO, base: BaseTensors, dctx: zstandard.ZstdDecompressor) -> Iterator[bytes]:
    refs: dict[str, np.ndarray] = {}
    while True:
        kind = _read(inp, 1)
        if kind == b"E":
            return
        if kind == b"R":
            size, clen = struct.unpack("<QQ", _read(inp, 16))
            if size > CHUNK_BYTES:
                raise FMDeltaError("corrupted frame (too large)")
            yield _unpack(dctx, _read(inp, clen), size)
        elif kind == b"D":
            width, n = struct.unpack("<BH", _read(inp, 3))
            if width not in _UINT:
                raise FMDeltaError(f"corrupted frame (element width {width})")
            name = _read(inp, n).decode("utf-8", "replace")
            first, count = struct.unpack("<QQ", _read(inp, 16))
            if count * width > CHUNK_BYTES:
                raise FMDeltaError("corrupted frame (too large)")
            if name not in refs:
                try:
                    refs = {name: base.tensor_bytes(name)}  # one tensor at a time: frames come tensor by tensor
                except KeyError:
                    raise FMDeltaError(f"the base has no tensor {name!r}") from None
            ref = refs[name]
            if (first + count) * width > ref.nbytes:
                raise FMDeltaError(f"corrupted frame (past the end of base tensor {name!r})")
            planes = np.empty((width, count), np.uint8)
            for p in range(width):
                (clen,) = struct.unpack("<Q", _read(inp, 8))
                planes[p] = np.frombuffer(_unpack(dctx, _read(inp, clen), count), np.uint8)
            z = np.ascontiguousarray(planes.T).view(_UINT[width]).reshape(count)
            uint = _UINT[width]
            yield decode_delta(z, np.asarray(ref[first * width : (first + count) * width]).view(uint)).tobytes()
        else:
            raise FMDeltaError(f"corrupted container (frame type {kind!r})")


def copy_decoded(inp: BinaryIO, base: BaseTensors, write: Callable[[bytes], object], **kwargs) -> int:
    """decode() into `write`; returns the number of bytes written."""
    n = 0
    for chunk in decode(inp, base, **kwargs):
        write(chunk)
        n += len(chunk)
    return n
