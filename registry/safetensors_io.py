"""Strict safetensors reading and atomic writing.

Every file that reaches the registry is checked here, from its raw bytes, before any tensor is read:
`read_header` parses and validates the 8-byte length prefix and the JSON header itself (it never
trusts the `safetensors` library to be the first line of defence), and recognises pickle files
(`torch.save` output, `pytorch_model.bin`, ...) so they can be refused with a clear message.
Pickle is never loaded anywhere in deltaserve: no `torch.load`, no `pickle`.

File layout (https://github.com/huggingface/safetensors): u64 little-endian N, N bytes of UTF-8 JSON
`{"__metadata__": {str: str}, NAME: {"dtype": str, "shape": [int], "data_offsets": [begin, end]}, ...}`,
then the data section; offsets are relative to the data section, tensors are packed without gaps or
overlaps and cover the data section exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from registry.errors import AdapterMismatch, PickleRefused, UnsupportedFormat
from registry.fsync import fsync_dir

MAX_HEADER_BYTES = 100_000_000
"""The largest JSON header accepted (the safetensors library's own limit)."""

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "U16": (torch.uint16, 2),
    "I16": (torch.int16, 2),
    "U32": (torch.uint32, 4),
    "I32": (torch.int32, 4),
    "U64": (torch.uint64, 8),
    "I64": (torch.int64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
}
"""safetensors dtype name -> (torch dtype, bytes per element). Any other dtype name is refused."""

_PICKLE_MESSAGE = (
    "{name} is a pickle file (as torch.save / pytorch_model.bin write), not safetensors; "
    "pickle files are never loaded: convert it to safetensors"
)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it.

    dtype: the torch dtype stored on disk.  shape: its shape.
    start, end: absolute byte offsets of its data in the file (end - start = numel * itemsize).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _refuse(name: str, message: str) -> UnsupportedFormat:
    return UnsupportedFormat(f"{name}: {message}", param=name)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _looks_like_pickle(prefix: bytes) -> bool:
    """Pickle protocol >= 2 starts with 0x80 <protocol>; torch.save's zip format starts with a zip local header."""
    return prefix[:1] == b"\x80" or prefix[:4] == b"PK\x03\x04"


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates the header of a safetensors file without reading any tensor data.

    Returns (tensors, metadata): tensor name -> TensorInfo, in the header's order; the `__metadata__`
    strings ({} when absent).

    Raises UnsupportedFormat (param = the file name) for: a file shorter than 8 bytes; a pickle file
    (the message says pickle files are never loaded); a header length over 100 MB or past the end of the
    file; a header that is not UTF-8 JSON, not an object, or has duplicate keys; metadata that is not
    str -> str; an entry without exactly dtype/shape/data_offsets; an unknown dtype; a shape that is not
    a list of non-negative ints; offsets outside the data section, not matching shape x itemsize,
    overlapping or leaving gaps; a data section whose size differs from what the header describes
    (truncated or padded file). A file that passes can be opened by `safetensors.safe_open`.
    """
    path = Path(path)
    name = path.name
    raw, size = _read_raw_header(path)
    header_end = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _refuse(name, f"header is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise _refuse(name, "header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(name, "__metadata__ must be an object of string values")
    tensors = {tname: _tensor_info(name, tname, entry, header_end, size - header_end) for tname, entry in header.items()}
    _check_tiling(name, tensors, header_end, size - header_end)
    return tensors, dict(metadata)


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and the file's size; refuses pickles and impossible lengths before reading."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(9)
            if size < 8 or len(prefix) < 8:
                raise _refuse(name, f"file is {size} bytes, too short for a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix[:8])
            plausible = header_len <= MAX_HEADER_BYTES and 8 + header_len <= size and prefix[8:9] == b"{"
            if not plausible:
                # A sane length followed by '{' is safetensors even if byte 0 happens to be 0x80.
                if _looks_like_pickle(prefix):
                    raise PickleRefused(_PICKLE_MESSAGE.format(name=name), param=name)
                if header_len > MAX_HEADER_BYTES:
                    raise _refuse(name, f"header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit")
                if 8 + header_len > size:
                    raise _refuse(name, f"header length {header_len} runs past the end of the {size}-byte file")
                raise _refuse(name, "header is not a JSON object")
            f.seek(8)
            raw = f.read(header_len)
    except OSError as e:
        raise _refuse(name, f"cannot read file: {e.strerror or e}") from e
    if len(raw) != header_len:
        raise _refuse(name, "file changed while reading its header")
    return raw, size


def _tensor_info(name: str, tname: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    """One header entry, checked on its own: its keys, dtype, shape, and offsets of the right span."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise _refuse(name, f"tensor {tname!r} must have exactly dtype, shape and data_offsets, got {got}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _refuse(name, f"tensor {tname!r} has unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _refuse(name, f"tensor {tname!r} has invalid shape {shape!r} (need non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _refuse(name, f"tensor {tname!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _refuse(name, f"tensor {tname!r} has invalid data_offsets {offsets} (need 0 <= begin <= end)")
    torch_dtype, itemsize = DTYPES[dtype_name]
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        raise _refuse(
            name,
            f"tensor {tname!r} data_offsets {offsets} span {end - begin} bytes but {dtype_name} {shape} "
            f"needs {expected}",
        )
    if end > data_size:
        raise _refuse(
            name,
            f"tensor {tname!r} data_offsets {offsets} run past the end of the {data_size}-byte data section "
            "(truncated file?)",
        )
    return TensorInfo(torch_dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(name: str, tensors: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    """The tensors' data tile the data section exactly: no overlap, no gap, nothing before or after."""
    cursor = data_start
    for tname, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start < cursor:
            raise _refuse(name, f"tensor {tname!r} overlaps the data of another tensor")
        if info.start > cursor:
            raise _refuse(name, f"gap of {info.start - cursor} unused bytes before tensor {tname!r}")
        cursor = info.end
    described = cursor - data_start
    if described != data_size:
        raise _refuse(
            name, f"data section is {data_size} bytes but the header describes {described} (truncated or padded file)"
        )


def load_tensors(path: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Reads tensors of a safetensors file onto the CPU, after `read_header` has validated it.

    names: the tensors to read (default: all, in header order). A name not in the file raises KeyError.
    Returns name -> tensor, in the dtype stored on disk, owning its memory (a copy, not a view of the
    file's mmap, so later changes to the file cannot change validated values).
    """
    tensors, _ = read_header(path)
    wanted = list(tensors) if names is None else list(names)
    for n in wanted:
        if n not in tensors:
            raise KeyError(f"{Path(path).name} has no tensor {n!r}")
    out: dict[str, torch.Tensor] = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        for n in wanted:
            out[n] = f.get_tensor(n).clone()  # own the memory: never alias the file's mmap
    return out


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raises AdapterMismatch (param = name) if a floating-point tensor holds NaN or Inf."""
    if not tensor.is_floating_point():
        return
    if tensor.element_size() < 2:  # float8: torch has no isfinite for it; float32 holds every value exactly
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterMismatch(f"tensor {name} contains {n_bad} NaN or Inf values", param=name)


def sha256_file(path: str | os.PathLike[str], prefix: bytes = b"") -> str:
    """Hex sha256 of `prefix` followed by a file's bytes (the file is streamed, not read whole)."""
    h = hashlib.sha256(prefix)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Writes a safetensors file so that `path` holds either the old content or the complete new one.

    The file is written to a temporary file in the same directory, fsynced, renamed over `path` with
    os.replace, then the directory is fsynced. Tensors are written from the CPU, contiguous.
    Returns the hex sha256 of the written file's bytes.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("safetensors metadata must map str to str")
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(cpu, tmp_name, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary data file
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(directory)
    return h.hexdigest()
