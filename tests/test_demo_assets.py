"""The embedded demo's assets: they load offline, the tokenizer covers every tenant's language, the manifest
matches the files, and the whole stays small."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from safetensors import safe_open

from serving.demo import demo_base, demo_dir, demo_tenants, read_heldout

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_base().path, local_files_only=True)


def test_assets_are_small_and_pickle_free():
    files = [p for p in demo_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30_000_000
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]


def test_base_loads_offline_and_generates(tokenizer):
    from transformers import AutoModelForCausalLM

    base = demo_base()
    config = json.loads((base.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] < config["num_attention_heads"]
    assert {dt for _, dt in _tensors(base.path / "model.safetensors").values()} == {"F16"}
    model = AutoModelForCausalLM.from_pretrained(base.path, local_files_only=True, dtype=torch.float32).eval()
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = tokenizer(base.example_prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0, eos_token_id=2)
    assert out.shape[1] > ids.shape[1]


def test_tokenizer_round_trips_every_language(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) <= 4096
    for heldout in [demo_base().heldout_path] + [t.heldout_path for t in demo_tenants()]:
        entries = read_heldout(heldout)
        assert entries, heldout
        text = "\n".join(entries[:20])
        ids = tokenizer(text).input_ids
        assert ids[0] == 1 and 0 not in ids  # <s> added; byte-level: nothing is unknown
        assert tokenizer.decode(ids, skip_special_tokens=True) == unicodedata.normalize("NFC", text)
        assert len(text) / len(ids) > 2.0, heldout  # the vocabulary was trained on this language
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hallo"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|user|>\nHallo</s>\n<|assistant|>\n"
    assert tokenizer.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [3, 4, 5]


def test_manifest_matches_the_files():
    base_tensors = _tensors(demo_base().path / "model.safetensors")
    base_config = json.loads((demo_base().path / "config.json").read_text())
    tenants = demo_tenants()
    assert {t.kind for t in tenants} == {"bitdelta", "lora"}
    for t in tenants:
        assert t.heldout_path.is_file() and t.example_prompt
        if t.kind == "bitdelta":
            assert t.adapter_path.parent == demo_dir() / "deltas"
            assert t.adapter_path.name == f"{t.name}.bitdelta.safetensors"
            assert sorted(p.name for p in t.finetune_path.iterdir()) == ["config.json", "model.safetensors"]
            config = json.loads((t.finetune_path / "config.json").read_text())
            for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_key_value_heads"):
                assert config[key] == base_config[key]
            assert _tensors(t.finetune_path / "model.safetensors") == base_tensors
        else:
            assert t.finetune_path is None
            config = json.loads((t.adapter_path / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and config["r"] == 8
            assert set(config["target_modules"]) == PROJECTIONS
            assert not config.get("modules_to_save") and config.get("bias", "none") == "none"
            names = _tensors(t.adapter_path / "adapter_model.safetensors")
            assert len(names) == 2 * len(PROJECTIONS) * base_config["num_hidden_layers"]


def test_finetunes_are_real_finetunes():
    """Every weight of a full fine-tune moved away from the base (not a LoRA merged into a few layers)."""
    with safe_open(str(demo_base().path / "model.safetensors"), framework="pt") as fb:
        for t in [t for t in demo_tenants() if t.kind == "bitdelta"]:
            with safe_open(str(t.finetune_path / "model.safetensors"), framework="pt") as ft:
                for name in fb.keys():  # noqa: SIM118
                    if name.endswith("proj.weight"):
                        changed = (fb.get_tensor(name) != ft.get_tensor(name)).float().mean().item()
                        assert changed > 0.5, (t.name, name, changed)
