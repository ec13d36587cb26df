"""Serving under load: versions and deletes during streams, many tenants while uploads and cold loads happen,
the queue limit, per-tenant limits, disconnects freeing KV blocks, and the metrics."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from tests.api.conftest import start_server, stop_server
from tests.api.helpers import upload
from tests.helpers import make_lora

LONG = {"max_tokens": 60, "temperature": 0, "ignore_eos": True}


def text_of(client: httpx.Client, model: str, prompt: str = "The quick brown fox", **kw) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, **{**LONG, **kw}})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def stream_text(response: httpx.Response, on_first=None) -> str:
    parts, first = [], True
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        parts.append(event["choices"][0]["text"])
        if first and on_first is not None:
            on_first()
        first = False
    return "".join(parts)


@pytest.fixture(scope="module")
def second_lora(live):
    path, _ = make_lora(live.base_dir, live.files["root"] / "lora-b", r=2, seed=9)
    return path


def test_new_version_and_delete_during_a_stream(live, second_lora):
    key, ref_key = live.new_tenant("versions"), live.new_tenant("versions-ref")
    with live.client(key) as c, live.client(ref_key) as ref:
        assert upload(c, "ver", "lora", live.files["lora"]).json()["version"] == 1
        assert upload(ref, "b", "lora", second_lora).status_code == 201
        want_a, want_b = text_of(c, "ver"), text_of(ref, "b")
        assert want_a != want_b

        def reupload():
            r = upload(c, "ver", "lora", second_lora)
            assert r.status_code == 201 and r.json()["version"] == 2
            assert live.backend.num_pending >= 1  # the stream is still running
            assert text_of(c, "ver") == want_b  # new requests use the new version at once

        v1 = live.backend.registry.resolve("versions", "ver")
        with c.stream("POST", "/v1/completions", json={"model": "ver", "prompt": "The quick brown fox", "stream": True, **LONG}) as s:
            assert stream_text(s, on_first=reupload) == want_a  # the running stream finished on version 1
        # the replaced version's GPU slot and host copy are freed once its last request ended; it is collected
        wait_until(lambda: not resident(live, f"versions/lora/{v1.sha256}"))
        assert [r.version for r in live.backend.registry.list_versions("versions", "ver")] == [2]

        def delete():
            assert c.delete("/v1/adapters/ver").status_code == 204
            assert live.backend.num_pending >= 1
            r = c.post("/v1/completions", json={"model": "ver", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 404

        with c.stream("POST", "/v1/completions", json={"model": "ver", "prompt": "The quick brown fox", "stream": True, **LONG}) as s:
            assert stream_text(s, on_first=delete) == want_b
        # the deleted version's GPU slot is free once its last request ended (and no key of it stays cached)
        wait_until(lambda: not resident(live, "versions/"))


def resident(live, prefix: str) -> bool:
    """True while a delta whose key starts with `prefix` is in a GPU slot or the host tier."""
    slots = live.backend.generation.engine.slots
    keys = [k for kind in ("lora", "bitdelta") for k in slots.resident(kind) if k] + live.backend.generation.host_tier.keys()
    return any(k.startswith(prefix) for k in keys)


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_cli_adapters_rm_and_tenants_rm_free_what_they_held(live, second_lora, capsys, monkeypatch):
    from serving.cli import main as cli_main
    from tests.api.conftest import ADMIN_KEY

    monkeypatch.setenv("DELTASERVE_URL", live.url)
    monkeypatch.setenv("DELTASERVE_ADMIN_KEY", ADMIN_KEY)
    assert cli_main(["tenants", "create", "leaving"]) == 0
    key = capsys.readouterr().out.strip().split()[-1]
    monkeypatch.setenv("DELTASERVE_API_KEY", key)
    for name, fmt, path in (("a", "lora", live.files["lora"]), ("b", "lora", second_lora), ("c", "bitdelta", live.files["bd"])):
        assert cli_main(["adapters", "push", str(path), "--name", name, "--format", fmt]) == 0
    with live.client(key) as c:
        for name in "abc":
            text_of(c, name, max_tokens=2)
    capsys.readouterr()
    assert resident(live, "leaving/lora/") and resident(live, "leaving/bitdelta/")

    b = live.backend.registry.resolve("leaving", "b")
    assert cli_main(["adapters", "push", str(second_lora), "--name", "b", "--format", "lora"]) == 0  # same content
    assert [r.version for r in live.backend.registry.list_versions("leaving", "b")] == [2]  # version 1 collected...
    assert resident(live, f"leaving/lora/{b.sha256}")  # ...but its delta is version 2's too: it stays resident
    a = live.backend.registry.resolve("leaving", "a")
    capsys.readouterr()
    assert cli_main(["adapters", "rm", "a"]) == 0
    wait_until(lambda: not resident(live, f"leaving/lora/{a.sha256}"))
    assert cli_main(["adapters", "ls"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["b", "c"]
    assert cli_main(["adapters", "rm", "a"]) == 2  # gone: 404
    assert "404" in capsys.readouterr().err

    assert cli_main(["tenants", "rm", "leaving"]) == 0
    wait_until(lambda: not resident(live, "leaving/"))  # its deltas leave the host tier and the GPU slots
    with live.client(key) as c:
        assert c.get("/v1/models").status_code == 401  # its key is gone too
    assert cli_main(["tenants", "ls"]) == 0
    assert "leaving" not in capsys.readouterr().out.split()
    assert cli_main(["tenants", "rm", "leaving"]) == 2
    assert "404" in capsys.readouterr().err
    assert not live.backend.registry.list_tenant_versions("leaving")


def test_many_tenants_stream_while_uploading_and_cold_loading(live, second_lora):
    tenants = []
    for i in range(6):
        key = live.new_tenant(f"busy-{i}")
        fmt, path = ("lora", live.files["lora"]) if i % 2 else ("bitdelta", live.files["bd"])
        with live.client(key) as c:
            assert upload(c, "mine", fmt, path).status_code == 201
            tenants.append((key, text_of(c, "mine", max_tokens=40)))
    uploader = live.new_tenant("uploader")
    errors: list = []
    results: dict[int, str] = {}

    def run_stream(i, key):
        try:
            with live.client(key) as c, c.stream("POST", "/v1/completions", json={
                    "model": "mine", "prompt": "The quick brown fox", "stream": True, **LONG, "max_tokens": 40}) as s:
                assert s.status_code == 200, s.read()
                results[i] = stream_text(s)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def upload_and_cold_load():
        try:
            with live.client(uploader) as c:
                assert upload(c, "fresh", "lora", second_lora).status_code == 201
                assert text_of(c, "fresh", max_tokens=10)  # a cold adapter: host tier + GPU slot load mid-traffic
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run_stream, args=(i, k)) for i, (k, _) in enumerate(tenants)]
    threads.append(threading.Thread(target=upload_and_cold_load))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert {i: t for i, t in results.items()} == {i: want for i, (_, want) in enumerate(tenants)}


def test_disconnect_frees_kv_blocks(live):
    key = live.new_tenant("leaver")
    blocks = live.backend.generation.engine.blocks
    with live.client(key) as c:
        with c.stream("POST", "/v1/completions", json={"model": live.backend.model_id, "prompt": "To be", "stream": True,
                                                       "max_tokens": 100, "temperature": 0, "ignore_eos": True}) as s:
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert blocks.num_free < blocks.num_blocks
            assert live.backend.num_pending == 1
        # the client went away: within a step or so the request is aborted and its blocks are free again
        deadline = time.time() + 10
        while blocks.num_free != blocks.num_blocks or live.backend.num_pending:
            assert time.time() < deadline, "the disconnected stream kept its KV blocks"
            time.sleep(0.01)
    with live.client() as admin:  # ... and the metrics say so, though the engine is idle since the abort
        metrics = admin.get("/metrics").text
    assert metric(metrics, "deltaserve_kv_cache_usage_ratio") == 0.0
    assert metric(metrics, "deltaserve_running_sequences") == 0.0


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name) + (r"\{" + labels + r"[^}]*\}" if labels else r"(\{[^}]*\})?") + r" ([0-9.e+-]+)"
    values = [float(m.group(len(m.groups()))) for m in re.finditer(pattern, text, re.M)]
    assert values, f"{name} missing"
    return sum(values)


def test_metrics_after_load(live):
    with live.client() as admin:
        text = admin.get("/metrics").text
    for name in ["deltaserve_requests_total", "deltaserve_time_to_first_token_seconds_count",
                 "deltaserve_inter_token_latency_seconds_count", "deltaserve_request_latency_seconds_count",
                 "deltaserve_step_batch_size_count", "deltaserve_step_distinct_adapters_count",
                 "deltaserve_prompt_tokens_total", "deltaserve_generation_tokens_total",
                 "deltaserve_adapter_cache_hits_total", "deltaserve_adapter_cache_misses_total",
                 "deltaserve_adapter_loads_total", "deltaserve_adapter_load_seconds_count"]:
        assert metric(text, name) > 0, name
    for name in ["deltaserve_queue_length", "deltaserve_running_sequences", "deltaserve_kv_cache_usage_ratio",
                 "deltaserve_adapter_slots_in_use", "deltaserve_adapter_evictions_total"]:
        assert metric(text, name) >= 0, name
    assert metric(text, "deltaserve_requests_total", 'model_kind="lora",route="/v1/completions",status="200"') > 0
    assert metric(text, "deltaserve_adapter_slots_in_use", 'tier="host"') >= 1
    assert metric(text, "deltaserve_host_tier_capacity_bytes") == live.backend.generation.host_tier.capacity_bytes
    assert 0 < metric(text, "deltaserve_host_tier_bytes") == live.backend.generation.host_tier.nbytes
    assert 'deltaserve_adapter_slots{tier="host"}' not in text  # a tier sized in bytes has no slot count
    for name in ["deltaserve_adapter_cache_misses_total", "deltaserve_adapter_loads_total",
                 "deltaserve_adapter_load_seconds_count"]:  # the GPU slots report as the host tier does
        assert metric(text, name, 'tier="gpu"') > 0, name
        assert metric(text, name, 'tier="host"') > 0, name
    assert 'tenant="' not in text and "busy-0" not in text and "secret" not in text  # no tenant or adapter labels
    assert metric(text, "deltaserve_step_batch_size_sum") >= metric(text, "deltaserve_step_batch_size_count")


def test_host_tier_hits_count_only_deltas_without_a_gpu_slot(live):
    """Every request looks its delta up in the host tier; one already in a GPU slot needs no host copy, so its
    lookup is no hit (else the host hit ratio sat near 1). A delta evicted from its slot but still in host
    memory is a host hit."""
    key = live.new_tenant("hits")
    with live.client(key) as c:
        assert upload(c, "hot", "lora", live.files["lora"]).status_code == 201

        def host(name: str) -> float:
            with live.client() as admin:
                return metric(admin.get("/metrics").text, name, 'tier="host"')

        body = {"model": "hot", "prompt": "hi", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 200  # loaded: from disk, into a GPU slot
        hits, misses = host("deltaserve_adapter_cache_hits_total"), host("deltaserve_adapter_cache_misses_total")
        for _ in range(3):
            assert c.post("/v1/completions", json=body).status_code == 200
        assert host("deltaserve_adapter_cache_hits_total") == hits  # resident on the GPU: no host lookup needed
        assert host("deltaserve_adapter_cache_misses_total") == misses
        delta = f"hits/lora/{live.backend.registry.resolve('hits', 'hot').sha256}"
        live.backend.generation.loop.forget("lora", delta)  # its GPU slot freed (as for a new version); the host copy stays
        wait_until(lambda: not live.backend.generation.engine.holds_delta("lora", delta))
        assert c.post("/v1/completions", json=body).status_code == 200
        assert host("deltaserve_adapter_cache_hits_total") == hits + 1  # no GPU slot: found in host memory


def test_queue_limit_and_tenant_limit(tmp_path_factory, live):
    srv = start_server(tmp_path_factory.mktemp("small"), live.base_dir, max_pending=2, tenant_max_concurrent=1)
    engine, step = srv.backend.generation.engine, srv.backend.generation.engine.step

    def slow_step():  # a slower device: the long requests are surely still running when the next ones arrive
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    try:
        a, b, c = srv.new_tenant("a"), srv.new_tenant("b"), srv.new_tenant("c")
        body = {"model": srv.backend.model_id, "prompt": "To be", "stream": True, "max_tokens": 120, "temperature": 0,
                "ignore_eos": True}
        with srv.client(a) as ca, srv.client(b) as cb, srv.client(c) as cc:
            with ca.stream("POST", "/v1/completions", json=body) as s1:
                lines1 = s1.iter_lines()  # kept alive: closing httpx's line iterator closes the connection
                next(line for line in lines1 if line.startswith("data: "))
                busy = ca.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
                assert busy.status_code == 429 and busy.headers["retry-after"]
                assert busy.json()["error"]["type"] == "rate_limit_error"
                with cb.stream("POST", "/v1/completions", json=body) as s2:
                    lines2 = s2.iter_lines()
                    next(line for line in lines2 if line.startswith("data: "))
                    full = cc.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
                    assert full.status_code == 503 and full.headers["retry-after"]
                    assert full.json()["error"]["code"] == "overloaded"
            deadline = time.time() + 10  # both streams were closed: their requests are aborted at the next step
            while srv.backend.num_pending:
                assert time.time() < deadline
                time.sleep(0.01)
            assert cc.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
        with srv.client() as admin:  # the alert rules' inputs: the queue's bound, and whether the engine runs
            text = admin.get("/metrics").text
            assert metric(text, "deltaserve_max_pending_requests") == 2
            assert metric(text, "deltaserve_engine_up") == 1
            srv.backend.generation.loop.stop(timeout=5)  # the engine thread gone, the HTTP server still up
            assert admin.get("/health").status_code == 503
            assert metric(admin.get("/metrics").text, "deltaserve_engine_up") == 0
    finally:
        stop_server(srv)


def test_finetune_upload_is_compressed_in_the_background(live, tmp_path):
    import torch

    from tests.helpers import hf_model

    ft = hf_model(live.base_dir)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "proj" in name:
                p.add_(0.05 * torch.randn_like(p))
    ft.save_pretrained(tmp_path / "ft")
    key = live.new_tenant("ft-owner")
    with live.client(key) as c:
        r = upload(c, "full", "finetune", tmp_path / "ft")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "compressing" and r.json()["format"] == "finetune"
        assert c.post("/v1/completions", json={"model": "full", "prompt": "hi"}).status_code == 404  # not ready yet
        deadline = time.time() + 120
        progress = []
        while (a := c.get("/v1/adapters/full").json())["status"] == "compressing":
            progress.append(a["progress"])
            assert time.time() < deadline
            time.sleep(0.05)
        assert a["status"] == "ready" and a["progress"] == 1.0 and a["error"] is None, a
        assert progress == sorted(progress)
        assert text_of(c, "full", max_tokens=8) != text_of(c, live.backend.model_id, max_tokens=8)
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text((tmp_path / "ft" / "config.json").read_text())
        (bad / "model.safetensors").write_bytes((tmp_path / "ft" / "model.safetensors").read_bytes()[:1000])
        r = upload(c, "broken", "finetune", bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_format"


def test_preload_puts_an_adapter_on_the_gpu_before_any_request(tmp_path, live):
    from registry.catalog import Registry
    from registry.checkpoint import Checkpoint
    from registry.fingerprint import base_spec
    from serving.server import ServerSettings, build_backend

    settings = ServerSettings(model=live.base_dir, registry=tmp_path / "reg", device="cpu", kernel_backend="torch",
                              max_lora_rank=8, preload=["acme/bot"])
    with Registry(settings.registry) as registry:
        registry.create_tenant("acme")
        staging = registry.stage()
        staging.import_path(live.files["lora"])
        registry.commit_adapter("acme", "bot", "lora", staging,
                                staging.validate("lora", base_spec(Checkpoint(live.base_dir)), 8))
        backend = build_backend(settings, registry)
        for ref in settings.preload:
            backend.preload(ref)
        assert any(k and k.startswith("acme/lora/") for k in backend.generation.engine.slots.resident("lora"))
        assert backend.generation.host_tier.num_items == 1
        with pytest.raises(Exception, match="no ready adapter"):
            backend.preload("acme/missing")
        backend.stop()


def test_a_slow_metrics_scrape_holds_back_no_other_request(live, monkeypatch):
    metrics = live.backend.metrics
    render = metrics.render

    def slow_render():  # a scrape of many series on a busy machine
        time.sleep(0.6)
        return render()

    monkeypatch.setattr(metrics, "render", slow_render)
    with live.client() as admin:
        scrape = threading.Thread(target=admin.get, args=("/metrics",))
        scrape.start()
        time.sleep(0.1)
        t0 = time.perf_counter()
        assert admin.get("/health").status_code == 200
        assert time.perf_counter() - t0 < 0.3  # answered while the scrape renders, not after it
        scrape.join(10)
