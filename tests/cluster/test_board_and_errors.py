"""Without Ray: the cluster's board (notices every replica reads, replicas' reports) and the errors a replica
raises to the ingress through Ray, which pickles them — each must arrive as the same API error one server gives."""

from __future__ import annotations

import pickle

import pytest

from registry.errors import AdapterMismatch, InsufficientStorage, NameTaken, NotFound, UnsupportedFormat
from serving.api.errors import to_api_error
from serving.cluster import board as board_module
from serving.cluster.board import Board
from serving.cluster.errors import ReplicaLost
from serving.cluster.refs import CompositionRef, DeltaRef, multiplexed_id
from serving.engine.errors import Overloaded, PromptTooLong, TenantBusy
from serving.engine.sampling_params import SamplingParamsError

REF = DeltaRef("acme", "lora", "ab" * 32, "lora/ab/" + "ab" * 32)


@pytest.mark.parametrize("error", [
    SamplingParamsError("guided_regex is not a valid regex", "guided_regex"),
    PromptTooLong("This model's maximum context length is 8 tokens", "max_tokens"),
    AdapterMismatch("LoRA rank 99 is above 64", param="r"), UnsupportedFormat("a pickle", param="x.bin"),
    NotFound("The model was deleted", param="model"), NameTaken("taken", "name"), InsufficientStorage("full"),
    TenantBusy("tenant has 64 requests in flight"), Overloaded("256 requests are queued"), ReplicaLost("stopped"),
], ids=lambda e: type(e).__name__)  # fmt: skip
def test_every_error_a_replica_raises_arrives_as_the_same_api_error(error):
    arrived = pickle.loads(pickle.dumps(error))
    assert type(arrived) is type(error)
    want, got = to_api_error(error), to_api_error(arrived)
    assert (got.status, got.message, got.param, got.code) == (want.status, want.message, want.param, want.code)


def test_a_lost_replica_is_a_503_to_retry():
    err = to_api_error(ReplicaLost("the engine replica running this request stopped; retry"))
    assert (err.status, err.code) == (503, "replica_lost") and err.headers["Retry-After"]
    assert err.message == "The engine replica running this request stopped; retry."


def test_routing_ids_are_the_deltas_keys():
    assert multiplexed_id(None) == ""  # the base: routed by load alone
    assert multiplexed_id(REF) == REF.key == f"acme/lora/{'ab' * 32}"
    other = DeltaRef("acme", "bitdelta", "cd" * 32, "bitdelta/cd/" + "cd" * 32)
    assert multiplexed_id(CompositionRef(((REF, 1.0), (other, 0.5)))) == f"{REF.key}+{other.key}"


def test_readers_get_each_notice_once_from_where_they_started():
    board = Board()
    board.forget([REF])
    epoch, head = board.head()
    assert head == 1  # a reader that starts now never held REF: it starts after it
    other = DeltaRef("bob", "lora", "cd" * 32, "lora/cd/" + "cd" * 32)
    board.forget([other])
    assert board.notices_since(epoch, head) == (epoch, 2, [other], False)
    assert board.notices_since(epoch, 2) == (epoch, 2, [], False)
    assert board.notices_since(epoch, 0) == (epoch, 2, [REF, other], False)


def test_a_reader_that_missed_notices_is_told_so(monkeypatch):
    monkeypatch.setattr(board_module, "KEEP_NOTICES", 3)
    board = Board()
    refs = [DeltaRef("t", "lora", f"{i:064x}", f"lora/00/{i:064x}") for i in range(5)]
    board.forget(refs)
    epoch, head = board.head()
    assert head == 5
    assert board.notices_since(epoch, 1) == (epoch, 5, refs[2:], True)  # 1 was dropped: the reader lets go of all
    restarted = Board()  # Ray restarted the board: a new epoch, sequence numbers from 0 again
    new_epoch, seen, notices, missed = restarted.notices_since(epoch, 5)
    assert new_epoch != epoch and seen == 0 and notices == [] and missed


def test_reports_of_silent_replicas_expire(monkeypatch):
    board = Board()
    now = [1000.0]
    monkeypatch.setattr(board_module.time, "time", lambda: now[0])
    board.report("r1", {"alive": True})
    now[0] += board_module.REPORT_TTL_S / 2
    board.report("r2", {"alive": True})
    assert set(board.reports()) == {"r1", "r2"}
    now[0] += board_module.REPORT_TTL_S * 0.75
    assert set(board.reports()) == {"r2"}  # r1 killed: its last report is gone, r2 still reports


def test_a_replica_remembers_what_it_was_told_to_forget_for_a_while():
    from serving.cluster.board import RecentlyForgotten

    now = [0.0]
    forgotten = RecentlyForgotten(ttl=60, clock=lambda: now[0])
    forgotten.add(REF.key)
    assert REF.key in forgotten and "acme/lora/other" not in forgotten
    now[0] = 59.0
    assert REF.key in forgotten  # a request resolved before the delete and ending now lets its copy go again
    now[0] = 61.0
    assert REF.key not in forgotten  # later, the same content uploaded again is kept as any delta
    forgotten.add("acme/bitdelta/x")
    assert REF.key not in forgotten._until  # expired keys are dropped as others are added
