"""A cluster's ingress (a Ray Serve deployment behind Ray Serve's HTTP proxy): the same FastAPI app as one server
(serving.api: auth, tenants, uploads, the OpenAI routes, errors, /metrics), over a Backend whose generation is the
engine replicas (serving.cluster.generation). It owns the registry (catalog and blobs) as one server does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from ray import serve

log = logging.getLogger("deltaserve")


@serve.ingress()
class Ingress:
    """Built by Ray Serve in a process of its own (serving.cluster.launch deploys it)."""

    async def __init__(self, settings: dict[str, Any], replicas: Any, model_dir: str, board_name: str, namespace: str):
        import ray
        from transformers import AutoTokenizer

        from registry.catalog import Registry
        from serving.api.app import create_app
        from serving.backend import Backend
        from serving.cluster.generation import ClusterGeneration
        from serving.cluster.metrics import ReplicaMetrics
        from serving.metrics import Metrics
        from serving.server import ServerSettings, backend_config, register_demo

        s = ServerSettings.model_validate(settings)
        quota = s.tenant_quota_mb << 20 if s.tenant_quota_mb is not None else None
        self.registry = await _open_registry(lambda: Registry(s.registry, max_upload_bytes=s.max_upload_mb << 20,
                                                              tenant_quota_bytes=quota))  # fmt: skip
        # The base as the replicas loaded it; compression and fidelity runs happen here, on this process's CPU.
        base = dataclasses.replace(await replicas.base_facts.remote(), device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        board = ray.get_actor(board_name, namespace=namespace)
        generation = ClusterGeneration(replicas, board, base, tokenizer, num_replicas=s.replicas or 1,
                                       max_pending=s.max_pending)  # fmt: skip
        metrics = Metrics(engine_side=False)
        metrics.registry.register(ReplicaMetrics(generation.reports))
        self.backend = Backend(generation, self.registry, metrics, backend_config(s))
        if s.model is None:
            register_demo(self.backend)
        self.backend.start()
        log.info("%s", self.backend.describe())
        self._asgi = create_app(self.backend, public_metrics=s.public_metrics, local_adapter_dir=s.allowed_local_adapter_dir)

    def __serve_build_asgi_app__(self):
        return self._asgi

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.stop()
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.close()


async def _open_registry(open_it, timeout: float = 60.0):
    """The registry, once the ingress before this one (stopped by Ray Serve while this one starts) let go of it."""
    from registry.catalog import RegistryBusy

    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_it()
        except RegistryBusy:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
