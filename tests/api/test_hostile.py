"""Hostile clients against a real `deltaserve serve` process: no tenant can corrupt, stall, starve or fill up
another's service (absurd deltas, disconnects, half-open sockets, request smuggling, floods)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.safetensors_io import read_header
from tests.api.helpers import upload
from tests.api.test_process import ServerProcess, completion, files  # noqa: F401 (the fixture)
from tests.helpers import make_bitdelta, make_model_dir

ADMIN = "test-admin-key-0123456789"


def new_tenant(server: ServerProcess, name: str) -> str:
    with server.client(ADMIN) as c:
        r = c.post("/v1/tenants", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]


def raw(server: ServerProcess, data: bytes, wait: float = 2.0) -> tuple[bytes, bool]:
    """Sends bytes on a fresh connection: (everything the server sent, whether it closed the connection within
    `wait` seconds)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                return got, True
            got += chunk
        return got, False


@pytest.fixture(scope="module")
def long_base(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("long") / "base", arch="llama", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(long_base, tmp_path_factory):
    srv = ServerProcess(long_base, tmp_path_factory.mktemp("hostile") / "registry", "--header-timeout", "1",
                        "--max-connections", "40", "--tenant-max-concurrent", "2", "--max-model-len", "1024")  # fmt: skip
    yield srv
    srv.stop()


def test_an_absurd_delta_is_refused_and_the_cache_cannot_be_poisoned(server, long_base, tmp_path):
    # The attack: a real 1-bit file with every scale set to 3e38 (finite, so every format check passes).
    bd, _ = make_bitdelta(long_base, tmp_path / "bd.safetensors", seed=2, per_row=True, replace=False)
    tensors = load_file(bd)
    for name in tensors:
        if name.endswith(".scale"):
            tensors[name] = torch.full_like(tensors[name], 3e38)
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(tensors, poisoned, metadata=read_header(bd)[1])
    attacker, victim = new_tenant(server, "attacker"), new_tenant(server, "victim")
    with server.client(victim) as c:
        before = completion(c, "base").json()["choices"][0]["text"]
    with server.client(attacker) as c:
        r = upload(c, "evil", "bitdelta", poisoned)
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_mismatch", r.text
        assert "too large to be a fine-tune" in r.json()["error"]["message"]
        assert c.get("/v1/adapters").json()["data"] == []
    with server.client(victim) as c:
        assert completion(c, "base").json()["choices"][0]["text"] == before


def test_a_client_that_disconnects_frees_its_place(server):
    # --tenant-max-concurrent 2: two non-streaming requests whose clients leave must not keep the tenant's places.
    key = new_tenant(server, "leaver")
    with server.client(key) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "The quick brown fox", "max_tokens": 900, "temperature": 0,
                       "ignore_eos": True}).encode()  # fmt: skip
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    socks = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(request)
        socks.append(s)
    time.sleep(0.5)
    with server.client(key) as c:
        busy = completion(c, model, max_tokens=2)
        assert busy.status_code == 429, busy.text  # both places taken: the two requests are running
    for s in socks:
        s.close()  # gone long before their 900 tokens (about 5 s of steps)
    deadline = time.time() + 1.5
    with server.client(key) as c:
        while True:
            r = completion(c, model, max_tokens=2)
            if r.status_code == 200:
                break
            assert r.status_code == 429 and time.time() < deadline, r.text
            time.sleep(0.1)


def test_half_open_sockets_are_closed_and_capped(server):
    # A connection that never completes its headers is closed after --header-timeout (1 s) ...
    assert raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n", wait=5) == (b"", True)
    # ... also on a kept-alive connection: a first request answered, then a second one's headers never finished.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'{"status":"ok"}' not in first:
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")
        t0 = time.time()
        assert s.recv(65536) == b"" and time.time() - t0 < 3  # closed after about 1 s, not kept forever
    # ... and beyond --max-connections (40) new connections are closed at once, while the server still answers.
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
    try:
        time.sleep(0.3)
        closed = 0
        for s in socks:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                closed += s.recv(1) == b""
        assert closed >= 15, closed  # about 20 over the limit (less those still being accepted)
        time.sleep(1.5)  # the others reach their header timeout
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_content_length_with_transfer_encoding_is_refused_and_nothing_after_it_is_served(server):
    smuggled = (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\nGET /ready HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
    reply, closed = raw(server, smuggled, wait=3)
    assert reply.startswith(b"HTTP/1.1 400") and closed, reply[:200]
    assert reply.count(b"HTTP/1.1") == 1  # the smuggled second request got no answer: the connection was closed


def test_a_flooding_tenant_does_not_starve_a_light_one(files, tmp_path):  # noqa: F811
    _, base, _, _ = files
    srv = ServerProcess(base, tmp_path / "registry", "--max-num-seqs", "8", "--tenant-max-concurrent", "64",
                        "--max-pending", "256")  # fmt: skip
    try:
        flood, light = new_tenant(srv, "flood"), new_tenant(srv, "light")
        with srv.client(flood) as c:
            model = c.get("/v1/models").json()["data"][0]["id"]
        stop = threading.Event()

        def flooding():
            with srv.client(flood) as c:
                while not stop.is_set():
                    completion(c, model, max_tokens=200, ignore_eos=True)

        threads = [threading.Thread(target=flooding, daemon=True) for _ in range(32)]  # four times the batch
        for t in threads:
            t.start()
        time.sleep(2)
        waits = []
        with srv.client(light) as c:
            for _ in range(5):
                t0 = time.perf_counter()
                r = completion(c, model, max_tokens=4)
                assert r.status_code == 200, r.text
                waits.append(time.perf_counter() - t0)
        stop.set()
        for t in threads:
            t.join(30)
        # First come, first served, the light request would wait behind 24 queued flood requests of 200 tokens
        # (seconds); with fair shares it is admitted at the next step, and 4 tokens take a few steps.
        assert sorted(waits)[2] < 0.5, waits
    finally:
        srv.stop()


def test_quota_replaced_versions_and_a_full_disk(files, tmp_path):  # noqa: F811
    from tests.helpers import fill_disk, small_filesystem

    _, base, lora, _ = files
    bd, _ = make_bitdelta(base, tmp_path / "bd.safetensors", seed=3, per_row=True, replace=True)  # ~90 KB
    versions = [make_bitdelta(base, tmp_path / f"v{i}.safetensors", seed=10 + i, per_row=True, replace=False)[0]
                for i in range(5)]  # fmt: skip
    with small_filesystem(tmp_path / "disk", 48) as disk:
        srv = ServerProcess(base, disk / "registry", "--tenant-quota-mb", "1")
        try:
            hog, other = new_tenant(srv, "hog"), new_tenant(srv, "other")
            with srv.client(hog) as c:
                # 1. the quota: uploads until the tenant's megabyte is full, then 507 insufficient_storage
                statuses = [upload(c, f"a{i}", "bitdelta", bd).status_code for i in range(20)]
                assert 201 in statuses and statuses[-1] == 507, statuses
                r = upload(c, "one-more", "bitdelta", bd)
                assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
                assert r.json()["error"]["type"] == "server_error" and "quota" in r.json()["error"]["message"]
            with srv.client(other) as c:
                assert upload(c, "mine", "lora", lora).status_code == 201  # the others' quota is their own
                # 2. replaced versions are collected: five versions of one name keep one blob
                before = {p for p in (disk / "registry" / "blobs" / "bitdelta").rglob("*") if p.is_file()}
                for v in versions:
                    assert upload(c, "again", "bitdelta", v).status_code == 201
                current = c.get("/v1/adapters/again").json()
                assert current["version"] == 5
            blobs = {p for p in (disk / "registry" / "blobs" / "bitdelta").rglob("*") if p.is_file()} - before
            assert [p.name for p in blobs] == [current["sha256"]]  # the four replaced versions' blobs are gone
            # 3. a full disk: 507 for writes, deletes still work, nothing stored is lost
            filler = fill_disk(disk)
            with srv.client(other) as c:
                r = upload(c, "too-much", "lora", lora)
                assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
            with srv.client(ADMIN) as c:
                r = c.post("/v1/tenants", json={"name": "newcomer"})
                for i in range(50):  # a tenant is a tiny row: the catalog's last free pages may take a few
                    if r.status_code != 201:
                        break
                    r = c.post("/v1/tenants", json={"name": f"newcomer{i}"})
                assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
            with srv.client(hog) as c:
                assert c.delete("/v1/adapters/a0").status_code == 204
                assert c.get("/v1/adapters/a0").status_code == 404
            with srv.client(other) as c:
                assert completion(c, "mine").status_code == 200 and completion(c, "again").status_code == 200
            filler.unlink()
            with srv.client(hog) as c:
                assert upload(c, "a0", "bitdelta", bd).status_code == 201  # room again
        finally:
            srv.stop()
