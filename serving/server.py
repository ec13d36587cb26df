"""`deltaserve serve`: settings, start-up (engine, registry, demo tenant), uvicorn, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("deltaserve")


class ServerSettings(BaseSettings):
    """Every server option; flags of `deltaserve serve` or DELTASERVE_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="DELTASERVE_", extra="forbid")

    model: Path | None = None  # None: the embedded demo
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    registry: Path = Path("./deltaserve-registry")
    admin_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    public_metrics: bool = False
    max_model_len: int | None = None
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=4096, ge=1)
    prefill_chunk: int = Field(default=512, ge=1)
    max_pending: int = Field(default=256, ge=1)
    tenant_max_concurrent: int = Field(default=64, ge=1)
    bitdelta_slots: int = Field(default=4, ge=0)
    lora_slots: int = Field(default=8, ge=0)
    max_lora_rank: int = Field(default=64, ge=1)
    host_cache_mb: int = Field(default=4096, ge=1)
    max_upload_mb: int = Field(default=2048, ge=1)
    tenant_quota_mb: int | None = Field(default=None, ge=1)  # stored bytes one tenant may hold; None: no quota
    drain_timeout: float = Field(default=30.0, ge=0)
    header_timeout: float = Field(default=10.0, gt=0)  # seconds for a request's headers to arrive
    max_connections: int = Field(default=1000, ge=1)  # open connections at once; beyond, new ones are closed
    num_kv_blocks: int | None = None
    kernel_backend: str = "auto"
    cuda_graphs: bool = False
    preload: list[str] = Field(default_factory=list)  # "tenant/adapter" to load onto the GPU at start-up


def build_backend(settings: ServerSettings, registry):
    """Loads the model and builds the backend over an open registry; registers the demo tenant when
    serving the demo."""
    from serving.backend import Backend, BackendConfig
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine
    from serving.metrics import Metrics

    model_dir = settings.model
    demo = model_dir is None
    if demo:
        from serving.demo import demo_dir

        model_dir = demo_dir() / "base"
    engine = LLMEngine.from_model_dir(
        model_dir,
        EngineConfig(
            device=settings.device, dtype=settings.dtype, max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
            prefill_chunk=settings.prefill_chunk, bitdelta_slots=settings.bitdelta_slots, lora_slots=settings.lora_slots,
            max_lora_rank=settings.max_lora_rank, num_kv_blocks=settings.num_kv_blocks,
            kernel_backend=settings.kernel_backend, cuda_graphs=settings.cuda_graphs,
        ),
    )
    backend = Backend(
        engine, registry, Metrics(),
        BackendConfig(
            max_pending=settings.max_pending, tenant_max_concurrent=settings.tenant_max_concurrent,
            host_cache_bytes=settings.host_cache_mb << 20, max_upload_bytes=settings.max_upload_mb << 20,
            drain_timeout=settings.drain_timeout,
        ),
    )
    if demo:
        register_demo(backend)
    return backend


def register_demo(backend) -> None:
    """Creates the `demo` tenant with the demo adapters, once; prints its key the first time."""
    from registry.errors import NameTaken
    from serving.demo import demo_tenants

    registry = backend.registry
    try:
        _, key = registry.create_tenant("demo")
        print(f"deltaserve: demo tenant created; its API key (shown once): {key}", file=sys.stderr, flush=True)
    except NameTaken:
        pass
    for t in demo_tenants():
        if registry.resolve("demo", t.name) is not None or not t.adapter_path.exists():
            continue
        staging = backend.stage()
        staging.import_path(t.adapter_path)
        delta = staging.validate(t.kind, backend.engine.spec, backend.engine.config.max_lora_rank)
        registry.commit_adapter("demo", t.name, t.kind, staging, delta)


def make_server(app, settings: ServerSettings, backend):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: /ready turns 503 and new requests get 503 while running ones finish (at most
        drain_timeout seconds); then uvicorn shuts down. A second signal exits at once."""

        def handle_exit(self, sig, frame):
            if backend.draining:
                return super().handle_exit(sig, frame)
            backend.draining = True
            log.warning("draining: %d requests in flight", backend.num_pending)
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self):
            deadline = time.monotonic() + settings.drain_timeout
            while backend.num_pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.should_exit = True

    from serving.http_protocol import guarded_h11

    _raise_open_files_limit(settings.max_connections + 256)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", lifespan="off",
                            timeout_graceful_shutdown=5, http=guarded_h11(settings.header_timeout, settings.max_connections))  # fmt: skip
    return DrainingServer(config)


def _raise_open_files_limit(wanted: int) -> None:
    """Every connection is a file descriptor: the soft limit (often 1024) is raised toward `wanted`, within the
    hard limit, so that max_connections, not the operating system, decides who is refused."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_server(settings: ServerSettings) -> int:
    from registry.catalog import Registry
    from serving.api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quota = settings.tenant_quota_mb << 20 if settings.tenant_quota_mb is not None else None
    with Registry(settings.registry, max_upload_bytes=settings.max_upload_mb << 20, tenant_quota_bytes=quota) as registry:
        new_key = registry.ensure_admin_key(settings.admin_key)
        if new_key is not None:
            print(f"deltaserve: admin key generated (shown once, stored hashed in {settings.registry}): {new_key}",
                  file=sys.stderr, flush=True)
        backend = build_backend(settings, registry)
        for ref in settings.preload:
            backend.preload(ref)
        backend.start()
        server = make_server(create_app(backend, public_metrics=settings.public_metrics), settings, backend)
        try:
            server.run()
        finally:
            backend.stop()
    return 0
