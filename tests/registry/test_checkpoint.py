"""registry.checkpoint: HF model directories, single-file and sharded, read lazily."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from registry.errors import UnsupportedFormat
from tests.helpers import make_model_dir


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("single") / "m", arch="qwen2")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_model_dir(tmp_path_factory.mktemp("sharded") / "m", arch="qwen2", max_shard_size="50KB")
    assert (path / INDEX_FILE).is_file() and not (path / SINGLE_FILE).exists()
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refused(path: Path) -> UnsupportedFormat:
    with pytest.raises(UnsupportedFormat) as e:
        Checkpoint(path)
    assert e.value.code == "unsupported_format"
    return e.value


def test_single_file(single_dir: Path) -> None:
    ckpt = Checkpoint(single_dir)
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"]
    assert ckpt.shards() == [SINGLE_FILE]
    names = ckpt.names()
    assert names == sorted(names) and len(ckpt) == len(names)
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt and "lm_head.weight" in ckpt
    info = ckpt.info("model.layers.0.mlp.down_proj.weight")
    assert (info.dtype, info.shape) == (torch.float32, (64, 96))
    w = ckpt.get("model.layers.0.mlp.down_proj.weight")
    assert w.shape == (64, 96) and w.dtype == torch.float32
    assert ckpt.get("model.layers.0.mlp.down_proj.weight", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(KeyError, match="nope"):
        ckpt.get("nope")
    with pytest.raises(KeyError):
        ckpt.info("nope")


def test_sharded_equals_single(single_dir: Path, sharded_dir: Path) -> None:
    single, sharded = Checkpoint(single_dir), Checkpoint(sharded_dir)
    assert len(sharded.shards()) > 1
    assert single.names() == sharded.names()
    for name in single.names():
        assert single.info(name).shape == sharded.info(name).shape
        assert torch.equal(single.get(name), sharded.get(name)), name


def test_iter_tensors_streams_every_tensor_once(sharded_dir: Path) -> None:
    ckpt = Checkpoint(sharded_dir)
    seen = []
    for name, tensor in ckpt.iter_tensors():
        seen.append(name)
        assert tensor.shape == ckpt.info(name).shape
        assert torch.equal(tensor, ckpt.get(name))
    assert sorted(seen) == ckpt.names()
    assert all(t.dtype == torch.float16 for _, t in ckpt.iter_tensors(dtype=torch.float16))


def test_get_rows(single_dir: Path) -> None:
    ckpt = Checkpoint(single_dir)
    name = "model.embed_tokens.weight"
    full = ckpt.get(name)
    assert torch.equal(ckpt.get_rows(name, [0, 5, full.shape[0] - 1]), full[[0, 5, full.shape[0] - 1]])
    assert torch.equal(ckpt.get_rows("model.norm.weight", [3]), ckpt.get("model.norm.weight")[3:4])
    assert ckpt.get_rows(name, []).shape == (0, full.shape[1])
    with pytest.raises(IndexError):
        ckpt.get_rows(name, [full.shape[0]])


def test_returned_tensors_own_their_memory(single_dir: Path) -> None:
    ckpt = Checkpoint(single_dir)
    name = "model.norm.weight"
    t = ckpt.get(name)
    before = t.clone()
    t.zero_()
    assert torch.equal(ckpt.get(name), before)


def test_missing_shard_is_named(sharded_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(sharded_dir, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    err = refused(path)
    assert shard.name in err.message and "missing" in err.message
    assert err.param == shard.name


def test_bin_only_directory_is_refused(single_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(single_dir / "config.json", path / "config.json")
    torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")  # written only: never loaded
    err = refused(path)
    assert "pickle checkpoints are not loaded" in err.message and "pytorch_model.bin" in err.message
    (path / "pytorch_model.bin").rename(path / "weights.pt")
    assert "weights.pt" in refused(path).message


def test_pickle_named_model_safetensors(single_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(single_dir, tmp_path / "m")
    torch.save({"w": torch.zeros(2)}, path / SINGLE_FILE)
    err = refused(path)
    assert "pickle files are never loaded" in err.message and err.param == SINGLE_FILE


def test_no_weights(single_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(single_dir, tmp_path / "m")
    (path / SINGLE_FILE).unlink()
    (path / "consolidated.safetensors").write_bytes(b"")  # other names are never guessed from
    err = refused(path)
    assert SINGLE_FILE in err.message and INDEX_FILE in err.message


def test_config_problems(single_dir: Path, tmp_path: Path) -> None:
    assert "not a directory" in refused(tmp_path / "absent").message
    path = copy_dir(single_dir, tmp_path / "m")
    (path / "config.json").write_text("{oops")
    assert refused(path).param == "config.json"
    (path / "config.json").write_text("[1]")
    assert "JSON object" in refused(path).message
    (path / "config.json").unlink()
    err = refused(path)
    assert "config.json" in err.message and err.param == "config.json"


def test_index_problems(sharded_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(sharded_dir, tmp_path / "m")
    index_path = path / INDEX_FILE
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]

    index_path.write_text("not json")
    assert refused(path).param == INDEX_FILE
    index_path.write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in refused(path).message

    bad = dict(weight_map, **{"model.norm.weight": "../outside.safetensors"})
    index_path.write_text(json.dumps({"weight_map": bad}))
    assert "not a file of this directory" in refused(path).message

    # the index maps a tensor to a shard that lacks it (and leaves it unlisted in its real shard)
    name = "model.norm.weight"
    other = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    index_path.write_text(json.dumps({"weight_map": dict(weight_map, **{name: other})}))
    err = refused(path)
    assert name in err.message

    # a shard holds a tensor the index does not list
    index_path.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != name}}))
    err = refused(path)
    assert name in err.message and "does not map" in err.message


def test_bad_shard_header_is_refused(sharded_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(sharded_dir, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    err = refused(path)
    assert err.param == shard.name and "truncated" in err.message


def test_minimal_directory(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    save_file({"x": torch.arange(3, dtype=torch.float32)}, str(path / SINGLE_FILE))
    ckpt = Checkpoint(path)
    assert ckpt.config == {} and ckpt.names() == ["x"]
    assert ckpt.get("x").tolist() == [0.0, 1.0, 2.0]
