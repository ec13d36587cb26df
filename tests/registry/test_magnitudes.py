"""Deltas absurd against the served base are refused by name (registry/magnitudes.py); real ones pass."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.errors import AdapterMismatch
from registry.loading import load_delta
from registry.magnitudes import LORA_LIMIT, REPLACEMENT_LIMIT, SCALE_LIMIT, measure
from registry.safetensors_io import read_header
from tests.helpers import hf_model
from tests.registry.assets import Assets


@pytest.fixture(scope="module")
def spec(assets: Assets):
    return dataclasses.replace(assets.spec, magnitudes=measure(hf_model(assets.model).state_dict()))


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a safetensors file with change(tensors) applied, its metadata kept."""
    tensors = load_file(src)
    change(tensors)
    save_file(tensors, dst, metadata=read_header(src)[1])
    return dst


def test_measured_magnitudes(assets: Assets, spec) -> None:
    w = hf_model(assets.model).state_dict()["model.layers.0.mlp.up_proj.weight"]
    m = spec.magnitudes["model.layers.0.mlp.up_proj.weight"]
    assert m.max_abs == pytest.approx(float(w.abs().max())) and m.frobenius == pytest.approx(float(w.norm()))


def test_real_deltas_pass(assets: Assets, spec) -> None:
    for path in (assets.bd1, assets.bd2, assets.lora, assets.lora2):
        load_delta(path, spec, 8)


def test_demo_tenants_pass() -> None:
    # The shipped fine-tunes (distilled 1-bit deltas with replaced embeddings, a trained LoRA) are real fine-tunes.
    from registry.checkpoint import Checkpoint
    from registry.fingerprint import base_spec
    from serving.demo import demo_dir, demo_tenants
    from serving.models.loader import load_model

    base = demo_dir() / "base"
    spec = dataclasses.replace(base_spec(Checkpoint(base)), magnitudes=measure(load_model(base).state_dict()))
    for t in demo_tenants():
        load_delta(t.adapter_path, spec, 64)


def test_an_absurd_scale_is_refused(assets: Assets, spec, tmp_path: Path) -> None:
    # The attack of the issue: every scale set to 3e38 (finite: every format check passes).
    def poison(t):
        for name in t:
            if name.endswith(".scale"):
                t[name] = torch.full_like(t[name], 3e38)

    bad = _rewrite(assets.bd1, tmp_path / "bad.safetensors", poison)
    with pytest.raises(AdapterMismatch, match=r"\.scale: its largest value is 3e\+38, over .* too large to be a fine-tune"):
        load_delta(bad, spec)
    try:
        load_delta(bad, spec)
    except AdapterMismatch as e:
        assert e.param.endswith(".scale")


def test_the_scale_limit_is_where_it_says(assets: Assets, spec, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.down_proj"
    limit = SCALE_LIMIT * spec.magnitudes[name + ".weight"].max_abs

    def at(factor):
        def change(t):
            t[name + ".scale"] = torch.full_like(t[name + ".scale"], limit * factor)

        return change

    load_delta(_rewrite(assets.bd1, tmp_path / "ok.safetensors", at(0.99)), spec)
    with pytest.raises(AdapterMismatch, match=name):
        load_delta(_rewrite(assets.bd1, tmp_path / "over.safetensors", at(1.01)), spec)


def test_an_absurd_replacement_is_refused(assets: Assets, spec, tmp_path: Path) -> None:
    def poison(t):
        t["model.norm.weight"] = t["model.norm.weight"] * (2 * REPLACEMENT_LIMIT)

    bad = _rewrite(assets.bd2, tmp_path / "bad.safetensors", poison)  # bd2 replaces the final norm
    with pytest.raises(AdapterMismatch, match=r"model\.norm\.weight: its largest value"):
        load_delta(bad, spec)


def _lora_copy(src: Path, dst: Path, config_change=None, weights_change=None) -> Path:
    shutil.copytree(src, dst)
    if config_change:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config_change(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if weights_change:
        _rewrite(src / "adapter_model.safetensors", dst / "adapter_model.safetensors", weights_change)
    return dst


def test_an_absurd_lora_is_refused(assets: Assets, spec, tmp_path: Path) -> None:
    huge_alpha = _lora_copy(assets.lora, tmp_path / "alpha", config_change=lambda c: c.update(lora_alpha=1e30))
    with pytest.raises(AdapterMismatch, match=r"scaling x \|B\|_F x \|A\|_F is .* too large to be a fine-tune"):
        load_delta(huge_alpha, spec, 8)

    def blow_up(t):
        key = next(k for k in t if k.endswith("lora_B.weight"))
        t[key] = t[key] * (10 * LORA_LIMIT)

    huge_b = _lora_copy(assets.lora, tmp_path / "b", weights_change=blow_up)
    with pytest.raises(AdapterMismatch, match="too large to be a fine-tune"):
        load_delta(huge_b, spec, 8)


def test_without_magnitudes_nothing_is_checked(assets: Assets, tmp_path: Path) -> None:
    # Offline tools that never load the weights (compress, eval) have a spec without magnitudes.
    def poison(t):
        for name in t:
            if name.endswith(".scale"):
                t[name] = torch.full_like(t[name], 3e38)

    load_delta(_rewrite(assets.bd1, tmp_path / "bad.safetensors", poison), assets.spec)
