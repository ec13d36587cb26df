"""A real uvicorn server on a loopback port, over a tiny model and a fresh registry, for the API tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_bitdelta, make_ia3, make_lora, make_model_dir

ADMIN_KEY = "test-admin-key-0123456789"


@dataclass
class LiveServer:
    url: str
    backend: object
    server: object
    thread: threading.Thread
    base_dir: Path
    files: dict
    stopped: bool = False

    def client(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def new_tenant(self, name: str) -> str:
        with self.client() as c:
            r = c.post("/v1/tenants", json={"name": name})
            assert r.status_code == 201, r.text
            return r.json()["api_key"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, base_dir: Path, **overrides) -> LiveServer:
    from registry.catalog import Registry
    from serving.api.app import create_app
    from serving.server import ServerSettings, build_backend, make_server

    defaults = dict(model=base_dir, registry=root / "registry", admin_key=ADMIN_KEY, device="cpu", dtype="float32",
                    port=free_port(), max_model_len=128, max_lora_rank=8, num_kv_blocks=64, kernel_backend="torch",
                    max_upload_mb=1)  # fmt: skip
    settings = ServerSettings(**{**defaults, **overrides})
    quota = settings.tenant_quota_mb << 20 if settings.tenant_quota_mb is not None else None
    registry = Registry(settings.registry, max_upload_bytes=settings.max_upload_mb << 20, tenant_quota_bytes=quota)
    registry.ensure_admin_key(settings.admin_key)
    backend = build_backend(settings, registry)
    backend.start()
    server = make_server(create_app(backend, public_metrics=settings.public_metrics,
                                   local_adapter_dir=settings.allowed_local_adapter_dir), settings, backend)
    server.install_signal_handlers = lambda: None  # runs in a thread: the test process keeps its signals
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{settings.port}", backend, server, thread, base_dir, {})


def stop_server(live: LiveServer) -> None:
    """Stops the server and closes its registry (once: a test that restarted it leaves nothing to the fixture)."""
    if live.stopped:
        return
    live.stopped = True
    live.server.should_exit = True
    live.thread.join(30)
    live.backend.stop()
    live.backend.registry.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base = make_model_dir(root / "base", arch="qwen2")
    srv = start_server(root, base)
    srv.files["lora"], srv.files["lora_merged"] = make_lora(base, root / "lora", r=4, seed=1)
    srv.files["ia3"], srv.files["ia3_merged"] = make_ia3(base, root / "ia3", seed=3)
    srv.files["bd"], srv.files["bd_merged"] = make_bitdelta(base, root / "bd.safetensors", seed=2, per_row=True,
                                                            replace=True)
    srv.files["root"] = root
    yield srv
    stop_server(srv)
