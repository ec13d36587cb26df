"""Engine behaviour: continuous batching under memory pressure, slot contention, abort, stop conditions."""

from __future__ import annotations

import pytest

from registry.loading import load_delta
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.errors import PromptTooLong
from serving.engine.sampling_params import SamplingParams, SamplingParamsError
from serving.engine.sequence import Sequence
from tests.helpers import greedy_tokens, hf_model, make_bitdelta, make_lora, make_model_dir

PROMPTS = ["The quick brown fox", "To be or not", "A journey of a thousand miles", "def main():", "All that", "Caf\u00e9"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = make_model_dir(root / "base", arch="llama")
    adapters = [make_lora(base, root / f"lora{i}", r=2 + i, seed=10 + i)[0] for i in range(3)]
    adapters += [make_bitdelta(base, root / f"bd{i}.safetensors", seed=20 + i, per_row=True, replace=False)[0]
                 for i in range(3)]
    return base, adapters


def engine_for(base, **overrides) -> LLMEngine:
    kwargs = dict(device="cpu", dtype="float32", kernel_backend="torch", max_model_len=96, max_num_batched_tokens=128,
                  max_lora_rank=8)
    return LLMEngine.from_model_dir(base, EngineConfig(**{**kwargs, **overrides}))


def run_all(engine: LLMEngine, requests) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(requests)]


def test_preemption_under_kv_pressure_gives_the_same_tokens(world):
    base, adapters = world
    roomy = engine_for(base, max_model_len=48)
    deltas = [load_delta(a, roomy.spec, 8) for a in adapters]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    requests = [(PROMPTS[i % 6], greedy, deltas[i % 6] if i % 4 else None) for i in range(10)]
    expected = run_all(roomy, requests)
    tight = engine_for(base, num_kv_blocks=12, block_size=8, max_model_len=48)  # 96 token slots for 10 sequences of up to ~40
    got = run_all(tight, [(p, s, load_delta(adapters[i % 6], tight.spec, 8) if d else None)
                          for i, (p, s, d) in enumerate(requests)])
    assert got == expected
    assert tight.scheduler.num_preemptions > 0
    assert tight.blocks.num_free == tight.blocks.num_blocks  # everything given back


def test_more_adapters_than_slots(world):
    base, adapters = world
    roomy = engine_for(base, lora_slots=3, bitdelta_slots=3)
    few = engine_for(base, lora_slots=1, bitdelta_slots=1, max_num_seqs=4)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    reqs = lambda eng: [(PROMPTS[i % 6], greedy, load_delta(adapters[i % 6], eng.spec, 8)) for i in range(12)]  # noqa: E731
    events = []
    few.observe_slots(lambda event, seconds: events.append((event, seconds)))
    assert run_all(few, reqs(few)) == run_all(roomy, reqs(roomy))
    assert ("evict", 0.0) in events
    loads = [s for e, s in events if e == "load"]
    assert len(loads) == sum(e == "miss" for e, _ in events) >= 6 and all(s > 0 for s in loads)


def test_tied_embeddings_replaced_per_row(world, tmp_path):
    """On a tied base, a tenant's replaced embeddings are its lm_head too; other rows keep the base's."""
    base, _ = world
    bd, merged = make_bitdelta(base, tmp_path / "tied.safetensors", seed=5, per_row=False, replace=True)
    engine = engine_for(base)
    delta = load_delta(bd, engine.spec, 8)
    assert "model.embed_tokens.weight" in delta.replacements
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    got = run_all(engine, [(p, greedy, delta if i % 2 else None) for i, p in enumerate(PROMPTS)])
    plain = hf_model(base)
    for i, (p, tokens) in enumerate(zip(PROMPTS, got)):
        assert tokens == greedy_tokens(merged if i % 2 else plain, engine.tokenizer, p, 8)


def test_abort_frees_blocks_and_slot(world):
    base, adapters = world
    engine = engine_for(base, lora_slots=1)
    delta = load_delta(adapters[0], engine.spec, 8)
    engine.add_request("a", "The quick brown fox", SamplingParams(max_tokens=50, ignore_eos=True), delta)
    engine.add_request("b", "To be", SamplingParams(max_tokens=50, ignore_eos=True), None)
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    assert engine.abort("a") and engine.abort("b")
    assert not engine.abort("a")
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.has_unfinished()
    assert engine.slots.acquire(load_delta(adapters[1], engine.spec, 8)) == 0  # the only LoRA slot is free again


def test_stop_conditions(world):
    base, _ = world
    engine = engine_for(base)
    free_run = engine.generate([("The quick", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), None)])[0]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 12
    # stop token id: the generation ends on the first occurrence of the 4th token
    stop_id = free_run.token_ids[3]
    first = free_run.token_ids.index(stop_id)
    r = engine.generate([("The quick", SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]), None)])
    assert r[0].token_ids == free_run.token_ids[: first + 1] and r[0].finish_reason == "stop"
    # stop string: text is cut before it and never contains it
    text = free_run.text
    stop = text[len(text) // 2 : len(text) // 2 + 2] if len(text) >= 4 else None
    if stop and stop.strip():
        r = engine.generate([("The quick", SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True), None)])
        assert r[0].finish_reason == "stop" and stop not in r[0].text and text.startswith(r[0].text)
        kept = engine.generate([("The quick", SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True,
                                                             include_stop_str_in_output=True), None)])[0]  # fmt: skip
        assert kept.text == r[0].text + stop


def test_bad_requests_are_refused_naming_the_field_at_fault(world):
    base, _ = world
    engine = engine_for(base)  # max_model_len 96
    with pytest.raises(PromptTooLong) as info:  # the prompt fits alone: max_tokens is what to lower
        engine.add_request("long", list(range(3, 95)), SamplingParams(max_tokens=10), None)
    assert info.value.param == "max_tokens"
    with pytest.raises(PromptTooLong) as info:  # the prompt alone fills the context
        engine.add_request("longer", list(range(3, 99)), SamplingParams(max_tokens=1), None)
    assert info.value.param == "prompt"
    with pytest.raises(SamplingParamsError, match="outside the vocabulary") as info:
        engine.add_request("oov", [1, 2, 10_000], SamplingParams(max_tokens=1), None)
    assert info.value.param == "prompt"
    with pytest.raises(SamplingParamsError, match="empty") as info:
        engine.add_request("empty", [], SamplingParams(max_tokens=1), None)
    assert info.value.param == "prompt"
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=1), None)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], SamplingParams(max_tokens=1), None)


def test_a_finished_request_leaves_the_engine_and_its_id_can_be_used_again(world):
    base, _ = world
    engine = engine_for(base)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = engine.generate([("The quick", params, None)])
    engine.add_request("again", [1, 2, 3], params, None)
    while engine.has_unfinished():
        engine.step()
    engine.add_request("again", [1, 2, 3], params, None)  # the finished one's id is free
    assert engine.generate([("The quick", params, None)])[0].token_ids == first[0].token_ids


def test_cuda_graphs_on_a_cpu_engine_is_refused_saying_so(world):
    base, _ = world
    with pytest.raises(ValueError, match="^cuda_graphs needs the engine on a CUDA device$"):
        engine_for(base, cuda_graphs=True)


def test_the_model_is_named_after_its_directory(world):
    base, _ = world
    assert engine_for(base).model.config.name == base.resolve().name


def test_block_manager_accounting():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = Sequence("s", list(range(5)), SamplingParams())
    assert bm.can_grow(seq, 5)
    bm.grow(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free == 2
    for t in range(3):  # tokens 6..8 fit in the second block
        seq.token_ids.append(t)
        assert bm.can_append(seq)
        bm.append(seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(9)  # 9th token: a third block
    bm.append(seq)
    assert len(seq.block_table) == 3 and bm.num_free == 1
    bm.free(seq)
    assert bm.num_free == 4 and seq.block_table == []


def test_slot_pool_lru_pins_and_forget(world):
    base, adapters = world
    engine = engine_for(base, lora_slots=2)
    pool = engine.slots
    events = []
    engine.observe_slots(lambda event, seconds: events.append(event))
    a, b, c = (load_delta(adapters[i], engine.spec, 8) for i in range(3))
    sa, sb = pool.acquire(a), pool.acquire(b)
    assert {sa, sb} == {0, 1} and pool.acquire(c) is None  # both pinned: c waits
    assert events == ["miss", "load", "miss", "load"]  # a refused acquire is no miss: it is retried
    pool.release(a)
    assert pool.acquire(c) == sa and events[4:] == ["miss", "evict", "load"]  # a was the LRU unpinned slot
    assert pool.slot_of(a) is None and pool.acquire(b) == sb and events[7:] == ["hit"]
    pool.forget("lora", b.key)  # deleted while pinned twice: freed only when its last request ends
    pool.release(b)
    assert pool.slot_of(b) == sb
    pool.release(b)
    assert pool.slot_of(b) is None and pool.resident("lora")[sb] is None
    # the same content loaded by another tenant is another key: never shares the first tenant's slot
    import dataclasses

    other = dataclasses.replace(c, owner="someone-else")
    assert other.key != c.key and pool.acquire(other) == sb


def test_cold_adapters_waiting_for_a_slot_do_not_stall_others(world):
    base, adapters = world
    engine = engine_for(base, lora_slots=1)
    a, b = (load_delta(adapters[i], engine.spec, 8) for i in range(2))
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("a", "The quick", long, a)  # pins the only LoRA slot
    engine.step()
    engine.add_request("b", "To be", long, b)  # must wait for the slot ...
    engine.add_request("base", "All that", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), None)
    finished = []
    for _ in range(5):
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["base"]  # ... while the base request behind it ran to the end
    assert [s.request_id for s in engine.scheduler.waiting] == ["b"]


def test_stats_report_what_the_engine_holds(world):
    base, adapters = world
    engine = engine_for(base, lora_slots=2, bitdelta_slots=2, max_num_seqs=2)
    deltas = [load_delta(adapters[0], engine.spec, 8), load_delta(adapters[3], engine.spec, 8)]
    idle = engine.stats()
    assert (idle.num_waiting, idle.num_running, idle.kv_usage, idle.distinct_deltas_running) == (0, 0, 0.0, 0)
    assert idle.slots_in_use == {"lora": 0, "bitdelta": 0, "ia3": 0} and idle.num_preemptions == 0
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i, delta in enumerate([deltas[0], deltas[1], None]):
        engine.add_request(f"r{i}", PROMPTS[i], long, delta)
    engine.step()
    busy = engine.stats()
    assert busy.num_running == 2 and busy.num_waiting == 1  # max_num_seqs 2: the third waits
    assert busy.distinct_deltas_running == 2 and busy.slots_in_use == {"lora": 1, "bitdelta": 1, "ia3": 0}
    assert 0.0 < busy.kv_usage < 1.0
    assert busy.num_preemptions == engine.scheduler.num_preemptions


def test_an_aborted_request_ends_as_aborted(world):
    base, _ = world
    engine = engine_for(base)
    engine.add_request("gone", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), None)
    engine.step()
    seq = engine._seqs["gone"]
    assert engine.abort("gone") and seq.finish_reason == "abort"
    assert not engine.abort("gone")  # once


def test_outputs_carry_no_logprobs_unless_asked_and_empty_prompts_are_refused(world):
    base, _ = world
    engine = engine_for(base)
    engine.add_request("plain", PROMPTS[1], SamplingParams(max_tokens=2, temperature=0.0), None)
    outputs = [o for _ in range(3) for o in engine.step()]
    assert outputs and all(o.new_logprobs == [] for o in outputs)
    with pytest.raises(SamplingParamsError, match="^the prompt is empty$"):
        engine.add_request("empty", [], SamplingParams(max_tokens=2), None)


def test_text_and_logprobs_of_an_engine_request(world):
    base, _ = world
    engine = engine_for(base)
    engine.add_request("r", PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3), None)
    outputs = [o for _ in range(8) for o in engine.step()]
    tokens = [t for o in outputs for t in o.new_token_ids]
    assert "".join(o.new_text for o in outputs) == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    logprobs = [lp for o in outputs for lp in o.new_logprobs]
    assert [lp.token_id for lp in logprobs] == tokens
    for lp in logprobs:  # greedy: the chosen token is the best, its logprob the top one's
        assert isinstance(lp.logprob, float) and lp.logprob <= 0.0 and len(lp.top) == 3
        assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob, abs=1e-5))
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_the_engine_seed_drives_unseeded_sampling(world):
    base, _ = world
    sampled = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    def tokens(seed: int) -> list[int]:
        return run_all(engine_for(base, seed=seed), [([5, 6, 7], sampled, None)])[0]

    assert tokens(1) == tokens(1)  # a restart with the same --seed samples the same
    assert tokens(1) != tokens(2) and tokens(0) != tokens(2)


def test_kv_block_bytes_is_what_one_block_of_the_cache_takes(world):
    import torch

    engine = engine_for(world[0], block_size=8)
    cache = engine.runner.kv_cache  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    one_block = cache[:, :, 0].numel() * cache.element_size()
    assert engine.runner.kv_block_bytes(engine.runner.model, 8, torch.float32) == one_block
    half = engine.runner.kv_block_bytes(engine.runner.model, 8, torch.bfloat16)
    assert half == one_block // 2 and isinstance(half, int)


def test_a_sliding_window_model_decodes_as_transformers(tmp_path):
    # Window 5, prompts and generations well past it: every step attends to its last 5 positions only.
    base = make_model_dir(tmp_path / "mistral", arch="mistral", sliding_window=5)
    engine = engine_for(base)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    got = engine.generate([(p, greedy, None) for p in PROMPTS[:3]])
    plain = hf_model(base)
    assert [c.token_ids for c in got] == [greedy_tokens(plain, engine.tokenizer, p, 16) for p in PROMPTS[:3]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kv_cache_takes_the_bytes_its_block_count_was_sized_for(world, dtype):
    import torch

    from serving.engine.model_runner import ModelRunner

    base, _ = world
    engine = engine_for(base, dtype=dtype, num_kv_blocks=16, block_size=8)
    per_block = ModelRunner.kv_block_bytes(engine.model, 8, getattr(torch, dtype))
    assert engine.runner.kv_cache.dtype == engine.dtype == getattr(torch, dtype)
    assert engine.runner.kv_cache.nbytes == (16 + 1) * per_block  # and the null block


def test_both_the_configs_and_the_tokenizers_end_of_sequence_end_a_row(tmp_path):
    base = make_model_dir(tmp_path / "base", eos_token_id=5)  # the tokenizer's own is 2
    engine = engine_for(base)
    assert engine.eos_token_ids == {5, engine.tokenizer.eos_token_id} and engine.tokenizer.eos_token_id == 2


def test_structured_outputs_without_a_tokenizer_are_refused_saying_why(world):
    from registry.checkpoint import Checkpoint
    from registry.fingerprint import base_spec
    from serving.engine.sampling_params import Guide

    base, _ = world
    with_tokenizer = engine_for(base, pack_cpu_weights=False)  # its model is reused below: packed once only
    engine = LLMEngine(with_tokenizer.model, None, base_spec(Checkpoint(base)), with_tokenizer.config)
    with pytest.raises(SamplingParamsError, match="need the model's tokenizer"):
        engine.add_request("r", [1, 2, 3], SamplingParams(guide=Guide("json_object")))


def test_a_preloaded_delta_is_resident_but_unpinned(world):
    """preload() puts the delta in a slot and lets go of it: it serves at once, and another delta can take the
    slot when it is the only one."""
    base, adapters = world
    eng = engine_for(base, lora_slots=1)
    first, second = (load_delta(a, eng.spec, 8) for a in adapters[:2])
    eng.preload(first)
    assert eng.holds_delta("lora", first.key)
    assert eng.slots.acquire(second) is not None  # the one slot was free to take: preload pinned nothing
    assert not eng.holds_delta("lora", first.key) and eng.holds_delta("lora", second.key)
