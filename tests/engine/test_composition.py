"""Compositions (registry.deltas.Composition): a request on several of its tenant's deltas with weights, any mix
of kinds, computed per row in a mixed batch without a merge step, gives the greedy tokens of plain transformers
running the weighted merge W_base + sum_k w_k (W_k - W_base) of the parts' merged fine-tunes; and what the pool
and the scheduler do with one."""

from __future__ import annotations

import dataclasses

import pytest

from registry.deltas import Composition
from registry.errors import AdapterMismatch
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
    run_in_waves,
    weighted_merge,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("composed")
    base = make_model_dir(root / "base", arch="qwen2")  # untied lm_head, q/k/v biases
    parts = {
        "lora-a": make_lora(base, root / "lora-a", r=4, seed=11),
        "lora-b": make_lora(base, root / "lora-b", r=2, seed=12, targets=["q_proj", "v_proj", "down_proj"]),
        "bd": make_bitdelta(base, root / "bd.safetensors", seed=13, per_row=True, replace=False),
        # replaces norms, a bias, the embeddings and the (untied) lm_head: every replacement path, weighted
        "bd-repl": make_bitdelta(base, root / "bd-repl.safetensors", seed=14, per_row=False, replace=True),
        "ia3": make_ia3(base, root / "ia3", seed=15),
        "ia3-q": make_ia3(base, root / "ia3-q", seed=16, targets=("q_proj", "k_proj", "down_proj")),
    }
    return base, parts


MIXES = {
    "lora+bd": [("lora-a", 1.0), ("bd", 0.5)],
    "ia3+lora": [("ia3", 0.7), ("lora-a", -0.5)],
    "repl+ia3+lora": [("bd-repl", 0.6), ("ia3", 1.0), ("lora-b", 0.3)],
    "two-loras": [("lora-a", 0.5), ("lora-b", 0.5)],
    "two-ia3": [("ia3", 0.5), ("ia3-q", 0.8)],
    "half-lora": [("lora-a", 0.5)],  # a composition of one: a delta at another weight
}


def _engine(base, backend: str, dtype: str = "float32", **slots) -> LLMEngine:
    cfg = EngineConfig(device="cpu", dtype=dtype, kernel_backend=backend, max_lora_rank=8, max_model_len=128,
                       max_num_batched_tokens=256, **{"bitdelta_slots": 2, "lora_slots": 3, "ia3_slots": 2, **slots})
    return LLMEngine.from_model_dir(base, cfg)


def _compose(deltas: dict, mix: list[tuple[str, float]]) -> Composition:
    return Composition(tuple((deltas[name], w) for name, w in mix))


@pytest.mark.parametrize("backend,max_tokens", [("torch", 10), ("cpu", 10), ("triton", 3)])
def test_compositions_in_a_mixed_batch_match_the_weighted_merge(world, backend, max_tokens) -> None:
    base, parts = world
    engine = _engine(base, backend)
    deltas = {name: dataclasses.replace(load_delta(path, engine.spec, 8), owner="acme")
              for name, (path, _) in parts.items()}  # fmt: skip
    served = {name: _compose(deltas, mix) for name, mix in MIXES.items()}
    served |= {"lora-a": deltas["lora-a"], "ia3": deltas["ia3"], "bd-repl": deltas["bd-repl"], "base": None}
    names = list(served) if backend != "triton" else ["repl+ia3+lora", "two-loras", "lora-a", "base"]
    requests = [(f"{name}/{i}", name, PROMPTS[(i + j) % len(PROMPTS)]) for j, name in enumerate(names) for i in range(2)]
    got = run_in_waves(engine, requests, served, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    references = {name: weighted_merge(base, [(parts[p][1], w) for p, w in MIXES[name]]) for name in MIXES}
    references |= {name: parts[name][1] for name in ("lora-a", "ia3", "bd-repl")} | {"base": hf_model(base)}
    for rid, name, prompt in requests:
        assert got[rid] == greedy_tokens(references[name], engine.tokenizer, prompt, max_tokens), f"{rid}: {prompt!r}"
    # The parts and weights matter (the test could fail): most compositions' tokens are not their first part's.
    composed = [(rid, name, p) for rid, name, p in requests if name in MIXES]
    first = {(name, p): greedy_tokens(parts[MIXES[name][0][0]][1], engine.tokenizer, p, max_tokens) for _, name, p in composed}
    assert sum(got[rid] != first[name, p] for rid, name, p in composed) >= len(composed) // 2
    assert engine.slots.num_resident("lora") <= 3 and not engine.has_unfinished()
    assert all(p == 0 for table in engine.slots._tables.values() for p in table.pins)  # every slot given back


def test_a_composition_the_pool_cannot_hold_is_refused_by_name(world) -> None:
    base, parts = world
    engine = _engine(base, "torch", lora_slots=1)
    d = {name: dataclasses.replace(load_delta(path, engine.spec, 8), owner="acme") for name, (path, _) in parts.items()}
    greedy = SamplingParams(max_tokens=2)
    with pytest.raises(AdapterMismatch, match="2 deltas of kind lora; this server has 1") as e:
        engine.add_request("r1", "hi", greedy, _compose(d, MIXES["two-loras"]))
    assert e.value.param == "adapters"
    other = dataclasses.replace(d["bd"], owner="mallory")
    with pytest.raises(AdapterMismatch, match="one tenant's"):
        engine.add_request("r2", "hi", greedy, Composition(((d["lora-a"], 1.0), (other, 1.0))))
    ff_out = load_delta(make_ia3(base, base.parent / "ia3-down-out", seed=17, feedforward=())[0], engine.spec)
    with pytest.raises(AdapterMismatch, match="on its input and on its output"):  # down_proj: input in one, output in the other
        engine.add_request("r3", "hi", greedy, Composition(((d["ia3"], 1.0), (dataclasses.replace(ff_out, owner="acme"), 1.0))))
    assert not engine.has_unfinished()


def test_a_composition_waits_for_all_its_slots_and_takes_none_meanwhile(world) -> None:
    base, parts = world
    engine = _engine(base, "torch", lora_slots=2)
    d = {name: dataclasses.replace(load_delta(path, engine.spec, 8), owner="acme") for name, (path, _) in parts.items()}
    third, _ = make_lora(base, base.parent / "lora-c", r=2, seed=18)
    busy = dataclasses.replace(load_delta(third, engine.spec, 8), owner="acme")
    engine.add_request("busy", "The quick brown fox", SamplingParams(max_tokens=6, ignore_eos=True), busy)
    outputs: dict[str, list[int]] = {}

    def step():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    step()  # `busy` pins one of the two LoRA slots
    engine.add_request("soup", "To be", SamplingParams(max_tokens=3, ignore_eos=True), _compose(d, MIXES["two-loras"]))
    step()
    soup = engine._seqs["soup"]
    assert not soup.holds_slots and soup.slots == [-1, -1]  # it needs both free slots: it holds none meanwhile
    assert engine.slots.num_resident("lora") == 1  # and loaded nothing it could not keep
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert len(outputs["busy"]) == 6 and len(outputs["soup"]) == 3  # it ran once `busy` gave its slot back
    assert all(p == 0 for table in engine.slots._tables.values() for p in table.pins)  # and nothing stays pinned


def test_a_composition_that_cannot_fit_holds_no_other_tenants_cold_load(world) -> None:
    """Two LoRA slots, one kept pinned by a steady stream on a resident LoRA: a two-LoRA composition cannot fit
    meanwhile, and must not keep the load turn from a single cold LoRA that can."""
    base, parts = world
    engine = _engine(base, "torch", lora_slots=2)
    d = {name: dataclasses.replace(load_delta(path, engine.spec, 8), owner="acme") for name, (path, _) in parts.items()}
    steady, _ = make_lora(base, base.parent / "lora-steady", r=2, seed=19)
    steady = dataclasses.replace(load_delta(steady, engine.spec, 8), owner="a")
    cold, _ = make_lora(base, base.parent / "lora-cold", r=2, seed=20)
    cold = dataclasses.replace(load_delta(cold, engine.spec, 8), owner="c")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    n = 0

    def stream() -> None:  # tenant a: a new request on its LoRA every step, so one always runs on it
        nonlocal n
        engine.add_request(f"a{n}", "The quick brown fox", params, steady, tenant="a")
        n += 1

    stream()
    engine.step()
    engine.add_request("soup", "To be", params, _compose(d, MIXES["two-loras"]), tenant="b")
    engine.add_request("cold", "All that glitters", params, cold, tenant="c")
    done: set[str] = set()
    for _ in range(30):
        stream()
        done |= {out.request_id for out in engine.step() if out.finished}
    assert "cold" in done  # it loaded into the free slot although the composition waits


def test_a_composition_with_replacements_runs_in_bfloat16(world) -> None:
    """The parts' weights are float32: their weighted changes to replaced norms and embeddings come back in the
    model's dtype, or the next GEMM would mix dtypes and stop the engine."""
    base, parts = world
    engine = _engine(base, "torch", dtype="bfloat16")
    d = {name: dataclasses.replace(load_delta(path, engine.spec, 8), owner="acme") for name, (path, _) in parts.items()}
    out = engine.generate([("To be", SamplingParams(max_tokens=4, ignore_eos=True), _compose(d, MIXES["repl+ia3+lora"])),
                           ("To be", SamplingParams(max_tokens=4, ignore_eos=True), d["bd-repl"])])  # fmt: skip
    assert [len(o.token_ids) for o in out] == [4, 4]
