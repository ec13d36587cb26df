"""Structured outputs in the engine: each guided row of a mixed batch (the demo's base and its four tenants'
fine-tunes, 1-bit and LoRA) generates text its grammar accepts — a JSON schema, a regex, a choice — while the
unguided rows' tokens stay exactly those of the same requests without any guided neighbour; the bitmask is
applied as llguidance lays it out."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from registry.loading import load_delta
from serving.demo import demo_dir, demo_tenants
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampler import mask_disallowed
from serving.engine.sampling_params import Guide, SamplingParams, SamplingParamsError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "lang": {"enum": ["de", "es", "it", "en"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "lang", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,5}"
CHOICES = ["yes", "no", "perhaps"]


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_model_dir(demo_dir() / "base", EngineConfig(device="cpu", dtype="float32", max_model_len=256,
                                                                      kernel_backend="cpu", max_lora_rank=16))  # fmt: skip


@pytest.fixture(scope="module")
def deltas(engine):
    return [None] + [load_delta(t.adapter_path, engine.spec, 16) for t in demo_tenants()]


def _guides():
    return [Guide("json_schema", json.dumps(PERSON)), Guide("regex", REGEX, "guided_regex"),
            Guide("choice", json.dumps(CHOICES), "guided_choice")]  # fmt: skip


def _check(guide: Guide, text: str) -> None:
    if guide.kind == "json_schema":
        jsonschema.validate(json.loads(text), PERSON)
    elif guide.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


def test_every_tenants_guided_rows_follow_their_grammar_beside_free_rows(engine, deltas):
    prompts = ["Write a person as JSON:", "Der Hund", "El perro", "Il cane", "The order number is"]
    free = SamplingParams(max_tokens=24, temperature=0.0)
    requests, guided = [], []
    for i, delta in enumerate(deltas):
        requests.append((prompts[i], free, delta))
        for g in _guides():
            guided.append((len(requests), g))
            requests.append((prompts[i], SamplingParams(max_tokens=80, temperature=0.0, guide=g), delta))
    sampled = (prompts[0], SamplingParams(max_tokens=80, temperature=1.0, seed=7, guide=_guides()[0]), deltas[1])
    out = engine.generate([*requests, sampled])
    for i, g in guided:
        assert out[i].finish_reason == "stop", (i, out[i].text)
        _check(g, out[i].text)
    _check(_guides()[0], out[-1].text)  # a sampled row too
    # free rows: the same tokens as without any guided row in the batch
    alone = engine.generate([r for i, r in enumerate(requests) if r[1] is free])
    assert [c.token_ids for c in alone] == [out[i].token_ids for i, r in enumerate(requests) if r[1] is free]
    # the grammar changes what the tenants write (the test could fail)
    assert sum(out[i].text != out[i - 1 - (i - 1) % 4].text for i, _ in guided) >= len(guided) // 2


def test_json_object_and_the_end_of_a_grammar(engine):
    out = engine.generate([("Write a person as JSON:", SamplingParams(max_tokens=200, temperature=0.0,
                                                                       guide=Guide("json_object")), None)])  # fmt: skip
    assert out[0].text.startswith("{")
    if out[0].finish_reason == "stop":
        assert isinstance(json.loads(out[0].text), dict)
    else:  # cut at max_tokens inside a string: a prefix of an object
        assert out[0].finish_reason == "length" and len(out[0].token_ids) == 200
    # a choice ends the sequence as soon as it is complete, ignore_eos or not
    done = engine.generate([("x", SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True,
                                                  guide=Guide("choice", json.dumps(["ok"]))), None)])  # fmt: skip
    assert done[0].text == "ok" and done[0].finish_reason == "stop"


@pytest.mark.parametrize(("guide", "param", "message"), [
    (Guide("regex", "[0-9", "guided_regex"), "guided_regex", "invalid regex"),
    (Guide("json_schema", json.dumps({"type": "objectx"})), "response_format", "objectx"),
    (Guide("json_schema", "[1, 2]", "guided_json"), "guided_json", ""),
    (Guide("choice", json.dumps([]), "guided_choice"), "guided_choice", "1 to 256 non-empty strings"),
    (Guide("choice", "not json", "guided_choice"), "guided_choice", "1 to 256 non-empty strings"),
    (Guide("yaml", "", "response_format"), "response_format", "unknown structured output kind"),
])  # fmt: skip
def test_a_bad_grammar_is_refused_naming_its_field(engine, guide, param, message):
    with pytest.raises(SamplingParamsError, match=re.escape(message)) as info:
        engine.add_request("bad", "x", SamplingParams(max_tokens=4, guide=guide), None)
    assert info.value.param == param
    assert not engine.has_unfinished()


def test_min_tokens_with_a_grammar_is_refused():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=8, min_tokens=2, guide=Guide("json_object"))
    assert info.value.param == "min_tokens"


def test_mask_disallowed_reads_llguidance_bit_layout() -> None:
    V = 70
    allowed = torch.zeros(2, 3, dtype=torch.int32)
    allowed[0, 0] = 1 << 5  # token 5
    allowed[0, 2] = 1 << 3  # token 67
    allowed[1, 1] = -(1 << 31)  # bit 31 of word 1 (the sign bit): token 63
    allowed[1, 0] = -1  # tokens 0..31
    logits = torch.randn(2, V)
    masked = mask_disallowed(logits, allowed)
    keep = torch.zeros(2, V, dtype=torch.bool)
    keep[0, [5, 67]] = True
    keep[1, list(range(32)) + [63]] = True
    assert torch.equal(masked[keep], logits[keep]) and bool((masked[~keep] == float("-inf")).all())
    assert torch.equal(mask_disallowed(logits, torch.full((2, 3), -1, dtype=torch.int32)), logits)


def test_compiled_grammars_are_kept_per_tenant_most_recently_used_first(engine, monkeypatch):
    import llguidance

    from serving.engine import structured

    monkeypatch.setattr(structured, "CACHE_PER_TENANT", 2)
    so = structured.StructuredOutputs(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    compiled: list[str] = []
    real = llguidance.LLMatcher

    def counting(tokenizer, grammar, **kwargs):
        compiled.append(grammar)
        return real(tokenizer, grammar, **kwargs)

    counting.grammar_from_regex = real.grammar_from_regex  # what grammar_of calls
    monkeypatch.setattr(llguidance, "LLMatcher", counting)
    a, b, c = (Guide("regex", p, "guided_regex") for p in ("a+", "b+", "c+"))
    for tenant, guide in (("t", a), ("t", b), ("t", a), ("t", c), ("t", a), ("u", a)):
        so.matcher(guide, tenant)
    # t: a, b compiled; a again a hit (now the newest); c evicts b, not a; a is still there; u compiles its own
    assert [structured.grammar_of(g) for g in (a, b, c, a)] == compiled
    monkeypatch.setattr(structured, "CACHED_TENANTS", 2)
    so.matcher(a, "v")  # a third tenant: t's grammars (the least recently active) go
    so.matcher(a, "u")
    so.matcher(a, "t")
    assert len(compiled) == 6 and list(so._compiled) == ["u", "t"]


def test_a_tokenizer_llguidance_cannot_read_leaves_everything_else_served(monkeypatch):
    from serving.engine import structured

    def unreadable(*args, **kwargs):
        raise ValueError("no such vocabulary")

    monkeypatch.setattr(structured.StructuredOutputs, "__init__", unreadable)
    engine = LLMEngine.from_model_dir(demo_dir() / "base", EngineConfig(device="cpu", dtype="float32",
                                                                        max_model_len=64))  # fmt: skip
    assert engine.generate([("Hello", SamplingParams(max_tokens=3, temperature=0.0), None)])[0].token_ids
    with pytest.raises(SamplingParamsError, match=r"not available with this model's tokenizer \(no such") as info:
        engine.add_request("g", "x", SamplingParams(max_tokens=3, guide=Guide("json_object")), None)
    assert info.value.param == "response_format"


def test_a_grammar_error_is_reported_by_its_first_line_or_a_generic_message():
    from serving.engine.structured import _first_line

    assert _first_line("  bad token at 3\nmore detail\n") == "bad token at 3"
    assert _first_line("x" * 900) == "x" * 500  # bounded: the message goes back to the client
    assert _first_line(" \n ") == "invalid grammar"  # llguidance gave no text: still a message, not an IndexError
