"""Completions' `echo`: the prompt before each choice's text, and with `logprobs` the prompt tokens' log-probabilities
(the first null, as OpenAI's), each under its own model — the base's or the tenant's adapter's, as transformers
computes them on the merged fine-tune."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.api.helpers import sse_events, upload
from tests.helpers import hf_model

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tenant(live):
    key = live.new_tenant("echo")
    with live.client(key) as c:
        assert upload(c, "echo-lora", "lora", live.files["lora"]).status_code == 201
    return key


@pytest.fixture(scope="module")
def client(live, tenant):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=tenant)


def _complete(client, model, **kw):
    return client.completions.create(model=model, prompt=kw.pop("prompt", PROMPT), max_tokens=6,
                                     temperature=kw.pop("temperature", 0), extra_body={"ignore_eos": True}, **kw)  # fmt: skip


def test_echo_puts_the_prompt_before_each_choice(live, client):
    model = live.backend.model_id
    plain = _complete(client, model).choices[0].text
    echoed = _complete(client, model, echo=True, n=2, temperature=0.0)
    assert [c.text for c in echoed.choices] == [PROMPT + plain] * 2
    ids = live.backend.tokens.tokenizer.encode(PROMPT, add_special_tokens=False)
    by_ids = _complete(client, model, prompt=ids, echo=True).choices[0].text
    assert by_ids == live.backend.tokens.decode(ids) + plain
    assert _complete(client, model, echo=False).choices[0].text == plain
    assert echoed.usage.prompt_tokens == len(live.backend.tokens.tokenizer.encode(PROMPT))  # counted once


@pytest.mark.parametrize("which", ["base", "echo-lora"])
def test_echoed_prompt_logprobs_are_the_models(live, client, which):
    model = live.backend.model_id if which == "base" else which
    reference = hf_model(live.base_dir) if which == "base" else live.files["lora_merged"]
    out = _complete(client, model, echo=True, logprobs=2).choices[0]
    lp = out.logprobs
    ids = live.backend.tokens.tokenizer.encode(PROMPT)
    P = len(ids)
    assert lp.tokens[:P] == [live.backend.tokens.token_text(t) for t in ids] and len(lp.tokens) == P + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)  # [P, V]
    for j in range(1, P):
        assert abs(lp.token_logprobs[j] - want[j - 1, ids[j]].item()) < 1e-4, f"prompt token {j}"
        top = want[j - 1].topk(2)
        # keyed by token text, as OpenAI's (two tokens of one text, such as byte pieces, share a key)
        texts = [live.backend.tokens.token_text(t) for t in top.indices.tolist()]
        expected = dict(zip(texts, top.values.tolist()))  # the later of two entries of one text, as a dict keeps
        assert lp.top_logprobs[j] == pytest.approx(expected, abs=1e-4)
    plain = _complete(client, model, logprobs=2).choices[0].logprobs
    assert lp.tokens[P:] == plain.tokens and lp.token_logprobs[P:] == plain.token_logprobs
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))


def test_a_streamed_echo_sends_the_prompt_first(live, tenant, client):
    model = live.backend.model_id
    whole = _complete(client, model, echo=True, logprobs=1).choices[0]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "echo": True,
            "logprobs": 1, "stream": True}  # fmt: skip
    with live.client(tenant) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [e for e in sse_events(r) if e != "[DONE]"]
    choices = [e["choices"][0] for e in events]
    assert choices[0]["text"].startswith(PROMPT) and choices[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in choices) == whole.text
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


def test_chat_refuses_echo(live, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.backend.model_id, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={"echo": True})  # fmt: skip
    assert e.value.body["param"] == "echo" and e.value.body["code"] == "unsupported_parameter"
