"""BitDelta compression (registry.compress, `deltaserve compress`): round trip through the serving model,
scale modes, replacements, identical tensors, streaming memory, and refusals that write nothing."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import registry.compress as compress_mod
from deltakernels import select_delta_ops
from deltakernels.bitdelta import unpack_signs
from registry.checkpoint import Checkpoint
from registry.compress import CompressError, CompressOptions, check_pair, compress
from registry.errors import AdapterMismatch
from registry.fingerprint import base_spec
from registry.loading import load_delta
from registry.slot_pool import SlotPool
from serving.cli import main
from serving.evaluation import delta_batch, prefill_logits
from serving.models.loader import load_model
from tests.helpers import hf_model, make_model_dir, make_tokenizer, save_finetune

UNCHANGED = {"model.layers.0.self_attn.k_proj.weight", "model.layers.1.post_attention_layernorm.weight"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    base = make_model_dir(root / "base", arch="qwen2", max_shard_size="40KB")  # untied, q/k/v biases, sharded
    ft = save_finetune(base, root / "ft", seed=1, touch=lambda n: n not in UNCHANGED, max_shard_size="40KB")
    return root, base, ft


def expected_delta(base: Path, ft: Path, per_row: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Independently computed: P -> (signs as +-1 floats, scale) from whole state dicts."""
    wb, wf = hf_model(base).state_dict(), hf_model(ft).state_dict()
    out = {}
    for path in base_spec(Checkpoint(base)).projections:
        d = wf[path + ".weight"] - wb[path + ".weight"]
        if not d.any():
            continue
        scale = d.abs().mean(dim=1) if per_row else d.abs().mean().reshape(1)
        out[path] = (torch.where(d > 0, 1.0, -1.0), scale)
    return out


def served_logits(base: Path, delta_file: Path, ids: list[int]) -> torch.Tensor:
    """Logits of every position through OUR model with the delta in a SlotPool slot, batched with a base row."""
    model = load_model(base)
    model.bind_kv_cache(None)
    pool = SlotPool(model.projection_paths(), dict(model.state_dict()), bitdelta_slots=2, lora_slots=0,
                    max_lora_rank=1, dtype=torch.float32, device="cpu")  # fmt: skip
    delta = load_delta(delta_file, base_spec(Checkpoint(base)))
    slot = pool.acquire(delta)
    deltas = delta_batch(pool, select_delta_ops("torch"), [-1, slot], [-1, -1], [len(ids)] * 2, torch.device("cpu"))
    logits = prefill_logits(model, [ids, ids], deltas, torch.device("cpu"))
    return logits[len(ids) :]


@pytest.mark.parametrize("scale", ["per-matrix", "per-row"])
def test_round_trip_through_the_serving_model(world, tmp_path, scale):
    root, base, ft = world
    out = tmp_path / "delta.safetensors"
    result = compress(base, ft, out, CompressOptions(scale=scale))
    delta = load_delta(out, base_spec(Checkpoint(base)))
    assert delta.metadata["scale_mode"] == scale and delta.metadata["base"].startswith("sha256:")
    assert delta.metadata["source_finetune"] == "ft" and delta.metadata["distill_steps"] == "0"

    # The file holds exactly sign(W_ft - W_base) and mean|delta| (per matrix or per row).
    want = expected_delta(base, ft, per_row=scale == "per-row")
    assert set(delta.projections) == set(want) and result.num_projections == len(want)
    assert "model.layers.0.self_attn.k_proj" not in delta.projections  # identical: not stored
    for path, (sign, scale_t) in delta.projections.items():
        in_f = want[path][0].shape[1]
        assert torch.equal(unpack_signs(sign, in_f), want[path][0]), path
        assert scale_t.shape == want[path][1].shape and torch.allclose(scale_t, want[path][1], rtol=1e-6), path

    # Served (our model, per-row slot) == transformers with W + scale * sign and the fine-tune's other tensors.
    merged = hf_model(ft)
    state = merged.state_dict()
    base_state = hf_model(base).state_dict()
    with torch.no_grad():
        for path, (sign, scale_t) in delta.projections.items():
            w = base_state[path + ".weight"]
            state[path + ".weight"].copy_(w + scale_t[:, None] * unpack_signs(sign, w.shape[1]))
    ids = make_tokenizer()("To be or not to be, that is the question.").input_ids
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(served_logits(base, out, ids), ref, atol=2e-4, rtol=1e-4)


def test_replacements_exact_and_identical_skipped(world, tmp_path):
    _, base, ft = world
    out = tmp_path / "d.safetensors"
    result = compress(base, ft, out)
    stored = load_file(str(out))
    ft_state = {n: Checkpoint(ft).get(n) for n in Checkpoint(ft).names()}
    projections = {p + ".weight" for p in base_spec(Checkpoint(base)).projections}
    others = {n for n in ft_state if n not in projections}
    expected_replaced = others - UNCHANGED
    assert set(result.replacements) == expected_replaced
    for name in expected_replaced:  # bit for bit, dtype kept
        assert stored[name].dtype == ft_state[name].dtype and torch.equal(stored[name], ft_state[name]), name
    assert set(result.identical) == UNCHANGED
    assert not any(n in stored for n in UNCHANGED) and "model.layers.0.self_attn.k_proj.sign" not in stored


def test_half_mode_rounds_and_skips_negligible(world, tmp_path):
    root, base, _ = world
    tiny_change = "model.layers.0.input_layernorm.weight"
    ft = save_finetune(base, root / "ft_half", seed=2, touch=lambda n: n != tiny_change)
    # a change far below the 1e-3 relative threshold
    path = ft / "model.safetensors"
    tensors = load_file(str(path))
    tensors[tiny_change] = tensors[tiny_change] * (1 + 1e-6)
    save_file(tensors, str(path), metadata={"format": "pt"})
    out = tmp_path / "h.safetensors"
    result = compress(base, ft, out, CompressOptions(other_tensors="half"))
    stored = load_file(str(out))
    assert result.negligible == [tiny_change] and tiny_change not in stored
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["model.norm.weight"], tensors["model.norm.weight"].to(torch.bfloat16))
    exact = compress(base, ft, tmp_path / "e.safetensors")
    assert tiny_change in exact.replacements and result.size_bytes < exact.size_bytes


class TrackingCheckpoint(Checkpoint):
    """Counts the bytes of tensors read from any checkpoint that are still alive, and their peak."""

    live = 0
    peak = 0
    reads: list[str] = []

    @classmethod
    def _track(cls, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        cls.live += n
        cls.peak = max(cls.peak, cls.live)
        weakref.finalize(t, TrackingCheckpoint._release, n)
        return t

    @staticmethod
    def _release(n: int) -> None:
        TrackingCheckpoint.live -= n

    def get(self, name, dtype=None):
        TrackingCheckpoint.reads.append(name)
        return self._track(super().get(name, dtype))

    def get_rows(self, name, rows):
        return self._track(super().get_rows(name, rows))

    def iter_tensors(self, dtype=None):
        raise AssertionError("compression must not iterate over whole checkpoints")


def test_streaming_holds_about_one_tensor_pair(tmp_path, monkeypatch):
    # 4 layers, sharded into many files; embeddings untouched (identical), so what the output keeps is small.
    base = make_model_dir(tmp_path / "base", max_shard_size="60KB", num_hidden_layers=4, intermediate_size=160)
    ft = save_finetune(base, tmp_path / "ft", seed=3, touch=lambda n: "embed" not in n, max_shard_size="60KB")
    assert len(Checkpoint(ft).shards()) > 4
    monkeypatch.setattr(compress_mod, "Checkpoint", TrackingCheckpoint)
    TrackingCheckpoint.live = TrackingCheckpoint.peak = 0
    TrackingCheckpoint.reads = []
    result = compress(base, ft, tmp_path / "d.safetensors")
    ckpt = Checkpoint(base)
    sizes = [ckpt.info(n).nbytes for n in ckpt.names()]
    model_bytes = 2 * sum(sizes)  # base + fine-tune
    kept = sum(ckpt.info(n).nbytes for n in result.replacements)  # replacements are the output: kept on purpose
    assert sorted(set(TrackingCheckpoint.reads)) == ckpt.names()
    assert TrackingCheckpoint.peak <= 2 * max(sizes) + kept, (TrackingCheckpoint.peak, max(sizes), kept)
    assert TrackingCheckpoint.peak < model_bytes / 5


def test_refused_against_another_base(world, tmp_path):
    root, base, ft = world
    out = tmp_path / "d.safetensors"
    compress(base, ft, out)
    other = make_model_dir(root / "other_base", arch="qwen2", seed=7)
    with pytest.raises(AdapterMismatch, match="built for base"):
        load_delta(out, base_spec(Checkpoint(other)))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _malformed(kind: str, root: Path, base: Path, ft: Path, tmp: Path) -> Path:
    if kind == "architecture":
        return make_model_dir(tmp / "mistral", arch="mistral")
    bad = _copy(ft, tmp / kind)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    if kind == "missing shard":
        (bad / index["model.norm.weight"]).unlink()
    elif kind == "vocab":
        _edit_config(bad, vocab_size=400)
    elif kind == "tokenizer":
        tok = json.loads((bad / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab)[10:12]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (bad / "tokenizer.json").write_text(json.dumps(tok))
    elif kind in ("shape", "missing tensor"):
        shard = bad / index["model.layers.1.mlp.up_proj.weight"]
        tensors = load_file(str(shard))
        if kind == "shape":
            tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :32].clone()
        else:
            del tensors["model.layers.1.mlp.up_proj.weight"]
            idx = json.loads((bad / "model.safetensors.index.json").read_text())
            del idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
            (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
        save_file(tensors, str(shard), metadata={"format": "pt"})
    elif kind == "nan":
        shard = bad / index["model.layers.0.mlp.down_proj.weight"]
        tensors = load_file(str(shard))
        tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return bad


MALFORMED = {
    "architecture": "different architectures",
    "missing shard": "missing",
    "vocab": "vocab_size",
    "tokenizer": "tokenizer vocabulary differs",
    "shape": r"up_proj.weight has shape \[96, 32\] in the fine-tune, \[96, 64\]",
    "missing tensor": "lacks 1 tensor",
    "nan": "NaN",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_inputs_refused_and_nothing_written(world, tmp_path, capsys, kind):
    root, base, ft = world
    bad = _malformed(kind, root, base, ft, tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CompressError, match=MALFORMED[kind]):
        compress(base, bad, out)
    assert not out.exists()
    capsys.readouterr()
    code = main(["compress", "--base", str(base), "--finetune", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("deltaserve: error: ") and not out.exists(), err
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".out*")) == []


def test_identical_finetune_refused(world, tmp_path):
    _, base, _ = world
    with pytest.raises(CompressError, match="identical"):
        compress(base, base, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_check_pair_reads_headers_only(world):
    _, base, ft = world
    pair = check_pair(base, ft)
    assert pair.names == sorted(pair.names) and "model.norm.weight" in pair.names


def test_cli_compress(world, tmp_path, capsys):
    _, base, ft = world
    out = tmp_path / "cli.safetensors"
    code = main(["compress", "--base", str(base), "--finetune", str(ft), "--out", str(out), "--scale", "per-row", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["out"] == str(out) and summary["scale_mode"] == "per-row"
    assert summary["size_bytes"] == out.stat().st_size and summary["projections"] == 13
    delta = load_delta(out, base_spec(Checkpoint(base)))
    assert all(scale.shape[0] == sign.shape[0] for sign, scale in delta.projections.values())
    # distillation flags without calibration text: refused before any work
    code = main(["compress", "--base", str(base), "--finetune", str(ft), "--out", str(tmp_path / "n.safetensors"),
                 "--distill-steps", "5"])  # fmt: skip
    assert code == 2 and "--calibration" in capsys.readouterr().err and not (tmp_path / "n.safetensors").exists()
