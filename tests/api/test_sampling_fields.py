"""OpenAI's and vLLM's sampling fields through the API, per request: stop_token_ids, skip_special_tokens,
include_stop_str_in_output, min_tokens, logit_bias, the penalties and min_p (their numerics: tests/engine)."""

from __future__ import annotations

import openai
import pytest

from serving.api.sampling import sampling_for
from serving.api.schemas import CompletionRequest


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.new_tenant("sampling"))


def _greedy(client, model, **extra):
    out = client.completions.create(model=model, prompt="To be or not", max_tokens=8, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, **extra})  # fmt: skip
    return out.choices[0]


def test_a_stop_token_id_ends_the_choice_before_it(live, client):
    model = live.backend.model_id
    plain = _greedy(client, model)
    texts = plain.logprobs.tokens
    k = next(i for i in range(1, len(texts)) if texts[i] not in texts[:i])  # a token whose text is new there
    tok = live.backend.tokens  # the ids that render as that text (one, or a few for a byte-level vocabulary)
    ids = [t for t in range(tok.vocab_size) if tok.token_text(t) == texts[k]]
    assert 1 <= len(ids) <= 64
    stopped = _greedy(client, model, stop_token_ids=ids)
    # as vLLM: the stop token is generated (in the tokens and their logprobs), not in the text
    assert stopped.finish_reason == "stop" and stopped.logprobs.tokens == texts[: k + 1]
    assert plain.text.startswith(stopped.text) and len(stopped.text) < len(plain.text)


def test_stop_token_ids_are_checked(live, client):
    model = live.backend.model_id
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        _greedy(client, model, stop_token_ids=[10**9])
    with pytest.raises(openai.BadRequestError):
        _greedy(client, model, stop_token_ids=list(range(65)))


def test_the_request_fields_reach_the_sampling_params():
    req = CompletionRequest.model_validate({
        "model": "m", "prompt": "x", "stop_token_ids": [3, 4], "skip_special_tokens": False,
        "include_stop_str_in_output": True, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
        "logit_bias": {"7": 3, "12": -100.0}, "min_p": 0.1, "min_tokens": 2,
    })  # fmt: skip
    params = sampling_for(req, 4, 0, None)
    assert params.stop_token_ids == [3, 4] and params.skip_special_tokens is False
    assert params.include_stop_str_in_output is True and params.logit_bias == {7: 3.0, 12: -100.0}
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.2)
    assert (params.min_p, params.min_tokens) == (0.1, 2)
    default = sampling_for(CompletionRequest.model_validate({"model": "m", "prompt": "x"}), 4, 0, None)
    assert default.stop_token_ids == [] and default.skip_special_tokens is True
    assert not default.include_stop_str_in_output and not default.changes_logits and default.min_p == 0


def _text(client, model, chat=False, **fields):
    """Greedy text of a fixed prompt; the fields go in the body (extensions through extra_body)."""
    openai_fields = {k: fields.pop(k) for k in ("presence_penalty", "frequency_penalty", "logit_bias") if k in fields}
    if chat:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "To be or not"}],
                                             max_tokens=12, temperature=0, extra_body={"ignore_eos": True, **fields},
                                             **openai_fields)  # fmt: skip
        return out.choices[0].message.content
    out = client.completions.create(model=model, prompt="To be or not", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, **fields}, **openai_fields)  # fmt: skip
    return out.choices[0].text


def test_include_stop_str_in_output_keeps_the_stop_string(live, client):
    model = live.backend.model_id
    plain = _text(client, model)
    stop = plain[3:5]
    assert stop and stop not in plain[:3]
    assert _text(client, model, stop=[stop]) == plain[:3]
    assert _text(client, model, stop=[stop], include_stop_str_in_output=True) == plain[:5]


def test_min_tokens_holds_stop_strings_back(live, client):
    model = live.backend.model_id
    plain = _greedy(client, model).text  # 8 tokens
    at, stop = next((i, c) for i, c in enumerate(plain) if c.isascii() and c.isprintable())
    assert _greedy(client, model, stop=[stop]).text == plain[:at]
    # looked for only from the 8th token on: the first occurrence is in text out before, so it does not end it
    late = _greedy(client, model, stop=[stop], min_tokens=8).text
    assert plain.startswith(late) and len(late) > at


def test_logit_bias_changes_the_greedy_choice(live, client):
    model = live.backend.model_id
    plain = _text(client, model)
    tok = live.backend.tokens
    forced = next(t for t in range(3, tok.vocab_size) if tok.token_text(t).strip() and tok.token_text(t) not in plain)
    for chat in (False, True):
        biased = _text(client, model, chat=chat, logit_bias={str(forced): 100})
        assert biased == tok.token_text(forced) * 12  # +100 on one token: it wins every step
    # the penalties' numerics, per row in mixed batches: tests/engine/test_mixed_batch.py and test_logits_adjustment.py
    assert _text(client, model, min_p=0.5) == plain  # min_p never changes the most likely token


@pytest.mark.parametrize("fields,param", [
    ({"logit_bias": {"x1": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {str(10**9): 1}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": 13}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
])  # fmt: skip
def test_out_of_range_sampling_fields_are_refused_by_name(live, client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        _text(client, live.backend.model_id, **fields)
    assert e.value.body["param"] == param or param in e.value.body["message"]


PENALTIES = [{"presence_penalty": 1.5}, {"frequency_penalty": 1.2}, {"repetition_penalty": 1.8},
             {"presence_penalty": -0.5, "frequency_penalty": 0.7, "repetition_penalty": 1.3}]  # fmt: skip


@pytest.fixture(scope="module")
def lora_tenant(live):
    from tests.api.helpers import upload

    key = live.new_tenant("penalised")
    with live.client(key) as c:
        assert upload(c, "mine", "lora", live.files["lora"]).status_code == 201
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key)


@pytest.mark.parametrize("settings", PENALTIES, ids=lambda s: ",".join(s))
def test_penalties_through_the_client_give_transformers_tokens(live, lora_tenant, settings):
    # The same greedy tokens as transformers' generate() with its RepetitionPenalty processor (and OpenAI's formula
    # for presence/frequency, which transformers lacks) on the tenant's merged model; the base too.
    import torch

    from serving.engine.sampling_params import SamplingParams
    from tests.helpers import hf_model, hf_processors, make_tokenizer

    ids = make_tokenizer()("To be or not to be").input_ids
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, **settings)
    changed = 0
    for model, reference in ((live.backend.model_id, hf_model(live.base_dir)), ("mine", live.files["lora_merged"])):
        openai_fields = {k: v for k, v in settings.items() if k != "repetition_penalty"}
        vllm_fields = {k: v for k, v in settings.items() if k == "repetition_penalty"}
        got = lora_tenant.completions.create(model=model, prompt=ids, max_tokens=16, temperature=0, logprobs=0,
                                             extra_body={"ignore_eos": True, **vllm_fields}, **openai_fields)  # fmt: skip
        with torch.no_grad():
            want = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                                      logits_processor=hf_processors(params, len(ids), set()))[0, len(ids):].tolist()  # fmt: skip
            plain = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        tok = make_tokenizer()
        assert got.choices[0].logprobs.tokens == [tok.decode([t]) for t in want], (model, settings)
        changed += want != plain[0, len(ids):].tolist()
    assert changed  # the settings change the tokens of at least one model (the test could fail)


def test_skip_special_tokens_keeps_or_drops_their_text(live, client):
    model = live.backend.model_id
    eos = 2  # "</s>" in the test tokenizer: a special token, forced by the bias and not ending the choice
    kept = _greedy(client, model, logit_bias={str(eos): 100}, skip_special_tokens=False)
    dropped = _greedy(client, model, logit_bias={str(eos): 100})
    assert kept.text == "</s>" * 8 and dropped.text == ""
    assert kept.logprobs.tokens == dropped.logprobs.tokens == ["</s>"] * 8  # the tokens are the same either way


def test_a_token_without_text_is_still_a_streamed_chunk(live, client):
    # As vLLM streams: one chunk per generated token, its text empty when held back (here skipped special
    # tokens), so a client times tokens by chunks (tests/test_prometheus_live.py compares those with /metrics).
    chunks = list(client.completions.create(model=live.backend.model_id, prompt="To be or not", max_tokens=8,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True, "logit_bias": {"2": 100}}))  # fmt: skip
    tokens = [c for c in chunks if c.choices]
    assert len(tokens) == 8 and all(c.choices[0].text == "" for c in tokens)
    assert tokens[-1].choices[0].finish_reason == "length"
