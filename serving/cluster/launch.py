"""`deltaserve serve --replicas N`: a local Ray cluster (or the one at --ray-address), Ray Serve's HTTP proxy on
--host/--port, the ingress and N engine replicas; runs until SIGTERM/SIGINT, then shuts Serve down."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("deltaserve")

APP_NAME = "deltaserve"
NAMESPACE = "deltaserve"


def deploy(settings, model_dir, admin_key_hash: str | None = None):
    """Deploys the board, the replicas and the ingress on the Ray cluster this process is connected to. Returns
    the board's handle: hold it (a Ray actor nobody holds a handle of is ended). admin_key_hash: the stored hash of
    the admin key, which every ingress keeps in its machine's registry folder (folders of their own, with a
    bucket for the blobs, have none)."""
    import ray
    from ray import serve

    from serving.cluster.board import BOARD_NAME, Board
    from serving.cluster.ingress import Ingress
    from serving.cluster.replica import EngineReplica
    from serving.engine.config import EngineOptions
    from serving.server import engine_config

    replicas = settings.replicas
    model_dir = Path(model_dir).resolve()
    config = engine_config(settings)
    # the cluster's GPUs, not this machine's: joining with --ray-address, the driver may run on a CPU head node
    gpus = 1 if config.device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if config.device == "auto":
        config = config.model_copy(update={"device": "cuda" if gpus else "cpu"})
    # Replicas sharing one CPU machine split its cores: each engine's threads would otherwise contend with the rest.
    threads = None if gpus else max(1, (os.cpu_count() or 1) // replicas)
    # Restarted by Ray if its process dies (with its epoch renewed: serving.cluster.board), its calls retried meanwhile.
    board = ray.remote(Board).options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                      lifetime="detached", max_restarts=-1, max_task_retries=-1).remote()  # fmt: skip
    ray.get(board.reports.remote())  # it answers: the replicas can find it
    engine_options = config.model_dump(include=set(EngineOptions.model_fields))
    replica = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=replicas,
        # a replica takes as many requests as its engine batches; beyond, Ray Serve tries another replica
        max_ongoing_requests=config.max_num_seqs, ray_actor_options={"num_cpus": 0, "num_gpus": gpus},
        health_check_period_s=2, health_check_timeout_s=30,
    ).bind(str(model_dir), engine_options, str(settings.registry.resolve() / "blobs"), settings.max_pending,
           settings.host_cache_mb << 20, BOARD_NAME, NAMESPACE, threads, settings.blob_store)  # fmt: skip
    # The ingress gets absolute paths (its working directory is Ray's) and no admin key: it is in the registry already,
    # and what a deployment is given is kept in Ray's cluster store.
    absolute = {f: getattr(settings, f).resolve() for f in ("registry", "model", "allowed_local_adapter_dir")
                if getattr(settings, f) is not None}  # fmt: skip
    ingress_settings = settings.model_copy(update={**absolute, "admin_key": None})
    # Several ingresses share the registry (registry.catalog: leases; the catalog in PostgreSQL); Ray Serve's proxy
    # spreads requests over them.
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=settings.ingresses,
                               max_ongoing_requests=settings.max_connections,
                               ray_actor_options={"num_cpus": 0}).bind(
        ingress_settings.model_dump(mode="json"), replica, str(Path(model_dir).resolve()), BOARD_NAME, NAMESPACE,
        admin_key_hash)  # fmt: skip
    serve.run(ingress, name=APP_NAME, route_prefix="/", blocking=False)
    return board


def run_cluster(settings) -> int:
    import ray
    from ray import serve

    from serving.server import open_registry

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.preload:
        print("deltaserve: --preload is not available with --replicas (each replica loads what it is sent)",
              file=sys.stderr)  # fmt: skip
        return 2
    with open_registry(settings) as registry:  # the admin key as one server keeps it; the ingress opens it next
        new_key = registry.ensure_admin_key(settings.admin_key)
        admin_key_hash = registry.admin_key._read_hash()
    if new_key is not None:
        print(f"deltaserve: admin key generated (shown once, stored hashed in {settings.registry}): {new_key}",
              file=sys.stderr, flush=True)  # fmt: skip
    model_dir = settings.model
    if model_dir is None:
        from serving.demo import demo_dir

        model_dir = demo_dir() / "base"
    ray.init(address=settings.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True,
             configure_logging=False)  # fmt: skip
    serve.start(http_options={"host": settings.host, "port": settings.port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    board = None
    try:
        board = deploy(settings, model_dir, admin_key_hash)
        print(f"deltaserve: serving on http://{settings.host}:{settings.port} with {settings.replicas} engine "
              "replicas (Ray Serve)", file=sys.stderr, flush=True)  # fmt: skip
        stop.wait()
    finally:
        log.warning("shutting down the ingress and the replicas")
        if settings.ray_address:  # someone else's cluster: only what this command started goes
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        if board is not None:
            ray.kill(board)
        ray.shutdown()
    return 0
