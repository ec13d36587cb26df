"""The engine thread behind the server (serving.engine.async_engine.EngineLoop), driven from an event loop as the
server drives it: streaming, the bound on pending requests, refusals, early disconnects, and a failing engine."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest

from registry.loading import load_delta
from serving.engine.async_engine import EngineLoop
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.errors import EngineDead, Overloaded, PromptTooLong
from serving.engine.sampling_params import SamplingParams
from tests.helpers import make_lora, make_model_dir

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    base = make_model_dir(root / "base", arch="llama")
    lora_dir = make_lora(base, root / "lora", r=2, seed=3)[0]
    return base, lora_dir


def new_engine(base, **overrides) -> LLMEngine:
    config = dict(device="cpu", dtype="float32", kernel_backend="torch", max_model_len=32,
                  max_num_batched_tokens=64, lora_slots=1)
    return LLMEngine.from_model_dir(base, EngineConfig(**{**config, **overrides}))


@pytest.fixture
def running(world):
    """A started loop over a fresh engine; stopped after the test."""
    loops = []

    def start(max_pending: int = 8, on_step=None, engine=None) -> EngineLoop:
        loop = EngineLoop(engine or new_engine(world[0]), max_pending=max_pending, on_step=on_step)
        loop.start()
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        loop.stop(timeout=30)


async def collect(loop: EngineLoop, request_id: str, prompt, params=GREEDY, delta=None, tenant="t") -> list:
    """The request's outputs; a request whose outputs never come fails the test in 20 s instead of hanging it."""

    async def outputs() -> list:
        return [o async for o in loop.stream(request_id, prompt, params, delta, tenant)]

    return await asyncio.wait_for(outputs(), timeout=20)


def test_stream_yields_each_step_and_ends_with_the_finished_output(world, running):
    steps = []
    loop = running(on_step=lambda engine, outputs, seconds: steps.append((engine is loop.engine, len(outputs), seconds)))
    delta = load_delta(world[1], loop.engine.spec, 8)
    expected = new_engine(world[0]).generate([([5, 6, 7], GREEDY, delta)])[0].token_ids

    outputs = asyncio.run(collect(loop, "r1", [5, 6, 7], delta=delta))
    assert [o.finished for o in outputs] == [False, False, False, True]
    assert [t for o in outputs for t in o.new_token_ids] == expected
    assert outputs[-1].finish_reason == "length" and outputs[-1].num_output_tokens == 4
    for _ in range(500):  # the observer of the last step runs after its output was delivered
        if len(steps) == 4:
            break
        time.sleep(0.01)
    assert len(steps) == 4 and all(own and n == 1 and seconds > 0 for own, n, seconds in steps)
    assert loop.num_pending == 0 and loop._requests == {}


def test_concurrent_streams_are_delivered_to_their_own_consumer(running):
    loop = running()

    async def both():
        return await asyncio.gather(collect(loop, "a", [5, 6, 7]), collect(loop, "b", [9, 10]))

    a, b = asyncio.run(both())
    assert {o.request_id for o in a} == {"a"} and {o.request_id for o in b} == {"b"}
    assert a[-1].num_prompt_tokens == 3 and b[-1].num_prompt_tokens == 2


def test_beyond_max_pending_submit_refuses_at_once(running):
    loop = running(max_pending=2)
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def scenario():
        first = loop.submit("a", [5, 6], long, None, "t")
        loop.submit("b", [5, 6], long, None, "t")
        assert loop.num_pending == 2
        with pytest.raises(Overloaded, match="2 requests are queued or running"):
            loop.submit("c", [5, 6], long, None, "t")
        loop.abort("a")
        loop.abort("b")
        while loop.num_pending:
            await asyncio.sleep(0.01)
        assert first.empty() or not (await first.get()).finished  # aborted: no finished output is owed
        loop.submit("d", [5, 6], GREEDY, None, "t")  # room again

    asyncio.run(scenario())


def test_a_request_the_engine_refuses_fails_on_its_own_queue(running):
    loop = running()

    async def scenario():
        with pytest.raises(PromptTooLong):
            await collect(loop, "long", list(range(40)))
        assert loop.num_pending == 0
        return await collect(loop, "fine", [5, 6])  # the loop goes on

    assert asyncio.run(scenario())[-1].finished
    assert loop.alive


def test_a_consumer_that_stops_early_aborts_its_request(running):
    loop = running()
    long = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)

    async def scenario():
        async for output in loop.stream("gone", [5, 6, 7], long, None, "t"):
            assert not output.finished
            break  # the client went away
        for _ in range(500):
            if loop.num_pending == 0 and not loop.engine.has_unfinished():
                return True
            await asyncio.sleep(0.01)
        return False

    aborted = []
    real_abort = loop.engine.abort
    loop.engine.abort = lambda request_id: aborted.append(request_id) or real_abort(request_id)
    assert asyncio.run(scenario())
    assert aborted == ["gone"], "the engine was told to abort it (not left to run to max_tokens)"
    assert loop.engine.stats().kv_usage == 0.0


def test_stream_passes_its_tenant_and_defaults_to_none(running):
    loop = running()
    seen = []
    real_add = loop.engine.add_request
    loop.engine.add_request = lambda *args: seen.append(args[-1]) or real_add(*args)
    asyncio.run(collect(loop, "named", [5], tenant="acme"))

    async def unnamed():
        return [o async for o in loop.stream("unnamed", [5], GREEDY, None)]

    asyncio.run(unnamed())
    assert seen == ["acme", ""]


def test_abort_of_an_unknown_request_is_harmless(running):
    loop = running()
    loop.abort("never")
    assert asyncio.run(collect(loop, "after", [5]))[-1].finished


def test_forget_reaches_the_engine_thread(world, running):
    loop = running()
    delta = load_delta(world[1], loop.engine.spec, 8)
    asyncio.run(collect(loop, "r", [5, 6], delta=delta))
    assert loop.engine.slots.is_resident(delta)
    loop.forget(delta.kind, delta.key)
    asyncio.run(collect(loop, "wake", [5]))  # commands are drained before the next step
    assert not loop.engine.slots.is_resident(delta)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread re-raises
def test_a_failing_engine_fails_every_waiter_and_refuses_new_requests(world, running):
    engine = new_engine(world[0])

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step
    loop = running(engine=engine)
    with pytest.raises(EngineDead, match="the engine failed: RuntimeError"):
        asyncio.run(collect(loop, "r", [5, 6]))
    loop._thread.join(timeout=30)
    assert not loop.alive and isinstance(loop.error, RuntimeError)
    with pytest.raises(EngineDead, match="not running"):
        asyncio.run(collect(loop, "late", [5]))


def test_a_stopped_loop_refuses_and_stop_before_start_is_harmless(world, running):
    loop = running()
    loop.stop(timeout=30)
    assert not loop.alive
    with pytest.raises(EngineDead):
        asyncio.run(collect(loop, "r", [5]))
    EngineLoop(new_engine(world[0])).stop(timeout=1)  # never started: nothing to join


def test_outputs_for_a_closed_event_loop_are_dropped(running):
    loop = running()
    long = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def submit_and_leave():
        loop.submit("orphan", [5, 6], long, None, "t")

    asyncio.run(submit_and_leave())  # the event loop closes with the request still running
    for _ in range(500):
        if loop.num_pending == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert loop.num_pending == 0 and loop.alive  # finished without a listener, and the thread lives on


def test_an_idle_loop_blocks_instead_of_spinning(running):
    loop = running()
    calls = []
    real_drain = loop._drain
    loop._drain = lambda block: calls.append(block) or real_drain(block)
    time.sleep(1.2)
    assert 1 <= len(calls) <= 4 and all(calls), calls  # one blocking wait per 0.5 s while there is no work


def test_stop_ends_the_thread_cleanly(world):
    loop = EngineLoop(new_engine(world[0]))
    assert loop.max_pending == 256 and loop._thread.name == "deltaserve-engine"  # the name thread dumps show
    assert loop._thread.daemon  # a server that exits without stop() is not kept alive by its engine thread
    loop.start()
    loop.stop(timeout=30)
    assert not loop._thread.is_alive() and loop.error is None


class _RecordingQueue(queue.Queue):
    """The command queue, noting every wait for a command and whether the engine had work meanwhile."""

    def __init__(self, engine: LLMEngine):
        super().__init__()
        self.engine = engine
        self.waits_with_work = 0

    def get(self, block=True, timeout=None):
        if block and self.engine.has_unfinished():
            self.waits_with_work += 1
        return super().get(block, timeout)


def test_a_busy_loop_never_waits_for_commands(world):
    engine = new_engine(world[0])
    loop = EngineLoop(engine)
    loop._commands = _RecordingQueue(engine)
    loop.start()
    try:
        long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        assert len(asyncio.run(collect(loop, "r", [5, 6], long))) == 12
    finally:
        loop.stop(timeout=30)
    assert loop._commands.waits_with_work == 0  # every step between commands: no 0.5 s wait per token


def test_one_drain_takes_every_queued_command(world):
    from serving.engine.async_engine import _Pending

    loop = EngineLoop(new_engine(world[0]))  # not started: the test plays the engine thread
    event_loop = asyncio.new_event_loop()
    try:
        for rid in ("a", "b", "c"):
            loop._commands.put(("add", _Pending(rid, [5, 6], GREEDY, None, "t", event_loop, asyncio.Queue())))
        loop._drain(block=False)
    finally:
        event_loop.close()
    assert loop._commands.empty() and loop.engine.scheduler.has_unfinished()
    assert {rid: p.request_id for rid, p in loop._requests.items()} == {"a": "a", "b": "b", "c": "c"}
