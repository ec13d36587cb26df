"""registry.bitdelta_format: the deltaserve.bitdelta v1 file, saved atomically and loaded strictly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltakernels.bitdelta import pack_signs, unpack_signs
from registry.bitdelta_format import FORMAT, VERSION, load_bitdelta_file, save_bitdelta_file
from registry.checkpoint import Checkpoint
from registry.deltas import BaseSpec, BitDelta
from registry.errors import AdapterMismatch, UnsupportedFormat
from registry.fingerprint import base_spec
from tests.helpers import make_model_dir

FP = "sha256:" + "ab" * 32
Q = "model.layers.0.self_attn.q_proj"  # [5, 13]: in is not a multiple of 8 (padding bits)
D = "model.layers.0.mlp.down_proj"  # [4, 16]


def synthetic_spec(tied: bool = False, fingerprint: str = FP) -> BaseSpec:
    bf16 = torch.bfloat16
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        f"{Q}.weight": ((5, 13), bf16),
        f"{D}.weight": ((4, 16), bf16),
        "model.layers.0.input_layernorm.weight": ((13,), bf16),
        "model.embed_tokens.weight": ((10, 13), bf16),
        "model.norm.weight": ((13,), bf16),
    }
    if not tied:
        tensors["lm_head.weight"] = ((10, 13), bf16)
    return BaseSpec(fingerprint=fingerprint, tensors=tensors, projections=frozenset({Q, D}), tie_word_embeddings=tied)


def signs(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack_signs(torch.rand(out_f, in_f, generator=g) > 0.5)


def good_tensors() -> dict[str, torch.Tensor]:
    return {
        f"{Q}.sign": signs(5, 13),
        f"{Q}.scale": torch.rand(5) + 0.1,
        f"{D}.sign": signs(4, 16, seed=1),
        f"{D}.scale": torch.tensor([0.25]),
        "model.norm.weight": torch.randn(13, dtype=torch.bfloat16),
    }


def write(path: Path, tensors: dict[str, torch.Tensor], **meta: str | None) -> Path:
    """Writes a file by hand (no checks), metadata defaulting to a valid v1 header; None drops a key."""
    metadata = {"format": FORMAT, "version": VERSION, "base": FP, **meta}
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if v is not None})
    return path


def refused(path: Path, spec: BaseSpec, cls: type = AdapterMismatch, *words: str) -> AdapterMismatch:
    with pytest.raises(cls) as e:
        load_bitdelta_file(path, spec)
    assert e.value.code == ("adapter_mismatch" if cls is AdapterMismatch else "unsupported_format")
    for w in words:
        assert w in e.value.message, (w, e.value.message)
    return e.value


# --- round trips ---------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    spec = synthetic_spec()
    t = good_tensors()
    path = tmp_path / "delta.safetensors"
    digest = save_bitdelta_file(
        path,
        {Q: (t[f"{Q}.sign"], t[f"{Q}.scale"]), D: (t[f"{D}.sign"], t[f"{D}.scale"])},
        {"model.norm.weight": t["model.norm.weight"]},
        FP,
        metadata={"source": "unit-test"},
    )
    assert os.listdir(tmp_path) == ["delta.safetensors"]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()

    delta = load_bitdelta_file(path, spec)
    assert isinstance(delta, BitDelta) and delta.kind == "bitdelta"
    assert delta.sha256 == digest and delta.base_fingerprint == FP
    assert delta.metadata == {"format": FORMAT, "version": VERSION, "base": FP, "source": "unit-test"}
    assert set(delta.projections) == {Q, D}
    sign, scale = delta.projections[Q]
    assert sign.dtype == torch.uint8 and torch.equal(sign, t[f"{Q}.sign"])
    assert scale.shape == (5,) and torch.equal(scale, t[f"{Q}.scale"])  # per-row scales
    assert delta.projections[D][1].tolist() == [0.25]  # one scale per matrix
    norm = delta.replacements["model.norm.weight"]
    assert norm.dtype == torch.float32 and torch.equal(norm, t["model.norm.weight"].float())
    assert delta.nbytes == 5 * 2 + 5 * 4 + 4 * 2 + 4 + 13 * 4


def test_round_trip_on_a_real_base(tmp_path: Path) -> None:
    ckpt = Checkpoint(make_model_dir(tmp_path / "base", arch="qwen2"))
    spec = base_spec(ckpt)
    proj = "model.layers.1.mlp.down_proj"
    w = ckpt.get(proj + ".weight")
    target = w + 0.01 * torch.randn_like(w)
    diff = target - w
    scale = diff.abs().mean(dim=1)
    lm_head = torch.randn(spec.tensors["lm_head.weight"][0])
    bias = torch.randn(spec.tensors["model.layers.0.self_attn.q_proj.bias"][0])
    path = tmp_path / "d.safetensors"
    save_bitdelta_file(
        path,
        {proj: (pack_signs(diff > 0), scale)},
        {"lm_head.weight": lm_head, "model.layers.0.self_attn.q_proj.bias": bias},
        spec.fingerprint,
    )
    delta = load_bitdelta_file(path, spec)
    sign, s = delta.projections[proj]
    rebuilt = w + s[:, None] * unpack_signs(sign, w.shape[1])
    assert torch.equal(torch.sign(rebuilt - w), torch.where(diff > 0, 1.0, -1.0))
    assert torch.equal(delta.replacements["lm_head.weight"], lm_head)
    assert torch.equal(delta.replacements["model.layers.0.self_attn.q_proj.bias"], bias)


def test_replacements_only_file(tmp_path: Path) -> None:
    path = write(tmp_path / "d.safetensors", {"model.embed_tokens.weight": torch.randn(10, 13, dtype=torch.float64)})
    delta = load_bitdelta_file(path, synthetic_spec())
    assert delta.projections == {} and delta.replacements["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_replacements_load_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    # torch has no isfinite for float8: the check must not fail (a 500) but work on the exact float32 values.
    value = torch.tensor([0.5, -1.25, 2.0] + [1.0] * 10).to(dtype)
    delta = load_bitdelta_file(write(tmp_path / "d.safetensors", {"model.norm.weight": value}), synthetic_spec())
    assert delta.replacements["model.norm.weight"].dtype == torch.float32
    assert torch.equal(delta.replacements["model.norm.weight"], value.float())
    nan = value.clone().view(torch.uint8)
    nan[0] = 0x7F if dtype == torch.float8_e4m3fn else 0x7E  # the format's NaN bit patterns
    bad = write(tmp_path / "nan.safetensors", {"model.norm.weight": nan.view(dtype)})
    assert refused(bad, synthetic_spec(), AdapterMismatch, "model.norm.weight", "NaN or Inf").param == "model.norm.weight"


def test_save_refuses_bad_arguments(tmp_path: Path) -> None:
    t = good_tensors()
    path = tmp_path / "d.safetensors"
    with pytest.raises(ValueError, match="format"):
        save_bitdelta_file(path, {}, {"model.norm.weight": t["model.norm.weight"]}, FP, metadata={"format": "x"})
    with pytest.raises(ValueError, match="sign"):
        save_bitdelta_file(path, {Q: (t[f"{Q}.sign"].to(torch.int8), t[f"{Q}.scale"])}, {}, FP)
    with pytest.raises(ValueError, match="scale"):
        save_bitdelta_file(path, {Q: (t[f"{Q}.sign"], t[f"{Q}.scale"][:3])}, {}, FP)
    with pytest.raises(ValueError, match="reserves"):
        save_bitdelta_file(path, {}, {"x.scale": torch.ones(1)}, FP)
    with pytest.raises(ValueError, match="at least one"):
        save_bitdelta_file(path, {}, {}, FP)
    assert not path.exists() and os.listdir(tmp_path) == []


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"format": "something.else"}, ["format", "something.else"]),
        ({"format": None}, ["format"]),
        ({"version": "2"}, ["version", "'2'"]),
        ({"version": None}, ["version"]),
    ],
)
def test_format_and_version(tmp_path: Path, meta: dict[str, str | None], words: list[str]) -> None:
    path = write(tmp_path / "d.safetensors", good_tensors(), **meta)
    err = refused(path, synthetic_spec(), UnsupportedFormat, *words)
    assert err.param == "d.safetensors"


def test_wrong_fingerprint(tmp_path: Path) -> None:
    other = "sha256:" + "cd" * 32
    path = write(tmp_path / "d.safetensors", good_tensors(), base=other)
    refused(path, synthetic_spec(), AdapterMismatch, f"built for base {other}, this server serves base {FP}")
    refused(write(tmp_path / "e.safetensors", good_tensors(), base=None), synthetic_spec(), AdapterMismatch, "base")


def test_empty_file(tmp_path: Path) -> None:
    refused(write(tmp_path / "d.safetensors", {}), synthetic_spec(), AdapterMismatch, "no tensors")


def test_pickle_and_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    torch.save(good_tensors(), path)  # written only: never loaded
    refused(path, synthetic_spec(), UnsupportedFormat, "pickle files are never loaded")
    write(path, good_tensors())
    path.write_bytes(path.read_bytes()[:-7])
    refused(path, synthetic_spec(), UnsupportedFormat, "truncated")


def _variant(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    t = good_tensors()
    for name, value in changes.items():
        name = name.replace("__", ".").replace("Q", Q).replace("D", D)
        if value is None:
            t.pop(name)
        else:
            t[name] = value
    return t


@pytest.mark.parametrize(
    ("tensors", "param", "words"),
    [
        (_variant(Q__scale=None), f"{Q}.sign", [f"{Q}.sign", "no matching", f"{Q}.scale"]),
        (_variant(D__sign=None), f"{D}.scale", [f"{D}.scale", "no matching", f"{D}.sign"]),
        (
            {
                **good_tensors(),
                "model.layers.0.mlp.up_proj.sign": signs(4, 16),
                "model.layers.0.mlp.up_proj.scale": torch.ones(1),
            },
            "model.layers.0.mlp.up_proj.sign",
            ["model.layers.0.mlp.up_proj", "not a projection of the base"],
        ),
        (_variant(Q__sign=signs(5, 24)), f"{Q}.sign", [f"{Q}.sign", "uint8 [5, 2]", "got torch.uint8 [5, 3]"]),
        (_variant(Q__sign=signs(4, 13)), f"{Q}.sign", [f"{Q}.sign", "uint8 [5, 2]", "[4, 2]"]),
        (_variant(Q__sign=signs(5, 13).to(torch.int8)), f"{Q}.sign", [f"{Q}.sign", "torch.int8"]),
        (_variant(Q__sign=signs(5, 13).flatten()), f"{Q}.sign", [f"{Q}.sign", "[10]"]),
        (_variant(Q__scale=torch.ones(3)), f"{Q}.scale", [f"{Q}.scale", "[5] or [1]", "[3]"]),
        (_variant(Q__scale=torch.ones(5, 1)), f"{Q}.scale", [f"{Q}.scale", "[5, 1]"]),
        (_variant(D__scale=torch.ones(1, dtype=torch.float16)), f"{D}.scale", [f"{D}.scale", "float16"]),
        (_variant(D__scale=torch.tensor([float("nan")])), f"{D}.scale", [f"{D}.scale", "NaN or Inf"]),
        (_variant(Q__scale=torch.full((5,), float("inf"))), f"{Q}.scale", [f"{Q}.scale", "NaN or Inf"]),
        (
            {**good_tensors(), "model.layers.3.mlp.up_proj.weight": torch.ones(2)},
            "model.layers.3.mlp.up_proj.weight",
            ["model.layers.3.mlp.up_proj.weight", "not a tensor of the base"],
        ),
        (
            {**good_tensors(), "model.norm.weight": torch.ones(12)},
            "model.norm.weight",
            ["model.norm.weight", "[12]", "[13]"],
        ),
        (
            {**good_tensors(), "model.embed_tokens.weight": torch.ones(13, 10)},
            "model.embed_tokens.weight",
            ["[13, 10]", "[10, 13]"],
        ),
        (
            {**good_tensors(), "model.norm.weight": torch.ones(13, dtype=torch.int32)},
            "model.norm.weight",
            ["model.norm.weight", "floating point"],
        ),
        (
            {**good_tensors(), "model.norm.weight": torch.tensor([float("nan")] + [1.0] * 12)},
            "model.norm.weight",
            ["model.norm.weight", "NaN or Inf"],
        ),
        (
            {**good_tensors(), "model.norm.weight": torch.tensor([1e300] * 13, dtype=torch.float64)},
            "model.norm.weight",
            ["model.norm.weight", "NaN or Inf"],
        ),
        (
            {**good_tensors(), f"{Q}.weight": torch.ones(5, 13)},
            f"{Q}.weight",
            [f"{Q}.weight", "both replaced and compressed"],
        ),
    ],
)
def test_refused_tensors(tmp_path: Path, tensors: dict[str, torch.Tensor], param: str, words: list[str]) -> None:
    err = refused(write(tmp_path / "d.safetensors", tensors), synthetic_spec(), AdapterMismatch, *words)
    assert err.param == param


def test_non_zero_padding_bits(tmp_path: Path) -> None:
    sign = signs(5, 13)
    sign[2, 1] |= 0b1000_0000  # column 15 does not exist (in = 13)
    path = write(tmp_path / "d.safetensors", _variant(Q__sign=sign))
    err = refused(path, synthetic_spec(), AdapterMismatch, f"{Q}.sign", "padding")
    assert err.param == f"{Q}.sign"
    sign[2, 1] = 0b0001_1111  # columns 8..12 only: fine
    load_bitdelta_file(write(tmp_path / "e.safetensors", _variant(Q__sign=sign)), synthetic_spec())


def test_lm_head_on_tied_base(tmp_path: Path) -> None:
    path = write(tmp_path / "d.safetensors", {**good_tensors(), "lm_head.weight": torch.ones(10, 13)})
    assert "lm_head.weight" in load_bitdelta_file(path, synthetic_spec(tied=False)).replacements
    err = refused(path, synthetic_spec(tied=True), AdapterMismatch, "lm_head.weight", "ties")
    assert err.param == "lm_head.weight"
