"""The engine behind the server: one thread owns the model and runs `step()`; the event loop never waits on it.

The event loop submits and aborts requests through a thread-safe command queue and receives each
request's outputs on an asyncio queue of its own (filled with `call_soon_threadsafe`). A bounded number
of requests may be queued or running; beyond it `submit` raises `Overloaded` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from registry.deltas import Served
from serving.engine.engine import LLMEngine, RequestOutput
from serving.engine.errors import EngineDead, Overloaded
from serving.engine.host_memory import HeapTrimmer
from serving.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestFailed:
    """Delivered on a request's queue instead of an output when the engine refused or lost it."""

    error: BaseException


@dataclass
class _Pending:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    delta: Served | None
    tenant: str
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue


StepObserver = Callable[[LLMEngine, list, float], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_pending: int = 256, on_step: StepObserver | None = None):
        """max_pending: requests queued or running at once. on_step(engine, outputs, seconds) is called in
        the engine thread after every step (metrics)."""
        self.engine = engine
        self.max_pending = max_pending
        self.on_step = on_step
        self._commands: queue.Queue = queue.Queue()
        self._requests: dict[str, _Pending] = {}  # engine thread only
        self._count = 0  # queued + running, guarded by _lock
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        # a CPU engine's activations fragment the C heap: freed pages go back now and then (engine thread only)
        self.heap = HeapTrimmer() if engine.device.type == "cpu" else None

    # ---- event-loop side -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_pending(self) -> int:
        return self._count

    def submit(
        self, request_id: str, prompt: list[int], params: SamplingParams, delta: Served | None, tenant: str = ""
    ) -> asyncio.Queue:
        """Queues a request of `tenant`; its outputs (RequestOutput, or RequestFailed) arrive on the returned queue."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        with self._lock:
            if self._count >= self.max_pending:
                raise Overloaded(f"{self._count} requests are queued or running")
            self._count += 1
        out: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", _Pending(request_id, prompt, params, delta, tenant, asyncio.get_running_loop(), out)))
        return out

    def abort(self, request_id: str) -> None:
        """Frees the request's KV blocks and slot at the next step boundary (a client went away)."""
        self._commands.put(("abort", request_id))

    def forget(self, kind: str, key: str) -> None:
        """A deleted or replaced delta: its GPU slot is freed once no running request uses it."""
        self._commands.put(("forget", (kind, key)))

    async def stream(
        self, request_id: str, prompt: list[int], params: SamplingParams, delta: Served | None, tenant: str = ""
    ) -> AsyncIterator[RequestOutput]:
        """Submits and yields outputs until the request finishes; aborts it if the consumer stops early."""
        out = self.submit(request_id, prompt, params, delta, tenant)
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, RequestFailed):
                    finished = True
                    raise item.error
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    # ---- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                self._drain(block)
                if self.engine.has_unfinished():
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    for o in outputs:
                        self._deliver(o)
                    if self.on_step is not None:
                        self.on_step(self.engine, outputs, time.perf_counter() - t0)
                    if self.heap is not None:
                        self.heap.after_step()
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to every waiter
            self.error = e
            for p in list(self._requests.values()):
                self._finish(p, RequestFailed(EngineDead(f"the engine failed: {type(e).__name__}")))
            raise

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "add":
                self._add(arg)
            elif kind == "forget":
                self.engine.forget_delta(*arg)
            elif kind == "abort":
                p = self._requests.get(arg)
                if p is not None:
                    self.engine.abort(arg)
                    self._finish(p, None)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, p: _Pending) -> None:
        try:
            self.engine.add_request(p.request_id, p.prompt, p.params, p.delta, p.tenant)
        except Exception as e:  # bad input the API could not see (e.g. a delta that does not fit the slots)
            self._finish(p, RequestFailed(e))
            return
        self._requests[p.request_id] = p

    def _deliver(self, o: RequestOutput) -> None:
        p = self._requests.get(o.request_id)
        if p is None:
            return
        if o.finished:
            self._finish(p, o)
        else:
            self._post(p, o)

    def _finish(self, p: _Pending, last) -> None:
        self._requests.pop(p.request_id, None)
        with self._lock:
            self._count -= 1
        if last is not None:
            self._post(p, last)

    @staticmethod
    def _post(p: _Pending, item) -> None:
        # RuntimeError: the caller's event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            p.loop.call_soon_threadsafe(p.out.put_nowait, item)
