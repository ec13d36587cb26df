"""A cluster's ingress (a Ray Serve deployment behind Ray Serve's HTTP proxy): the same FastAPI app as one server
(serving.api: auth, tenants, uploads, the OpenAI routes, errors, /metrics), over a Backend whose generation is the
engine replicas (serving.cluster.generation). It opens the registry (catalog and blobs) as one server does; with
--ingresses N, N of them share it (and the board), each with its own admission limits (--max-pending,
--tenant-max-concurrent count per ingress).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ray import serve

log = logging.getLogger("deltaserve")


@serve.ingress()
class Ingress:
    """Built by Ray Serve in a process of its own (serving.cluster.launch deploys it)."""

    async def __init__(self, settings: dict[str, Any], replicas: Any, model_dir: str, board_name: str, namespace: str,
                       admin_key_hash: str | None = None):
        import ray
        from transformers import AutoTokenizer

        from serving.api.app import create_app
        from serving.backend import Backend
        from serving.cluster.generation import ClusterGeneration
        from serving.cluster.metrics import ReplicaMetrics
        from serving.metrics import Metrics
        from serving.server import ServerSettings, backend_config, open_registry, register_demo

        s = ServerSettings.model_validate(settings)
        self.registry = open_registry(s)  # shared with any other process that has it open (registry.catalog)
        if admin_key_hash is not None:  # this machine's registry folder may be new (blobs in a bucket)
            self.registry.admin_key.adopt(admin_key_hash)
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
