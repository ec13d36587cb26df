"""Structured outputs through the official `openai` client against a real server on the demo base, with the
demo tenants' fine-tunes uploaded over HTTP: response_format json_schema and json_object (chat and completions),
vLLM's guided_regex and guided_choice; greedy outputs parse and validate. Bad grammars and two at once are 400s
naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from serving.demo import demo_dir, demo_tenants
from tests.api.conftest import start_server, stop_server
from tests.api.helpers import upload

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("structured"), demo_dir() / "base", max_upload_mb=64, max_lora_rank=16,
                       max_model_len=256, kernel_backend="cpu")  # fmt: skip
    key = srv.new_tenant("shop")
    with srv.client(key) as c:
        for t in demo_tenants():
            assert upload(c, t.name, t.kind, t.adapter_path).status_code == 201, t.name
    yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key=key)
    stop_server(srv)


def _models(srv) -> list[str]:
    return [srv.backend.model_id] + [t.name for t in demo_tenants()]


def test_json_schema_in_chat_for_every_tenant(demo):
    srv, client = demo
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for model in _models(srv):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A person, as JSON"}],
                                           max_tokens=60, temperature=0, response_format=fmt)  # fmt: skip
        assert r.choices[0].finish_reason == "stop", (model, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_guided_fields_in_completions_streamed_or_not(demo):
    srv, client = demo
    for model in _models(srv):
        r = client.completions.create(model=model, prompt="Order:", max_tokens=20, temperature=0,
                                      extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{4}"})  # fmt: skip
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
        chunks = client.completions.create(model=model, prompt="Answer:", max_tokens=10, temperature=0, stream=True,
                                           extra_body={"guided_choice": ["positive", "negative"]})  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) in ("positive", "negative")
    r = client.completions.create(model="german", prompt="JSON:", max_tokens=40, temperature=0,
                                  extra_body={"guided_json": PERSON})  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model="italian", prompt="{", max_tokens=120, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    text = r.choices[0].text
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": "[0-9"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.json_schema.name"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, None),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
])  # fmt: skip
def test_a_bad_structured_output_is_a_400_naming_the_field(demo, extra, param):
    srv, client = demo
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=srv.backend.model_id, prompt="x", max_tokens=4, extra_body=extra)
    err = info.value.body
    if param is not None:
        assert err["param"].startswith(param.split(".")[0]), err
    else:
        assert "at most one of response_format, guided_json, guided_regex, guided_choice" in err["message"]


def test_response_format_text_is_free_text(demo):
    srv, client = demo
    plain = client.completions.create(model=srv.backend.model_id, prompt="Hello", max_tokens=8, temperature=0)
    same = client.completions.create(model=srv.backend.model_id, prompt="Hello", max_tokens=8, temperature=0,
                                     extra_body={"response_format": {"type": "text"}})  # fmt: skip
    assert same.choices[0].text == plain.choices[0].text
