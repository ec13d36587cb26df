"""registry.lora_format: PEFT LoRA directories, checked against the base and loaded as LoraDelta."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.checkpoint import Checkpoint
from registry.deltas import BaseSpec, LoraDelta
from registry.errors import AdapterMismatch, DeltaError, UnsupportedFormat
from registry.fingerprint import base_spec
from registry.lora_format import load_lora_dir
from registry.peft_dir import CONFIG_FILE, WEIGHTS_FILE
from tests.helpers import make_hf_model, make_model_dir, tiny_config

Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> BaseSpec:
    return base_spec(Checkpoint(make_model_dir(tmp_path_factory.mktemp("base") / "m")))


def make_peft(path: Path, **lora: Any) -> dict[str, torch.Tensor]:
    """Saves a real PEFT LoRA directory at path; returns module path -> PEFT's own delta weight."""
    from peft import LoraConfig, get_peft_model

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora}
    model = get_peft_model(make_hf_model(tiny_config("llama")), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(path)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    return deltas


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("lora") / "plain"
    return path, make_peft(path)


@pytest.fixture
def adapter(plain: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> Path:
    """A fresh, writable copy of the plain adapter."""
    return Path(shutil.copytree(plain[0], tmp_path / "adapter"))


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def edit_weights(path: Path, edit) -> None:
    sd = load_file(str(path / WEIGHTS_FILE))
    edit(sd)
    save_file(sd, str(path / WEIGHTS_FILE))


def mismatch(path: Path, spec: BaseSpec, *words: str, max_rank: int | None = None) -> AdapterMismatch:
    with pytest.raises(AdapterMismatch) as e:
        load_lora_dir(path, spec, max_rank=max_rank)
    assert e.value.code == "adapter_mismatch"
    for w in words:
        assert w in e.value.message, (w, e.value.message)
    return e.value


def unsupported(path: Path, spec: BaseSpec, *words: str) -> UnsupportedFormat:
    with pytest.raises(UnsupportedFormat) as e:
        load_lora_dir(path, spec)
    assert e.value.code == "unsupported_format"
    for w in words:
        assert w in e.value.message, (w, e.value.message)
    return e.value


def assert_matches_peft(delta: LoraDelta, peft_deltas: dict[str, torch.Tensor]) -> None:
    assert set(delta.weights) == set(peft_deltas)
    for module, (a, b) in delta.weights.items():
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(delta.scaling * b @ a, peft_deltas[module], rtol=1e-5, atol=1e-6)


# --- round trips -------------------------------------------------------------------------------------


def test_round_trip(plain: tuple[Path, dict[str, torch.Tensor]], spec: BaseSpec) -> None:
    path, peft_deltas = plain
    delta = load_lora_dir(path, spec)
    assert isinstance(delta, LoraDelta) and delta.kind == "lora"
    assert delta.rank == 4 and delta.scaling == 2.0
    assert len(delta.weights) == 6  # 3 targets x 2 layers
    saved = load_file(str(path / WEIGHTS_FILE))
    a, b = delta.weights[Q0]
    assert torch.equal(a, saved[KEY_A]) and torch.equal(b, saved[KEY_B])
    assert a.shape == (4, 64) and b.shape == (64, 4)
    assert delta.weights["model.layers.1.self_attn.v_proj"][1].shape == (32, 4)
    assert_matches_peft(delta, peft_deltas)
    assert delta.nbytes == sum(a.numel() * 4 + b.numel() * 4 for a, b in delta.weights.values())


def test_sha256_covers_config_and_weights(adapter: Path, spec: BaseSpec) -> None:
    config, weights = (adapter / CONFIG_FILE).read_bytes(), (adapter / WEIGHTS_FILE).read_bytes()
    expected = hashlib.sha256(struct.pack("<Q", len(config)) + config + weights).hexdigest()
    assert load_lora_dir(adapter, spec).sha256 == expected
    edit_config(adapter, lora_alpha=16)
    assert load_lora_dir(adapter, spec).sha256 != expected


def test_rslora(tmp_path: Path, spec: BaseSpec) -> None:
    peft_deltas = make_peft(tmp_path / "a", r=4, lora_alpha=8, use_rslora=True)
    delta = load_lora_dir(tmp_path / "a", spec)
    assert delta.scaling == pytest.approx(8 / math.sqrt(4))
    assert_matches_peft(delta, peft_deltas)


def test_rank_and_alpha_patterns(tmp_path: Path, spec: BaseSpec) -> None:
    peft_deltas = make_peft(
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
        rank_pattern={"down_proj": 6, "layers.1.self_attn.q_proj": 2},
        alpha_pattern={"o_proj": 3, "layers.0.mlp.gate_proj": 20},
    )
    delta = load_lora_dir(tmp_path / "a", spec)
    assert delta.rank == 6 and delta.scaling == 2.0
    assert delta.weights["model.layers.0.mlp.down_proj"][0].shape == (6, 96)
    assert delta.weights["model.layers.1.self_attn.q_proj"][0].shape == (2, 64)
    assert delta.weights["model.layers.0.self_attn.q_proj"][0].shape == (4, 64)
    assert_matches_peft(delta, peft_deltas)
    with pytest.raises(AdapterMismatch) as e:
        load_lora_dir(tmp_path / "a", spec, max_rank=4)
    assert "rank 6" in e.value.message and "max rank 4" in e.value.message and e.value.param == "rank"


def test_rslora_with_patterns(tmp_path: Path, spec: BaseSpec) -> None:
    peft_deltas = make_peft(tmp_path / "a", use_rslora=True, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 5})
    assert_matches_peft(load_lora_dir(tmp_path / "a", spec), peft_deltas)


def test_all_linear_and_max_rank_ok(tmp_path: Path, spec: BaseSpec) -> None:
    peft_deltas = make_peft(tmp_path / "a", target_modules="all-linear")
    delta = load_lora_dir(tmp_path / "a", spec, max_rank=4)
    assert set(delta.weights) == spec.projections
    assert_matches_peft(delta, peft_deltas)


# --- files ---------------------------------------------------------------------------------------------


def test_missing_files(adapter: Path, spec: BaseSpec, tmp_path: Path) -> None:
    unsupported(tmp_path / "absent", spec, "not a directory")
    (adapter / WEIGHTS_FILE).unlink()
    assert unsupported(adapter, spec, WEIGHTS_FILE).param == WEIGHTS_FILE
    (adapter / CONFIG_FILE).unlink()
    assert unsupported(adapter, spec, CONFIG_FILE).param == CONFIG_FILE


def test_bin_only_adapter_is_refused(adapter: Path, spec: BaseSpec) -> None:
    (adapter / WEIGHTS_FILE).unlink()
    torch.save({KEY_A: torch.zeros(4, 64)}, adapter / "adapter_model.bin")  # written only: never loaded
    err = unsupported(adapter, spec, "pickle files are never loaded", "adapter_model.bin")
    assert err.param == "adapter_model.bin"


def test_pickle_named_safetensors(adapter: Path, spec: BaseSpec) -> None:
    torch.save({KEY_A: torch.zeros(4, 64)}, adapter / WEIGHTS_FILE)
    unsupported(adapter, spec, "pickle files are never loaded")


def test_bad_config_json(adapter: Path, spec: BaseSpec) -> None:
    (adapter / CONFIG_FILE).write_text("{")
    unsupported(adapter, spec, "not valid JSON")
    (adapter / CONFIG_FILE).write_text("[]")
    unsupported(adapter, spec, "JSON object")


def test_config_size_and_pattern_keys_are_bounded(adapter: Path, spec: BaseSpec) -> None:
    from registry.lora_format import MAX_PATTERN_KEYS
    from registry.peft_dir import MAX_CONFIG_BYTES

    edit_config(adapter, rank_pattern={f"layers.{i}.mlp.up_proj": 4 for i in range(MAX_PATTERN_KEYS + 1)})
    assert mismatch(adapter, spec, "rank_pattern", "over the limit").param == "rank_pattern"
    edit_config(adapter, rank_pattern=None, peft_version="x" * MAX_CONFIG_BYTES)
    unsupported(adapter, spec, CONFIG_FILE, "over the limit")


def test_pattern_matching_is_peft_s_and_compiles_nothing_per_module(adapter: Path, spec: BaseSpec, monkeypatch) -> None:
    import re

    from registry.lora_format import _Pattern

    keys = {"q_proj": 1, "layers.1.mlp.down_proj": 2, "1.self_attn.k_proj": 3, "mlp.gate_proj": 4, "layers.0.mlp.up_proj": 5,
            "proj": 6, "v_pro": 7, "layers.0": 8, "layers.1.self_attn.o.proj": 9}  # fmt: skip
    modules = sorted(spec.projections)

    def peft(module: str):  # PEFT's get_pattern_key, as it is written there
        return next((keys[k] for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)

    compiled = []
    real_compile = re.compile
    monkeypatch.setattr(re, "compile", lambda *a, **kw: compiled.append(a) or real_compile(*a, **kw))
    pattern = _Pattern(keys)
    assert [pattern.value(m, None) for m in modules] == [peft(m) for m in modules]
    assert len(compiled) == sum("." in k for k in keys)  # once per key with a '.', never per module
    # 600 keys (the upload that took seconds of CPU) validate without a compile per key and module
    many = {f"layers.{i}.mlp.up_proj": 4 for i in range(600)}
    edit_config(adapter, r=4, rank_pattern=many)
    compiled.clear()
    load_lora_dir(adapter, spec)
    assert len(compiled) <= 600


def test_truncated_weights(adapter: Path, spec: BaseSpec) -> None:
    data = (adapter / WEIGHTS_FILE).read_bytes()
    (adapter / WEIGHTS_FILE).write_bytes(data[:-100])
    unsupported(adapter, spec, "truncated")


# --- options refused by name -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"peft_type": "LOHA"}, ["peft_type", "LOHA"]),
        ({"use_dora": True}, ["use_dora", "DoRA"]),
        ({"bias": "all"}, ["bias", "all"]),
        ({"bias": "lora_only"}, ["bias"]),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save"]),
        ({"layer_replication": [[0, 2]]}, ["layer_replication"]),
        ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
        ({"lora_bias": True}, ["lora_bias"]),
        ({"trainable_token_indices": [1, 2]}, ["trainable_token_indices"]),
        ({"target_parameters": ["experts.weight"]}, ["target_parameters"]),
        ({"use_qalora": True}, ["use_qalora"]),
        ({"alora_invocation_tokens": [5]}, ["alora_invocation_tokens"]),
        ({"init_lora_weights": "pissa"}, ["init_lora_weights", "pissa"]),
        ({"init_lora_weights": "olora"}, ["init_lora_weights"]),
        ({"some_future_variant": {"k": 1}}, ["some_future_variant"]),
        ({"target_modules": ["embed_tokens"]}, ["embedding LoRA is not supported"]),
        ({"target_modules": ["q_proj", "lm_head"]}, ["lm_head", "embedding LoRA is not supported"]),
        ({"target_modules": ".*embed_tokens"}, ["embedding LoRA is not supported"]),
        ({"target_modules": ["q_proj", "fc1"]}, ["fc1", "not an attention/MLP projection"]),
        ({"target_modules": 3}, ["target_modules"]),
        ({"r": 0}, ["r must be"]),
        ({"r": True}, ["r must be"]),
        ({"lora_alpha": "8"}, ["lora_alpha"]),
        ({"lora_alpha": None}, ["lora_alpha"]),
        ({"use_rslora": "yes"}, ["use_rslora"]),
        ({"rank_pattern": {"(a+)+$": 2}}, ["rank_pattern", "(a+)+$"]),
        ({"rank_pattern": {"q_proj": -1}}, ["rank_pattern", "q_proj"]),
        ({"alpha_pattern": {"q_proj": "x"}}, ["alpha_pattern"]),
        ({"rank_pattern": [1]}, ["rank_pattern"]),
    ],
)
def test_refused_options(adapter: Path, spec: BaseSpec, changes: dict[str, Any], words: list[str]) -> None:
    edit_config(adapter, **changes)
    err = mismatch(adapter, spec, *words)
    option = next(iter(changes))
    assert err.param == option


def test_benign_options_accepted(adapter: Path, spec: BaseSpec) -> None:
    edit_config(
        adapter,
        init_lora_weights="gaussian",
        layers_to_transform=[0, 1],
        lora_dropout=0.1,
        task_type="CAUSAL_LM",
        unknown_but_unset=None,
        modules_to_save=[],
    )
    assert load_lora_dir(adapter, spec).rank == 4


def test_real_peft_dora_is_refused(tmp_path: Path, spec: BaseSpec) -> None:
    make_peft(tmp_path / "a", use_dora=True)
    mismatch(tmp_path / "a", spec, "use_dora")
    # and the magnitude vector key alone, without the config flag
    edit_config(tmp_path / "a", use_dora=False)
    err = mismatch(tmp_path / "a", spec, "lora_magnitude_vector")
    assert "lora_magnitude_vector" in (err.param or "")


def test_real_peft_embedding_lora_is_refused(tmp_path: Path, spec: BaseSpec) -> None:
    make_peft(tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    mismatch(tmp_path / "a", spec, "embedding LoRA is not supported")
    edit_config(tmp_path / "a", target_modules=["q_proj"])
    err = mismatch(tmp_path / "a", spec, "embedding LoRA is not supported")
    assert "embed_tokens" in (err.param or "")


def test_real_peft_modules_to_save_is_refused(tmp_path: Path, spec: BaseSpec) -> None:
    make_peft(tmp_path / "a", modules_to_save=["lm_head"])
    mismatch(tmp_path / "a", spec, "modules_to_save")


# --- weights refused by key / tensor ---------------------------------------------------------------------


def test_unknown_keys_are_named(adapter: Path, spec: BaseSpec) -> None:
    for key, words in [
        ("base_model.model.model.norm.weight", ["not a lora_A/lora_B"]),
        ("base_model.model.model.embed_tokens.lora_A.weight", ["embedding LoRA is not supported"]),
        ("base_model.model.lm_head.lora_B.weight", ["embedding LoRA is not supported"]),
        ("base_model.model.model.layers.0.mlp.act_fn.lora_A.weight", ["not an attention/MLP projection"]),
        ("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", ["not an attention/MLP projection"]),
        ("model.layers.0.self_attn.k_proj.lora_A.weight", ["base_model.model."]),
        (f"base_model.model.{Q0}.lora_A.default.weight", ["not a lora_A/lora_B"]),
        (f"base_model.model.{Q0}.lora_B.bias", ["not a lora_A/lora_B"]),
    ]:
        fresh = adapter.parent / f"k{abs(hash(key))}"
        shutil.copytree(adapter, fresh)
        edit_weights(fresh, lambda sd, key=key: sd.__setitem__(key, torch.zeros(4, 64)))
        err = mismatch(fresh, spec, key, *words)
        assert err.param == key


def test_missing_a_or_b(adapter: Path, spec: BaseSpec) -> None:
    edit_weights(adapter, lambda sd: sd.pop(KEY_B))
    err = mismatch(adapter, spec, Q0, "lora_B", KEY_B)
    assert err.param == KEY_B


def test_no_tensors(adapter: Path, spec: BaseSpec) -> None:
    save_file({}, str(adapter / WEIGHTS_FILE))
    mismatch(adapter, spec, "no tensors")


def test_rank_above_max(adapter: Path, spec: BaseSpec) -> None:
    mismatch(adapter, spec, "rank 4", "max rank 2", max_rank=2)


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [(KEY_A, (4, 63), "[4, 64]"), (KEY_B, (64, 3), "[64, 4]"), (KEY_A, (4, 64, 1), "[4, 64]")],
)
def test_wrong_shapes(adapter: Path, spec: BaseSpec, key: str, shape: tuple[int, ...], expected: str) -> None:
    edit_weights(adapter, lambda sd: sd.__setitem__(key, torch.zeros(shape)))
    err = mismatch(adapter, spec, key, expected, str(list(shape)))
    assert err.param == key


def test_rank_disagrees_with_config(adapter: Path, spec: BaseSpec) -> None:
    edit_config(adapter, r=8)
    mismatch(adapter, spec, "lora_A.weight has shape [4, ", "expected [8, ")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(adapter: Path, spec: BaseSpec, bad: float) -> None:
    def poison(sd: dict[str, torch.Tensor]) -> None:
        sd[KEY_B][3, 1] = bad

    edit_weights(adapter, poison)
    err = mismatch(adapter, spec, KEY_B, "NaN or Inf")
    assert err.param == KEY_B


def test_non_float_dtype(adapter: Path, spec: BaseSpec) -> None:
    edit_weights(adapter, lambda sd: sd.__setitem__(KEY_A, torch.zeros(4, 64, dtype=torch.int32)))
    mismatch(adapter, spec, KEY_A, "floating point")


def test_half_precision_weights_become_float32(adapter: Path, spec: BaseSpec) -> None:
    saved = load_file(str(adapter / WEIGHTS_FILE))
    save_file({k: v.to(torch.bfloat16) for k, v in saved.items()}, str(adapter / WEIGHTS_FILE))
    a, b = load_lora_dir(adapter, spec).weights[Q0]
    assert a.dtype == torch.float32 and torch.equal(a, saved[KEY_A].to(torch.bfloat16).float())


def test_errors_are_delta_errors(adapter: Path, spec: BaseSpec) -> None:
    edit_config(adapter, use_dora=True)
    with pytest.raises(DeltaError):
        load_lora_dir(adapter, spec)
