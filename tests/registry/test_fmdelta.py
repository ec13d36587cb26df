"""Lossless fine-tune storage (registry/fmdelta.py, registry/source_files.py): every file decodes to its exact
bytes (sha256 equal) whatever its tensors hold, in frames of bounded size, and a damaged container, a container
of another base or a base without the tensor is refused rather than decoded into wrong bytes."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from registry import fmdelta
from registry.checkpoint import Checkpoint
from registry.source_files import decode_file, encode_file, regions
from tests.helpers import hf_model, make_model_dir, save_finetune

UINTS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@settings(max_examples=60, deadline=None)
@given(width=st.sampled_from([2, 4, 8]), data=st.data())
def test_any_bit_patterns_round_trip(width, data):
    n = data.draw(st.integers(0, 64))
    top = (1 << (8 * width)) - 1
    ft = np.array(data.draw(st.lists(st.integers(0, top), min_size=n, max_size=n)), dtype=UINTS[width])
    base = np.array(data.draw(st.lists(st.integers(0, top), min_size=n, max_size=n)), dtype=UINTS[width])
    assert (fmdelta.decode_delta(fmdelta.encode_delta(ft, base), base) == ft).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_keys_follow_the_order_of_the_floats_and_small_changes_give_small_codes(dtype):
    x = np.unique(np.random.default_rng(0).standard_normal(2000).astype(dtype))  # sorted, no ties
    x = np.concatenate([[-np.inf], x[x < 0], [-0.0, 0.0], x[x > 0], [np.inf]]).astype(dtype)
    uint = UINTS[np.dtype(dtype).itemsize]
    keys = fmdelta._keys(x.view(uint))
    assert (keys[1:] > keys[:-1]).all()  # strictly: -0.0 just below +0.0
    finite = x[1:-1][~((x[1:-1] == 0) & np.signbit(x[1:-1]))]  # -0.0's next float up is the tiniest, not +0.0
    nxt = np.nextafter(finite, np.array(np.inf, dtype))  # one step up, from the negatives to +0.0 too
    assert (fmdelta.encode_delta(nxt.view(uint), finite.view(uint)) == 2).all()  # zigzag(+1)
    assert (fmdelta.encode_delta(finite.view(uint), nxt.view(uint)) == 1).all()  # zigzag(-1)


class _Base:
    def __init__(self, tensors):
        self.tensors = {k: np.frombuffer(v.tobytes(), np.uint8) for k, v in tensors.items()}

    def tensor_bytes(self, name):
        return self.tensors[name]


def _container(src: bytes, rs, base, fingerprint="sha256:base") -> bytes:
    out = io.BytesIO()
    fmdelta.encode(io.BytesIO(src), rs, base, out, size=len(src), sha256=hashlib.sha256(src).hexdigest(),
                   base_fingerprint=fingerprint)  # fmt: skip
    return out.getvalue()


def _specials(dtype):
    return np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, np.finfo(dtype).tiny / 4, -np.finfo(dtype).max],
                    dtype)  # fmt: skip


def test_frames_bound_the_memory_and_still_give_the_exact_bytes(monkeypatch):
    monkeypatch.setattr(fmdelta, "CHUNK_BYTES", 1000)  # many frames per tensor and per raw region
    rng = np.random.default_rng(1)
    base = rng.standard_normal(5000).astype(np.float32)
    ft = (base + rng.standard_normal(5000).astype(np.float32) * 1e-3).astype(np.float32)
    ft[:8] = _specials(np.float32)
    head, tail = bytes(rng.integers(0, 256, 3333, dtype=np.uint8)), b"end"
    src = head + ft.tobytes() + tail
    rs = [fmdelta.Region(0, len(head)), fmdelta.Region(len(head), len(head) + ft.nbytes, "w", 4),
          fmdelta.Region(len(head) + ft.nbytes, len(src))]  # fmt: skip
    blob = _container(src, rs, _Base({"w": base}))
    chunks = list(fmdelta.decode(io.BytesIO(blob), _Base({"w": base})))
    assert b"".join(chunks) == src
    assert len(chunks) > 20 and max(map(len, chunks)) <= 1000


def test_a_damaged_container_or_another_base_is_refused():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(4096).astype(np.float32)
    ft = (base * 1.001).astype(np.float32)
    src = b"header" + ft.tobytes()
    rs = [fmdelta.Region(0, 6), fmdelta.Region(6, len(src), "w", 4)]
    blob = _container(src, rs, _Base({"w": base}))
    with pytest.raises(fmdelta.FMDeltaError, match="truncated"):
        b"".join(fmdelta.decode(io.BytesIO(blob[:-10]), _Base({"w": base})))
    with pytest.raises(fmdelta.FMDeltaError, match="another base|not sha256:other"):
        next(fmdelta.decode(io.BytesIO(blob), _Base({"w": base}), base_fingerprint="sha256:other"))
    other_base = _Base({"w": base + 1})  # same names, other values: decodes, but not to the file
    with pytest.raises(fmdelta.FMDeltaError, match="sha256"):
        b"".join(fmdelta.decode(io.BytesIO(blob), other_base))
    with pytest.raises(fmdelta.FMDeltaError, match="no tensor 'w'"):
        b"".join(fmdelta.decode(io.BytesIO(blob), _Base({})))
    with pytest.raises(fmdelta.FMDeltaError, match="not a deltaserve.fmdelta"):
        fmdelta.read_header(io.BytesIO(b"PK\x03\x04" + blob[4:]))


def test_the_last_chunk_waits_for_the_check():
    """A consumer streaming the bytes out (the download route) never receives a whole wrong file: the sha256 is
    checked before the last chunk is given."""
    base = np.zeros(10, np.float32)
    src = b"xyz" + np.ones(10, np.float32).tobytes()
    blob = _container(src, [fmdelta.Region(0, 3), fmdelta.Region(3, len(src), "w", 4)], _Base({"w": base}))
    chunks = fmdelta.decode(io.BytesIO(blob), _Base({"w": base + 2}))
    assert next(chunks) == b"xyz"
    with pytest.raises(fmdelta.FMDeltaError):
        next(chunks)


def test_regions_must_tile_the_file():
    with pytest.raises(ValueError, match="tile"):
        _container(b"abcdef", [fmdelta.Region(0, 2), fmdelta.Region(3, 6)], _Base({}))
    with pytest.raises(ValueError, match="cover"):
        _container(b"abcdef", [fmdelta.Region(0, 4)], _Base({}))
    with pytest.raises(ValueError, match="whole elements"):
        _container(b"abcdef", [fmdelta.Region(0, 3, "w", 2), fmdelta.Region(3, 6)], _Base({}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_saved_fine_tune_round_trips_byte_for_byte_and_is_smaller_than_zstd(tmp_path, dtype):
    import zstandard

    base_dir = make_model_dir(tmp_path / "base", dtype=dtype, max_shard_size="200KB")
    ft32 = save_finetune(base_dir, tmp_path / "ft32", seed=3, std=0.002)
    ft_dir = tmp_path / "ft"
    hf_model(ft32).to(dtype).save_pretrained(ft_dir, max_shard_size="150KB")  # saved in the base's dtype
    base = Checkpoint(base_dir)
    files = sorted(p for p in ft_dir.iterdir() if p.is_file())
    assert sum(p.suffix == ".safetensors" for p in files) > 1  # sharded differently from the base
    stored = raw = zstd = 0
    for path in files:
        out = tmp_path / (path.name + ".fmd")
        digest = encode_file(path, base, out, base_fingerprint="sha256:b")
        got = b"".join(decode_file(out, base, base_fingerprint="sha256:b"))
        assert hashlib.sha256(got).hexdigest() == digest == hashlib.sha256(path.read_bytes()).hexdigest()
        if path.suffix == ".safetensors":
            assert any(r.base for r in regions(path, base))
            raw += path.stat().st_size
            stored += out.stat().st_size
            zstd += len(zstandard.ZstdCompressor(level=3).compress(path.read_bytes()))
    assert stored < zstd < raw


def test_tensors_the_base_lacks_or_has_otherwise_are_stored_as_they_are(tmp_path):
    base_dir = make_model_dir(tmp_path / "base")
    base = Checkpoint(base_dir)
    name = base.names()[0]
    weird = {
        name: torch.zeros(base.info(name).shape, dtype=torch.float16),  # another dtype
        "extra.weight": torch.randn(7, 3),  # not in the base
        "step": torch.tensor([3], dtype=torch.int64),  # not a float
        "empty": torch.zeros(0),
    }
    path = tmp_path / "odd.safetensors"
    save_file(weird, str(path), metadata={"format": "pt"})
    rs = regions(path, base)
    assert all(r.base is None for r in rs) and len(rs) == 1  # merged into one raw region
    out = tmp_path / "odd.fmd"
    encode_file(path, base, out, base_fingerprint="f")
    assert b"".join(decode_file(out, base)) == path.read_bytes()


def test_encoding_and_decoding_a_file_hold_a_few_frames_not_the_file(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(fmdelta, "CHUNK_BYTES", 1 << 20)
    gen = torch.Generator().manual_seed(0)
    base_w = torch.randn(2048, 2048, generator=gen)  # 16 MiB of float32
    (tmp_path / "base").mkdir()
    save_file({"w": base_w}, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text("{}")
    ft = tmp_path / "ft.safetensors"
    save_file({"w": base_w + 1e-3 * torch.randn(2048, 2048, generator=gen)}, ft)
    del base_w
    base = Checkpoint(tmp_path / "base")
    out = tmp_path / "ft.fmd"
    tracemalloc.start()
    try:
        digest = encode_file(ft, base, out, base_fingerprint="sha256:b")
        encoding_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        h, n = hashlib.sha256(), 0
        for chunk in decode_file(out, base, base_fingerprint="sha256:b"):
            h.update(chunk)
            n += len(chunk)
        decoding_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert h.hexdigest() == digest and n == ft.stat().st_size > 16 * 2**20
    assert encoding_peak < 12 * 2**20 and decoding_peak < 12 * 2**20, (encoding_peak, decoding_peak)  # file: 16 MiB
