"""The routes a vLLM user calls besides completions: model cards, /tokenize, /detokenize, /version, and
--served-model-name; through a live server and the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import start_server, stop_server
from tests.api.helpers import upload
from tests.helpers import make_lora, make_model_dir


def test_models_retrieve_and_cards(live):
    key = live.new_tenant("cards")
    other = live.new_tenant("cards-other")
    with live.client(key) as c:
        assert upload(c, "mine", "lora", live.files["lora"]).status_code == 201
    with live.client(other) as c:
        assert upload(c, "theirs", "lora", live.files["lora"]).status_code == 201
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=key)
    base_id = live.backend.model_id
    base = client.models.retrieve(base_id)
    assert base.id == base_id and base.owned_by == "deltaserve"
    assert base.model_extra["root"] == base_id and base.model_extra["parent"] is None
    assert base.model_extra["max_model_len"] == live.backend.max_model_len == 128
    mine = client.models.retrieve("mine")
    record = live.backend.registry.resolve("cards", "mine")
    assert mine.owned_by == "cards" and mine.model_extra["parent"] == base_id
    assert mine.model_extra["root"] == f"sha256:{record.sha256}" and mine.created == record.created
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {base_id, "mine"} and listed["mine"].model_extra == mine.model_extra
    for missing in ("theirs", "nope"):  # another tenant's adapter is a missing one
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(missing)
        assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with live.client(None) as c:
        assert c.get(f"/v1/models/{base_id}").status_code == 401


def test_tokenize_and_detokenize_use_the_base_tokenizer(live):
    key = live.new_tenant("tok")
    tok = live.backend.tokens.tokenizer
    with live.client(key) as c:
        assert upload(c, "ad", "lora", live.files["lora"]).status_code == 201
        for model in (live.backend.model_id, "ad"):
            r = c.post("/tokenize", json={"model": model, "prompt": "To be or not"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["tokens"] == tok.encode("To be or not") and body["count"] == len(body["tokens"])
            assert body["max_model_len"] == 128 and body["token_strs"] is None
            r = c.post("/detokenize", json={"model": model, "tokens": body["tokens"]})
            assert r.json() == {"prompt": tok.decode(body["tokens"])}
        plain = c.post("/tokenize", json={"model": "ad", "prompt": "To be", "add_special_tokens": False,
                                          "return_token_strs": True}).json()  # fmt: skip
        assert plain["tokens"] == tok.encode("To be", add_special_tokens=False)
        assert plain["token_strs"] == [tok.decode([t]) for t in plain["tokens"]]
        messages = [{"role": "user", "content": "hi"}]
        for opened in (True, False):
            r = c.post("/tokenize", json={"model": "ad", "messages": messages, "add_generation_prompt": opened})
            expected = tok.apply_chat_template(messages, add_generation_prompt=opened, tokenize=True, return_dict=False)
            assert r.json()["tokens"] == list(expected)
        assert r.json()["tokens"] != c.post("/tokenize", json={"model": "ad", "messages": messages}).json()["tokens"]


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": "BASE"}, 400, None),  # neither prompt nor messages
        ("/tokenize", {"model": "BASE", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, None),
        ("/tokenize", {"model": "BASE", "prompt": "x", "bogus": 1}, 400, "bogus"),
        ("/detokenize", {"model": "BASE", "tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"model": "BASE", "tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ],
)
def test_bad_tokenize_requests_get_contract_errors(live, path, body, status, param):
    key = live.new_tenant(f"badtok-{abs(hash((path, str(body)))) % 10**8}")
    body = {k: (live.backend.model_id if v == "BASE" else v) for k, v in body.items()}
    with live.client(key) as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


def test_tokenize_needs_a_tenant_key(live):
    with live.client(None) as c:
        assert c.post("/tokenize", json={"model": "m", "prompt": "x"}).status_code == 401
    with live.client() as c:  # the admin key is not a tenant's
        assert c.post("/detokenize", json={"model": "m", "tokens": [1]}).status_code in (401, 403)


def test_version_is_public_and_the_package_version(live):
    from importlib import metadata

    r = httpx.get(live.url + "/version", timeout=10)
    assert r.status_code == 200 and r.json() == {"version": metadata.version("deltaserve")}


def test_served_model_name_is_the_base_id(tmp_path):
    base = make_model_dir(tmp_path / "base", arch="llama")
    srv = start_server(tmp_path, base, served_model_name="acme/base-7b")
    try:
        with srv.client() as admin:
            key = admin.post("/v1/tenants", json={"name": "acme"}).json()["api_key"]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key)
        assert [m.id for m in client.models.list().data] == ["acme/base-7b"]
        assert client.models.retrieve("acme/base-7b").model_extra["root"] == "acme/base-7b"
        lora, _ = make_lora(base, tmp_path / "lora", r=2, seed=3)
        with srv.client(key) as c:
            assert upload(c, "tuned", "lora", lora).status_code == 201
        assert client.models.retrieve("tuned").model_extra["parent"] == "acme/base-7b"
        out = client.completions.create(model="acme/base-7b", prompt="To be", max_tokens=2, temperature=0)
        assert out.model == "acme/base-7b" and out.usage.completion_tokens == 2
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=base.name, prompt="To be", max_tokens=2)  # the folder's name is not it
    finally:
        stop_server(srv)


def test_a_served_model_name_with_spaces_is_refused():
    from pydantic import ValidationError

    from serving.server import ServerSettings

    with pytest.raises(ValidationError):
        ServerSettings(served_model_name="has space")
