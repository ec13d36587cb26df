"""The GPU slot pool on its own (registry.slot_pool), on CPU tensors: what a slot holds after a load, which slot a
new delta takes, pins, deferred frees, replacement pools and the servability checks. The engine tests drive it
through real models; these pin each rule down without one."""

from __future__ import annotations

import pytest
import torch

from deltakernels.bitdelta import BLOCKED16
from registry.deltas import BitDelta, Ia3Delta, LoraDelta
from registry.errors import AdapterMismatch
from registry.slot_pool import SlotPool

PROJECTIONS = {"m.q": (6, 16), "m.v": (4, 16)}  # path -> (out, in)


def base_tensors() -> dict[str, torch.Tensor]:
    return {
        "m.q.weight": torch.randn(6, 16),
        "m.v.weight": torch.randn(4, 16),
        "m.norm.weight": torch.full((16,), 1.0),
        "m.bias": torch.arange(4, dtype=torch.float32),
    }


def make_pool(*, bitdelta_slots=2, lora_slots=2, max_lora_rank=4, sign_layout=None, events=None, ia3_slots=0) -> SlotPool:
    observer = None if events is None else (lambda event, seconds: events.append((event, seconds)))
    extra = {} if sign_layout is None else {"sign_layout": sign_layout}
    return SlotPool(
        PROJECTIONS, base_tensors(), bitdelta_slots=bitdelta_slots, lora_slots=lora_slots,
        max_lora_rank=max_lora_rank, dtype=torch.float32, device="cpu", observer=observer, ia3_slots=ia3_slots,
        **extra,
    )


def lora(name: str, rank: int = 2, *, owner: str = "t", paths=("m.q",), scaling: float = 0.5) -> LoraDelta:
    weights = {p: (torch.randn(rank, PROJECTIONS[p][1]), torch.randn(PROJECTIONS[p][0], rank)) for p in paths}
    return LoraDelta(sha256=name, rank=rank, scaling=scaling, weights=weights, owner=owner)


def bitdelta(name: str, *, owner: str = "t", paths=("m.q",), replacements=None, scale_shape="row") -> BitDelta:
    projections = {}
    for p in paths:
        out_f, in_f = PROJECTIONS[p]
        sign = torch.randint(0, 256, (out_f, (in_f + 7) // 8), dtype=torch.uint8)
        scale = torch.rand(out_f) + 0.1 if scale_shape == "row" else torch.tensor([0.25])
        projections[p] = (sign, scale)
    return BitDelta(sha256=name, base_fingerprint="sha256:x", projections=projections,
                    replacements=replacements or {}, owner=owner)


# ---- construction ------------------------------------------------------------------------------------------
def test_pools_have_the_documented_shapes_and_start_empty():
    pool = make_pool(bitdelta_slots=3, lora_slots=2, max_lora_rank=4)
    q = pool.projection("m.q")
    assert (q.out_features, q.in_features) == (6, 16)
    assert q.signs.shape == (3, 6, 2) and q.signs.dtype == torch.uint8
    assert q.scales.shape == (3, 6) and q.scales.dtype == torch.float32
    assert q.lora_a.shape == (2, 4, 16) and q.lora_bt.shape == (2, 4, 6)
    assert q.lora_scaling.shape == (2,) and q.lora_ranks.shape == (2,) and q.lora_ranks.dtype == torch.int32
    assert pool.projection("m.nope") is None
    assert pool.resident("bitdelta") == [None] * 3 and pool.resident("lora") == [None] * 2
    assert pool.num_resident("lora") == 0 and not pool.has_replacements


def test_a_kind_with_no_slots_allocates_no_pools():
    pool = make_pool(bitdelta_slots=0, lora_slots=1)
    assert pool.projection("m.q").signs is None and pool.projection("m.q").scales is None
    assert make_pool(lora_slots=0).projection("m.q").lora_a is None


@pytest.mark.parametrize("kwargs", [{"bitdelta_slots": -1}, {"lora_slots": -1}, {"max_lora_rank": 0}])
def test_bad_sizes_are_refused(kwargs):
    with pytest.raises(ValueError, match="slot counts"):
        make_pool(**kwargs)


def test_zero_slots_and_rank_one_are_allowed():
    make_pool(bitdelta_slots=0, lora_slots=0, max_lora_rank=1)


def test_signs_follow_the_kernels_layout():
    pool = make_pool(sign_layout=BLOCKED16)
    assert pool.projection("m.q").signs.shape == BLOCKED16.pool_shape(2, 6, 16)
    d = bitdelta("b")
    slot = pool.acquire(d)
    assert torch.equal(pool.projection("m.q").signs[slot], BLOCKED16.to_slot(d.projections["m.q"][0]))


# ---- what a load puts into a slot ----------------------------------------------------------------------------
def test_a_lora_load_fills_its_slot_zero_padded_and_clears_what_it_does_not_target():
    pool = make_pool(max_lora_rank=4)
    wide = lora("wide", rank=4, paths=("m.q", "m.v"), scaling=2.0)
    slot = pool.acquire(wide)
    pool.release(wide)
    narrow = lora("narrow", rank=2, paths=("m.q",), scaling=0.5)
    other = pool.acquire(lora("other"))  # takes the free slot: `narrow` must reuse `wide`'s
    assert other != slot
    assert pool.acquire(narrow) == slot
    q, v = pool.projection("m.q"), pool.projection("m.v")
    a, b = narrow.weights["m.q"]
    assert torch.equal(q.lora_a[slot, :2], a) and torch.equal(q.lora_bt[slot, :2], b.t())
    assert not q.lora_a[slot, 2:].any() and not q.lora_bt[slot, 2:].any()  # wide's rows 2..3 are gone
    assert q.lora_ranks[slot] == 2 and q.lora_scaling[slot] == 0.5
    assert not v.lora_a[slot].any() and not v.lora_bt[slot].any()  # narrow leaves m.v alone
    assert v.lora_ranks[slot] == 0 and v.lora_scaling[slot] == 0.0
    assert q.lora_ranks[other] == 2  # the other slot is untouched


def ia3(name: str, *, owner: str = "t", out_paths=("m.q",), in_paths=()) -> Ia3Delta:
    vectors = {p: torch.rand(PROJECTIONS[p][0]) + 0.5 for p in out_paths}
    vectors.update({p: torch.rand(PROJECTIONS[p][1]) + 0.5 for p in in_paths})
    return Ia3Delta(sha256=name, vectors=vectors, feedforward=frozenset(in_paths), owner=owner)


def test_ia3_pools_hold_a_row_of_ones_for_rows_without_one_and_a_load_resets_what_it_leaves_alone():
    pool = make_pool(ia3_slots=1)
    q, v = pool.projection("m.q"), pool.projection("m.v")
    assert q.ia3_in.shape == (2, 16) and q.ia3_out.shape == (2, 6) and pool.ia3_ones_slot == 1
    assert make_pool().projection("m.q").ia3_in is None  # no (IA)^3 slots: no pools
    first = ia3("first", out_paths=("m.q", "m.v"), in_paths=())
    slot = pool.acquire(first)
    assert torch.equal(v.ia3_out[slot], first.vectors["m.v"])
    pool.release(first)
    second = ia3("second", out_paths=(), in_paths=("m.q",))  # reuses the one slot, evicting `first`
    assert pool.acquire(second) == slot
    assert torch.equal(q.ia3_in[slot], second.vectors["m.q"])
    assert torch.equal(q.ia3_out[slot], torch.ones(6)) and torch.equal(v.ia3_out[slot], torch.ones(4))  # first's gone
    assert torch.equal(v.ia3_in[slot], torch.ones(16))
    assert all(torch.equal(t[pool.ia3_ones_slot], torch.ones_like(t[0])) for t in (q.ia3_in, q.ia3_out, v.ia3_in))
    # which slots scale which side of which projection, and a layout number that changes with it (CUDA graph keys)
    assert (q.ia3_in_slots, q.ia3_out_slots, v.ia3_in_slots, v.ia3_out_slots) == ({slot}, set(), set(), set())
    layout = pool.ia3_layout
    pool.release(second)
    pool.acquire(ia3("third", out_paths=(), in_paths=("m.q",)))  # the same sides scaled: the same layout
    assert pool.ia3_layout == layout
    assert pool.resident("ia3") == ["t/ia3/third"] and pool.num_resident("lora") == 0


def test_an_ia3_delta_that_does_not_fit_is_refused():
    with pytest.raises(AdapterMismatch, match="no \\(IA\\)\\^3 slots"):
        make_pool().check_servable(ia3("a"))
    pool = make_pool(ia3_slots=1)
    with pytest.raises(AdapterMismatch, match="not a projection"):
        pool.check_servable(Ia3Delta(sha256="x", vectors={"m.nope": torch.ones(3)}, feedforward=frozenset()))
    wrong = Ia3Delta(sha256="x", vectors={"m.q": torch.ones(16)}, feedforward=frozenset())  # [in] given for an output
    with pytest.raises(AdapterMismatch, match="expected 6"):
        pool.check_servable(wrong)
    pool.check_servable(ia3("ok", in_paths=("m.v",)))


def test_a_bitdelta_load_fills_signs_and_scales_and_zeroes_scales_it_does_not_touch():
    pool = make_pool()
    both = bitdelta("both", paths=("m.q", "m.v"))
    slot = pool.acquire(both)
    pool.release(both)
    pool.acquire(bitdelta("filler"))
    only_q = bitdelta("q", paths=("m.q",), scale_shape="scalar")
    assert pool.acquire(only_q) == slot
    q, v = pool.projection("m.q"), pool.projection("m.v")
    assert torch.equal(q.signs[slot], only_q.projections["m.q"][0])
    assert torch.equal(q.scales[slot], torch.full((6,), 0.25))  # a scalar scale spans the rows
    assert not v.scales[slot].any()  # m.v as in the base: a zero scale, whatever signs remain


# ---- which slot a delta takes ---------------------------------------------------------------------------------
def test_a_resident_delta_is_a_hit_and_loads_nothing():
    events = []
    pool = make_pool(events=events)
    d = lora("a")
    slot = pool.acquire(d)
    # only a load takes time (the copies' host time); a miss or a hit is an event of no duration
    assert events[0] == ("miss", 0.0) and events[1][0] == "load" and events[1][1] >= 0.0 and len(events) == 2
    pool.projection("m.q").lora_a[slot].fill_(7.0)  # a second load would overwrite this
    assert pool.acquire(d) == slot and events[2:] == [("hit", 0.0)]
    assert pool.projection("m.q").lora_a[slot, 0, 0] == 7.0
    assert pool.slot_of(d) == slot and pool.is_resident(d)


def test_a_free_slot_is_taken_before_evicting_and_then_the_least_recently_used():
    events = []
    pool = make_pool(lora_slots=3, events=events)
    a, b, c, d = (lora(n) for n in "abcd")
    sa, sb = pool.acquire(a), pool.acquire(b)
    pool.release(a)
    pool.release(b)  # a released first: a is the least recently used
    sc = pool.acquire(c)
    assert sc not in (sa, sb) and pool.num_resident("lora") == 3  # the free slot, not a's
    assert "evict" not in [e for e, _ in events]
    pool.release(c)
    assert pool.acquire(a) == sa  # a hit moves a to the most recently used end
    pool.release(a)
    events.clear()
    assert pool.acquire(d) == sb  # b is now the least recently used
    assert [e for e, _ in events] == ["miss", "evict", "load"]
    assert pool.slot_of(b) is None and pool.resident("lora")[sb] == d.key


def test_pinned_slots_are_never_taken_and_a_full_pool_says_so():
    pool = make_pool(lora_slots=2)
    a, b, c = lora("a"), lora("b"), lora("c")
    pool.acquire(a)
    pool.acquire(a)  # two requests on a
    pool.acquire(b)
    assert not pool.has_room("lora") and pool.acquire(c) is None
    assert pool.has_room("bitdelta")  # the kinds have separate slots
    pool.release(a)
    assert pool.acquire(c) is None  # a is still pinned once
    pool.release(b)
    assert pool.has_room("lora")
    assert pool.acquire(c) == pool.slot_of(c) and pool.slot_of(b) is None


def test_the_kinds_never_share_a_slot_index_space():
    pool = make_pool(bitdelta_slots=1, lora_slots=1)
    assert pool.acquire(lora("x")) == 0 and pool.acquire(bitdelta("x")) == 0
    assert pool.resident("lora") == ["t/lora/x"] and pool.resident("bitdelta") == ["t/bitdelta/x"]


def test_the_same_content_of_two_tenants_takes_two_slots():
    pool = make_pool()
    mine, theirs = lora("same", owner="me"), lora("same", owner="you")
    assert pool.acquire(mine) != pool.acquire(theirs)


def test_release_of_a_delta_without_a_slot_is_a_bug():
    pool = make_pool()
    with pytest.raises(AssertionError):
        pool.release(lora("never"))
    d = lora("d")
    pool.acquire(d)
    pool.release(d)
    with pytest.raises(AssertionError, match="unpinned"):
        pool.release(d)


# ---- forgetting (deleted or replaced deltas) ------------------------------------------------------------------
def test_forget_frees_an_unpinned_slot_at_once():
    pool = make_pool()
    d = lora("d")
    slot = pool.acquire(d)
    pool.release(d)
    pool.forget("lora", d.key)
    assert pool.resident("lora")[slot] is None and not pool.is_resident(d)
    pool.forget("lora", d.key)  # forgetting twice, or something never loaded, is harmless
    pool.forget("lora", "t/lora/never")


def test_forget_of_a_pinned_slot_waits_for_its_last_release():
    pool = make_pool(lora_slots=1)
    d = lora("d")
    slot = pool.acquire(d)
    pool.acquire(d)
    pool.forget("lora", d.key)
    assert pool.slot_of(d) == slot  # still running: the rows keep reading it
    pool.release(d)
    assert pool.slot_of(d) == slot
    pool.release(d)
    assert pool.slot_of(d) is None and pool.resident("lora") == [None]
    e = lora("e")
    assert pool.acquire(e) == slot
    pool.release(e)
    assert pool.slot_of(e) == slot  # the slot's doom went with its old owner


# ---- replacements -----------------------------------------------------------------------------------------------
def test_replacements_get_a_pool_whose_other_rows_hold_the_base():
    pool = make_pool(bitdelta_slots=3)
    norm = torch.full((16,), 3.0)
    d = bitdelta("r", replacements={"m.norm.weight": norm})
    slot = pool.acquire(d)
    rep = pool.replacement("m.norm.weight")
    assert pool.has_replacements and rep.pool.shape == (3, 16)
    assert torch.equal(rep.pool[slot], norm) and rep.replaced_slots == {slot}
    for other in set(range(3)) - {slot}:
        assert torch.equal(rep.pool[other], torch.ones(16))
    assert pool.replaces_any([slot]) and not pool.replaces_any([s for s in range(3) if s != slot])
    assert pool.replacement("m.bias") is None


def test_a_delta_that_does_not_replace_restores_the_base_row_it_reuses():
    pool = make_pool(bitdelta_slots=1)
    d = bitdelta("r", replacements={"m.norm.weight": torch.full((16,), 3.0), "m.bias": torch.zeros(4)})
    pool.acquire(d)
    pool.release(d)
    plain = bitdelta("plain")
    assert pool.acquire(plain) == 0
    assert torch.equal(pool.replacement("m.norm.weight").pool[0], torch.ones(16))
    assert torch.equal(pool.replacement("m.bias").pool[0], torch.arange(4, dtype=torch.float32))
    assert not pool.replaces_any([0])
    pool.release(plain)
    partial = bitdelta("partial", replacements={"m.bias": torch.full((4,), 9.0)})
    pool.acquire(partial)
    assert pool.replacement("m.bias").replaced_slots == {0}
    assert pool.replacement("m.norm.weight").replaced_slots == set()


def test_a_packed_base_weight_is_unpacked_for_its_replacement_pool():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    base = base_tensors()
    dense = base["m.q.weight"].clone()
    base["m.q.weight"] = dense.to_mkldnn()
    pool = SlotPool(PROJECTIONS, base, bitdelta_slots=2, lora_slots=0, max_lora_rank=1,
                    dtype=torch.float32, device="cpu")
    d = bitdelta("r", paths=("m.v",), replacements={"m.q.weight": torch.zeros(6, 16)})
    slot = pool.acquire(d)
    assert torch.equal(pool.replacement("m.q.weight").pool[1 - slot], dense)


# ---- servability ---------------------------------------------------------------------------------------------
def test_servable_deltas_pass():
    pool = make_pool(max_lora_rank=4)
    pool.check_servable(lora("ok", rank=4, paths=("m.q", "m.v")))
    pool.check_servable(bitdelta("ok", paths=("m.q", "m.v"), replacements={"m.norm.weight": torch.ones(16)}))


@pytest.mark.parametrize(
    "pool_kwargs, delta, message, param",
    [
        ({"lora_slots": 0}, lambda: lora("x"), "no LoRA slots", None),
        ({"max_lora_rank": 2}, lambda: lora("x", rank=3), "rank 3 is above this server's max_lora_rank 2", "r"),
        ({}, lambda: LoraDelta("x", 2, 1.0, {"m.k": (torch.zeros(2, 16), torch.zeros(6, 2))}),
         "'m.k', which is not a projection", "m.k"),
        ({"bitdelta_slots": 0}, lambda: bitdelta("x"), "no 1-bit delta slots", None),
        ({}, lambda: BitDelta("x", "f", {"m.k": (torch.zeros(6, 2, dtype=torch.uint8), torch.ones(6))}, {}),
         "'m.k' is not a projection", "m.k"),
        ({}, lambda: bitdelta("x", replacements={"m.q.weight": torch.zeros(6, 16)}),
         "m.q.weight is both replaced and given as sign/scale", "m.q.weight"),
        ({}, lambda: bitdelta("x", replacements={"m.extra": torch.zeros(3)}), "'m.extra' is not a tensor", "m.extra"),
        ({}, lambda: bitdelta("x", replacements={"m.bias": torch.zeros(5)}),
         r"'m.bias' has shape \(5,\), the base has \(4,\)", "m.bias"),
    ],
)
def test_unservable_deltas_are_refused_by_name(pool_kwargs, delta, message, param):
    pool = make_pool(**pool_kwargs)
    with pytest.raises(AdapterMismatch, match=message) as refused:
        pool.check_servable(delta())
    assert refused.value.param == param
