"""`deltaserve serve --replicas 2` as a user runs it, on this CPU with the embedded demo: the same tokens as one
server, a tenant's requests where its delta already is (per-replica load counts on /metrics), spilling to the other
replica under load, a delete freeing the delta on every replica, and a replica killed mid-stream failing only its
own requests while the rest go on."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadtest.server_process import ServeProcess
from tests.api.conftest import ADMIN_KEY
from tests.api.helpers import sse_events, upload

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]'; the dev extra has it)")

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MODELS = ("base", "german", "spanish", "bofh", "italian")  # the demo's base and tenants
PROMPTS = ("Der Hund", "El perro", "The operator", "Il cane")


class Deltaserve(ServeProcess):
    """`deltaserve serve` on the demo, on this CPU (loadtest.server_process), with the demo tenant's key."""

    def __init__(self, registry: Path, *extra: str):
        super().__init__(registry, "--device", "cpu", *extra, admin_key=ADMIN_KEY)
        assert self.demo_key, self.output()
        self.key = self.demo_key

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.key}"}, timeout=120)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    single = Deltaserve(root / "single")
    # two sequences per step per replica: a third request for a delta spills to the other replica
    cluster = Deltaserve(root / "cluster", "--replicas", "2", "--max-num-seqs", "2")
    yield single, cluster
    cluster.stop()
    single.stop()


def replica_metric(cluster: Deltaserve, name: str, **labels: str) -> dict[str, float]:
    """replica -> value of one sample of the ingress's /metrics (the replicas' reports, about a second old)."""
    text = httpx.get(cluster.url + "/metrics", headers=ADMIN, timeout=30).text
    out = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, value = line[len(name) + 1 :].rsplit("} ", 1)
        got = dict(part.split("=", 1) for part in body.split(","))
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == v for k, v in labels.items()):
            out[got["replica"]] = float(value)
    return out


def settled(read, want=None, timeout: float = 15.0):
    """read()'s value once two reads a report apart agree (and equal `want`, when given)."""
    deadline, last = time.time() + timeout, None
    while True:
        now = read()
        if now == last and (want is None or want(now)):
            return now
        assert time.time() < deadline, f"not settled: {last} then {now}"
        last = now
        time.sleep(1.2)


def completion(server: Deltaserve, model: str, prompt: str, **extra) -> dict:
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_cluster_gives_one_servers_tokens(servers):
    single, cluster = servers
    with single.client() as a, cluster.client() as b:
        assert [m["id"] for m in a.get("/v1/models").json()["data"]] == [m["id"] for m in b.get("/v1/models").json()["data"]]
    for model in MODELS:
        for prompt in PROMPTS[:2]:
            want, got = completion(single, model, prompt), completion(cluster, model, prompt)
            assert got["choices"][0]["text"] == want["choices"][0]["text"], (model, prompt)
            assert got["usage"] == want["usage"]
    messages = [{"role": "user", "content": "Wie geht es?"}]
    texts = []
    for server in servers:
        with server.client() as c, c.stream("POST", "/v1/chat/completions", json={
                "model": "german", "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}) as r:  # fmt: skip
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        texts.append("".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]))
    assert texts[0] == texts[1] and texts[0]
    # a composition, an error: the same as one server
    mix = {"adapters": [{"name": "german", "weight": 0.5}, {"name": "italian"}]}
    assert completion(cluster, "base", "Der", **mix)["choices"][0]["text"] == completion(single, "base", "Der", **mix)["choices"][0]["text"]
    # errors: the same answers (a replica's own errors cross Ray as the ingress's typed errors)
    for body in ({"model": "nobody", "prompt": "x"}, {"model": "german", "prompt": "x", "guided_regex": "(unclosed"},
                 {"model": "base", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
                     "name": "s", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}):  # fmt: skip
        with single.client() as a, cluster.client() as b:
            want, got = a.post("/v1/completions", json=body), b.post("/v1/completions", json=body)
        assert want.status_code in (400, 404) and (got.status_code, got.json()) == (want.status_code, want.json()), body


def test_every_completion_names_the_replica_that_served_it(servers):
    single, cluster = servers
    replicas = set(replica_metric(cluster, "deltaserve_running_sequences"))
    assert len(replicas) == 2, replicas
    seen = set()
    with cluster.client() as c:
        for i in range(6):
            body = {"model": "german", "prompt": "Der", "max_tokens": 2, "stream": i % 2 == 1}
            for path in ("/v1/completions", "/v1/chat/completions"):
                if path.endswith("chat/completions"):
                    body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "Hallo"}]}
                r = c.post(path, json=body)
                assert r.status_code == 200, r.text
                assert r.headers["x-deltaserve-replica"] in replicas, r.headers
                seen.add(r.headers["x-deltaserve-replica"])
        r = c.post("/v1/completions", json={"model": "base", "prompt": "Der", "max_tokens": 2, "n": 2, "seed": 1})
        assert set(r.headers["x-deltaserve-replica"].split(", ")) <= replicas
    with single.client() as c:  # one server: no replicas, no header
        assert "x-deltaserve-replica" not in c.post("/v1/completions", json={"model": "german", "prompt": "Der",
                                                                            "max_tokens": 2}).headers  # fmt: skip


def test_a_tenants_requests_go_where_its_delta_is(servers):
    _, cluster = servers
    loads = lambda: sum(replica_metric(cluster, "deltaserve_adapter_loads_total", tier="host").values())  # noqa: E731
    before = settled(loads)
    with cluster.client() as c:  # a new tenant: deltas no replica holds yet
        r = c.post("/v1/tenants", json={"name": "affine"}, headers=ADMIN)
        assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    with cluster.client(key) as c:
        for name in ("one", "two"):
            assert upload(c, name, "bitdelta", Path(_demo_delta("german" if name == "one" else "bofh"))).status_code == 201
        for i in range(4):  # one at a time: never more than a replica takes
            for name in ("one", "two"):
                r = c.post("/v1/completions", json={"model": name, "prompt": "Der", "max_tokens": 2})
                assert r.status_code == 200, r.text
            if i == 0:  # the replicas tell Ray Serve's router what they hold every 0.1 s; the controller passes it on
                time.sleep(2)
    # 8 requests, 2 deltas: each read from its blob once, on the replica the router then kept sending it to
    assert settled(loads, want=lambda n: n == before + 2) == before + 2


def test_under_load_a_delta_spills_to_the_other_replica_and_a_delete_frees_it_everywhere(servers):
    _, cluster = servers
    with cluster.client() as c:
        r = c.post("/v1/tenants", json={"name": "popular"}, headers=ADMIN)
    key = r.json()["api_key"]
    def held() -> dict[str, tuple[float, float]]:  # replica -> (host copies, LoRA GPU slots in use)
        host = replica_metric(cluster, "deltaserve_adapter_slots_in_use", tier="host")
        gpu = replica_metric(cluster, "deltaserve_adapter_slots_in_use", tier="gpu_lora")
        return {r: (host[r], gpu.get(r, -1.0)) for r in host}

    before = settled(held)
    assert len(before) == 2
    with cluster.client(key) as c:
        assert upload(c, "hit", "lora", _demo_lora()).status_code == 201

        def ask():
            with cluster.client(key) as cc:
                r = cc.post("/v1/completions", json={"model": "hit", "prompt": "Il cane", "max_tokens": 48,
                                                     "ignore_eos": True})  # fmt: skip
                assert r.status_code == 200, r.text

        threads = [threading.Thread(target=ask) for _ in range(8)]  # 8 at once, 2 per replica's step
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        during = settled(held)
        # both replicas hold it, in host memory and in a GPU slot (the demo's one LoRA tenant may sit in another)
        assert all(during[r][0] == before[r][0] + 1 and during[r][1] >= 1 for r in before), (before, during)
        assert c.delete("/v1/adapters/hit").status_code == 204
    assert settled(held, want=lambda now: now == before) == before  # and neither does once it is deleted (slot freed)


def test_a_client_that_leaves_frees_its_sequence_on_the_replica(servers):
    # The ingress cancels the replica's stream when its client goes away: the engine aborts the request (its KV
    # blocks and slot freed) instead of generating 480 tokens nobody reads.
    _, cluster = servers
    running = lambda: sum(replica_metric(cluster, "deltaserve_running_sequences").values())  # noqa: E731
    generated = lambda: sum(replica_metric(cluster, "deltaserve_generation_tokens_total").values())  # noqa: E731
    assert settled(running, want=lambda n: n == 0) == 0
    before = settled(generated)
    with cluster.client() as c, c.stream("POST", "/v1/completions", json={
            "model": "bofh", "prompt": "The operator", "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    assert settled(running, want=lambda n: n == 0, timeout=20) == 0
    assert settled(generated) - before < 240  # stopped soon after the client left, not at 480 tokens


def test_a_killed_replica_fails_only_its_own_requests(servers):
    _, cluster = servers
    replicas = settled(lambda: set(replica_metric(cluster, "deltaserve_kv_cache_usage_ratio")))
    assert len(replicas) == 2
    results: dict[int, tuple[int, list]] = {}
    started = threading.Semaphore(0)

    def stream(i: int) -> None:
        body = {"model": MODELS[1 + i % 4], "prompt": PROMPTS[i % 4], "max_tokens": 480, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with cluster.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines, events = r.iter_lines(), []
            for line in lines:
                if line.startswith("data: "):
                    events += sse_events_of([line])
                    if len(events) == 1:
                        started.release()
            results[i] = (r.status_code, events)
        started.release()  # (also when it failed before its first token)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for _ in range(4):  # two running on each replica (--max-num-seqs 2); Ray Serve holds the other two back
        assert started.acquire(timeout=120)
    os.kill(_replica_pids()[0], signal.SIGKILL)
    for t in threads:
        t.join(300)
    lost, whole = 0, 0
    for status, events in results.values():
        if status == 503:  # sent to the victim as it died, before its first token: a plain error
            assert events == [] or events[-1] == "[DONE]"
            lost += 1
            continue
        assert status == 200 and events[-1] == "[DONE]"
        errors = [e for e in events[:-1] if "error" in e]
        if errors:
            assert errors[0]["error"]["code"] == "replica_lost" and "pid" not in errors[0]["error"]["message"], errors
            lost += 1
        else:
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            whole += 1
    # the victim's two running streams failed, the survivor's two finished (and those held back went on somewhere)
    assert len(results) == 6 and lost >= 2 and whole >= 2, (lost, whole)
    # the ingress goes on: new requests are served (by the survivor, then by the replica Ray Serve starts again)
    for model in MODELS:
        assert completion(cluster, model, "Der")["choices"][0]["text"]
    with cluster.client() as c:
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} >= set(MODELS)  # nothing stored was lost
    # and Ray Serve has started a new replica in the killed one's place
    now = settled(lambda: set(replica_metric(cluster, "deltaserve_kv_cache_usage_ratio")),
                  want=lambda ids: len(ids) == 2 and ids != replicas, timeout=120)  # fmt: skip
    assert len(now & replicas) == 1


def sse_events_of(lines: list[str]) -> list:
    import json

    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines]


def _replica_pids() -> list[int]:
    """The engine replicas' processes (Ray names them `ray::ServeReplica:deltaserve:EngineReplica`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ServeReplica:deltaserve:EngineReplica" in cmdline:
            pids.append(int(proc.name))
    assert len(pids) == 2, pids
    return pids


def _demo_delta(name: str) -> str:
    from serving.demo import demo_tenants

    return str(next(t.adapter_path for t in demo_tenants() if t.name == name))


def _demo_lora() -> Path:
    from serving.demo import demo_tenants

    return next(t.adapter_path for t in demo_tenants() if t.kind == "lora")
