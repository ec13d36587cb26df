"""Usage for billing through a real server: GET /v1/usage equals the sum of the responses' own `usage` (per
tenant, model and period; n > 1 counts its prompt once; streamed requests too), a tenant sees only its own, the
admin all, it survives a restart, `deltaserve usage` prints it, and the opt-in Prometheus tenant label is capped
(the top N tenants by tokens, the rest `other`)."""

from __future__ import annotations

import openai
import pytest

from serving.cli import main as cli_main
from tests.api.conftest import ADMIN_KEY, start_server, stop_server
from tests.api.helpers import upload
from tests.helpers import make_lora, make_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("usage")
    base = make_model_dir(root / "base", arch="llama")
    lora, _ = make_lora(base, root / "lora", r=2, seed=3)
    return root, base, lora


@pytest.fixture(scope="module")
def server(world):
    root, base, lora = world
    srv = start_server(root, base, metrics_top_tenants=1)
    yield srv
    stop_server(srv)


def _sum(usages) -> dict:
    usages = list(usages)
    return {k: sum(getattr(u, k) for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _report(live, key: str, **params) -> dict:
    with live.client(key) as c:
        r = c.get("/v1/usage", params=params)
        assert r.status_code == 200, r.text
        return r.json()


def _per_model(report: dict) -> dict:
    out: dict = {}
    for e in report["data"]:
        got = out.setdefault((e["tenant"], e["model"]), {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                          "total_tokens": 0})  # fmt: skip
        for k in got:
            got[k] += e[k]
    return out


def test_usage_is_what_the_responses_reported_per_tenant_and_model(server, world):
    root, base, lora = world
    acme_key, beta_key = server.new_tenant("acme"), server.new_tenant("beta")
    with server.client(acme_key) as c:
        assert upload(c, "german", "lora", lora).status_code == 201
    acme = openai.OpenAI(base_url=server.url + "/v1", api_key=acme_key)
    beta = openai.OpenAI(base_url=server.url + "/v1", api_key=beta_key)
    base_id = server.backend.model_id
    on_base = [acme.completions.create(model=base_id, prompt="To be or not", max_tokens=5, n=2, temperature=0),
               acme.chat.completions.create(model=base_id, messages=[{"role": "user", "content": "hi"}], max_tokens=3)]
    on_german = [acme.completions.create(model="german", prompt=["The quick", "A journey"], max_tokens=4)]
    streamed = acme.completions.create(model="german", prompt="def main():", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    on_german.append([chunk for chunk in streamed][-1].usage)
    on_german[0] = on_german[0].usage
    on_beta = [beta.completions.create(model=base_id, prompt="Caf\u00e9", max_tokens=7).usage]
    assert on_base[0].usage.prompt_tokens == len(server.backend.generation.engine.tokenizer.encode("To be or not"))  # once for n=2

    mine = _per_model(_report(server, acme_key))
    assert mine == {("acme", base_id): {"requests": 2, **_sum(u.usage for u in on_base)},
                    ("acme", "german"): {"requests": 2, **_sum(on_german)}}  # fmt: skip
    everyone = _report(server, ADMIN_KEY)
    assert _per_model(everyone) == {**mine, ("beta", base_id): {"requests": 1, **_sum(on_beta)}}
    assert everyone["total"]["total_tokens"] == sum(e["total_tokens"] for e in everyone["data"])
    assert _per_model(_report(server, ADMIN_KEY, tenant="beta")) == {("beta", base_id): {"requests": 1, **_sum(on_beta)}}
    assert _per_model(_report(server, acme_key, model="german")) == {("acme", "german"): mine[("acme", "german")]}
    assert _per_model(_report(server, acme_key, model=base_id)) == {("acme", base_id): mine[("acme", base_id)]}
    by_hour = _report(server, acme_key, granularity="hour")
    assert by_hour["granularity"] == "hour" and _per_model(by_hour) == mine
    assert all(e["period_start"] % 3600 == 0 for e in by_hour["data"])
    assert all(e["period_start"] % 86400 == 0 for e in everyone["data"])


def test_a_tenant_never_reads_another_tenants_usage(server):
    key = server.new_tenant("curious")
    assert _report(server, key)["data"] == []
    with server.client(key) as c:
        r = c.get("/v1/usage", params={"tenant": "acme"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        assert r.json()["error"]["param"] == "tenant"
        assert c.get("/v1/usage", params={"tenant": "curious"}).status_code == 200
    with server.client("wrong-key") as c:
        assert c.get("/v1/usage").status_code == 401


@pytest.mark.parametrize(("params", "param", "message"), [
    ({"granularity": "week"}, "granularity", "granularity"),
    ({"frm": "1"}, "frm", "Unrecognized request argument supplied: frm"),
    ({"start": "-5"}, "start", "start"),
    ({"start": "soon"}, "start", "start"),
    ({"start": "100", "end": "100"}, "start", "start must be before end."),
    ({"granularity": "hour", "start": "0", "end": str(32 * 86400)}, "start", "at most 744 periods of one hour"),
    ({"tenant": "no/such"}, "tenant", "tenant"),
])  # fmt: skip
def test_a_bad_query_is_a_400_naming_the_parameter(server, params, param, message):
    with server.client(ADMIN_KEY) as c:
        r = c.get("/v1/usage", params=params)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


def test_the_tenant_label_names_the_top_tenants_and_counts_the_rest_as_other(server):
    heavy, light = server.new_tenant("heavy"), server.new_tenant("light")
    base_id = server.backend.model_id
    for key, tokens in ((heavy, 100), (heavy, 100), (light, 1)):  # heavy: more than any tenant before
        openai.OpenAI(base_url=server.url + "/v1", api_key=key).completions.create(
            model=base_id, prompt="To be", max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True})
    _report(server, ADMIN_KEY)  # a write: the label now goes to the top tenant of the last 24 hours (one: N=1)
    top = server.backend.registry.top_tenants(1, 0)
    assert top == ["heavy"]
    for key in (heavy, light):
        openai.OpenAI(base_url=server.url + "/v1", api_key=key).completions.create(
            model=base_id, prompt="To be", max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    with server.client(ADMIN_KEY) as c:
        text = c.get("/metrics").text
    series = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("deltaserve_tenant_")}  # fmt: skip
    assert series['deltaserve_tenant_tokens_total{kind="completion",tenant="heavy"}'] == 2
    assert series['deltaserve_tenant_requests_total{tenant="heavy"}'] == 1
    assert series['deltaserve_tenant_requests_total{tenant="other"}'] >= 2  # light's, and those before the label
    assert not any('tenant="light"' in name or 'tenant="acme"' in name for name in series)


def test_naming_tenants_in_public_metrics_is_refused():
    from pydantic import ValidationError

    from serving.server import ServerSettings

    with pytest.raises(ValidationError, match="cannot be used with --public-metrics"):
        ServerSettings(metrics_top_tenants=3, public_metrics=True)


def test_usage_survives_a_restart_and_the_cli_prints_it(server, world, capsys, monkeypatch):
    root, base, _ = world
    key = server.new_tenant("restarted")  # usage of its own: the test does not lean on the ones before it
    base_id = openai.OpenAI(base_url=server.url + "/v1", api_key=key).models.list().data[0].id
    openai.OpenAI(base_url=server.url + "/v1", api_key=key).completions.create(
        model=base_id, prompt="To be", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    before = _report(server, ADMIN_KEY)
    assert any(e["tenant"] == "restarted" for e in before["data"])
    stop_server(server)
    again = start_server(root, base)
    try:
        after = _report(again, ADMIN_KEY)
        assert after["data"] == before["data"] and after["total"] == before["total"]
        monkeypatch.delenv("DELTASERVE_API_KEY", raising=False)
        monkeypatch.setenv("DELTASERVE_ADMIN_KEY", ADMIN_KEY)
        assert cli_main(["usage", "--url", again.url, "--by", "hour"]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("INFO:")]  # uvicorn's
        assert lines[0].split() == ["PERIOD", "(UTC)", "TENANT", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"]
        assert lines[-1].split() == ["total", *(str(before["total"][k]) for k in ("requests", "prompt_tokens",
                                                                                 "completion_tokens", "total_tokens"))]  # fmt: skip
        assert any(line.split()[2:4] == ["restarted", base_id] for line in lines[1:-1])  # period: date and hour
        assert cli_main(["usage", "--url", again.url, "--since", "yesterday"]) == 2
        assert "--since 'yesterday'" in capsys.readouterr().err
    finally:
        stop_server(again)
