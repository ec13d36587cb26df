"""One registry shared through a PostgreSQL catalog and an S3-compatible bucket, as by two machines:
`deltaserve serve --replicas 1 --ingresses 2 --catalog ... --blob-store s3://...` with its registry folder, and a
plain `deltaserve serve` with another folder (another machine's cache) on the same catalog and bucket. What one of
them stores, versions or deletes, the others answer at once; an ingress killed with kill -9 leaves the API served
by the other one, and nothing stored is lost."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ADMIN_KEY
from tests.api.helpers import upload
from tests.cluster.test_ray_serve import ADMIN, Deltaserve, _demo_delta

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]'; the dev extra has it)")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, postgres, s3):
    root = tmp_path_factory.mktemp("shared")
    shared = ("--catalog", postgres.new_database(), "--blob-store", s3.new_bucket())
    cluster = Deltaserve(root / "machine-1", "--replicas", "1", "--ingresses", "2", *shared)
    try:
        # the demo tenant exists already (the cluster made it): this server prints no key, it uses the cluster's
        single = SingleOnSameRegistry(root / "machine-2", cluster.key, *shared)
    except BaseException:
        cluster.stop()
        raise
    yield cluster, single
    single.stop()
    cluster.stop()


class SingleOnSameRegistry(Deltaserve):
    def __init__(self, registry: Path, key: str, *extra: str):
        from loadtest.server_process import ServeProcess

        ServeProcess.__init__(self, registry, "--device", "cpu", *extra, admin_key=ADMIN_KEY)
        self.key = key


def _ingress_pids() -> list[int]:
    """The ingresses' processes (Ray names them `ray::ServeReplica:deltaserve:Ingress`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ServeReplica:deltaserve:Ingress" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _complete(server: Deltaserve, key: str, model: str) -> httpx.Response:
    with server.client(key) as c:
        return c.post("/v1/completions", json={"model": model, "prompt": "Der Hund", "max_tokens": 8, "temperature": 0})


def test_what_one_stores_versions_or_deletes_the_others_answer_at_once(shared):
    cluster, single = shared
    assert len(_ingress_pids()) == 2
    with cluster.client() as c:
        r = c.post("/v1/tenants", json={"name": "acme"}, headers=ADMIN)
        assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    with single.client(key) as c:  # the key the cluster made works on the other server: one catalog
        assert upload(c, "support", "bitdelta", Path(_demo_delta("german"))).status_code == 201
    for _ in range(4):  # every ingress (Ray's proxy spreads the requests) resolves it
        r = _complete(cluster, key, "support")
        assert r.status_code == 200, r.text
    german = r.json()["choices"][0]["text"]
    assert _complete(single, key, "support").json()["choices"][0]["text"] == german
    with cluster.client(key) as c:  # a new version through the cluster: the other server serves it at once
        assert upload(c, "support", "bitdelta", Path(_demo_delta("bofh"))).status_code == 201
        versions = c.get("/v1/adapters/support").json()
    assert versions["version"] == 2, versions
    bofh = _complete(single, key, "support").json()["choices"][0]["text"]
    assert bofh != german and all(_complete(cluster, key, "support").json()["choices"][0]["text"] == bofh
                                  for _ in range(3))  # fmt: skip
    with single.client(key) as c:
        assert c.delete("/v1/adapters/support").status_code in (200, 204)
    for _ in range(3):
        r = _complete(cluster, key, "support")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    with cluster.client() as c:  # usage is counted in one catalog, whichever process served the request
        deadline = time.time() + 20
        while True:
            usage = c.get("/v1/usage", params={"tenant": "acme"}, headers=ADMIN).json()
            requests = sum(row["requests"] for row in usage["data"])
            if requests >= 9 or time.time() > deadline:
                break
            time.sleep(1)
    assert requests >= 9, usage


def test_a_killed_ingress_leaves_the_api_served_and_nothing_lost(shared):
    cluster, _ = shared
    with cluster.client() as c:
        r = c.post("/v1/tenants", json={"name": "sturdy"}, headers=ADMIN)
        assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    with cluster.client(key) as c:
        assert upload(c, "kept", "bitdelta", Path(_demo_delta("spanish"))).status_code == 201
    want = _complete(cluster, key, "kept").json()["choices"][0]["text"]
    pids = _ingress_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    answered = [_complete(cluster, key, "kept") for _ in range(8)]  # Ray's proxy sends them to the live ingress
    ok = [r for r in answered if r.status_code == 200]
    assert len(ok) >= 6, [(r.status_code, r.text[:200]) for r in answered]  # at most what was on its way to the dead one
    assert all(r.json()["choices"][0]["text"] == want for r in ok)
    with cluster.client(key) as c:  # uploads go on, and what was stored is there
        assert upload(c, "after", "bitdelta", Path(_demo_delta("german"))).status_code == 201
        assert sorted(a["name"] for a in c.get("/v1/adapters").json()["data"]) == ["after", "kept"]
    deadline = time.time() + 90  # Ray Serve starts a new ingress in its place
    while len(_ingress_pids()) < 2 and time.time() < deadline:
        time.sleep(1)
    assert len(_ingress_pids()) == 2 and pids[0] not in _ingress_pids()
