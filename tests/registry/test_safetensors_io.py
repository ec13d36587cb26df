"""registry.safetensors_io: the strict header check, tensor loading, finiteness, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.errors import AdapterMismatch, UnsupportedFormat
from registry.safetensors_io import (
    TensorInfo,
    check_finite,
    load_tensors,
    read_header,
    sha256_file,
    write_safetensors_atomic,
)


def write_raw(path: Path, header: object, data: bytes = b"", header_len: int | None = None, pad_to: int = 0) -> Path:
    """Writes a safetensors-shaped file by hand: u64 length, JSON header (space-padded to pad_to), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw = raw.ljust(pad_to, b" ")
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def f32_entry(begin: int, shape: list[int]) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


def assert_unsupported(path: Path, *words: str) -> UnsupportedFormat:
    with pytest.raises(UnsupportedFormat) as e:
        read_header(path)
    err = e.value
    assert err.code == "unsupported_format"
    assert err.param == path.name
    for w in words:
        assert w in err.message, (w, err.message)
    return err


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
        str(path),
        metadata={"k": "v"},
    )
    return path


def test_valid_file_header_and_load(good: Path) -> None:
    tensors, metadata = read_header(good)
    assert metadata == {"k": "v"}
    assert set(tensors) == {"w", "b"}
    w = tensors["w"]
    assert isinstance(w, TensorInfo)
    assert (w.dtype, w.shape, w.numel, w.nbytes) == (torch.float32, (2, 3), 6, 24)
    raw = good.read_bytes()
    assert torch.equal(torch.frombuffer(bytearray(raw[w.start : w.end]), dtype=torch.float32).reshape(2, 3),
                       torch.arange(6, dtype=torch.float32).reshape(2, 3))  # fmt: skip
    assert tensors["b"].dtype == torch.bfloat16
    loaded = load_tensors(good)
    assert torch.equal(loaded["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert list(load_tensors(good, ["b"])) == ["b"]
    with pytest.raises(KeyError, match="nope"):
        load_tensors(good, ["nope"])


def test_loaded_tensors_do_not_alias_the_file(good: Path) -> None:
    loaded = load_tensors(good, ["w"])
    info = read_header(good)[0]["w"]
    with open(good, "r+b") as f:
        f.seek(info.start)
        f.write(struct.pack("<f", 99.0))
    assert loaded["w"][0, 0].item() == 0.0


def test_zero_size_and_no_metadata(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "z.safetensors",
        {"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}, "x": f32_entry(0, [1])},
        b"\0\0\0\0",
    )
    tensors, metadata = read_header(path)
    assert metadata == {} and tensors["e"].shape == (0, 3)
    assert load_tensors(path)["e"].shape == (0, 3)


def test_header_length_with_0x80_low_byte_is_still_safetensors(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "x.safetensors", {"x": f32_entry(0, [2])}, b"\0" * 8, pad_to=0x180)
    assert path.read_bytes()[0] == 0x80
    assert read_header(path)[0]["x"].shape == (2,)
    assert load_tensors(path)["x"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("size", [0, 5, 7])
def test_too_short(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    assert_unsupported(path, "too short")


def test_torch_save_zip_named_safetensors_is_refused_as_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, path)  # written only: never loaded
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert_unsupported(path, "pickle files are never loaded")


def test_legacy_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[0] == 0x80
    assert_unsupported(path, "pickle")
    path.write_bytes(pickle.dumps({"a": list(range(100))}, protocol=4))
    assert_unsupported(path, "pickle files are never loaded")


def test_absurd_header_length(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "big.safetensors", b"{}", header_len=200_000_000)
    assert_unsupported(path, "200000000", "limit")


def test_header_length_past_end(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "past.safetensors", b"{}", header_len=1000)
    assert_unsupported(path, "past the end")


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b"{not json}", ["not valid JSON"]),
        (b"[1, 2]", ["not a JSON object"]),
        (b'{"a": 1, "a": 2}', ["duplicate"]),
        (b"{\xff\xfe}", ["not valid JSON"]),
        ({"__metadata__": {"k": 1}}, ["__metadata__"]),
        ({"__metadata__": "x"}, ["__metadata__"]),
        ({"x": {"dtype": "F32", "shape": [1]}}, ["'x'", "data_offsets"]),
        ({"x": {**f32_entry(0, [1]), "extra": 1}}, ["'x'", "extra"]),
        ({"x": [1]}, ["'x'"]),
        ({"x": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]}}, ["unknown dtype", "Q4_K"]),
        ({"x": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 4]}}, ["shape", "-1"]),
        ({"x": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, ["shape"]),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, ["data_offsets"]),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8000]}}, ["'x'", "needs 4"]),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, ["'x'", "invalid data_offsets"]),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, ["'x'", "past the end", "truncated"]),
    ],
)
def test_malformed_headers(tmp_path: Path, header: object, words: list[str]) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, b"\0" * 4)
    assert_unsupported(path, *words)


def test_header_that_lies_about_offsets(tmp_path: Path) -> None:
    # shape [4] float32 needs 16 bytes, the offsets claim 8
    path = write_raw(
        tmp_path / "lie.safetensors", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    assert_unsupported(path, "'x'", "needs 16")


def test_overlapping_tensors(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "ov.safetensors", {"a": f32_entry(0, [2]), "b": f32_entry(4, [2])}, b"\0" * 12)
    assert_unsupported(path, "overlaps")


def test_gap_between_tensors(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "gap.safetensors", {"a": f32_entry(0, [1]), "b": f32_entry(8, [1])}, b"\0" * 12)
    assert_unsupported(path, "gap", "'b'")


def test_truncated_file(good: Path) -> None:
    good.write_bytes(good.read_bytes()[:-3])
    assert_unsupported(good, "truncated")


def test_padded_file(good: Path) -> None:
    good.write_bytes(good.read_bytes() + b"\0" * 16)
    assert_unsupported(good, "truncated or padded")


def test_missing_file(tmp_path: Path) -> None:
    assert_unsupported(tmp_path / "nothing.safetensors", "cannot read")


def test_check_finite() -> None:
    check_finite("ok", torch.ones(3))
    check_finite("ints", torch.arange(3))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(4, dtype=torch.bfloat16)
        t[2] = bad
        with pytest.raises(AdapterMismatch) as e:
            check_finite("model.layers.0.x", t)
        assert e.value.code == "adapter_mismatch"
        assert e.value.param == "model.layers.0.x"
        assert "model.layers.0.x" in e.value.message and "NaN or Inf" in e.value.message


def test_write_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    t = {"a": torch.randn(3, 5)[:, 1:4], "b": torch.arange(4, dtype=torch.uint8)}  # non-contiguous view
    digest = write_safetensors_atomic(path, t, {"format": "x"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert read_header(path)[1] == {"format": "x"}
    loaded = load_tensors(path)
    assert torch.equal(loaded["a"], t["a"]) and torch.equal(loaded["b"], t["b"])
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert (path.stat().st_mode & 0o777) == 0o644

    digest2 = write_safetensors_atomic(path, {"c": torch.zeros(2)}, None)
    assert digest2 != digest and set(load_tensors(path)) == {"c"}


def test_write_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    write_safetensors_atomic(path, {"a": torch.ones(2)}, {})
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory
        write_safetensors_atomic(path, {"x": shared, "y": shared}, {})
    with pytest.raises(TypeError):
        write_safetensors_atomic(path, {"x": torch.ones(1)}, {"k": 1})  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_deeply_nested_header(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "deep.safetensors", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert_unsupported(path, "not valid JSON")
