"""The scheduler on its own (plain Python, no model): decodes first, chunked prefill, the token budget, queue
order, tenant fairness (virtual token counters, lifting, fair shares), preemption."""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import DECODE_WEIGHT, Scheduler
from serving.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class FakeDelta:
    key: str
    kind: str = "lora"


class FakeSlots:
    """n slots; acquire pins (None when all are pinned by other deltas), release unpins."""

    def __init__(self, n: int):
        self.n = n
        self.pins: dict[str, int] = {}

    def acquire(self, delta):
        if delta.key not in self.pins and len(self.pins) >= self.n:
            return None
        self.pins[delta.key] = self.pins.get(delta.key, 0) + 1
        return sorted(self.pins).index(delta.key)

    def release(self, delta):
        self.pins[delta.key] -= 1
        if not self.pins[delta.key]:
            del self.pins[delta.key]

    def is_resident(self, delta):
        return delta.key in self.pins

    def has_room(self, kind):
        return len(self.pins) < self.n

    def room(self, kind, keeping=()):
        return self.n - len(self.pins)


def make(max_num_seqs=8, budget=64, chunk=16, blocks=64, block_size=4, slots=4) -> Scheduler:
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, prefill_chunk=chunk)
    return Scheduler(cfg, BlockManager(blocks, block_size), FakeSlots(slots))


def seq(rid: str, n_prompt: int, tenant: str = "t", delta=None) -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=100), delta, tenant=tenant)


def step(s: Scheduler, token: int = 7) -> list[tuple[str, int]]:
    """One schedule + what the engine does after the step (computed tokens, a new token when complete)."""
    out = s.schedule()
    for item in out:
        complete = item.completes
        item.seq.num_computed += item.num_tokens
        if complete:
            item.seq.token_ids.append(token)
    return [(i.seq.request_id, i.num_tokens) for i in out]


def test_first_come_first_served_within_a_tenant_decodes_first() -> None:
    s = make()
    a, b = seq("a", 5), seq("b", 3)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 5), ("b", 3)]
    c = seq("c", 4)
    s.add(c)
    assert step(s) == [("a", 1), ("b", 1), ("c", 4)]  # decodes before the new prefill


def test_chunked_prefill_never_holds_the_decodes() -> None:
    s = make(chunk=8, budget=64)
    short = seq("short", 2, tenant="x")
    s.add(short)
    step(s)
    s.add(seq("long", 30, tenant="y"))
    got = [step(s) for _ in range(4)]
    assert got[0] == [("short", 1), ("long", 8)]
    assert got[1] == [("short", 1), ("long", 8)] and got[2] == [("short", 1), ("long", 8)]
    assert got[3] == [("short", 1), ("long", 6)]  # the last chunk: 30 = 8 + 8 + 8 + 6
    assert step(s) == [("short", 1), ("long", 1)]


def test_the_step_budget_is_shared_by_chunks() -> None:
    s = make(chunk=16, budget=20)
    for i in range(3):
        s.add(seq(f"p{i}", 16))
    assert step(s) == [("p0", 16), ("p1", 4)]  # 20 tokens: one whole chunk, then what is left
    assert step(s) == [("p0", 1), ("p1", 12), ("p2", 7)]


def test_a_request_waiting_for_a_slot_keeps_its_place() -> None:
    s = make(slots=1, budget=3)
    hog = seq("hog", 2, delta=FakeDelta("A"))
    s.add(hog)
    step(s)
    b, c, d = seq("b", 2, delta=FakeDelta("B")), seq("c", 2), seq("d", 2)
    for x in (b, c, d):
        s.add(x)
    assert step(s) == [("hog", 1), ("c", 2)]  # b waits for the slot; c (no delta) goes ahead; the budget is spent
    assert [x.request_id for x in s.waiting] == ["b", "d"]  # b is still ahead of d
    s.finish(hog, "stop")
    assert [r for r, _ in step(s)] == ["c", "b"]  # b first, as soon as the slot is free


def test_the_tenant_with_the_lowest_counter_is_served_first() -> None:
    s = make(chunk=4, budget=8, max_num_seqs=16)
    for i in range(4):
        s.add(seq(f"a{i}", 4, tenant="a"))
    s.add(seq("b0", 4, tenant="b"))
    s.counters["a"] = 0.0  # a arrived first, b was lifted to a's counter
    assert [r for r, _ in step(s)] == ["a0", "b0"]  # a at 0 and b at 0: a first (name); then a at 4 > b at 0
    assert s.counters["a"] == 4 and s.counters["b"] == 4
    s.add(seq("b1", 4, tenant="b"))
    out = [r for r, n in step(s) if n > 1]
    assert out == ["a1", "b1"]  # the budget alternates between the tenants, not a0..a3 first


def test_an_idle_tenant_banks_no_credit() -> None:
    s = make()
    s.add(seq("a", 4, tenant="a"))
    for _ in range(10):
        step(s)
    assert s.counters["a"] == 4 + 9 * DECODE_WEIGHT
    s.add(seq("b", 4, tenant="b"))  # new: lifted to the lowest active counter, not 0
    assert s.counters["b"] == s.counters["a"]
    s.counters["b"] = 1.0
    s.finish(s.queues["b"][0], "abort")
    s.add(seq("b2", 4, tenant="b"))  # returns after being idle: lifted again
    assert s.counters["b"] == s.counters["a"]


def test_a_flooding_tenant_is_preempted_down_to_its_fair_share() -> None:
    s = make(max_num_seqs=4, budget=64)
    flood = [seq(f"f{i}", 3, tenant="flood") for i in range(6)]
    for f in flood:
        s.add(f)
    step(s)
    assert [x.request_id for x in s.running] == ["f0", "f1", "f2", "f3"]
    light = seq("light", 3, tenant="light")
    s.add(light)
    got = step(s)
    assert ("light", 3) in got  # admitted at the next step
    assert light.status is SeqStatus.RUNNING and "f3" not in [x.request_id for x in s.running]
    # f3 is parked: out of the batch, at the head of its tenant's queue, its KV blocks and progress kept
    assert flood[3].status is SeqStatus.WAITING and s.queues["flood"][0] is flood[3]
    assert flood[3].num_computed == 3 and flood[3].block_table and s.num_parked == 1 and s.num_preemptions == 0
    for _ in range(3):
        step(s)
    assert sum(x.tenant == "flood" for x in s.running) == 3  # no more parking: light holds 1 of its 2
    assert s.num_parked == 1
    s.finish(light, "stop")
    assert ("f3", 1) in step(s)  # light gone: f3 resumes with its next token, nothing recomputed
    assert flood[3].num_computed == 4


def test_parked_sequences_give_their_blocks_back_when_memory_runs_short() -> None:
    s = make(max_num_seqs=2, blocks=4, block_size=4)
    a, b = seq("a", 7, tenant="a"), seq("b", 3, tenant="b")
    s.add(a)
    step(s)  # a: 2 blocks
    s.add(b)
    s.add(seq("a2", 3, tenant="a"))
    step(s)
    s._park(a)  # as a fair-share parking would
    a_blocks = len(a.block_table)
    assert a_blocks == 2 and s.blocks.num_free == 4 - a_blocks - len(b.block_table)
    for _ in range(8):  # b decodes into new blocks: a's are reclaimed rather than a running sequence preempted
        step(s)
    assert b.status is SeqStatus.RUNNING and not a.block_table and a.num_computed == 0 and s.num_preemptions >= 1


def test_over_its_share_a_tenant_is_not_admitted_while_others_wait() -> None:
    s = make(max_num_seqs=4)
    for i in range(4):
        s.add(seq(f"a{i}", 2, tenant="a"))
    for i in range(2):
        s.add(seq(f"b{i}", 2, tenant="b"))
    step(s)
    assert sorted(x.request_id for x in s.running) == ["a0", "a1", "b0", "b1"]  # the share of 4 among 2 is 2 each
    s.finish(s.running[-1], "stop")  # b1 ends: nobody else waits, so a may take the free place
    step(s)
    assert sorted(x.request_id for x in s.running) == ["a0", "a1", "a2", "b0"]


def test_a_tenant_waiting_for_a_delta_slot_does_not_hold_places_back() -> None:
    # b's requests wait for a GPU slot (the only one is pinned): they are not waiting for a place in the batch,
    # so a may fill the batch meanwhile rather than leave it part empty.
    s = make(max_num_seqs=4, slots=1)
    s.add(seq("a-first", 2, tenant="a", delta=FakeDelta("A")))
    step(s)
    for i in range(3):
        s.add(seq(f"a{i}", 2, tenant="a"))
    s.add(seq("b0", 2, tenant="b", delta=FakeDelta("B")))
    step(s)
    assert len(s.running) == 4 and all(x.tenant == "a" for x in s.running) and s.num_parked == 0


def test_fairness_never_leaves_places_empty() -> None:
    s = make(max_num_seqs=4)
    for i in range(4):
        s.add(seq(f"a{i}", 2, tenant="a"))
    s.add(seq("b0", 2, tenant="b"))
    step(s)
    assert len(s.running) == 4 and sum(x.tenant == "a" for x in s.running) == 3  # b wants one place only


def test_out_of_blocks_partial_prefills_make_progress() -> None:
    # 3 blocks of 4 tokens; two 8-token prompts in chunks of 4: both start, then only one can finish.
    s = make(blocks=3, block_size=4, chunk=4, budget=8)
    a, b = seq("a", 8), seq("b", 8)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 4), ("b", 4)]
    seen = [step(s) for _ in range(4)]
    assert any(("a", 4) in got or ("b", 4) in got for got in seen)
    assert s.num_preemptions >= 1
    assert a.num_uncomputed == 1 or b.num_uncomputed == 1  # one of them reached its decode


def test_fair_shares_are_max_min_by_demand() -> None:
    # 8 places: tenants wanting 1 and 2 get them; the two big ones split the other 5.
    s = make(max_num_seqs=8, budget=4)  # a small budget: nothing is admitted yet, the demands are what is queued
    for tenant, n in (("one", 1), ("two", 2), ("big1", 10), ("big2", 6)):
        for i in range(n):
            s.add(seq(f"{tenant}-{i}", 3, tenant=tenant))
    assert s.fair_shares() == {"one": 1, "two": 2, "big1": 2.5, "big2": 2.5}


def test_a_small_tenant_among_many_does_not_cap_a_big_one() -> None:
    # One tenant floods, ten others want one place each: the flood keeps the rest of the batch.
    s = make(max_num_seqs=16, budget=256)
    for i in range(30):
        s.add(seq(f"f{i}", 2, tenant="flood"))
    for i in range(10):
        s.add(seq(f"l{i}", 2, tenant=f"light{i}"))
    step(s)
    assert len(s.running) == 16 and sum(x.tenant == "flood" for x in s.running) == 6
    for _ in range(3):
        step(s)
    for x in [x for x in s.running if x.tenant != "flood"]:
        s.finish(x, "stop")  # the light ones end: the flood takes the whole batch again
    step(s)
    assert len(s.running) == 16 and all(x.tenant == "flood" for x in s.running)


def test_past_service_is_not_paid_back_for_ever() -> None:
    # a ran three sequences beside b's one for long, so its counter leads b's by hundreds. When a asks for more
    # while b keeps the step's budget busy with prompts, a waits about one step's budget of b's service, not until
    # b has caught up with all of a's past.
    s = make(max_num_seqs=16, budget=32, chunk=16, blocks=1024)
    for i in range(3):
        s.add(seq(f"a{i}", 4, tenant="a"))
    s.add(seq("b-long", 4, tenant="b"))
    for _ in range(100):
        step(s)
    s.add(seq("a-new", 4, tenant="a"))
    for n in range(6):
        for j in range(2):  # b's prompts alone would fill the budget left after the decodes
            s.add(seq(f"b{n}-{j}", 16, tenant="b"))
        got = step(s)
        for x in [x for x in s.running if x.request_id.startswith("b") and x.request_id != "b-long"]:
            if x.num_uncomputed == 1:
                s.finish(x, "stop")
        if any(rid == "a-new" for rid, _ in got):
            break
    assert n <= 2, f"a-new waited {n + 1} steps"


def test_freed_delta_slots_go_to_the_oldest_request_whatever_its_counter() -> None:
    # One slot, pinned by x. The flood (served a lot: the highest counter) waits for it first; a newcomer with a
    # lower counter comes after. When x ends, the slot goes to the flood's request: it waited longer.
    s = make(max_num_seqs=8, budget=64, slots=1)
    s.add(seq("x0", 2, tenant="x", delta=FakeDelta("X")))
    step(s)
    s.add(seq("f0", 2, tenant="flood", delta=FakeDelta("F")))
    s.counters["flood"] = s.counters["x"] + 40
    step(s)
    s.add(seq("y0", 2, tenant="y", delta=FakeDelta("Y")))
    step(s)
    assert [x.request_id for x in s.running] == ["x0"]
    s.finish(s.running[0], "stop")
    step(s)
    assert [x.request_id for x in s.running] == ["f0"]
    s.finish(s.running[0], "stop")
    step(s)
    assert [x.request_id for x in s.running] == ["y0"]  # then the next in line


def test_the_tenant_most_over_its_share_is_the_one_parked() -> None:
    # 8 places: "a" holds 6, "b" 2; "c" arrives. Shares by demand: c 1, b 2, a 5: a gives a place, b keeps both.
    s = make(max_num_seqs=8, budget=256)
    for i in range(6):
        s.add(seq(f"a{i}", 2, tenant="a"))
    step(s)
    for i in range(2):
        s.add(seq(f"b{i}", 2, tenant="b"))
    s.finish(s.running[-1], "stop")
    s.finish(s.running[-1], "stop")
    step(s)
    assert sorted(x.tenant for x in s.running) == ["a"] * 4 + ["b", "b"]
    for i in range(2):
        s.add(seq(f"a{i + 6}", 2, tenant="a"))
    step(s)
    assert len(s.running) == 8 and s.num_parked == 0  # nobody waits: a fills the batch
    s.add(seq("c0", 2, tenant="c"))
    step(s)
    assert s.num_parked == 1
    assert sorted(x.tenant for x in s.running) == ["a"] * 5 + ["b", "b", "c"]


def test_one_sequence_is_parked_per_step_however_many_tenants_wait() -> None:
    # Parking frees a place at once; a second waiting tenant gets the next one, a step later, rather than two
    # places being emptied in one step.
    s = make(max_num_seqs=4, budget=256)
    for i in range(4):
        s.add(seq(f"a{i}", 2, tenant="a"))
    step(s)
    s.add(seq("b0", 2, tenant="b"))
    s.add(seq("c0", 2, tenant="c"))
    step(s)
    assert s.num_parked == 1 and len(s.running) == 4
    step(s)
    assert s.num_parked == 2 and sorted(x.tenant for x in s.running) == ["a", "a", "b", "c"]


def test_a_decode_behind_a_prefilling_sequence_is_not_skipped() -> None:
    s = make(chunk=8, budget=64)
    s.add(seq("long", 30, tenant="x"))
    step(s)  # long: its first chunk; it stays first in the running batch
    s.add(seq("short", 2, tenant="x"))
    step(s)
    assert ("short", 1) in step(s)  # decoding, behind a sequence still prefilling


def test_out_of_blocks_the_newest_sequence_is_preempted() -> None:
    s = make(blocks=6, block_size=4, budget=64, chunk=16)
    seqs = [seq(f"s{i}", 8) for i in range(3)]
    for x in seqs:
        s.add(x)
    step(s)  # 3 prompts of 8 tokens: all 6 blocks
    got = step(s)  # each decode needs a new block: the newest gives its blocks back first
    assert seqs[2].status is SeqStatus.WAITING and seqs[2].num_computed == 0
    assert ("s0", 1) in got and ("s1", 1) in got
    assert s.num_preemptions == 1 and seqs[0].num_computed == 9 and seqs[1].num_computed == 9


def test_out_of_blocks_with_only_prefills_the_newest_of_three_gives_its_blocks() -> None:
    s = make(blocks=6, block_size=4, budget=12, chunk=4)
    seqs = [seq(f"s{i}", 12) for i in range(3)]
    for x in seqs:
        s.add(x)
    assert step(s) == [("s0", 4), ("s1", 4), ("s2", 4)]
    assert step(s) == [("s0", 4), ("s1", 4), ("s2", 4)]  # all 6 blocks held, every next chunk needs one more
    got = step(s)
    assert s.num_preemptions == 1 and [x.num_computed for x in seqs] == [12, 12, 0]
    assert got == [("s0", 4), ("s1", 4)]  # s2's two blocks: the last chunks of the older two (nobody admitted)
    assert seqs[2].status is SeqStatus.WAITING and s.waiting == [seqs[2]]


def test_a_tenant_waiting_for_a_slot_does_not_stop_the_others_being_admitted() -> None:
    s = make(slots=1)
    s.add(seq("a", 2, tenant="a", delta=FakeDelta("A")))
    step(s)  # a holds the only slot
    b, c = seq("b", 2, tenant="b", delta=FakeDelta("B")), seq("c", 2, tenant="c")
    s.add(b)
    s.add(c)
    got = step(s)  # b (first by name among equals) has no slot to get: c is admitted all the same
    assert ("c", 2) in got and b.status is SeqStatus.WAITING


def test_a_parked_sequence_gives_its_blocks_before_a_running_one_is_preempted() -> None:
    s = make(max_num_seqs=2, blocks=4, block_size=4, slots=2)
    a, b = seq("a", 8, tenant="a", delta=FakeDelta("A")), seq("b", 8, tenant="b")
    s.add(a)
    s.add(b)
    step(s)  # 2 full blocks each, none free: each next token needs a third block
    s._park(a)  # as a fair-share parking would; a keeps its blocks and its slot
    assert len(a.block_table) == 2 and s.blocks.num_free == 0 and s.slots.pins == {"A": 1}
    s.num_preemptions = 3  # as after earlier preemptions: the reclaim adds one to the count
    while len(b.block_table) < 3:  # b decodes until it needs a third block: a's are taken back for it
        step(s)
    assert b.status is SeqStatus.RUNNING and b.block_table
    assert not a.block_table and a.num_computed == 0 and a.status is SeqStatus.WAITING and a.slots == [-1]
    assert s.num_preemptions == 4 and s.slots.pins == {} and s.waiting[0] is a


def test_aborting_a_waiting_request_leaves_the_running_ones_pin() -> None:
    s = make(max_num_seqs=1)
    running, waiting = seq("r", 2, delta=FakeDelta("X")), seq("w", 2, delta=FakeDelta("X"))
    s.add(running)
    s.add(waiting)
    step(s)
    assert running.status is SeqStatus.RUNNING and waiting.slots == [-1] and s.slots.pins == {"X": 1}
    s.finish(waiting, "abort")  # it never held the slot: the running request's pin stays
    assert s.slots.pins == {"X": 1} and not s.waiting


def test_one_sequence_without_blocks_does_not_hold_its_tenants_others() -> None:
    s = make(chunk=2, blocks=2, block_size=4)
    x, y = seq("x", 10), seq("y", 4)
    s.add(x)
    assert step(s) == [("x", 2)]
    s.add(y)
    assert step(s) == [("x", 2), ("y", 2)]  # both blocks now held: x's next chunk needs a third
    assert step(s) == [("y", 2)]  # y's last prompt chunk fits its block: it runs, nobody is preempted
    assert s.num_preemptions == 0 and x.num_computed == 4


def test_running_sequences_alone_are_unfinished_work() -> None:
    s = make()
    assert not s.has_unfinished()
    s.add(seq("a", 3))
    step(s)  # admitted: the queue is empty, the sequence runs
    assert s.num_waiting == 0 and s.running and s.has_unfinished()
    s.finish(s.running[0], "stop")
    assert not s.has_unfinished()


def test_the_load_turn_is_the_oldest_request_whose_delta_is_not_resident() -> None:
    # One slot, pinned by x's X. "late"'s queue exists first (an earlier request of its own), but "early" asked for
    # its delta first: when X's slot frees, E loads, not L.
    s = make(max_num_seqs=8, budget=64, slots=1)
    s.add(seq("x0", 2, tenant="x", delta=FakeDelta("X")))
    s.add(seq("late0", 2, tenant="late"))
    step(s)
    s.add(seq("e0", 2, tenant="early", delta=FakeDelta("E")))
    s.add(seq("l0", 2, tenant="late", delta=FakeDelta("L")))
    step(s)
    s.finish(next(x for x in s.running if x.request_id == "x0"), "stop")
    step(s)
    assert "e0" in [x.request_id for x in s.running] and "l0" not in [x.request_id for x in s.running]


def test_a_resident_delta_never_takes_the_load_turn() -> None:
    # X is resident (x0 runs with it), a slot is free. w1 (X) arrived before f1 (F): the turn to load is F's, so
    # both join in the same step.
    s = make(max_num_seqs=3, budget=64, slots=2)
    s.add(seq("x0", 2, tenant="a", delta=FakeDelta("X")))
    step(s)
    s.add(seq("w1", 2, tenant="a", delta=FakeDelta("X")))
    s.add(seq("f1", 2, tenant="b", delta=FakeDelta("F")))
    step(s)
    assert sorted(x.request_id for x in s.running) == ["f1", "w1", "x0"]


def test_the_lowest_counter_tenant_over_its_share_lets_a_waiting_one_in() -> None:
    # b was served before (its counter stays high); a, now first in counter order, holds its share (1 of 2) while
    # b waits: b takes the free place, not a's second request.
    s = make(max_num_seqs=2, budget=64)
    b0 = seq("b0", 10, tenant="b")
    s.add(b0)
    step(s)
    s.finish(b0, "stop")
    s.add(seq("a0", 2, tenant="a"))
    step(s)
    s.add(seq("a1", 2, tenant="a"))
    s.add(seq("b1", 2, tenant="b"))
    assert s.counters["a"] < s.counters["b"]
    step(s)
    assert sorted(x.request_id for x in s.running) == ["a0", "b1"]


def test_a_request_whose_delta_is_resident_counts_as_waiting_for_a_place() -> None:
    # b1 needs B, already in a slot (b0 runs with it): it can run at once, so b's share is 1.5 of 3, not 1, and one
    # of a's two is parked for it.
    s = make(max_num_seqs=3, budget=64, slots=2)
    s.add(seq("b0", 2, tenant="b", delta=FakeDelta("B")))
    s.add(seq("a0", 2, tenant="a"))
    s.add(seq("a1", 2, tenant="a"))
    step(s)
    s.add(seq("a2", 2, tenant="a"))
    s.add(seq("b1", 2, tenant="b", delta=FakeDelta("B")))
    step(s)
    assert s.num_parked == 1 and sorted(x.request_id for x in s.running) == ["a0", "b0", "b1"]


def test_a_request_whose_turn_it_is_to_load_into_a_free_slot_counts_as_waiting_for_a_place() -> None:
    # a fills the batch; b0's delta B is not resident but a slot is free and the load turn is B's: b0 can run at
    # once, so one of a's sequences is parked for it.
    s = make(max_num_seqs=4, slots=2)
    for i in range(4):
        s.add(seq(f"a{i}", 2, tenant="a"))
    step(s)
    s.add(seq("b0", 2, tenant="b", delta=FakeDelta("B")))
    step(s)
    step(s)
    assert s.num_parked == 1 and "b0" in [x.request_id for x in s.running]


def test_a_resumed_sequence_leaves_the_rest_of_the_step_to_prefills() -> None:
    s = make(max_num_seqs=3)
    a = seq("a", 3, tenant="a")
    s.add(a)
    step(s)  # a's prompt done: its next step is a decode
    s._park(a)  # as a fair-share parking would
    s.add(seq("a2", 3, tenant="a"))
    assert sorted(step(s)) == [("a", 1), ("a2", 3)]  # a resumes and a2's prompt runs in the same step


def test_a_request_waiting_for_a_slot_does_not_hold_back_its_tenants_next_requests() -> None:
    """The head of a tenant's queue waits (every slot pinned by running requests of other deltas): the tenant's
    requests behind it that need no slot, or one already resident, still join the batch, and the head keeps its
    place."""
    s = make(slots=1)
    s.add(seq("pin", 2, tenant="other", delta=FakeDelta("x")))
    assert step(s) == [("pin", 2)]  # x holds the only slot while it runs
    s.add(seq("head", 2, delta=FakeDelta("y")))  # needs a slot: none free
    s.add(seq("base", 3))  # no delta
    s.add(seq("same", 4, delta=FakeDelta("x")))  # x is resident
    scheduled = dict(step(s))
    assert "head" not in scheduled and scheduled.get("base") == 3 and scheduled.get("same") == 4
    assert [q.request_id for q in s.queues["t"]] == ["head"]


def test_a_request_behind_an_older_cold_load_does_not_hold_back_its_tenants_resident_requests() -> None:
    """A slot freed goes to the oldest request's delta (the load turn); a later cold request of another tenant
    waits for it, but that tenant's requests on a resident delta still run."""
    s = make(slots=1)
    s.add(seq("pin", 2, tenant="other", delta=FakeDelta("x")))
    assert step(s) == [("pin", 2)]
    s.add(seq("early", 2, tenant="first", delta=FakeDelta("z")))  # the oldest cold load: the turn is z's
    s.add(seq("head", 2, delta=FakeDelta("y")))  # cold too, after z: not its turn
    s.add(seq("same", 4, delta=FakeDelta("x")))  # resident
    scheduled = dict(step(s))
    assert "early" not in scheduled and "head" not in scheduled and scheduled.get("same") == 4
    assert [q.request_id for q in s.queues["t"]] == ["head"]


def test_fair_shares_fill_the_batch_by_demand_with_running_requests_counted_once() -> None:
    s = make(max_num_seqs=8)
    s.add(seq("a", 2, tenant="A"))
    step(s)
    for i in range(10):
        s.add(seq(f"b{i}", 2, tenant="B"))
    assert s.fair_shares() == {"A": 1, "B": 7}  # A wants its one place; B gets the other seven


def test_a_request_waiting_for_a_slot_is_not_demand_for_a_place_in_the_batch() -> None:
    """Its delta's turn to load has come, but every slot is pinned: it could not run, so it claims no share."""
    s = make(slots=1)
    s.add(seq("pin", 2, tenant="other", delta=FakeDelta("x")))
    step(s)
    s.add(seq("cold", 2, tenant="C", delta=FakeDelta("z")))  # the oldest cold load: its turn, no room
    step(s)
    assert s._could_run(s.queues["C"][0]) is False
    assert s.fair_shares() == {"other": 1, "C": 0}

