"""Each newer base family served end to end: a Qwen3 and a Gemma 3 base behind a real server, a LoRA and an
(IA)^3 adapter uploaded over HTTP, the official `openai` client's greedy text equal to plain transformers."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.api.conftest import start_server, stop_server
from tests.api.helpers import upload
from tests.helpers import hf_model, make_ia3, make_lora, make_model_dir, make_tokenizer

PROMPT = "The quick brown fox"
N = 8


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_the_family_is_served_through_the_openai_client(tmp_path, arch) -> None:
    base = make_model_dir(tmp_path / "base", arch=arch)
    lora, lora_merged = make_lora(base, tmp_path / "lora", r=4, seed=1)
    ia3, ia3_merged = make_ia3(base, tmp_path / "ia3", seed=2)
    live = start_server(tmp_path, base)
    try:
        key = live.new_tenant("acme")
        with live.client(key) as c:
            assert upload(c, "mine", "lora", lora).status_code == 201
            assert upload(c, "terse", "ia3", ia3).status_code == 201
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=key)
        ids = make_tokenizer()(PROMPT).input_ids
        for model, reference in ((live.backend.model_id, hf_model(base)), ("mine", lora_merged), ("terse", ia3_merged)):
            with torch.no_grad():
                out = reference.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0,
                                         eos_token_id=2)  # fmt: skip
            want = make_tokenizer().decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
            r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
            assert r.choices[0].text == want, (arch, model)
            chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    finally:
        stop_server(live)
