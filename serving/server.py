"""`deltaserve serve`: settings, start-up (engine, registry, demo tenant), uvicorn, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.engine.config import EngineConfig, EngineOptions

log = logging.getLogger("deltaserve")


class ServerSettings(EngineOptions, BaseSettings):
    """Every server option: the engine's (EngineOptions) and the server's own; each is a flag of
    `deltaserve serve` (serving.flags) and a DELTASERVE_* environment variable. Flags win over variables,
    variables over these defaults."""

    model_config = SettingsConfigDict(env_prefix="DELTASERVE_", extra="forbid", frozen=False)

    model: Path | None = Field(None, description="local Hugging Face directory of the base (default: the demo)")
    served_model_name: str | None = Field(
        None, pattern=r"^[\x21-\x7e]{1,256}$", description="the base's model id in the API (default: its folder's name)"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    registry: Path = Field(Path("./deltaserve-registry"), description="the registry folder (catalog, blobs, keys)")
    catalog: str | None = Field(
        None,
        description="the catalog's database, postgresql://USER@HOST/DB, shared by the servers of one registry "
        "(default: SQLite in the registry folder; a password is better given as PGPASSWORD than in the URL)",
        json_schema_extra={"metavar": "URL"},
    )
    blob_store: str | None = Field(
        None,
        description="s3://BUCKET/PREFIX: the blobs in an S3-compatible store, cached in the registry folder "
        "(endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; default: the registry folder's blobs/)",
        json_schema_extra={"metavar": "URL"},
    )
    admin_key: str | None = Field(None, description="the admin key (default: the stored one, else generated once)")
    public_metrics: bool = Field(False, description="serve /metrics without a key")
    metrics_top_tenants: int = Field(
        0, ge=0, le=100,
        description="name the N tenants with the most tokens (last 24 h) in the usage metrics, the rest `other`; "
        "0: no tenant label. Needs the admin key on /metrics (not with --public-metrics)",
    )  # fmt: skip
    max_pending: int = Field(256, ge=1, description="requests queued or running (then 503)")
    tenant_max_concurrent: int = Field(64, ge=1, description="one tenant's requests at once (then 429)")
    host_cache_mb: int = Field(4096, ge=1, description="host-memory tier for deltas, MB")
    max_upload_mb: int = Field(2048, ge=1, description="one upload's size, MB (then 413)")
    tenant_quota_mb: int | None = Field(None, ge=1, description="stored MB one tenant may hold (then 507; default: none)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds running requests get on SIGTERM")
    header_timeout: float = Field(10.0, gt=0, description="seconds a request's headers may take")
    max_connections: int = Field(1000, ge=1, description="open connections at once; beyond, new ones are closed")
    allowed_local_adapter_dir: Path | None = Field(
        None,
        description="a folder whose LoRA adapters the admin may load by path (POST /v1/load_lora_adapter; default: none)",
    )
    replicas: int | None = Field(
        None, ge=1, le=1024,
        description="run as a cluster on Ray Serve: an ingress and this many engine replicas, routed by adapter "
        "(default: one server in this process)",
    )  # fmt: skip
    ingresses: int = Field(
        1, ge=1, le=64,
        description="with --replicas: ingress processes (auth, uploads, the API) behind Ray Serve's proxy; above 1 "
        "needs --catalog postgresql://... (each opens the shared registry)",
    )  # fmt: skip
    ray_address: str | None = Field(
        None, description="with --replicas: the Ray cluster to join (default: start a local one)",
        json_schema_extra={"metavar": "ADDRESS"},
    )  # fmt: skip
    preload: list[str] = Field(
        default_factory=list,
        description="an adapter to load onto the GPU at start-up (repeatable)",
        json_schema_extra={"metavar": "TENANT/ADAPTER"},
    )

    @field_validator("catalog")
    @classmethod
    def _a_catalog_deltaserve_opens(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgresql+psycopg://", "sqlite:///")):
            raise ValueError("give a postgresql://USER@HOST/DB URL (or sqlite:///FILE)")
        return url

    @field_validator("blob_store")
    @classmethod
    def _an_s3_url(cls, url: str | None) -> str | None:
        if url is not None:
            import importlib.util

            from registry.s3_store import parse_s3_url

            parse_s3_url(url)
            if importlib.util.find_spec("boto3") is None:
                raise ValueError("an S3 blob store needs boto3: pip install 'deltaserve[s3]'")
        return url

    @model_validator(mode="after")
    def _tenants_named_only_behind_the_admin_key(self) -> ServerSettings:
        if self.metrics_top_tenants and self.public_metrics:
            raise ValueError("--metrics-top-tenants names tenants in /metrics: it needs the admin key there, so it "
                             "cannot be used with --public-metrics")  # fmt: skip
        return self


def engine_config(settings: ServerSettings) -> EngineConfig:
    return EngineConfig(**settings.model_dump(include=set(EngineOptions.model_fields)))


def backend_config(settings: ServerSettings):
    from serving.backend import BackendConfig

    return BackendConfig(
        tenant_max_concurrent=settings.tenant_max_concurrent, max_upload_bytes=settings.max_upload_mb << 20, drain_timeout=settings.drain_timeout,
        served_model_name=settings.served_model_name, metrics_top_tenants=settings.metrics_top_tenants,
    )  # fmt: skip


def build_backend(settings: ServerSettings, registry):
    """Loads the model and builds the backend over an open registry; registers the demo tenant when
    serving the demo."""
    from serving.backend import Backend
    from serving.engine.engine import LLMEngine
    from serving.generation import LocalGeneration
    from serving.metrics import Metrics

    model_dir = settings.model
    demo = model_dir is None
    if demo:
        from serving.demo import demo_dir

        model_dir = demo_dir() / "base"
    engine = LLMEngine.from_model_dir(model_dir, engine_config(settings))
    metrics = Metrics()
    generation = LocalGeneration(engine, registry.blob_path, metrics.engine, max_pending=settings.max_pending,
                                 host_cache_bytes=settings.host_cache_mb << 20)  # fmt: skip
    backend = Backend(generation, registry, metrics, backend_config(settings))
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
        staging = backend.adapters.stage()
        staging.import_path(t.adapter_path)
        base = backend.generation.base
        delta = staging.validate(t.kind, base.spec, base.max_lora_rank)
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


def open_registry(settings: ServerSettings):
    """The registry these settings name (its folder, its catalog, the upload and quota limits)."""
    from registry.catalog import Registry

    quota = settings.tenant_quota_mb << 20 if settings.tenant_quota_mb is not None else None
    return Registry(settings.registry, catalog=settings.catalog, blob_store=settings.blob_store, max_upload_bytes=settings.max_upload_mb << 20,
                    tenant_quota_bytes=quota)  # fmt: skip


def run_server(settings: ServerSettings) -> int:
    from serving.api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open_registry(settings) as registry:
        new_key = registry.ensure_admin_key(settings.admin_key)
        if new_key is not None:
            print(f"deltaserve: admin key generated (shown once, stored hashed in {settings.registry}): {new_key}",
                  file=sys.stderr, flush=True)
        backend = build_backend(settings, registry)
        log.info("%s", backend.describe())
        for ref in settings.preload:
            backend.preload(ref)
        backend.start()
        server = make_server(create_app(backend, public_metrics=settings.public_metrics,
                                   local_adapter_dir=settings.allowed_local_adapter_dir), settings, backend)
        try:
            server.run()
        finally:
            backend.stop()
    return 0
