"""Every base family with every delta kind: for tiny random Qwen3 and Gemma 3 models (the configs of
tests/helpers.tiny_config exercise each family's differences), one mixed batch of base rows, LoRA r4 and r16,
1-bit deltas (one replacing norms — a per-head query norm among them —, the embeddings and the lm_head), an
(IA)^3 adapter and a composition gives, row for row, the greedy tokens of plain transformers on each merged
fine-tune in float32, with the torch, CPU and Triton (interpreted) kernels."""

from __future__ import annotations

import dataclasses
import math

import pytest

from formats.signs import unpack_signs
from registry.deltas import Composition
from registry.errors import DeltaError
from registry.loading import load_delta
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from tests.helpers import MIXED_PROMPTS as PROMPTS
from tests.helpers import (
    greedy_tokens,
    hf_model,
    make_bitdelta,
    make_ia3,
    make_lora,
    make_model_dir,
    make_tokenizer,
    run_in_waves,
    save_finetune,
    weighted_merge,
)

FAMILIES = ("qwen3", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = make_model_dir(root / "base", arch=request.param)
    tenants = {
        "base": (None, hf_model(base)),
        "lora-r4": make_lora(base, root / "lora-r4", r=4, seed=1),
        "lora-r16": make_lora(base, root / "lora-r16", r=16, seed=2, targets=["q_proj", "v_proj", "down_proj"]),
        "bd": make_bitdelta(base, root / "bd.safetensors", seed=3, per_row=True, replace=False),
        "bd-repl": make_bitdelta(base, root / "bd-repl.safetensors", seed=4, per_row=False, replace=True),
        "ia3": make_ia3(base, root / "ia3", seed=5),
    }
    return request.param, base, tenants


SOUP = [("lora-r4", 0.6), ("bd-repl", 0.5), ("ia3", 0.8)]


@pytest.mark.parametrize("backend,max_tokens", [("torch", 10), ("cpu", 10), ("triton", 3)])
def test_a_mixed_batch_of_every_kind_matches_transformers(family, backend, max_tokens) -> None:
    arch, base, tenants = family
    cfg = EngineConfig(device="cpu", dtype="float32", kernel_backend=backend, bitdelta_slots=2, lora_slots=2,
                       ia3_slots=1, max_lora_rank=16, max_model_len=128, max_num_batched_tokens=256)  # fmt: skip
    engine = LLMEngine.from_model_dir(base, cfg)
    assert engine.model.config.architecture == {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
    deltas = {name: dataclasses.replace(load_delta(path, engine.spec, 16), owner="t") if path else None
              for name, (path, _) in tenants.items()}  # fmt: skip
    deltas["soup"] = Composition(tuple((deltas[n], w) for n, w in SOUP))
    refs = {name: model for name, (_, model) in tenants.items()}
    refs["soup"] = weighted_merge(base, [(tenants[n][1], w) for n, w in SOUP])
    names = list(deltas) if backend != "triton" else ["base", "lora-r16", "bd-repl", "ia3"]
    requests = [(f"{n}/{i}", n, PROMPTS[(i + j) % len(PROMPTS)]) for j, n in enumerate(names) for i in range(2)]
    got = run_in_waves(engine, requests, deltas, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    for rid, name, prompt in requests:
        assert got[rid] == greedy_tokens(refs[name], engine.tokenizer, prompt, max_tokens), f"{arch} {rid}: {prompt!r}"
    base_tokens = {p: greedy_tokens(refs["base"], engine.tokenizer, p, max_tokens) for p in PROMPTS}
    changed = sum(got[rid] != base_tokens[p] for rid, name, p in requests if name != "base")
    assert changed >= len([r for r in requests if r[1] != "base"]) // 2  # the tenants do differ (the test could fail)


def test_compress_distill_eval_uploads_and_fingerprint_work_on_the_family(family, tmp_path) -> None:
    import torch

    from registry.catalog import Registry
    from registry.checkpoint import Checkpoint
    from registry.compress import CompressOptions, compress
    from registry.distill import DistillConfig
    from registry.fingerprint import base_spec
    from serving.evaluation import evaluate
    from tests.registry.assets import add_files
    from tests.registry.test_compress import served_logits

    arch, base, _ = family
    ft = save_finetune(base, tmp_path / "ft", seed=9)
    spec = base_spec(Checkpoint(base))
    out = tmp_path / "d.safetensors"
    compress(base, ft, out, CompressOptions(scale="per-row"))
    delta = load_delta(out, spec)
    assert delta.metadata["base"] == spec.fingerprint and len(delta.projections) == 7 * engine_layers(base)
    # Served through our model == transformers on W + scale * sign with the fine-tune's other tensors.
    merged, base_state = hf_model(ft), hf_model(base).state_dict()
    with torch.no_grad():
        for path, (sign, scale) in delta.projections.items():
            w = base_state[path + ".weight"]
            merged.state_dict()[path + ".weight"].copy_(w + scale[:, None] * unpack_signs(sign, w.shape[1]))
        ids = make_tokenizer()("To be or not to be, that is the question.").input_ids
        ref = merged(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(served_logits(base, out, ids), ref, atol=2e-4, rtol=1e-4)
    # eval with distillation runs on the family: the scales' distillation lowers its loss against the fine-tune
    text = "The quick brown fox jumps over the lazy dog. To be or not to be, that is the question. " * 4
    report = evaluate(base, ft, text, device="cpu", window=32, calibration_text=text,
                      distill=DistillConfig(steps=3, lr=1e-3, seq_len=16, batch_size=2, device="cpu"))  # fmt: skip
    assert report.form("finetune").top1_agreement == 1.0 and math.isfinite(report.form("bitdelta_distilled").loss)
    assert report.distill is not None and report.distill.loss_after < report.distill.loss_before
    # an upload of the fine-tune is checked against this base (names, shapes, config), and another family refused
    other = make_model_dir(tmp_path / "other", arch="qwen3" if arch == "gemma3" else "gemma3")
    with Registry(tmp_path / "reg") as reg:
        for path, ok in ((ft, True), (other, False)):
            st = add_files(reg.stage(format="finetune"), sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors")))  # fmt: skip
            if ok:
                assert st.validate("finetune", spec) is None
            else:
                with pytest.raises(DeltaError):
                    st.validate("finetune", spec)
            st.discard()


def engine_layers(base) -> int:
    import json

    return json.loads((base / "config.json").read_text())["num_hidden_layers"]
