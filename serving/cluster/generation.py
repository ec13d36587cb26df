"""The ingress's side of a cluster: serving.generation.Generation over engine replicas on Ray Serve.

Requests go to the replicas' deployment handle with their delta's key as the multiplexed model id (Ray Serve
routes them to a replica holding that delta when one has room); outputs stream back as they come. What a request
runs on is a reference (serving.cluster.refs), loaded by the replica. Versions to let go of go to the Board, which
every replica reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from serving.cluster.errors import ReplicaLost
from serving.cluster.refs import CompositionRef, DeltaRef, multiplexed_id
from serving.engine.errors import Overloaded
from serving.generation import BaseFacts, StoredDelta

log = logging.getLogger("deltaserve")


class ClusterGeneration:
    def __init__(self, replicas: Any, board: Any, base: BaseFacts, tokenizer: Any, *, num_replicas: int,
                 max_pending: int):  # fmt: skip
        """replicas: the EngineReplica deployment's handle. board: the Board actor's handle. max_pending: requests
        this ingress has sent and not seen finish (beyond: Overloaded, as one server's queue bound)."""
        self.replicas = replicas
        self.board = board
        self.base = base
        self.tokenizer = tokenizer
        self.num_replicas = num_replicas
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._reports: dict[str, Any] = {}
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_reports, name="deltaserve-board", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        """At least one replica reported lately, and said its engine runs (a dead engine thread reports alive=False)."""
        return self._reader.is_alive() and any(r.get("alive") for r in self._reports.values())

    @property
    def num_pending(self) -> int:
        return self._pending

    def describe(self) -> str:
        return (f"on {self.num_replicas} engine replicas (Ray Serve), routed by adapter; GPU slots per replica: "
                f"{self.base.slots['lora']} LoRA (rank <= {self.base.max_lora_rank}), {self.base.slots['bitdelta']} "
                f"1-bit, {self.base.slots['ia3']} (IA)^3; max_model_len {self.base.max_model_len}")  # fmt: skip

    def reports(self) -> dict[str, Any]:
        """Each live replica's latest report (serving.cluster.replica.EngineReplica.snapshot), as last read."""
        return self._reports

    def _read_reports(self) -> None:
        """Reads the Board about once a second (off the event loop: /metrics and /health read the copy)."""
        import ray

        failing = False  # logged once per outage
        while True:
            try:
                self._reports = ray.get(self.board.reports.remote(), timeout=5)
                failing = False
            except Exception as e:  # noqa: BLE001 - the board unreachable: no replica can be seen
                if not failing:
                    log.warning("the cluster's board is unreachable: %s", e)
                self._reports, failing = {}, True
            if self._stop.wait(1.0):
                return

    # ---- what requests run on ----------------------------------------------------------------------
    @staticmethod
    def served_for(record: StoredDelta) -> DeltaRef:
        assert record.sha256 is not None and record.blob is not None
        return DeltaRef(record.tenant, record.kind, record.sha256, record.blob)

    @staticmethod
    def compose(parts: list[tuple[DeltaRef, float]]) -> CompositionRef:
        return CompositionRef(tuple(parts))

    def preload(self, record: StoredDelta) -> None:
        raise NotImplementedError("--preload is not available with --replicas: each replica loads what it is sent")

    def forget(self, record: StoredDelta) -> None:
        """Posted to the Board: every replica frees its copies within about a second (running requests finish)."""
        self.board.forget.remote([self.served_for(record)])

    def compile_guide(self, guide, tenant: str) -> None:
        """Compiled where it runs: in the replica, before its request is queued."""

    # ---- generation --------------------------------------------------------------------------------
    async def stream(self, request_id: str, prompt: list[int], params, served: DeltaRef | CompositionRef | None,
                     tenant: str) -> AsyncIterator[Any]:  # fmt: skip
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded(f"{self._pending} requests are queued or running")
            self._pending += 1
        try:
            handle = self.replicas.options(stream=True, multiplexed_model_id=multiplexed_id(served))
            outputs = handle.generate.remote(request_id, prompt, params, served, tenant)
            finished = False
            try:
                async for out in outputs:
                    yield out
                finished = True
            except RayTaskError as e:  # the replica raised: its own (typed, picklable) error, as one server raises
                # it; Ray's text of it names the replica's process and address, which is not for the client
                finished = True
                cause = e.cause if isinstance(e.cause, Exception) else RuntimeError("the engine replica failed")
                raise cause from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:  # killed, out of memory, unreachable
                finished = True
                log.warning("request %s lost its replica: %s", request_id, e)
                raise ReplicaLost("the engine replica running this request stopped; retry (other replicas serve "
                                  "new requests)") from None  # fmt: skip
            finally:
                if not finished:  # the client went away (cancelled, or the stream closed early): the replica aborts it
                    outputs.cancel()
        finally:
            with self._lock:
                self._pending -= 1

