"""A real Prometheus (Debian's `prometheus` package; scripts/setup.sh installs it as root) scraping a live server
under the project's own load generator: the first burst of 429s and the first refused upload show in
increase(), every dashboard query evaluates, and the latency quantiles Prometheus computes from the buckets are
within 10 % of the load generator's own figures (the dashboard's own p50/p95/p99 queries of TTFT, inter-token and
end-to-end latency); the dashboard's request, token, error-ratio and per-kind counts are the load generator's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.api.app import MODEL_KINDS
from tests.api.conftest import ADMIN_KEY, free_port, start_server, stop_server
from tests.helpers import make_model_dir
from tests.test_deploy import dashboard_targets

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus; setup.sh does it as root)"
)
WINDOW = "10m"  # longer than the whole test: increase() and the quantiles cover every request


def start_prometheus(tmp: Path, target: str) -> tuple[subprocess.Popen, str]:
    (tmp / "admin_key").write_text(ADMIN_KEY + "\n")
    (tmp / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "deltaserve", "static_configs": [{"targets": [target]}],
                            "authorization": {"type": "Bearer", "credentials_file": "admin_key"}}],
    }))  # fmt: skip
    port = free_port()
    with open(tmp / "prometheus.log", "wb") as log:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None and time.time() < deadline, (tmp / "prometheus.log").read_text()[-2000:]
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def scalar(url: str, expr: str) -> float:
    result = query(url, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def over_the_window(expr: str) -> str:
    """A dashboard query over the whole test: its rates as increases over WINDOW, every instance."""
    return re.sub(r"rate\((\w+\{[^}]*\})\[\$__rate_interval\]\)", rf"increase(\1[{WINDOW}])", expr).replace("$instance", ".*")


def wait_for_scrape_of(url: str, expr: str, want: float) -> None:
    deadline = time.time() + 30
    while not (query(url, expr) and scalar(url, expr) >= want):
        assert time.time() < deadline, f"{expr} never reached {want}"
        time.sleep(0.5)


def loadtest(server: str, key: str, model: str, out: Path, requests: int, concurrency: int) -> dict:
    cmd = [sys.executable, "-m", "loadtest", "--url", server, "--key", key, "--model", model, "--requests",
           str(requests), "--concurrency", str(concurrency), "--max-tokens", "6", "--ignore-eos", "--temperature", "0",
           "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_prometheus_sees_what_the_load_generator_saw(tmp_path):
    base = make_model_dir(tmp_path / "base", arch="llama")
    srv = start_server(tmp_path, base, tenant_max_concurrent=2)
    step = srv.backend.generation.engine.step

    def slow_step():  # steps of a real model's length, so that HTTP's own milliseconds are noise beside them
        time.sleep(0.04)
        return step()

    srv.backend.generation.engine.step = slow_step
    proc, prom = start_prometheus(tmp_path, srv.url.removeprefix("http://"))
    try:
        wait_for_scrape_of(prom, "sum(deltaserve_engine_up)", 1)
        key = srv.new_tenant("load")
        model = srv.backend.model_id
        route = 'route="/v1/completions"'
        # 1. steady load within the tenant's limit (2 at once): the latencies to compare
        steady = loadtest(srv.url, key, model, tmp_path / "steady.json", requests=200, concurrency=2)
        assert steady["summary"]["by_status"] == {"200": 200}
        wait_for_scrape_of(prom, f'sum(deltaserve_requests_total{{{route}, status="200"}})', 200)
        # the dashboard's own quantile queries (their rates over the whole test): p50/p95/p99 of TTFT, inter-token
        # and end-to-end latency within 10 % of the load generator's
        targets = dashboard_targets()
        client = steady["summary"]["latency"]  # seconds
        checked = 0
        for title, metric in (("Time to first token", "ttft"), ("Inter-token latency", "itl"),
                              ("Request latency (end to end)", "e2e")):  # fmt: skip
            for _, t in (pt for pt in targets if pt[0] == title):
                q = round(100 * float(re.match(r"histogram_quantile\(([\d.]+),", t["expr"]).group(1)))
                got, want = scalar(prom, over_the_window(t["expr"])), client[metric][f"p{q}"]
                # Inter-token gaps all sit near one 40 ms step, so a few chunks the client read late (two at once:
                # one long gap, one short) move its p99 by more than 10 % of 40 ms; 5 ms of slack covers that.
                slack = 0.005 if metric == "itl" else 0.0
                assert abs(got - want) <= 0.1 * want + slack, f"{metric} p{q}: Prometheus {got:.4f} s, client {want:.4f} s"
                checked += 1
        assert checked == 9

        # 2. a first burst of 429s: 6 at once for a tenant allowed 2; increase() sees it (its series is at 0 from the start)
        burst = loadtest(srv.url, key, model, tmp_path / "burst.json", requests=24, concurrency=6)
        n429 = burst["summary"]["by_status"].get("429", 0)
        assert n429 >= 4, burst["summary"]["by_status"]
        # 3. a first refused upload
        with srv.client(key) as c:
            r = c.post("/v1/adapters", data={"name": "bad", "format": "lora"},
                       files=[("files", ("adapter_config.json", b"{not json", "application/json"))])  # fmt: skip
            assert r.status_code == 400, r.text
        wait_for_scrape_of(prom, f'sum(deltaserve_requests_total{{{route}, status="429"}})', n429)
        wait_for_scrape_of(prom, 'sum(deltaserve_adapter_uploads_total{outcome="refused"})', 1)
        seen429 = scalar(prom, f'sum(increase(deltaserve_requests_total{{{route}, status="429"}}[{WINDOW}]))')
        assert abs(seen429 - n429) <= 0.1 * n429 + 1, (seen429, n429)
        refused = scalar(prom, f'sum(increase(deltaserve_adapter_uploads_total{{outcome="refused"}}[{WINDOW}]))')
        assert 0.9 <= refused <= 1.2, refused

        # every dashboard query evaluates (no error) with the dashboard's variables filled in
        for _, t in targets:
            query(prom, t["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m"))

        # the dashboard's queries on the counters themselves (its rates undone, since increase() extrapolates to
        # the window's edges): the load generator's requests plus the tenant's creation and the upload, never
        # Prometheus's own scrapes; every token the load generator received
        def over_the_test(title: str, which: int = 0) -> list[dict]:
            expr = [t["expr"] for panel, t in targets if panel == title][which]
            counters = re.sub(r"rate\((\w+\{[^}]*\})\[\$__rate_interval\]\)", r"\1", expr)
            assert "rate(" not in counters, counters
            return query(prom, counters.replace("$instance", ".*"))

        def value(title: str, which: int = 0) -> float:
            result = over_the_test(title, which)
            assert len(result) == 1, (title, result)
            return float(result[0]["value"][1])

        statuses = {**burst["summary"]["by_status"]}
        statuses["200"] = statuses.get("200", 0) + steady["summary"]["by_status"]["200"]
        sent = steady["summary"]["requests"] + burst["summary"]["requests"] + 2
        assert value("Requests/s") == sent
        tokens = steady["summary"]["output_tokens"] + burst["summary"]["output_tokens"]
        assert value("Generated tokens/s") == tokens == value("Tokens/s", 1)
        prompt_tokens = steady["summary"]["prompt_tokens"] + burst["summary"]["prompt_tokens"]
        assert prompt_tokens > 0 and value("Tokens/s", 0) == prompt_tokens
        assert value("5xx ratio") == 0
        # the error-ratio panel, line by line: 4xx (the 429s and the refused upload), 5xx, 429, 503
        n4xx = sum(n for status, n in statuses.items() if status.startswith("4")) + 1
        want = [n4xx / sent, 0, n429 / sent, statuses.get("503", 0) / sent]
        got = [value("Error ratio", i) for i in range(4)]
        assert got == pytest.approx(want, rel=1e-9), (got, want)
        by_kind = {r["metric"]["model_kind"]: float(r["value"][1]) for r in over_the_test("Generation requests by model kind")}
        assert set(by_kind) == set(MODEL_KINDS), by_kind  # a series for every kind, none missing
        assert by_kind.pop("base") == steady["summary"]["requests"] + burst["summary"]["requests"]
        assert set(by_kind.values()) == {0.0}, by_kind  # every other kind's at zero
    finally:
        proc.terminate()
        proc.wait(10)
        stop_server(srv)
