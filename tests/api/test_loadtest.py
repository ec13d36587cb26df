"""The load generator: its statistics on hand-made numbers, its SSE/retry handling against a fake transport,
and real runs against a live server with two tenants and two adapters (a LoRA and a 1-bit delta)."""

from __future__ import annotations

import json

import httpx
import pytest

from loadtest.__main__ import main
from loadtest.report import aggregate, build_report, meets, percentile, render_text, summarize, to_json
from loadtest.runner import (
    LoadConfig,
    Prompt,
    RequestResult,
    Target,
    arrivals,
    base_url,
    load_prompts,
    pair_targets,
    plan,
    public_url,
    retry_after_seconds,
    run_load,
)
from tests.api.helpers import upload

# ---------------------------------------------------------------- statistics on hand-made numbers


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile(list(range(101)), 90) == pytest.approx(90.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize():
    s = summarize([0.1, 0.2, 0.3, 0.4, 1.0])
    assert s["count"] == 5 and s["mean"] == pytest.approx(0.4)
    assert s["min"] == pytest.approx(0.1) and s["max"] == pytest.approx(1.0)
    assert s["p50"] == pytest.approx(0.3) and s["p90"] == pytest.approx(0.76) and s["p95"] == pytest.approx(0.88)
    assert s["p99"] == pytest.approx(0.976)
    assert summarize([]) == {"count": 0, "mean": None, "min": None, "p50": None, "p90": None, "p95": None, "p99": None,
                             "max": None}


def _ok(i: int, model: str, ttft: float, itl: list[float], e2e: float, out: int) -> RequestResult:
    return RequestResult(index=i, target=0, model=model, stream=True, status=200, ok=True, ttft=ttft, itl=itl,
                         e2e=e2e, output_tokens=out, prompt_tokens=3, usage_reported=True)


def test_aggregate_counts_throughput_and_latencies():
    results = [
        _ok(0, "a", 0.1, [0.01, 0.03], 0.14, 3),
        _ok(1, "b", 0.3, [0.02], 0.32, 2),
        RequestResult(index=2, target=1, model="a", stream=True, status=429, error_type="rate_limit_error",
                      e2e=0.01, retries=2),
        RequestResult(index=3, target=1, model="b", stream=True, status=503, error_type="server_error",
                      error_code="overloaded", e2e=0.01),
        RequestResult(index=4, target=1, model="b", stream=True, status=None, error_type="connection_error",
                      error_code="ConnectError"),
    ]
    a = aggregate(results, wall_time=2.0)
    assert (a["requests"], a["ok"], a["failed"], a["retries"]) == (5, 2, 3, 2)
    assert a["by_status"] == {"200": 2, "429": 1, "503": 1, "none": 1}
    assert a["by_error"] == {"rate_limit_error": 1, "overloaded": 1, "ConnectError": 1}
    assert a["output_tokens"] == 5 and a["prompt_tokens"] == 6
    assert a["output_tokens_per_s"] == pytest.approx(2.5) and a["requests_per_s"] == pytest.approx(1.0)
    lat = a["latency"]
    assert lat["ttft"]["count"] == 2 and lat["ttft"]["mean"] == pytest.approx(0.2)
    assert lat["itl"]["count"] == 3 and lat["itl"]["p50"] == pytest.approx(0.02)
    assert lat["e2e"]["max"] == pytest.approx(0.32)  # failed requests never enter the latencies
    assert lat["tpot"]["count"] == 2 and lat["tpot"]["p50"] == pytest.approx((0.02 + 0.02) / 2)


def test_targets_plan_and_helpers(tmp_path):
    assert pair_targets(["k1", "k2"], ["a", "b"]) == [Target("k1", "a"), Target("k2", "b")]
    assert pair_targets(["k"], ["a", "b"]) == [Target("k", "a"), Target("k", "b")]
    assert pair_targets(["k1", "k2"], ["base"]) == [Target("k1", "base"), Target("k2", "base")]
    with pytest.raises(ValueError):
        pair_targets(["k1", "k2"], ["a", "b", "c"])
    cfg = LoadConfig(url="http://x", targets=pair_targets(["k1", "k2", "k3"], ["m"]), prompts=[Prompt("p")],
                     requests=7)
    assert [t for t, _ in plan(cfg)] == [0, 1, 2, 0, 1, 2, 0]
    cfg.assign, cfg.seed = "random", 3
    assert plan(cfg) == plan(cfg) and {t for t, _ in plan(cfg)} <= {0, 1, 2}
    assert base_url("http://h:1/v1/") == "http://h:1" and base_url("http://h:1") == "http://h:1"
    assert public_url("http://user:secret@h:1/v1") == "http://h:1/v1"
    assert retry_after_seconds("3", 10) == 3 and retry_after_seconds("60", 10) == 10
    assert retry_after_seconds(None, 10) == 1 and retry_after_seconds("junk", 10) == 1
    f = tmp_path / "p.jsonl"
    f.write_text('"plain"\n\n{"prompt": "two", "max_tokens": 3}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    ps = load_prompts(f)
    assert ps[0] == Prompt("plain") and ps[1].max_tokens == 3 and ps[2].as_messages()[0]["content"] == "hi"
    f.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(f)


# ---------------------------------------------------------------- protocol handling against a fake server


def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}], "usage": None}


def _fake_run(handler, **kw) -> list[RequestResult]:
    cfg = LoadConfig(url="http://fake.invalid/v1", targets=[Target("sk-fake-key", "m")], prompts=[Prompt("hi")],
                     **{"requests": 1, "concurrency": 1, "max_tokens": 4, **kw})
    return run_load(cfg, transport=httpx.MockTransport(handler)).results


def test_stream_without_usage_counts_chunks_and_sends_include_usage():
    # Every chunk is a token, its text held back ("") or not, as the server streams them and vllm bench counts them.
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url, request.headers["authorization"], json.loads(request.content)))
        return httpx.Response(200, content=_sse(_chunk("a"), _chunk(""), _chunk("b"), _chunk("c"), b"[DONE]"))

    (r,) = _fake_run(handler)
    url, auth, body = seen[0]
    assert str(url) == "http://fake.invalid/v1/completions" and auth == "Bearer sk-fake-key"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert r.ok and r.output_tokens == 4 and not r.usage_reported and len(r.itl) == 3
    assert 0 <= r.ttft <= r.e2e


def test_a_one_token_stream_whose_chunk_has_no_text_still_has_a_ttft():
    # The first token held back (an incomplete character, or the end at once): TTFT is its chunk's arrival.
    (r,) = _fake_run(lambda req: httpx.Response(200, content=_sse(_chunk(""), b"[DONE]")))
    assert r.ok and r.ttft is not None and 0 <= r.ttft <= r.e2e


def test_zipf_popularity_and_poisson_or_ramped_arrivals():
    targets = [Target(f"k{i}", f"m{i}") for i in range(4)]
    cfg = LoadConfig(url="http://x.invalid", targets=targets, prompts=[Prompt("a"), Prompt("b")], requests=4000,
                     zipf=1.0, seed=3)  # fmt: skip
    counts = [sum(t == i for t, _ in plan(cfg)) for i in range(4)]
    share = [1 / (k + 1) / sum(1 / (j + 1) for j in range(4)) for k in range(4)]
    assert all(abs(c / 4000 - w) < 0.03 for c, w in zip(counts, share)) and counts == sorted(counts, reverse=True)
    assert plan(cfg) == plan(cfg)  # seeded
    assert arrivals(cfg) is None  # closed loop
    cfg.request_rate = 50.0
    times = [t for t, _ in arrivals(cfg)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g >= 0 for g in gaps) and abs(sum(gaps) / len(gaps) - 1 / 50) < 0.002
    assert {r for _, r in arrivals(cfg)} == {50.0}
    cfg.request_rate, cfg.ramp = None, (10.0, 100.0)
    rates = [r for _, r in arrivals(cfg)]
    assert rates[0] == 10.0 and rates[-1] == 100.0 and rates == sorted(rates)
    times = [t for t, _ in arrivals(cfg)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps[:500]) > 4 * sum(gaps[-500:])  # arrivals come faster as the rate ramps up
    for bad in (dict(request_rate=0.0), dict(ramp=(1.0, 0.0)), dict(ramp=(1.0, 2.0), request_rate=1.0),
                dict(zipf=-1.0), dict(goodput={"ttfb": 1.0}), dict(goodput={"ttft": 0.0})):  # fmt: skip
        with pytest.raises(ValueError):
            LoadConfig(url="http://x.invalid", targets=targets, prompts=[Prompt("a")], **bad).validate()


def test_goodput_counts_the_requests_within_every_slo():
    fast = _ok(0, "m", 0.1, [0.01], 0.2, 2)  # tpot 0.1
    slow_first = _ok(1, "m", 0.9, [0.01], 1.0, 2)
    one_token = _ok(2, "m", 0.05, [], 0.05, 1)  # no time per token: it meets any tpot limit
    failed = RequestResult(index=3, target=0, model="m", stream=True, status=200, ttft=0.1, e2e=0.2)  # an error event
    slo = {"ttft": 0.5, "tpot": 0.2}
    assert [meets(r, slo) for r in (fast, slow_first, one_token, failed)] == [True, False, True, False]
    g = aggregate([fast, slow_first, one_token, failed], 2.0, slo)["goodput"]
    assert g == {"slo": slo, "requests": 2, "requests_per_s": 1.0, "share": 0.5}
    assert aggregate([fast], 1.0)["goodput"] is None


def test_error_event_and_missing_done_are_failures():
    (r,) = _fake_run(lambda req: httpx.Response(200, content=_sse(
        _chunk("a"), {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}, b"[DONE]")))
    assert not r.ok and r.status == 200 and r.error_type == "server_error" and r.error_message == "boom"
    (r,) = _fake_run(lambda req: httpx.Response(200, content=_sse(_chunk("a"))))
    assert not r.ok and r.error_code == "incomplete_stream"


def test_429_is_retried_after_retry_after_then_counted():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {
                "message": "slow down", "type": "rate_limit_error", "param": None, "code": None}})
        return httpx.Response(200, json={"choices": [{"text": "xy"}], "usage": {
            "prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})

    (r,) = _fake_run(handler, retry=5, stream=False)
    assert r.ok and r.retries == 2 and len(calls) == 3 and r.output_tokens == 2 and r.ttft == r.e2e
    calls.clear()
    (r,) = _fake_run(handler, retry=1, stream=False)  # bounded: one retry, then the 429 stands
    assert not r.ok and r.status == 429 and r.retries == 1 and r.error_type == "rate_limit_error"


def test_run_is_bounded_in_time():
    import time

    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(0.05)
        return httpx.Response(200, json={"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}})

    t = time.perf_counter()
    results = _fake_run(handler, requests=10_000, duration=0.3, stream=False)
    assert time.perf_counter() - t < 5 and 0 < len(results) < 10_000 and all(r.ok for r in results)


# ---------------------------------------------------------------- against a live server


@pytest.fixture(scope="module")
def tenants(live):
    """Two tenants, each with its own adapter: a LoRA and a 1-bit delta."""
    pairs = []
    for name, fmt, path in [("lt-lora", "lora", live.files["lora"]), ("lt-bits", "bitdelta", live.files["bd"])]:
        key = live.new_tenant(name)
        with live.client(key) as c:
            assert upload(c, f"{name}-ft", fmt, path).status_code == 201
        pairs.append((key, f"{name}-ft"))
    return pairs


def _check_report(report: dict, keys: list[str], models: list[str], n: int) -> None:
    s = report["summary"]
    assert (s["requests"], s["ok"], s["failed"]) == (n, n, 0), s
    assert s["by_status"] == {"200": n} and s["by_error"] == {}
    assert s["output_tokens"] > 0 and s["prompt_tokens"] > 0 and s["output_tokens_per_s"] > 0
    for m, st in s["latency"].items():
        if st["count"]:
            assert 0 <= st["min"] <= st["p50"] <= st["p90"] <= st["p95"] <= st["p99"] <= st["max"], (m, st)
    assert set(report["per_model"]) == set(models)
    assert sum(a["requests"] for a in report["per_model"].values()) == n
    text = to_json(report)
    assert json.loads(text)["params"]["num_keys"] == len(set(keys))
    for k in keys:
        assert k not in text and k not in render_text(report)


@pytest.mark.parametrize("stream", [True, False])
def test_live_run_two_tenants(live, tenants, stream):
    keys, models = [k for k, _ in tenants], [m for _, m in tenants]
    cfg = LoadConfig(url=live.url, targets=pair_targets(keys, models), prompts=[Prompt("The quick brown fox"),
                     Prompt("Once upon a time")], requests=12, concurrency=4, max_tokens=8, temperature=0,
                     stream=stream, ignore_eos=True, timeout=60)
    run = run_load(cfg)
    report = build_report(run)
    _check_report(report, keys, models, 12)
    s = report["summary"]
    assert s["output_tokens"] == 12 * 8  # ignore_eos: every request generates max_tokens, reported in usage
    assert all(r.usage_reported for r in run.results)
    if stream:
        assert s["latency"]["ttft"]["count"] == 12 and s["latency"]["itl"]["count"] > 0
        assert all(r.ttft <= r.e2e for r in run.results)
    else:
        assert s["latency"]["ttft"]["count"] == 12 and s["latency"]["e2e"]["count"] == 12  # the whole answer
    assert {m: a["requests"] for m, a in report["per_model"].items()} == {models[0]: 6, models[1]: 6}


def test_live_cli_chat_and_json(live, tenants, tmp_path, capsys):
    (k1, m1), (k2, m2) = tenants
    out = tmp_path / "report.json"
    status = main(["--url", live.url + "/v1", "--key", k1, "--key", k2, "--model", m1, "--model", m2,
                   "--requests", "6", "--concurrency", "3", "--max-tokens", "4", "--chat", "--assign", "random",
                   "--seed", "1", "--temperature", "0", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["url"] == live.url + "/v1" and report["params"]["chat"] and report["started_at"]
    assert len(report["requests"]) == 6
    s = report["summary"]
    assert (s["requests"], s["ok"]) == (6, 6)
    assert k1 not in out.read_text() and k2 not in out.read_text() and k1 not in printed
    assert "throughput" in printed and m1 in printed and m2 in printed
    assert set(report["per_model"]) == {m1, m2}


def test_live_wrong_key_reports_401s(live, tenants):
    _, model = tenants[0]
    cfg = LoadConfig(url=live.url, targets=[Target("sk-wrong-key-000", model)], prompts=[Prompt("hi")],
                     requests=5, concurrency=2, max_tokens=4, retry=3)
    report = build_report(run_load(cfg))
    s = report["summary"]
    assert (s["requests"], s["ok"], s["failed"]) == (5, 0, 5)
    assert s["by_status"] == {"401": 5} and s["retries"] == 0  # a 401 is never retried
    assert s["by_error"] == {"invalid_api_key": 5}
    assert {r["error_type"] for r in report["requests"]} == {"authentication_error"}
    assert s["output_tokens_per_s"] == 0 and s["latency"]["e2e"]["count"] == 0
    assert report["per_model"][model]["failed"] == 5
    assert "sk-wrong-key-000" not in to_json(report)
    assert main(["--url", live.url, "--key", "sk-wrong-key-000", "--model", model, "-n", "2", "-c", "2",
                 "--max-tokens", "2"]) == 1


def test_live_poisson_run_with_zipf_goodput_and_plots(live, tenants, tmp_path, capsys):
    (k1, m1), (k2, m2) = tenants
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    status = main(["--url", live.url, "--key", k1, "--key", k2, "--model", m1, "--model", m2, "--requests", "16",
                   "--concurrency", "4", "--max-tokens", "3", "--ramp", "5:40", "--zipf", "1.2", "--seed", "2",
                   "--goodput", "ttft:60000", "--goodput", "e2e:60000", "--json", str(out), "--plots", str(plots)])
    assert status == 0
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["ok"] == 16 and s["latency"]["ttft"]["count"] == 16
    assert s["goodput"]["requests"] == 16 and s["goodput"]["slo"] == {"ttft": 60.0, "e2e": 60.0}
    rates = [r["offered_rate"] for r in sorted(report["requests"], key=lambda r: r["index"])]
    assert rates[0] == 5.0 and rates[-1] == 40.0
    assert "goodput: 16 requests within ttft 60000 ms, e2e 60000 ms" in capsys.readouterr().out
    from matplotlib import image

    for name in ("latency_cdf.png", "over_time.png", "ttft_vs_rate.png"):
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.imread(png).shape[:2] == (450, 800)
