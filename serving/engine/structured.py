"""Structured outputs: a request's text held to a JSON schema, any JSON object, a regular expression or a list of
choices, with llguidance (the grammar engine vLLM and SGLang use) computing each step which tokens may come next.

Per sequence one `llguidance.LLMatcher` follows the tokens generated so far. Each step the model runner asks for
the allowed-token bitmask of the rows that have one (`fill_bitmask`, on the host: llguidance's own code, a few
microseconds to a millisecond a row), the sampler sets every other logit to -inf (`serving.engine.sampler.
mask_disallowed`, one device op for the batch), and the engine feeds the chosen token back (`advance`). A
sequence whose grammar is complete ends with finish_reason "stop" (at end-of-sequence, or when nothing more may
follow). Rows without a grammar are untouched.

Compiling a grammar can take long for a large schema, so matchers are compiled once per (tenant, grammar) and
copied per sequence (`LLMatcher.deep_copy`); the cache is per tenant, so no tenant can time whether another
used a schema. llguidance's parser limits bound the work of one step.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from serving.engine.sampling_params import Guide, SamplingParamsError

if TYPE_CHECKING:
    import torch

# JSON as compact as json.dumps(separators=(",", ":")) writes it, but with ", " and ": ": a grammar that allows
# any whitespace lets a weak model pad with spaces until max_tokens (vLLM's guidance backend offers the same
# choice, xgrammar's any_whitespace=False).
JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_PER_TENANT = 32  # compiled grammars kept per tenant
CACHED_TENANTS = 256  # tenants whose grammars are kept (the least recently active one's go first)


def grammar_of(guide: Guide) -> str:
    """The llguidance grammar of a guide (not yet checked: `StructuredOutputs.matcher` compiles it)."""
    import llguidance

    if guide.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if guide.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(guide.spec, overrides=JSON_OPTIONS)
    if guide.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(guide.spec)
    choices = json.loads(guide.spec)  # "choice": a JSON list of strings (SamplingParams checked it)
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


class StructuredOutputs:
    """The tokenizer's view for llguidance, and the compiled grammars of each tenant."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]):
        import llguidance.hf

        # n_vocab: the logits' width (a model's vocabulary is often padded past the tokenizer's), or the tokenizer's
        # when it has added tokens past the model's (the sampler drops the bits past the logits).
        n_vocab = max(vocab_size, len(tokenizer))
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=sorted(eos_token_ids))
        self.vocab_size = n_vocab
        self._compiled: OrderedDict[str, OrderedDict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # the engine thread and the API's precompiling workers

    def matcher(self, guide: Guide, tenant: str) -> Any:
        """A fresh matcher at the start of `guide`'s grammar. Raises SamplingParamsError (naming the request's
        field) when the grammar is invalid."""
        import llguidance

        try:
            grammar = grammar_of(guide)
        except ValueError as e:  # a schema that is not a JSON object
            raise SamplingParamsError(f"{guide.param}: {e}", guide.param) from None
        with self._lock:
            cache = self._compiled.setdefault(tenant, OrderedDict())
            self._compiled.move_to_end(tenant)
            while len(self._compiled) > CACHED_TENANTS:
                self._compiled.popitem(last=False)
            template = cache.get(grammar)
            if template is not None:
                cache.move_to_end(grammar)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if template.is_error():
                raise SamplingParamsError(f"{guide.param}: {_first_line(template.get_error())}", guide.param)
            with self._lock:
                cache[grammar] = template
                while len(cache) > CACHE_PER_TENANT:
                    cache.popitem(last=False)
        return template.deep_copy()

    def fill_bitmask(self, matchers: list[Any]) -> torch.Tensor:
        """[B, ceil(V / 32)] int32 on the host: row i's allowed tokens as bits (token t: bit t % 32 of word t // 32);
        rows without a matcher allow every token."""
        import llguidance.torch
        import torch

        words = -(-self.vocab_size // 32)
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        for i, m in enumerate(matchers):
            if m is not None:
                llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
        return bitmask

    @staticmethod
    def advance(matcher: Any, token: int) -> bool:
        """Feeds the chosen token; True when the grammar is done (nothing more may be generated)."""
        matcher.consume_token(token)
        return matcher.is_stopped() or matcher.is_error()


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0][:500] if error.strip() else "invalid grammar"
