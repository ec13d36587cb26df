"""vLLM's sampling extensions through the API: stop_token_ids and skip_special_tokens, per request."""

from __future__ import annotations

import openai
import pytest

from serving.api.openai_routes import sampling_for
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
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "stop_token_ids": [3, 4],
                                            "skip_special_tokens": False})  # fmt: skip
    params = sampling_for(req, 4, 0, None)
    assert params.stop_token_ids == [3, 4] and params.skip_special_tokens is False
    default = sampling_for(CompletionRequest.model_validate({"model": "m", "prompt": "x"}), 4, 0, None)
    assert default.stop_token_ids == [] and default.skip_special_tokens is True
