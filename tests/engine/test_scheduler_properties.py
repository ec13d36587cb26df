"""The scheduler under random workloads (hypothesis): what must hold after every step, whatever the mix of tenants,
deltas, prompt lengths, KV memory, slots and aborts — and that every request finishes with nothing left held."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from registry.deltas import Composition
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import SeqStatus, Sequence
from tests.engine.test_scheduler import FakeDelta, FakeSlots

# "e" runs a composition of two LoRAs (two slots at once) where the pool has two slots or more, else one delta
TENANT_DELTAS = {"a": None, "b": FakeDelta("b"), "c": FakeDelta("c", "bitdelta"), "d": FakeDelta("d"),
                 "e": Composition(((FakeDelta("e1"), 1.0), (FakeDelta("e2"), 0.5)))}  # fmt: skip
BLOCK_SIZE = 4
MAX_PROMPT, MAX_NEW = 30, 6

request = st.tuples(
    st.sampled_from(sorted(TENANT_DELTAS)),  # tenant (its one delta)
    st.integers(1, MAX_PROMPT),  # prompt tokens
    st.integers(1, MAX_NEW),  # tokens to generate
    st.integers(0, 8),  # the step it arrives at
)
workload = st.fixed_dictionaries({
    "requests": st.lists(request, min_size=3, max_size=14),
    "max_num_seqs": st.integers(1, 6),
    "chunk": st.integers(2, 16),
    "extra_budget": st.integers(-4, 40),  # over max_num_seqs (below it: not every decode fits in a step)
    "blocks": st.integers((MAX_PROMPT + MAX_NEW) // BLOCK_SIZE + 1, 16),  # one sequence always fits; often short
    "slots": st.integers(1, 3),
    "fair": st.booleans(),
    "aborts": st.lists(st.tuples(st.integers(0, 30), st.integers(0, 13)), max_size=3),  # (step, request index)
})


def live_pins(seqs: list[Sequence]) -> Counter:
    return Counter(d.key for s in seqs if s.holds_slots and not s.finished for d, _ in s.parts)


def check_step(s: Scheduler, out, budget: int, chunk: int, seqs: list[Sequence], decoding: set[int]) -> None:
    cfg = s.config
    assert sum(i.num_tokens for i in out) <= budget
    assert len({id(i.seq) for i in out}) == len(out), "a sequence twice in one step"
    assert len(s.running) <= cfg.max_num_seqs
    for i in out:
        assert i.seq.status is SeqStatus.RUNNING and i.seq in s.running
        assert 1 <= i.num_tokens <= i.seq.num_uncomputed
        if i.seq.num_uncomputed > 1:
            assert i.num_tokens <= chunk
        # KV blocks for every token computed after this step
        assert len(i.seq.block_table) >= s.blocks.blocks_for(i.seq.num_computed + i.num_tokens)
        if i.seq.delta is not None:
            assert i.seq.holds_slots, "runs without its delta's slot"
    scheduled = {id(i.seq) for i in out}
    decodes = sum(i.num_tokens == 1 and id(i.seq) in decoding for i in out)
    for r in s.running:  # decodes first: every running sequence that was decoding got its token, budget allowing
        if id(r) in decoding:
            assert id(r) in scheduled or decodes == budget, f"{r.request_id} decoding but not scheduled"
        # a sequence that neither runs this step nor holds KV blocks would only hold a place and a slot
        assert id(r) in scheduled or r.block_table, f"{r.request_id} in the batch with nothing"
    tables = [b for q in seqs if not q.finished for b in q.block_table]
    assert len(tables) == len(set(tables)), "a KV block held twice"
    assert s.blocks.num_free + len(tables) == s.blocks.num_blocks, "KV blocks lost"
    assert live_pins(seqs) == Counter(s.slots.pins), "delta slot pins out of step with the sequences"
    for q in seqs:
        if q.status is SeqStatus.WAITING and q.arrival:  # arrived (add numbers arrivals from 1)
            assert q in s.queues[q.tenant]


def found(requests, max_num_seqs, chunk, extra_budget, blocks, slots=1, fair=False):
    return {"requests": requests, "max_num_seqs": max_num_seqs, "chunk": chunk, "extra_budget": extra_budget,
            "blocks": blocks, "slots": slots, "fair": fair, "aborts": []}  # fmt: skip


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # examples: tests/conftest.py
@given(workload)
# Workloads this test found that ran for ever before the fixes in Scheduler.schedule: a step that freed KV blocks
# admits nobody (a preempted decode took its own block back every step); a parked sequence's blocks go to the
# part-prefilled ones before a running one is preempted; the no-progress retry admits nobody while some run.
@example(found([("a", 3, 6, 1), ("a", 30, 1, 0), ("b", 16, 6, 0), ("c", 1, 2, 0), ("d", 1, 1, 0)], 3, 2, 2, 10))
@example(found([("a", 1, 1, 1), ("a", 3, 2, 0), ("a", 9, 4, 0), ("a", 17, 1, 0), ("b", 30, 4, 0), ("b", 17, 1, 0)],
               3, 9, 7, 12))  # fmt: skip
@example(found([("a", 1, 5, 5), ("b", 22, 1, 0), ("b", 18, 1, 0), ("c", 1, 1, 0)], 3, 2, 1, 10))
# ... and one that finished, only after 400 steps: 198 tokens at one token per step, with recomputation
@example(found([("a", 1, 1, 0)] * 6 + [("a", 14, 4, 0), ("a", 20, 6, 0), ("b", 17, 5, 1), ("c", 16, 6, 1),
               ("d", 14, 6, 1), ("d", 25, 6, 0), ("b", 20, 1, 0), ("c", 23, 1, 0)], 4, 2, -3, 10, slots=3))
def test_random_workloads_keep_every_invariant_and_finish(w) -> None:
    budget = max(1, w["max_num_seqs"] + w["extra_budget"])
    cfg = EngineConfig(max_num_seqs=w["max_num_seqs"], max_num_batched_tokens=budget, prefill_chunk=w["chunk"],
                       fair_scheduling=w["fair"])  # fmt: skip
    s = Scheduler(cfg, BlockManager(w["blocks"], BLOCK_SIZE), FakeSlots(w["slots"]))
    deltas = dict(TENANT_DELTAS) if w["slots"] >= 2 else {**TENANT_DELTAS, "e": FakeDelta("e1")}
    seqs = [Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=m), deltas[t], tenant=t)
            for i, (t, n, m, _) in enumerate(w["requests"])]  # fmt: skip
    arrive = {i: at for i, (*_, at) in enumerate(w["requests"])}
    aborts = {step: i for step, i in w["aborts"] if i < len(seqs)}
    first_run: list[Sequence] = []
    aborted: set[str] = set()
    # Bounded by the work (a step computes at most `budget` tokens; preemptions recompute some): a workload that
    # runs past it is stuck, not slow. 400 flat was too tight for a budget of 1 token per step.
    work = sum(n + m for _, n, m, _ in w["requests"])
    max_steps = 400 + 4 * work // budget
    for step in range(max_steps):
        for i, seq in enumerate(seqs):
            if arrive[i] == step:
                s.add(seq)
        if step in aborts and not seqs[aborts[step]].finished and arrive[aborts[step]] <= step:
            s.finish(seqs[aborts[step]], "abort")
            aborted.add(seqs[aborts[step]].request_id)
        if not s.has_unfinished():
            if step > max(arrive.values()):
                break
            continue
        decoding = {id(r) for r in s.running if r.num_uncomputed == 1}
        out = s.schedule()
        check_step(s, out, budget, w["chunk"], seqs, decoding)
        assert out, "a step with work to do scheduled nothing"
        for item in out:
            if item.seq not in first_run:
                first_run.append(item.seq)
            completes = item.completes
            item.seq.num_computed += item.num_tokens
            if completes:
                item.seq.token_ids.append(7)
                if len(item.seq.output_token_ids) == item.seq.params.max_tokens:
                    s.finish(item.seq, "length")
    else:
        raise AssertionError(f"the workload did not finish in {max_steps} steps")
    event(f"preempted {min(s.num_preemptions, 1)}, parked {min(s.num_parked, 1)}, aborted {len(aborted) > 0}")
    # Everything finished, nothing left held.
    for seq in seqs:
        assert seq.finished
        if seq.request_id not in aborted:
            assert seq.finish_reason == "length" and len(seq.output_token_ids) == seq.params.max_tokens
    assert not s.running and s.num_waiting == 0
    assert s.blocks.num_free == s.blocks.num_blocks and not s.slots.pins
    # First come, first served within a tenant (each tenant has one delta: nobody skips ahead of its own).
    for tenant in TENANT_DELTAS:
        started = [q for q in first_run if q.tenant == tenant]
        assert started == sorted(started, key=lambda q: q.arrival), tenant
