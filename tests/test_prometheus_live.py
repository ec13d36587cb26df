"""A real Prometheus (Debian's `prometheus` package; scripts/setup.sh installs it as root) scraping a live server
under the project's own load generator: the first burst of 429s and the first refused upload show in
increase(), every dashboard query evaluates, and the latency quantiles Prometheus computes from the buckets are
within 10 % of the load generator's own figures; the dashboard's request and token counts are the load generator's."""

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
    step = srv.backend.engine.step

    def slow_step():  # steps of a real model's length, so that HTTP's own milliseconds are noise beside them
        time.sleep(0.04)
        return step()

    srv.backend.engine.step = slow_step
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
        client = steady["summary"]["latency"]  # seconds
        for metric, name in (("ttft", "deltaserve_time_to_first_token_seconds"),
                             ("e2e", "deltaserve_request_latency_seconds")):  # fmt: skip
            for q in (50, 90, 99):
                expr = f"histogram_quantile({q / 100}, sum by (le) (increase({name}_bucket[{WINDOW}])))"
                got, want = scalar(prom, expr), client[metric][f"p{q}"]
                assert abs(got - want) <= 0.1 * want, f"{metric} p{q}: Prometheus {got:.4f} s, client {want:.4f} s"

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
        targets = dashboard_targets()
        for _, t in targets:
            query(prom, t["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m"))

        # the dashboard's queries on the counters themselves (its rates undone, since increase() extrapolates to
        # the window's edges): the load generator's requests plus the tenant's creation and the upload, never
        # Prometheus's own scrapes; every token the load generator received
        def over_the_test(title: str) -> float:
            expr = next(t["expr"] for panel, t in targets if panel == title)
            counters = re.sub(r"rate\((\w+\{[^}]*\})\[\$__rate_interval\]\)", r"\1", expr)
            assert "rate(" not in counters, counters
            return scalar(prom, counters.replace("$instance", ".*"))

        sent = steady["summary"]["requests"] + burst["summary"]["requests"] + 2
        assert over_the_test("Requests/s") == sent
        tokens = steady["summary"]["output_tokens"] + burst["summary"]["output_tokens"]
        assert over_the_test("Generated tokens/s") == tokens
        assert over_the_test("5xx ratio") == 0
    finally:
        proc.terminate()
        proc.wait(10)
        stop_server(srv)
