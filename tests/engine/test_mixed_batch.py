"""The central test: one engine, one mixed batch of many tenants, the same greedy tokens as plain
transformers running each tenant's merged fine-tune in float32.

Tenants: base rows; LoRA adapters of ranks 2, 8 and 4 (rsLoRA), saved by peft; 1-bit deltas with per-row
and per-matrix scales, one of which also replaces norm weights, a bias, the embeddings and the lm_head; (IA)^3
adapters saved by peft (keys, values and down_proj; q, o, up and down with two feedforward modules).
Prompts of different lengths; requests arrive at different steps.
"""

from __future__ import annotations

import pytest
import torch

from registry.loading import load_delta
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from tests.helpers import MIXED_PROMPTS as PROMPTS
from tests.helpers import greedy_tokens, mixed_tenants, run_in_waves


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mixed_tenants(tmp_path_factory.mktemp("mixed"))


@pytest.mark.parametrize("backend,max_tokens", [("torch", 12), ("cpu", 12), ("triton", 4)])
def test_mixed_batch_matches_merged_finetunes(world, backend, max_tokens):
    base_dir, tenants = world
    config = EngineConfig(device="cpu", dtype="float32", kernel_backend=backend, bitdelta_slots=3, lora_slots=3,
                          max_lora_rank=8, max_model_len=128, max_num_batched_tokens=256)
    engine = LLMEngine.from_model_dir(base_dir, config)
    assert engine.runner.ops.name == backend
    deltas = {name: load_delta(path, engine.spec, 8) if path else None for name, (path, _) in tenants.items()}
    # Every tenant with several prompts; requests join in three waves, while earlier ones decode.
    requests = [(f"{name}/{i}", name, PROMPTS[(i + j) % len(PROMPTS)])
                for j, name in enumerate(tenants) for i in range(1 if backend == "triton" else 2)]
    got = run_in_waves(engine, requests, deltas, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    for rid, name, prompt in requests:
        assert got[rid] == greedy_tokens(tenants[name][1], engine.tokenizer, prompt, max_tokens), f"{rid}: {prompt!r}"
    # Tenants really differ from the base (the test could fail): at least most of them change the tokens.
    base_tokens = {p: greedy_tokens(tenants["base"][1], engine.tokenizer, p, max_tokens) for p in PROMPTS}
    changed = sum(got[rid] != base_tokens[p] for rid, name, p in requests if name != "base")
    assert changed >= len([r for r in requests if r[1] != "base"]) // 2


def test_seeded_request_same_alone_and_in_busy_batch(world):
    base_dir, tenants = world
    config = EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", bitdelta_slots=2, lora_slots=2,
                          max_lora_rank=8, max_model_len=128, max_num_batched_tokens=256)
    engine = LLMEngine.from_model_dir(base_dir, config)
    lora = load_delta(tenants["lora-r2"][0], engine.spec, 8)
    bd = load_delta(tenants["bd-row"][0], engine.spec, 8)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate([("The quick brown fox", seeded, lora)])[0].token_ids
    busy = engine.generate(
        [("To be", SamplingParams(max_tokens=7, temperature=0.8), None),
         ("All that glitters", SamplingParams(max_tokens=12, temperature=1.0, seed=7), bd),
         ("The quick brown fox", seeded, lora),
         ("def main():", SamplingParams(max_tokens=5, temperature=0.0), lora)]
    )[2].token_ids
    assert alone == busy
    other_seed = engine.generate([("The quick brown fox", SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99), lora)])
    assert other_seed[0].token_ids != alone


def test_chunked_prefill_and_a_small_step_budget_give_the_same_tokens(world):
    # Prompts computed 3 tokens at a time, 16 tokens a step in all: every prompt spans several steps, interleaved
    # with other tenants' decodes; the tokens are still each merged fine-tune's.
    base_dir, tenants = world
    config = EngineConfig(device="cpu", dtype="float32", kernel_backend="cpu", bitdelta_slots=3, lora_slots=3,
                          max_lora_rank=8, max_model_len=128, max_num_batched_tokens=16, prefill_chunk=3)  # fmt: skip
    engine = LLMEngine.from_model_dir(base_dir, config)
    deltas = {name: load_delta(path, engine.spec, 8) if path else None for name, (path, _) in tenants.items()}
    requests = [(f"{name}/{i}", name, PROMPTS[(i + j) % len(PROMPTS)]) for j, name in enumerate(tenants) for i in range(2)]
    got = run_in_waves(engine, requests, deltas, SamplingParams(max_tokens=8, temperature=0.0))
    for rid, name, prompt in requests:
        assert got[rid] == greedy_tokens(tenants[name][1], engine.tokenizer, prompt, 8), f"{rid}: {prompt!r}"


# Each tenant's rows with their own penalties, bias and min_tokens (one row plain), in one mixed batch.
ROW_SETTINGS = {
    "base": {"repetition_penalty": 1.6},
    "lora-r2": {"frequency_penalty": 1.5, "presence_penalty": 0.5},
    "lora-r8": {"logit_bias": {2: 30.0}, "min_tokens": 3},  # EOS certain once 3 tokens are out, not before
    "lora-r4-rs": {"repetition_penalty": 0.7, "presence_penalty": -1.0},
    "bd-row": {"logit_bias": {50: 4.0, 60: -100.0, 61: -100.0}},
    "bd-mat": {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "min_tokens": 3},
    "bd-repl": {},
    "ia3-kvd": {"frequency_penalty": 0.8},
    "ia3-qoud": {},
}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_per_row_penalties_bias_and_min_tokens_match_transformers_processors(world, backend):
    from tests.helpers import hf_processors

    base_dir, tenants = world
    config = EngineConfig(device="cpu", dtype="float32", kernel_backend=backend, bitdelta_slots=3, lora_slots=3,
                          max_lora_rank=8, max_model_len=128, max_num_batched_tokens=256)  # fmt: skip
    engine = LLMEngine.from_model_dir(base_dir, config)
    deltas = {name: load_delta(path, engine.spec, 8) if path else None for name, (path, _) in tenants.items()}
    max_tokens = 10 if backend == "cpu" else 4
    requests = []
    for j, name in enumerate(tenants):
        prompt = PROMPTS[j % len(PROMPTS)]
        requests.append((prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **ROW_SETTINGS[name]), name))
    got = engine.generate([(prompt, params, deltas[name]) for prompt, params, name in requests])
    changed = 0
    for (prompt, params, name), out in zip(requests, got):
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = tenants[name][1].generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                                             eos_token_id=2, logits_processor=hf_processors(params, ids.shape[1], {2}))
        assert out.token_ids == want[0, ids.shape[1]:].tolist(), f"{name}: {ROW_SETTINGS[name]}"
        changed += out.token_ids != greedy_tokens(tenants[name][1], engine.tokenizer, prompt, max_tokens)
    assert changed >= (4 if backend == "cpu" else 2)  # the settings change the tokens (the test could fail)
    r8 = got[list(tenants).index("lora-r8")].token_ids
    assert len(r8) == 4 and r8[-1] == 2  # EOS the first time min_tokens allows it: after 3 tokens


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_prompt_logprobs_are_each_merged_finetunes_in_a_mixed_batch(world, backend):
    # Prompts computed 3 tokens at a time among other tenants' rows (some not asking): every prompt token's
    # logprob and top 3 are those of the tenant's merged model in transformers.
    base_dir, tenants = world
    config = EngineConfig(device="cpu", dtype="float32", kernel_backend=backend, bitdelta_slots=3, lora_slots=3,
                          max_lora_rank=8, max_model_len=128, max_num_batched_tokens=16, prefill_chunk=3)  # fmt: skip
    engine = LLMEngine.from_model_dir(base_dir, config)
    deltas = {name: load_delta(path, engine.spec, 8) if path else None for name, (path, _) in tenants.items()}
    names = list(tenants) if backend == "cpu" else ["base", "lora-r8", "bd-repl"]
    requests = [(PROMPTS[j % len(PROMPTS)], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3 - j % 2), name)
                for j, name in enumerate(names)]  # fmt: skip
    requests.append((PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0), "lora-r2"))  # asks for none
    got = engine.generate([(prompt, params, deltas[name]) for prompt, params, name in requests])
    assert got[-1].prompt_logprobs is None
    for (prompt, params, name), out in zip(requests[:-1], got):
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = torch.log_softmax(tenants[name][1](ids).logits[0].float(), dim=-1)  # [P, V]
        assert len(out.prompt_logprobs) == ids.shape[1] - 1
        for j, lp in enumerate(out.prompt_logprobs):
            assert lp.token_id == ids[0, j + 1].item()
            assert abs(lp.logprob - want[j, lp.token_id].item()) < 1e-4, f"{name}: token {j + 1}"
            top = want[j].topk(params.prompt_logprobs)
            assert [t for t, _ in lp.top] == top.indices.tolist(), f"{name}: token {j + 1}"
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, atol=1e-4, rtol=0)
