"""Compositions over HTTP: the `adapters` extension field names several of the caller's own adapters with weights,
any mix of kinds, on the base; greedy text equals plain transformers on the weighted merge; bad compositions are
clear 400s; another tenant's adapter is never read (404 as a missing one); usage and metrics name what ran."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.api.helpers import upload
from tests.api.test_serving import metric
from tests.helpers import make_tokenizer, weighted_merge

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "To be or not to be?"}]
N = 8
MIX = [{"name": "subject", "weight": 1.0}, {"name": "style", "weight": 0.5}, {"name": "terse", "weight": 0.7}]


@pytest.fixture(scope="module")
def tenant(live):
    key = live.new_tenant("souper")
    with live.client(key) as c:
        for name, fmt, path in (("subject", "lora", live.files["lora"]), ("style", "bitdelta", live.files["bd"]),
                                ("terse", "ia3", live.files["ia3"])):  # fmt: skip
            assert upload(c, name, fmt, path).status_code == 201
    return key


def greedy_text(model, ids: list[int]) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=2)
    return make_tokenizer().decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def test_a_composition_gives_the_weighted_merges_text(live, tenant) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=tenant)
    base_id = live.backend.model_id
    merged = weighted_merge(live.base_dir, [(live.files["lora_merged"], 1.0), (live.files["bd_merged"], 0.5),
                                            (live.files["ia3_merged"], 0.7)])  # fmt: skip
    tok = make_tokenizer()
    want = greedy_text(merged, tok(PROMPT).input_ids)
    assert want != greedy_text(live.files["lora_merged"], tok(PROMPT).input_ids)  # the other parts matter
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"adapters": MIX})
    assert r.choices[0].text == want and r.model == base_id
    chunks = list(client.completions.create(model=base_id, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            extra_body={"adapters": MIX}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    chat_ids = list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    r = client.chat.completions.create(model=base_id, messages=MESSAGES, max_tokens=N, temperature=0,
                                       extra_body={"adapters": MIX})  # fmt: skip
    assert r.choices[0].message.content == greedy_text(merged, chat_ids)
    # the default weight is 1: one part at weight 1 is the adapter itself
    one = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=N, temperature=0,
                                    extra_body={"adapters": [{"name": "subject"}]})  # fmt: skip
    alone = client.completions.create(model="subject", prompt=PROMPT, max_tokens=N, temperature=0)
    assert one.choices[0].text == alone.choices[0].text


@pytest.mark.parametrize(
    "body,param,match",
    [
        ({"model": "subject", "adapters": MIX}, "model", "runs them on the base"),
        ({"adapters": [{"name": "subject"}, {"name": "subject", "weight": 0.5}]}, "adapters", "once"),
        ({"adapters": [{"name": "subject", "weight": 4.5}]}, "adapters", "less than or equal to 4"),
        ({"adapters": [{"name": "subject", "weight": "1"}]}, "adapters", "valid number"),
        ({"adapters": [{"name": "subject", "scale": 1.0}]}, "adapters.0.scale", "Unrecognized request argument"),
        ({"adapters": []}, "adapters", "at least 1"),
        ({"adapters": [{"name": "subject"}] * 5}, "adapters", "at most 4"),
    ],
)
def test_bad_compositions_are_clear_400s(live, tenant, body, param, match) -> None:
    body = {"model": live.backend.model_id, "prompt": PROMPT, "max_tokens": 2, **body}
    with live.client(tenant) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param) and match in err["message"], err


def test_a_composition_never_reads_another_tenants_adapter(live, tenant) -> None:
    other = live.new_tenant("neighbour")
    with live.client(other) as c:
        assert upload(c, "private", "lora", live.files["lora"]).status_code == 201
    body = {"model": live.backend.model_id, "prompt": PROMPT, "max_tokens": 2}
    with live.client(tenant) as c:
        theirs = c.post("/v1/completions", json={**body, "adapters": [{"name": "subject"}, {"name": "private"}]})
        missing = c.post("/v1/completions", json={**body, "adapters": [{"name": "subject"}, {"name": "nothing"}]})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["param"] == "adapters"
    assert theirs.json()["error"]["message"] == missing.json()["error"]["message"].replace("nothing", "private")


def test_usage_and_metrics_name_the_composition(live, tenant) -> None:
    body = {"model": live.backend.model_id, "prompt": PROMPT, "max_tokens": 3, "adapters": MIX[:2]}
    with live.client(tenant) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200
        live.backend.usage.flush()
        report = c.get("/v1/usage").json()
    models = {e["model"]: e for e in report["data"]}
    assert models["subject+style"]["completion_tokens"] >= r.json()["usage"]["completion_tokens"]
    with live.client() as admin:
        text = admin.get("/metrics").text
    assert metric(text, "deltaserve_requests_total", 'model_kind="composed",route="/v1/completions",status="200"') > 0
