"""The official `openai` client against the live server: completions and chat, streamed and not, on the base
and on a LoRA, an (IA)^3 and a 1-bit adapter uploaded over HTTP in the same test. Greedy text equals plain transformers
on the merged fine-tune and `deltaserve generate`."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from serving.cli import main as cli_main
from tests.api.helpers import upload
from tests.helpers import hf_model, make_tokenizer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be or not to be?"}]
N = 8


def reference(model, ids: list[int]) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=2)
    return make_tokenizer().decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def tenant(live):
    key = live.new_tenant("openai-user")
    with live.client(key) as c:
        r = upload(c, "my-lora", "lora", live.files["lora"])
        assert r.status_code == 201, r.text
        r = upload(c, "my-ia3", "ia3", live.files["ia3"])
        assert r.status_code == 201 and r.json()["format"] == "ia3", r.text
        r = upload(c, "my-bitdelta", "bitdelta", live.files["bd"])
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "ready" and r.json()["version"] == 1
    return key


def test_openai_client_matches_transformers(live, tenant, capsys):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=tenant)
    base_id = live.backend.model_id
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_id, "my-lora", "my-ia3", "my-bitdelta"}
    assert models["my-lora"].parent == base_id
    tok = make_tokenizer()
    chat_ids = list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    references = {base_id: hf_model(live.base_dir), "my-lora": live.files["lora_merged"],
                  "my-ia3": live.files["ia3_merged"], "my-bitdelta": live.files["bd_merged"]}  # fmt: skip
    adapters = {base_id: None, "my-lora": live.files["lora"], "my-ia3": live.files["ia3"], "my-bitdelta": live.files["bd"]}
    for model, merged in references.items():
        want = reference(merged, tok(PROMPT).input_ids)
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
        assert r.choices[0].text == want, model
        assert r.usage.prompt_tokens == len(tok(PROMPT).input_ids) and r.usage.completion_tokens <= N
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        # the same as `deltaserve generate` on the same files
        argv = ["generate", "--model", str(live.base_dir), "--prompt", PROMPT, "--max-tokens", str(N), "--temperature",
                "0", "--json", "--device", "cpu", "--dtype", "float32", "--max-lora-rank", "8", "--max-model-len", "128"]
        if adapters[model]:
            argv += ["--adapter", str(adapters[model])]
        assert cli_main(argv) == 0
        assert json.loads(capsys.readouterr().out)["text"] == want

        want_chat = reference(merged, chat_ids)
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == want_chat and r.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sampling_fields(live, tenant):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=tenant)
    r = client.completions.create(model="my-lora", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=3, n=3, logprobs=2,
                                  top_p=0.9, extra_body={"top_k": 50})
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.completions.create(model="my-lora", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=3, n=3,
                                      logprobs=2, top_p=0.9, extra_body={"top_k": 50})
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices}) == 3  # and each choice its own draw (seeded outputs: never flaky)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="my-bitdelta", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3, user="u1")
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    # a stop string: the text ends before it
    full = client.completions.create(model="my-lora", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    if len(full) > 4 and full[2:4].strip():
        cut = client.completions.create(model="my-lora", prompt=PROMPT, max_tokens=12, temperature=0, stop=[full[2:4]])
        assert cut.choices[0].finish_reason == "stop" and full.startswith(cut.choices[0].text)
        assert full[2:4] not in cut.choices[0].text
