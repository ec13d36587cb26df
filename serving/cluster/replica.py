"""One engine replica of a cluster (a Ray Serve deployment): the engine thread, its host tier and GPU slots, as in
one server (serving.generation.LocalGeneration), behind Ray Serve's handle instead of HTTP.

A request arrives with references to the stored deltas it runs on (serving.cluster.refs); the replica loads them
from the shared blob store itself (through its host tier: a delta it holds is not read again). The delta's key is
the request's multiplexed model id, which Ray Serve uses to send a tenant's requests where its delta already is.
About once a second a thread reads the Board (versions to let go of) and posts this replica's metrics there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from serving.cluster.board import RecentlyForgotten
from serving.cluster.refs import CompositionRef, DeltaRef

log = logging.getLogger("deltaserve")

REPORT_EVERY_S = 1.0
ROUTED_DELTAS = 64  # delta ids per replica that Ray Serve routes by (more than the GPU slots: host copies count)


class EngineReplica:
    """Built by Ray Serve in a process of its own (serving.cluster.launch deploys it)."""

    def __init__(self, model_dir: str, engine_options: dict, blobs: str, max_pending: int, host_cache_bytes: int,
                 board_name: str, namespace: str, torch_threads: int | None = None,
                 blob_store: str | None = None):  # fmt: skip
        """blobs: the registry's blobs folder on this machine (with blob_store "s3://...", this machine's cache of
        the bucket's blobs, fetched on first use)."""
        import ray
        import torch
        from prometheus_client import CollectorRegistry

        from registry.blob_store import blob_reader
        from serving.engine.config import EngineConfig
        from serving.engine.engine import LLMEngine
        from serving.generation import LocalGeneration
        from serving.metrics import EngineMetrics

        if torch_threads:  # replicas sharing a CPU machine split its cores rather than fight over them
            torch.set_num_threads(torch_threads)
        engine = LLMEngine.from_model_dir(model_dir, EngineConfig(**engine_options))
        self.metrics_registry = CollectorRegistry()
        read_blob = blob_reader(Path(blobs), blob_store)
        self.generation = LocalGeneration(
            engine, lambda ref: read_blob(ref.blob), EngineMetrics(self.metrics_registry),
            max_pending=max_pending, host_cache_bytes=host_cache_bytes,
        )  # fmt: skip
        self.generation.start()
        try:
            self.replica_id = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - built outside Ray Serve (by hand, to debug one): named by its process
            self.replica_id = f"pid-{os.getpid()}"
        self.board = ray.get_actor(board_name, namespace=namespace)
        self._epoch, self._seen = ray.get(self.board.head.remote(), timeout=60)  # nothing before it is held here
        self.forgotten = RecentlyForgotten()
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="deltaserve-board", daemon=True)
        self._reporter.start()

    # ---- what the ingress and Ray Serve ask --------------------------------------------------------
    def base_facts(self):
        """The served base, for the ingress (serving.generation.BaseFacts: uploads are checked against it)."""
        return self.generation.base

    def check_health(self) -> None:
        """Ray Serve's health check (every few seconds): a replica whose engine thread died, or that no longer
        hears the board, is replaced rather than left failing every request it draws."""
        if not self.generation.alive:
            raise RuntimeError("the engine thread has stopped")
        if not self._reporter.is_alive():
            raise RuntimeError("the board reader has stopped")

    async def generate(self, request_id: str, prompt: list[int], params, served: DeltaRef | CompositionRef | None,
                       tenant: str) -> AsyncIterator[Any]:  # fmt: skip
        """Streams the request's RequestOutputs; raises the engine's typed errors (the ingress maps them)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._hold(model_id)  # tells Ray Serve's router that this replica holds the delta
        local = None if served is None else await asyncio.to_thread(self._load, served)
        try:
            if params.guide is not None:
                await asyncio.to_thread(self.generation.compile_guide, params.guide, tenant)
            first = True
            async for out in self.generation.stream(request_id, prompt, params, local, tenant):
                if first:  # which replica served it: the ingress names it in the response's headers
                    out.replica, first = self.replica_id, False
                yield out
        finally:  # a version deleted while this request ran on it (or waited for it) goes once it is done
            for ref in _parts(served):
                if ref.key in self.forgotten:
                    self.generation.forget(ref)

    # Ray Serve keeps the ids of the last N deltas served here and routes by them; the deltas themselves are in the
    # host tier (bounded in bytes) and the GPU slots, which keep their own LRU orders.
    @serve.multiplexed(max_num_models_per_replica=ROUTED_DELTAS)
    async def _hold(self, model_id: str) -> str:
        return model_id

    def _load(self, served: DeltaRef | CompositionRef):
        if isinstance(served, CompositionRef):
            return self.generation.compose([(self._load_one(ref), w) for ref, w in served.parts])
        return self._load_one(served)

    def _load_one(self, ref: DeltaRef):
        from registry.errors import NotFound

        try:
            return self.generation.served_for(ref)
        except FileNotFoundError:  # deleted (or replaced and collected) after the ingress resolved it
            raise NotFound("The model was deleted while the request waited; it does not exist any more.",
                           param="model") from None  # fmt: skip

    # ---- the board ---------------------------------------------------------------------------------
    def _report_loop(self) -> None:
        import ray

        failing = False  # logged once per outage
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                epoch, seen, notices, missed = ray.get(self.board.notices_since.remote(self._epoch, self._seen),
                                                       timeout=10)  # fmt: skip
                if missed:  # which to free is unknown: every copy goes (reloaded from its blob when asked again)
                    self.generation.forget_all()
                for ref in notices:
                    self.generation.forget(ref)
                    self.forgotten.add(ref.key)
                self._epoch, self._seen = epoch, seen
                self.board.report.remote(self.replica_id, self.snapshot())
                failing = False
            except Exception as e:  # noqa: BLE001 - the board restarting: the next round catches up
                if not failing:
                    log.warning("replica %s: the board is unreachable: %s", self.replica_id, e)
                failing = True

    def snapshot(self) -> dict[str, Any]:
        """This replica's engine metrics (prometheus_client families) and state, for the ingress's /metrics."""
        return {"families": list(self.metrics_registry.collect()), "alive": self.generation.alive,
                "pending": self.generation.num_pending}  # fmt: skip

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.generation.stop()


def _parts(served: DeltaRef | CompositionRef | None) -> list[DeltaRef]:
    if served is None:
        return []
    return [ref for ref, _ in served.parts] if isinstance(served, CompositionRef) else [served]

