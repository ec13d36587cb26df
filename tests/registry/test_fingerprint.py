"""registry.fingerprint: dtype-independent base fingerprints and the BaseSpec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.checkpoint import SINGLE_FILE, Checkpoint
from registry.errors import UnsupportedFormat
from registry.fingerprint import base_spec, fingerprint_checkpoint
from tests.helpers import make_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp")
    return {
        "fp32": make_model_dir(root / "fp32"),
        "bf16": make_model_dir(root / "bf16", dtype=torch.bfloat16),
        "sharded": make_model_dir(root / "sharded", max_shard_size="50KB"),
        "other": make_model_dir(root / "other", seed=1),
        "qwen2": make_model_dir(root / "qwen2", arch="qwen2"),
    }


def fp(path: Path) -> str:
    return fingerprint_checkpoint(Checkpoint(path))


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copies a single-file model dir and rewrites its weights through edit(state_dict)."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / SINGLE_FILE))
    edit(sd)
    save_file(sd, str(dst / SINGLE_FILE))
    return dst


def test_format_and_determinism(dirs: dict[str, Path]) -> None:
    a = fp(dirs["fp32"])
    assert a.startswith("sha256:") and len(a) == len("sha256:") + 64
    assert fp(dirs["fp32"]) == a


def test_same_weights_in_fp32_bf16_and_shards_agree(dirs: dict[str, Path]) -> None:
    assert Checkpoint(dirs["bf16"]).info("model.norm.weight").dtype == torch.bfloat16
    assert fp(dirs["fp32"]) == fp(dirs["bf16"]) == fp(dirs["sharded"])


def test_different_weights_differ(dirs: dict[str, Path], tmp_path: Path) -> None:
    base = fp(dirs["fp32"])
    assert fp(dirs["other"]) != base
    assert fp(dirs["qwen2"]) != base

    def bump_row0(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.1.mlp.up_proj.weight"][0, 7] += 0.5

    assert fp(rewrite(dirs["fp32"], tmp_path / "row0", bump_row0)) != base

    def rename(sd: dict[str, torch.Tensor]) -> None:
        sd["model.extra.weight"] = sd.pop("model.norm.weight")

    assert fp(rewrite(dirs["fp32"], tmp_path / "renamed", rename)) != base

    def reshape(sd: dict[str, torch.Tensor]) -> None:
        sd["model.norm.weight"] = sd["model.norm.weight"].reshape(8, 8).contiguous()

    assert fp(rewrite(dirs["fp32"], tmp_path / "reshaped", reshape)) != base


def test_reads_only_sampled_rows(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = Checkpoint(dirs["fp32"])
    expected = fingerprint_checkpoint(ckpt)
    rows_read: list[int] = []
    original = Checkpoint.get_rows

    def spy(self: Checkpoint, name: str, rows: list[int]) -> torch.Tensor:
        rows_read.append(len(rows))
        return original(self, name, rows)

    def no_full_reads(self: Checkpoint, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise AssertionError("fingerprint read a whole tensor")

    monkeypatch.setattr(Checkpoint, "get_rows", spy)
    monkeypatch.setattr(Checkpoint, "get", no_full_reads)
    assert fingerprint_checkpoint(ckpt) == expected
    assert len(rows_read) == len(ckpt) and max(rows_read) <= 3


def test_base_spec_tied_llama(dirs: dict[str, Path]) -> None:
    ckpt = Checkpoint(dirs["bf16"])
    spec = base_spec(ckpt)
    assert spec.fingerprint == fp(dirs["fp32"])
    assert spec.tie_word_embeddings is True
    assert "lm_head.weight" not in spec.tensors
    assert spec.tensors["model.layers.0.self_attn.k_proj.weight"] == ((32, 64), torch.bfloat16)
    expected = {
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert spec.projections == expected
    assert spec.projection_shape("model.layers.1.mlp.down_proj") == (64, 96)
    assert set(spec.tensors) == set(ckpt.names())


def test_base_spec_untied_qwen2(dirs: dict[str, Path]) -> None:
    spec = base_spec(Checkpoint(dirs["qwen2"]))
    assert spec.tie_word_embeddings is False
    assert "lm_head.weight" in spec.tensors
    assert "model.layers.0.self_attn.q_proj.bias" in spec.tensors
    assert len(spec.projections) == 14 and all(not p.endswith("bias") for p in spec.projections)


def test_tie_word_embeddings_from_config(dirs: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copytree(dirs["qwen2"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())

    config.pop("tie_word_embeddings", None)
    (path / "config.json").write_text(json.dumps(config))
    assert base_spec(Checkpoint(path)).tie_word_embeddings is False

    # tied, with a stored lm_head copy: the copy is not a tensor of the served model
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    spec = base_spec(Checkpoint(path))
    assert spec.tie_word_embeddings is True and "lm_head.weight" not in spec.tensors

    config["tie_word_embeddings"] = "yes"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormat, match="tie_word_embeddings"):
        base_spec(Checkpoint(path))
