"""Per-request sampling parameters, checked once at the boundary.

The API layer maps the OpenAI fields (CONTRACT.md §2 "Sampling fields honoured") onto :class:`SamplingParams`;
the engine trusts a validated instance. Out-of-range values raise :class:`SamplingParamsError`, whose ``param``
names the offending field so the API can answer ``400`` naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from numbers import Real

MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64  # each generated token is looked up in them: a bound keeps one request from slowing the step
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100], as OpenAI's
MAX_LOGIT_BIAS_ENTRIES = 300  # written into the logits every step: a bound keeps one request from slowing it
SEED_LIMIT = 2**63  # seeds live in [0, 2**63)
GUIDE_KINDS = ("json_object", "json_schema", "regex", "choice")
MAX_GUIDE_CHARS = 64 * 1024  # a schema, a pattern or the choices, as text: compiled once, but bounded
MAX_CHOICES = 256


@dataclass(frozen=True)
class Guide:
    """Structured output (serving.engine.structured): what the generated text must be.

    kind: "json_object" (any JSON object), "json_schema" (`spec`: the schema as JSON text), "regex" (`spec`: the
    pattern, matched by the whole text) or "choice" (`spec`: a JSON list of strings, one of which is the text).
    param: the request field it came from, named by errors (e.g. "response_format", "guided_regex").
    """

    kind: str
    spec: str = ""
    param: str = "response_format"

    def validate(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise SamplingParamsError(f"unknown structured output kind {self.kind!r}", self.param)
        if not isinstance(self.spec, str) or len(self.spec) > MAX_GUIDE_CHARS:
            raise SamplingParamsError(f"{self.param} is longer than {MAX_GUIDE_CHARS} characters", self.param)
        if self.kind == "choice":
            try:
                choices = json.loads(self.spec)
            except ValueError:
                choices = None
            if not (isinstance(choices, list) and 1 <= len(choices) <= MAX_CHOICES
                    and all(isinstance(c, str) and c for c in choices)):  # fmt: skip
                raise SamplingParamsError(f"{self.param} must be 1 to {MAX_CHOICES} non-empty strings", self.param)


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type.

    Attributes:
        param: the name of the offending field (e.g. ``"top_p"``), as the API reports it.
    """

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # pickled as it was made (a cluster's replicas raise it to the ingress through Ray)
        return type(self), (str(self), self.param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _finite_in(value: object, lo: float, hi: float) -> bool:
    """A finite real number (not a bool) in [lo, hi]."""
    return _is_real(value) and math.isfinite(value) and lo <= value <= hi


def _int_in(value: object, lo: int, hi: int) -> bool:
    """An integer (not a bool) in [lo, hi]."""
    return _is_int(value) and lo <= value <= hi


def _is_token_id(value: object, vocab_size: int | None) -> bool:
    return _is_int(value) and value >= 0 and (vocab_size is None or value < vocab_size)


def _token_bound(vocab_size: int | None) -> str:
    return f"[0, {vocab_size})" if vocab_size is not None else ">= 0"


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(message, param)


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Fields:
        max_tokens: most tokens to generate (>= 1).
        temperature: in [0, 2]; 0 = greedy (argmax of the raw logits).
        top_p: nucleus mass in (0, 1]; 1 = off.
        top_k: keep the k most likely tokens; 0 or -1 = off.
        seed: in [0, 2**63) or None. A seeded request draws its randomness from its own generator, so its
            tokens do not depend on the rest of the batch.
        stop: up to 4 non-empty strings; generation stops before the first one that appears in the output,
            which is never emitted.
        stop_token_ids: token ids that end generation (the token itself is not part of the text).
        ignore_eos: keep generating past the end-of-sequence token (until ``max_tokens`` or a stop).
        logprobs: None = no log-probabilities; k in [0, 20] = the chosen token's logprob plus the top k
            alternatives (under the model's raw distribution).
        skip_special_tokens: leave special tokens out of the detokenized text.
        include_stop_str_in_output: a matched stop string ends the text instead of being cut off.
        prompt_logprobs: None, or k in [0, 20]: the log-probability of every prompt token after the first under
            the model's (raw) distribution at the position before it, with the top k alternatives there.
        presence_penalty: in [-2, 2]; subtracted from the logit of every token generated at least once.
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time it was generated.
        repetition_penalty: > 0, 1 = off; the logits of tokens in the prompt or the output are divided by it when
            positive, multiplied when negative (as transformers' RepetitionPenaltyLogitsProcessor).
        logit_bias: token id -> a number in [-100, 100] added to its logit (at most 300 entries).
        min_p: in [0, 1]; tokens less likely than ``min_p`` times the most likely one are dropped (after top-k and
            top-p, as transformers' MinPLogitsWarper); 0 = off.
        min_tokens: generate at least this many tokens (<= max_tokens): until then the end-of-sequence token
            (unless ``ignore_eos``) and ``stop_token_ids`` cannot be drawn, and stop strings are not looked for.
        guide: structured output (:class:`Guide`): only tokens that keep the text within it can be drawn; None =
            free text.

    Penalties, bias and the min_tokens mask change the logits that greedy and sampled rows choose from; reported
    log-probabilities stay those of the raw logits. Construction normalises containers (``stop`` may be given as
    one string) and validates everything that does not need the vocabulary; call :meth:`validate` with
    ``vocab_size`` to check token ids too.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    guide: Guide | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self.logit_bias = {} if self.logit_bias is None else dict(self.logit_bias)
        self.validate()
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            setattr(self, name, float(getattr(self, name)))
        self.logit_bias = {tid: float(b) for tid, b in self.logit_bias.items()}

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises :class:`SamplingParamsError` for the first out-of-range field (in the order of the fields).

        Args:
            vocab_size: when given, every ``stop_token_ids`` entry and ``logit_bias`` key must lie in
                ``[0, vocab_size)``.
        """
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                 f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")  # fmt: skip
        _require(_finite_in(self.temperature, 0, MAX_TEMPERATURE), "temperature",
                 f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")  # fmt: skip
        _require(_finite_in(self.top_p, 0, 1) and self.top_p > 0, "top_p",
                 f"top_p must be a number in (0, 1], got {self.top_p!r}")  # fmt: skip
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k",
                 f"top_k must be an integer >= 1, or 0 / -1 for no limit, got {self.top_k!r}")  # fmt: skip
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT), "seed",
                 f"seed must be an integer in [0, 2**63), got {self.seed!r}")  # fmt: skip
        self._validate_stops(vocab_size)
        _require(self.logprobs is None or _int_in(self.logprobs, 0, MAX_LOGPROBS), "logprobs",
                 f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")  # fmt: skip
        self._validate_logit_changes(vocab_size)
        _require(_finite_in(self.min_p, 0, 1), "min_p", f"min_p must be a number in [0, 1], got {self.min_p!r}")
        _require(_int_in(self.min_tokens, 0, self.max_tokens), "min_tokens",
                 f"min_tokens must be an integer in [0, max_tokens = {self.max_tokens}], got {self.min_tokens!r}")  # fmt: skip
        _require(self.prompt_logprobs is None or _int_in(self.prompt_logprobs, 0, MAX_LOGPROBS), "prompt_logprobs",
                 f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")  # fmt: skip
        if self.guide is not None:
            self.guide.validate()
            # a grammar may end before min_tokens: then no token would be left to draw
            _require(not self.min_tokens, "min_tokens", "min_tokens cannot be combined with structured outputs")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            _require(isinstance(value, bool), name, f"{name} must be a boolean, got {value!r}")

    def _validate_stops(self, vocab_size: int | None) -> None:
        _require(len(self.stop) <= MAX_STOP_STRINGS, "stop",
                 f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")  # fmt: skip
        for s in self.stop:
            _require(isinstance(s, str) and bool(s), "stop", f"stop strings must be non-empty strings, got {s!r}")
        _require(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
                 f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}")  # fmt: skip
        for tid in self.stop_token_ids:
            _require(_is_token_id(tid, vocab_size), "stop_token_ids",
                     f"stop_token_ids entries must be integers {_token_bound(vocab_size)}, got {tid!r}")  # fmt: skip

    def _validate_logit_changes(self, vocab_size: int | None) -> None:
        """The penalties and the bias: what changes a row's logits before it chooses."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _require(_finite_in(v, -MAX_PENALTY, MAX_PENALTY), name,
                     f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")  # fmt: skip
        rp = self.repetition_penalty
        _require(_finite_in(rp, 0, math.inf) and rp > 0, "repetition_penalty",
                 f"repetition_penalty must be a finite number > 0, got {rp!r}")  # fmt: skip
        _require(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias",
                 f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries, got {len(self.logit_bias)}")  # fmt: skip
        for tid, bias in self.logit_bias.items():
            _require(_is_token_id(tid, vocab_size), "logit_bias",
                     f"logit_bias keys must be token ids {_token_bound(vocab_size)}, got {tid!r}")  # fmt: skip
            _require(_finite_in(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS), "logit_bias",
                     f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}")  # fmt: skip

    @property
    def changes_logits(self) -> bool:
        """True when a penalty, a bias or min_tokens may change this row's logits before it chooses."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
            or self.min_tokens
        )  # fmt: skip

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0): no randomness, seed irrelevant."""
        return self.temperature == 0

    @property
    def effective_top_k(self) -> int:
        """top_k with both "off" spellings (0 and -1) mapped to 0."""
        return max(self.top_k, 0)
