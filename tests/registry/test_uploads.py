"""registry.uploads: streamed uploads into a staging directory, file-name rules, size limit, validation."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.blob_store import content_sha256
from registry.catalog import Registry
from registry.deltas import BitDelta, LoraDelta
from registry.errors import AdapterMismatch, InvalidName, PickleRefused, UnsupportedFormat, UploadTooLarge
from registry.peft_dir import CONFIG_FILE, WEIGHTS_FILE
from registry.upload_formats import FINETUNE_OPTIONAL, LORA_CONFIG, LORA_WEIGHTS
from tests.registry.assets import Assets, add_files, chunks, lora_files


def test_lora_file_names_are_peft_names() -> None:
    assert (LORA_CONFIG, LORA_WEIGHTS) == (CONFIG_FILE, WEIGHTS_FILE)


def test_add_file_streams_and_counts(reg: Registry, assets: Assets) -> None:
    st = reg.stage(format="lora")
    assert st.path.parent == reg.tmp and st.path.is_dir()
    n = st.add_file(LORA_CONFIG, chunks(assets.lora / LORA_CONFIG, 7))
    st.add_file(LORA_WEIGHTS, iter([bytearray(b"ab"), memoryview(b"cd"), b""]))
    assert n == (assets.lora / LORA_CONFIG).stat().st_size
    assert st.files == [LORA_CONFIG, LORA_WEIGHTS]
    assert st.size_bytes == n + 4
    assert (st.path / LORA_CONFIG).read_bytes() == (assets.lora / LORA_CONFIG).read_bytes()
    assert (st.path / LORA_WEIGHTS).read_bytes() == b"abcd"
    with pytest.raises(TypeError):
        reg.stage().add_file("x.safetensors", iter(["text"]))  # type: ignore[list-item]
    st.discard()
    assert not st.path.exists() and st.discarded
    st.discard()  # idempotent
    with pytest.raises(ValueError, match="discarded"):
        st.add_file(LORA_CONFIG, iter([b"{}"]))


def test_size_limit(reg: Registry) -> None:
    st = reg.stage(100, format="finetune")
    st.add_file("config.json", iter([b"x" * 60]))
    st.add_file("a.safetensors", iter([b"y" * 40]))  # exactly at the limit: fine
    with pytest.raises(UploadTooLarge) as e:
        st.add_file("b.safetensors", iter([b"z"]))
    assert e.value.param == "files"
    assert not st.path.exists(), "what was written is deleted"
    assert list(reg.tmp.iterdir()) == []

    st = reg.stage(10_000, format="bitdelta")
    written: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            written.append(1)
            yield b"0" * 1000

    with pytest.raises(UploadTooLarge):
        st.add_file("d.safetensors", endless())
    assert len(written) == 11, "refused as soon as the limit was passed, not after reading everything"
    assert list(reg.tmp.iterdir()) == []


def test_registry_default_limit(tmp_path: Path) -> None:
    with Registry(tmp_path / "r", max_upload_bytes=5) as reg:
        st = reg.stage(format="bitdelta")
        with pytest.raises(UploadTooLarge):
            st.add_file("x.safetensors", iter([b"123456"]))


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "a\\b", ".hidden", "..", ".", "a\x00b", "x..safetensors", "-x.json", "é.json", "a b",
     "adapter_config.json/", "x" * 201, "/etc/passwd"],
)  # fmt: skip
def test_bad_file_names_refused(reg: Registry, name: str) -> None:
    st = reg.stage()
    with pytest.raises(InvalidName) as e:
        st.add_file(name, iter([b"data"]))
    assert e.value.param == "files"
    assert list(st.path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["lora", "bitdelta", "finetune"])
@pytest.mark.parametrize(
    "name", ["adapter_model.bin", "pytorch_model.bin", "model.pt", "x.pkl", "weights.pth", "model.ckpt", "A.BIN"]
)
def test_pickle_files_refused(reg: Registry, fmt: str, name: str) -> None:
    st = reg.stage(format=fmt)
    with pytest.raises(PickleRefused, match="pickle files are never loaded") as e:
        st.add_file(name, iter([b"\x80\x04junk"]))
    assert e.value.code == "unsupported_format" and e.value.param == name
    assert list(st.path.iterdir()) == []


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("lora", "README.md"), ("lora", "model.safetensors"), ("lora", "config.json"), ("bitdelta", "config.json"),
     ("bitdelta", "delta.json"), ("finetune", "vocab.txt"), ("finetune", "adapter_config.json"),
     ("finetune", "model.gguf")],
)  # fmt: skip
def test_unknown_files_refused(reg: Registry, fmt: str, name: str) -> None:
    st = reg.stage(format=fmt)
    with pytest.raises(UnsupportedFormat, match="is not part of"):
        st.add_file(name, iter([b"{}"]))


def test_duplicates_and_second_bitdelta_file_refused(reg: Registry) -> None:
    st = reg.stage(format="bitdelta")
    st.add_file("a.safetensors", iter([b"1"]))
    with pytest.raises(UnsupportedFormat, match="exactly one"):
        st.add_file("b.safetensors", iter([b"2"]))
    with pytest.raises(UnsupportedFormat, match="twice"):
        st.add_file("a.safetensors", iter([b"2"]))
    assert (st.path / "a.safetensors").read_bytes() == b"1"
    st2 = reg.stage()  # format not known yet: duplicates still refused
    st2.add_file("a.safetensors", iter([b"1"]))
    with pytest.raises(UnsupportedFormat, match="twice"):
        st2.add_file("a.safetensors", iter([b"2"]))


def test_failed_stream_removes_partial_file(reg: Registry) -> None:
    st = reg.stage(format="lora")

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        st.add_file(LORA_WEIGHTS, broken())
    assert list(st.path.iterdir()) == [] and st.size_bytes == 0
    st.add_file(LORA_WEIGHTS, iter([b"ok"]))  # still usable, and the name is free again
    assert st.files == [LORA_WEIGHTS]


def test_context_manager_discards_on_error_only(reg: Registry) -> None:
    with pytest.raises(RuntimeError), reg.stage(format="lora") as st:
        st.add_file(LORA_CONFIG, iter([b"{}"]))
        raise RuntimeError("boom")
    assert not st.path.exists()
    with reg.stage(format="finetune") as kept:
        kept.add_file("config.json", iter([b"{}"]))
    assert (kept.path / "config.json").is_file(), "kept for a background compression"


def test_validate_lora_and_bitdelta(reg: Registry, assets: Assets) -> None:
    st = add_files(reg.stage(format="lora"), lora_files(assets.lora))
    delta = st.validate("lora", assets.spec, max_lora_rank=8)
    assert isinstance(delta, LoraDelta) and delta.rank == 4
    assert delta.sha256 == content_sha256("lora", st.path)

    st = add_files(reg.stage(format="bitdelta"), [assets.bd1], ["tenant.bitdelta.safetensors"])
    delta = st.validate("bitdelta", assets.spec, None)
    assert isinstance(delta, BitDelta)
    assert delta.sha256 == content_sha256("bitdelta", st.path / "tenant.bitdelta.safetensors")


def test_validate_refusals(reg: Registry, assets: Assets, tmp_path: Path) -> None:
    st = add_files(reg.stage(format="lora"), lora_files(assets.lora))
    with pytest.raises(AdapterMismatch, match="max rank 2"):
        st.validate("lora", assets.spec, max_lora_rank=2)
    with pytest.raises(UnsupportedFormat, match="staged as lora") as e:
        st.validate("bitdelta", assets.spec)
    assert e.value.param == "format"
    with pytest.raises(UnsupportedFormat, match="format must be one of"):
        st.validate("gguf", assets.spec)

    st = add_files(reg.stage(format="lora"), [assets.lora / LORA_CONFIG])
    with pytest.raises(UnsupportedFormat, match="is missing|no .safetensors"):
        st.validate("lora", assets.spec)

    st = add_files(reg.stage(format="bitdelta"), [assets.other_bd])
    with pytest.raises(AdapterMismatch, match="built for base"):
        st.validate("bitdelta", assets.spec)

    # a LoRA file that is not a bitdelta file, uploaded as bitdelta
    st = add_files(reg.stage(format="bitdelta"), [assets.lora / LORA_WEIGHTS])
    with pytest.raises(UnsupportedFormat, match="deltaserve.bitdelta"):
        st.validate("bitdelta", assets.spec)


def test_wrong_shape_lora_refused(reg: Registry, assets: Assets, tmp_path: Path) -> None:
    tensors = load_file(assets.lora / LORA_WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    bad = tmp_path / LORA_WEIGHTS
    save_file(tensors, bad)
    st = add_files(reg.stage(format="lora"), [assets.lora / LORA_CONFIG, bad])
    with pytest.raises(AdapterMismatch, match="shape") as e:
        st.validate("lora", assets.spec)
    assert e.value.param == key


@pytest.mark.parametrize(
    "content",
    [b"\x80\x04\x95junk-pickle-bytes", b"PK\x03\x04zip", struct.pack("<Q", 10**12) + b"{}", b"short"],
)
def test_malformed_safetensors_refused_from_header(reg: Registry, assets: Assets, content: bytes) -> None:
    st = reg.stage(format="lora")
    st.add_file(LORA_CONFIG, chunks(assets.lora / LORA_CONFIG))
    st.add_file(LORA_WEIGHTS, iter([content]))
    with pytest.raises(UnsupportedFormat) as e:
        st.validate("lora", assets.spec)
    assert e.value.param == LORA_WEIGHTS


def _finetune_files(assets: Assets) -> list[Path]:
    return [assets.model / "config.json", assets.model / "model.safetensors"]


def test_finetune_validated_before_compression(reg: Registry, assets: Assets, tmp_path: Path) -> None:
    st = add_files(reg.stage(format="finetune"), _finetune_files(assets))
    assert st.validate("finetune", assets.spec) is None

    # sharded: index + shards
    tensors = load_file(assets.model / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {n: s for s, members in shards.items() for n in members}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = [assets.model / "config.json", tmp_path / "model.safetensors.index.json"] + [tmp_path / s for s in shards]
    st = add_files(reg.stage(format="finetune"), files)
    assert st.validate("finetune", assets.spec) is None

    # a shard the index does not use
    st = add_files(reg.stage(format="finetune"), [*files, assets.bd1])
    with pytest.raises(UnsupportedFormat, match="not part of the checkpoint"):
        st.validate("finetune", assets.spec)


def test_finetune_refusals(reg: Registry, assets: Assets, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    st = add_files(reg.stage(format="finetune"), [tmp_path / "config.json", assets.model / "model.safetensors"])
    with pytest.raises(UnsupportedFormat, match="not valid JSON"):
        st.validate("finetune", assets.spec)

    st = add_files(reg.stage(format="finetune"), [assets.model / "config.json"])
    with pytest.raises(UnsupportedFormat, match="no .safetensors"):
        st.validate("finetune", assets.spec)

    tensors = load_file(assets.model / "model.safetensors")
    wrong = dict(tensors)
    wrong["model.norm.weight"] = torch.ones(wrong["model.norm.weight"].shape[0] + 1)
    (tmp_path / "wrong").mkdir()
    save_file(wrong, tmp_path / "wrong" / "model.safetensors")
    st = add_files(reg.stage(format="finetune"), [assets.model / "config.json", tmp_path / "wrong" / "model.safetensors"])
    with pytest.raises(AdapterMismatch, match="model.norm.weight has shape"):
        st.validate("finetune", assets.spec)

    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    (tmp_path / "missing").mkdir()
    save_file(missing, tmp_path / "missing" / "model.safetensors")
    st = add_files(reg.stage(format="finetune"), [assets.model / "config.json", tmp_path / "missing" / "model.safetensors"])
    with pytest.raises(AdapterMismatch, match="lacks 1 tensor"):
        st.validate("finetune", assets.spec)

    st = add_files(reg.stage(format="finetune"), [assets.model / "config.json"])
    st.add_file("model.safetensors", iter([b"\x80\x02pickled"]))
    with pytest.raises(UnsupportedFormat, match="pickle"):
        st.validate("finetune", assets.spec)


def test_payload_layout(reg: Registry, assets: Assets) -> None:
    st = add_files(reg.stage(format="lora"), lora_files(assets.lora))
    assert st.payload("lora") == st.path
    with pytest.raises(ValueError):
        st.payload("bitdelta")
    out = reg.stage()
    shutil.copy(assets.bd1, out.path / "delta.safetensors")  # a compression's output
    assert out.payload("bitdelta") == out.path / "delta.safetensors"


def test_open_file_push_style(reg: Registry) -> None:
    st = reg.stage(50)  # format not known yet, as when the multipart files come before the fields
    with st.open_file("config.json") as w:
        w.write(b"{")
        w.write(memoryview(b"}"))
    assert st.files == ["config.json"] and st.size_bytes == 2
    w = st.open_file("model.safetensors")
    w.write(b"x" * 10)
    w.abort()
    assert not (st.path / "model.safetensors").exists() and st.size_bytes == 2
    with pytest.raises(ValueError):
        w.write(b"more")
    for name in ["pytorch_model.bin", "adapter_model.bin"]:
        with pytest.raises(PickleRefused, match="pickle files are never loaded"):
            st.open_file(name)
    with pytest.raises(UnsupportedFormat, match="any upload format"):
        st.open_file("README.md")
    with pytest.raises(UnsupportedFormat, match="twice"):
        st.open_file("config.json")
    with pytest.raises(InvalidName):
        st.open_file("../config.json")
    w = st.open_file("a.safetensors")
    with pytest.raises(UploadTooLarge):
        w.write(b"y" * 49)
    assert not st.path.exists()


def test_import_path_and_keep_only(reg: Registry, assets: Assets) -> None:
    st = reg.stage()
    st.import_path(assets.lora)  # a PEFT directory: README.md is skipped
    assert sorted(st.files) == [LORA_CONFIG, LORA_WEIGHTS]
    assert isinstance(st.validate("lora", assets.spec), LoraDelta)

    st = reg.stage(format="finetune")
    st.import_path(assets.model)  # the JSON files a fine-tune may carry come along; chat_template.jinja does not
    assert {"config.json", "model.safetensors"} <= set(st.files) <= {"config.json", "model.safetensors",
                                                                     *FINETUNE_OPTIONAL}
    assert st.validate("finetune", assets.spec) is None
    out = st.path / "delta.bitdelta.safetensors"
    shutil.copy(assets.bd1, out)  # what the compression writes next to the fine-tune
    st.keep_only(out)
    assert sorted(p.name for p in st.path.iterdir()) == [out.name]
    assert st.payload("bitdelta") == out
    with pytest.raises(ValueError):
        st.keep_only(assets.bd1)

    st = reg.stage(10)
    with pytest.raises(UploadTooLarge):
        st.import_path(assets.bd1)
