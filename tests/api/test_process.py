"""`deltaserve serve` as a real process: the CLI clients, SIGTERM drain, kill -9 during an upload and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ADMIN_KEY, free_port
from tests.helpers import make_bitdelta, make_lora, make_model_dir, save_finetune, staged_files


def deltaserve(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kwargs)


class ServerProcess:
    def __init__(self, base: Path, registry: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--model", str(base), "--registry", str(registry), "--port",
             str(self.port), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--max-lora-rank", "8",
             "--num-kv-blocks", "64", "--kernel-backend", "torch", *extra],
            env={**os.environ, "DELTASERVE_ADMIN_KEY": ADMIN_KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.1)

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    base = make_model_dir(root / "base", arch="llama")
    lora, _ = make_lora(base, root / "lora", r=4, seed=1)
    bd, _ = make_bitdelta(base, root / "bd.safetensors", seed=2, per_row=True, replace=False)
    return root, base, lora, bd


class SlowFile:
    """A file sent by a client on a slow link: `chunk` bytes per read, `pause` seconds apart, so that an upload is
    still arriving when the server dies; `received` is set at the first read."""

    def __init__(self, path: Path, received: threading.Event, pause: float, chunk: int):
        self.f = open(path, "rb")  # noqa: SIM115
        self.received, self.pause, self.chunk = received, pause, chunk

    def read(self, n=-1):
        self.received.set()
        time.sleep(self.pause)
        return self.f.read(self.chunk)


def kill_9_during(server: ServerProcess, upload, received: threading.Event, registry: Path) -> None:
    """Runs upload() in a thread and kills the server with SIGKILL once part of the body is on its disk."""
    t = threading.Thread(target=upload)
    t.start()
    assert received.wait(30)
    time.sleep(0.5)  # part of the body is on the server's disk
    assert staged_files(registry)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    t.join(30)


def completion(client: httpx.Client, model: str, **kw) -> httpx.Response:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, **kw}
    return client.post("/v1/completions", json=body)


def test_cli_clients_drain_and_crash_recovery(files, tmp_path):
    root, base, lora, bd = files
    registry = tmp_path / "registry"
    server = ServerProcess(base, registry)
    try:
        env = {"DELTASERVE_URL": server.url, "DELTASERVE_ADMIN_KEY": ADMIN_KEY}
        r = deltaserve("tenants", "create", "acme", env=env)
        assert r.returncode == 0, r.stderr
        key = r.stdout.strip().split()[-1]
        env["DELTASERVE_API_KEY"] = key
        r = deltaserve("adapters", "push", str(lora), "--name", "support-bot", "--format", "lora", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "ready"
        r = deltaserve("adapters", "push", str(bd), "--name", "legal", "--format", "bitdelta", env=env)
        assert r.returncode == 0, r.stderr
        r = deltaserve("adapters", "ls", env=env)
        assert "support-bot" in r.stdout and "legal" in r.stdout
        r = deltaserve("tenants", "ls", env={**env, "DELTASERVE_ADMIN_KEY": key})  # a tenant key: 403
        assert r.returncode == 2 and "403" in r.stderr
        with server.client(key) as c:
            before = {m: completion(c, m).json()["choices"][0]["text"] for m in ("support-bot", "legal")}

        # kill -9 while an upload streams in: the half-received upload must leave no trace.
        big = tmp_path / "big.safetensors"
        big.write_bytes(bd.read_bytes()[:8] + b"{" + b" " * (8 << 20))
        received = threading.Event()

        def slow_upload():
            try:
                with server.client(key) as c:
                    c.post("/v1/adapters", data={"name": "half", "format": "bitdelta"},
                           files=[("files", ("big.safetensors", SlowFile(big, received, 0.02, 64 << 10),
                                             "application/octet-stream"))])  # fmt: skip
            except httpx.HTTPError:
                pass

        kill_9_during(server, slow_upload, received, registry)
    finally:
        server.stop()

    server = ServerProcess(base, registry)
    try:
        with server.client(key) as c:
            names = sorted(a["name"] for a in c.get("/v1/adapters").json()["data"])
            assert names == ["legal", "support-bot"]
            assert not staged_files(registry)
            for m, text in before.items():  # everything stored before the crash still serves, identically
                assert completion(c, m).json()["choices"][0]["text"] == text

            # SIGTERM drains: /ready turns 503, new requests get 503, the running stream finishes, then exit 0.
            with c.stream("POST", "/v1/completions", json={"model": "legal", "prompt": "To be", "max_tokens": 200,
                                                           "temperature": 0, "stream": True, "ignore_eos": True}) as s:
                lines = s.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert "choices" in first
                server.proc.send_signal(signal.SIGTERM)
                deadline = time.time() + 10
                while httpx.get(server.url + "/ready").status_code != 503:
                    assert time.time() < deadline
                    time.sleep(0.02)
                refused = completion(c, "legal")
                assert refused.status_code == 503 and refused.headers.get("retry-after")
                assert refused.json()["error"]["code"] == "overloaded"
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            finals = [json.loads(x[6:]) for x in rest[:-1]]
            assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_a_stored_finetune_pulls_byte_identical_after_kill_9_during_an_upload_and_a_restart(files, tmp_path):
    root, base, _, _ = files
    ft = save_finetune(base, tmp_path / "ft", seed=7, touch=lambda n: "proj" in n, std=1e-3)
    uploaded = {p.name: p.read_bytes() for p in ft.iterdir() if p.suffix in (".json", ".safetensors")}
    registry = tmp_path / "registry"

    def pull(env: dict, out: Path) -> dict:
        r = deltaserve("adapters", "pull", "full", "--out", str(out), env=env)
        assert r.returncode == 0, r.stderr
        return {p.name: p.read_bytes() for p in out.iterdir()}

    server = ServerProcess(base, registry)
    try:
        env = {"DELTASERVE_URL": server.url, "DELTASERVE_ADMIN_KEY": ADMIN_KEY}
        r = deltaserve("tenants", "create", "acme", env=env)
        env["DELTASERVE_API_KEY"] = r.stdout.strip().split()[-1]
        r = deltaserve("adapters", "push", str(ft), "--name", "full", "--format", "finetune", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["status"] == "compressing", r.stderr
        with server.client(env["DELTASERVE_API_KEY"]) as c:
            deadline = time.time() + 120
            while c.get("/v1/adapters/full").json()["status"] == "compressing":
                assert time.time() < deadline
                time.sleep(0.1)
        assert pull(env, tmp_path / "before") == uploaded

        # kill -9 while a second fine-tune streams in, under another name
        received = threading.Event()
        weights = SlowFile(ft / "model.safetensors", received, 0.05, 16 << 10)

        def slow_upload():
            try:
                with server.client(env["DELTASERVE_API_KEY"]) as c:
                    c.post("/v1/adapters", data={"name": "half", "format": "finetune"},
                           files=[("files", ("config.json", (ft / "config.json").read_bytes(), "application/json")),
                                  ("files", ("model.safetensors", weights, "application/octet-stream"))])
            except httpx.HTTPError:
                pass

        kill_9_during(server, slow_upload, received, registry)
    finally:
        server.stop()

    server = ServerProcess(base, registry)
    try:
        env["DELTASERVE_URL"] = server.url
        assert not staged_files(registry)
        assert pull(env, tmp_path / "after") == uploaded  # byte for byte, from the store, after the crash
    finally:
        server.stop()
