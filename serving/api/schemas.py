"""Request bodies of the OpenAI-style routes, checked at the boundary.

Unknown fields are refused (400 naming them). Known OpenAI fields that deltaserve does not implement are
refused by name when set to anything but their no-op default — never silently ignored. Types are strict: a JSON
`true` is no number and `1.5` no integer, as the documented schemas (/openapi.json) say. The answers' models are
here too: they are what /openapi.json documents the routes to return. Over 400 lines: one concept, every shape
the API documents, kept together so that one module says what the wire format is.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from registry.catalog import STATUSES
from registry.names import MAX_NAME_LENGTH, NAME_PATTERN
from registry.recipe import Recipe
from registry.upload_formats import FORMATS
from serving.api.errors import APIError
from serving.engine.sampling_params import (
    MAX_CHOICES,
    MAX_GUIDE_CHARS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

MAX_N = 16
MAX_PROMPTS = 32  # prompts in one completions request

# field -> its no-op values (anything else is refused). The sampling fields are refused the same way by both routes.
UNSUPPORTED_SAMPLING_FIELDS: dict[str, tuple[Any, ...]] = {
    "best_of": (1, None),
    "suffix": (None, ""),
}
UNSUPPORTED_COMPLETION_FIELDS = UNSUPPORTED_SAMPLING_FIELDS
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    **UNSUPPORTED_SAMPLING_FIELDS,
    "echo": (False, None),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "web_search_options": (None,),
}


def _no_op_only(field: str) -> WithJsonSchema:
    """The documented schema of an unsupported field: exactly its no-op values (refuse_unsupported's rule)."""
    allowed = UNSUPPORTED_CHAT_FIELDS[field]
    values: list[Any] = []
    for v in allowed:
        if v is None:
            values.append({"type": "null"})
        elif isinstance(v, bool):
            values.append({"type": "boolean", "const": v})
        elif isinstance(v, int | float):
            if {"type": "number", "const": v} not in values:  # 0 and 0.0: one JSON number
                values.append({"type": "number", "const": v})
        elif v == {}:
            values.append({"type": "object", "maxProperties": 0})
        elif v == []:
            values.append({"type": "array", "maxItems": 0})
        else:
            values.append({"const": v})
    return WithJsonSchema({"anyOf": values, "description": "Not supported: accepted only at its no-op value."})


def refuse_unsupported(body: Any, table: dict[str, tuple[Any, ...]]) -> None:
    if not isinstance(body, dict):
        return
    for field, allowed in table.items():
        if field in body and body[field] not in allowed:
            raise APIError(400, f"`{field}` is not supported by this server.", param=field, code="unsupported_parameter")


# The documented forms of fields whose rules the validators below (and the routes) apply with their own messages.
# A token id's maximum is the served vocabulary's: serving/api/openapi.py fills it in where "x-vocabulary" is.
_TOKEN_ID = {"type": "integer", "minimum": 0, "x-vocabulary": True}
_TEXT = {"type": "string", "minLength": 1}
STOP_SCHEMA = WithJsonSchema({"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": MAX_STOP_STRINGS},
                                        {"type": "null"}]})  # fmt: skip
PROMPT_SCHEMA = WithJsonSchema({"anyOf": [
    _TEXT,
    {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_PROMPTS},
    {"type": "array", "items": _TOKEN_ID, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": _TOKEN_ID, "minItems": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
]})  # fmt: skip
MAX_DETOKENIZE_IDS = 1 << 20
TOKEN_IDS_SCHEMA = WithJsonSchema({"type": "array", "items": _TOKEN_ID, "maxItems": MAX_DETOKENIZE_IDS})
LOGIT_BIAS_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "object", "maxProperties": MAX_LOGIT_BIAS_ENTRIES, "propertyNames": {"pattern": "^[0-9]{1,10}$"},
     "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS},
     "description": "token id (a decimal string, below the vocabulary size) -> bias added to its logit"},
    {"type": "null"},
]})  # fmt: skip
STOP_TOKEN_IDS_SCHEMA = WithJsonSchema({"anyOf": [{"type": "array", "items": _TOKEN_ID, "maxItems": MAX_STOP_TOKEN_IDS},
                                                  {"type": "null"}]})  # fmt: skip
# A tenant's or adapter's name: checked by registry.names.validate_name (its messages), documented as a pattern.
Name = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME_LENGTH),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH, "pattern": NAME_PATTERN}),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema the text must follow (`strict` is accepted: the output
    always follows the schema)."""

    model_config = ConfigDict(extra="forbid", strict=True, serialize_by_alias=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


MAX_COMPOSED_ADAPTERS = 4
MAX_ADAPTER_WEIGHT = 4.0


class AdapterPart(BaseModel):
    """One of the caller's adapters in a composition, with its weight in the weighted merge."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name
    weight: float = Field(default=1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT, allow_inf_nan=False)


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]
GUIDE_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, STOP_SCHEMA] = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = False  # extension (as in vLLM): keep generating past the end-of-sequence token
    # extensions as in vLLM: token ids that end the choice (finish_reason "stop"), special tokens in the text
    stop_token_ids: Annotated[list[int] | None, STOP_TOKEN_IDS_SCHEMA] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # extension (vLLM): a matched stop string ends the text
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: Annotated[dict[str, float] | None, LOGIT_BIAS_SCHEMA] = None
    # extensions as in vLLM (semantics: serving/engine/sampling_params.py)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0)
    # structured outputs (serving/engine/structured.py), at most one: OpenAI's response_format, vLLM's guided_*
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, min_length=1, max_length=MAX_GUIDE_CHARS)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1,
                                                                              max_length=MAX_CHOICES)  # fmt: skip
    # extension: a composition of the caller's own adapters, served as their weighted merge W_base + sum w (W_k -
    # W_base) (model soups; a subject and a style), any mix of kinds; `model` is then the base's id
    adapters: list[AdapterPart] | None = Field(
        default=None, min_length=1, max_length=MAX_COMPOSED_ADAPTERS,
        description="the caller's adapters to apply together, each with its weight (names distinct); `model` must "
                    "name the base")  # fmt: skip

    @field_validator("adapters")
    @classmethod
    def _distinct_adapters(cls, v):
        names = [p.name for p in v or ()]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may appear once in `adapters`")
        return v

    @model_validator(mode="after")
    def _one_structured_output(self):
        given = [f for f in GUIDE_FIELDS if getattr(self, f) is not None and getattr(self, f) != TextFormat(type="text")]
        if len(given) > 1:
            raise ValueError(f"at most one of {', '.join(GUIDE_FIELDS)}, got {' and '.join(given)}")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries")
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys must be token ids written in decimal, got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must lie in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        return v

    # fields of the unsupported tables, accepted here only at their no-op values (checked before parsing)
    best_of: Annotated[int | None, _no_op_only("best_of")] = None
    suffix: Annotated[str | None, _no_op_only("suffix")] = None


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], PROMPT_SCHEMA]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # the prompt's text before each choice's; with logprobs, its tokens' too (the first has null ones)
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    # top_logprobs needs logprobs: true (the route's check), as a schema
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        },
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # accepted at their no-op values only (see UNSUPPORTED_CHAT_FIELDS)
    echo: Annotated[bool | None, _no_op_only("echo")] = None
    tools: Annotated[list | None, _no_op_only("tools")] = None
    tool_choice: Annotated[Any, _no_op_only("tool_choice")] = None
    functions: Annotated[list | None, _no_op_only("functions")] = None
    function_call: Annotated[Any, _no_op_only("function_call")] = None
    parallel_tool_calls: Annotated[Any, _no_op_only("parallel_tool_calls")] = None
    store: Annotated[bool | None, _no_op_only("store")] = None
    metadata: Annotated[dict | None, _no_op_only("metadata")] = None
    modalities: Annotated[list | None, _no_op_only("modalities")] = None
    audio: Annotated[Any, _no_op_only("audio")] = None
    prediction: Annotated[Any, _no_op_only("prediction")] = None
    reasoning_effort: Annotated[Any, _no_op_only("reasoning_effort")] = None
    service_tier: Annotated[str | None, _no_op_only("service_tier")] = None
    web_search_options: Annotated[Any, _no_op_only("web_search_options")] = None


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name


SCALE_MODES = ("per-matrix", "per-row")  # registry.compress.SCALE_MODES (this module imports no torch)
MAX_DISTILL_STEPS = 10_000
DEFAULT_DISTILL_STEPS = 200  # with calibration text and no distill_steps (registry.distill.DistillConfig's default)
MAX_CALIBRATION_BYTES = 1 << 20
MIN_CALIBRATION_CHARS = 200  # a fifth of it is held out to measure fidelity: a few dozen tokens at least


class Recompress(BaseModel):
    """How to compress a fine-tune again from its kept upload (also the upload's own form fields `scale`,
    `distill_steps` and its `calibration` file part)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    scale: Literal[SCALE_MODES] = Field("per-matrix", description="one scale per matrix, or one per output row")
    distill_steps: Annotated[int, Field(ge=0, le=MAX_DISTILL_STEPS)] | None = Field(
        None, description=f"scale-distillation steps on the calibration text (needs it; default: "
        f"{DEFAULT_DISTILL_STEPS} with calibration text, else 0)")  # fmt: skip
    calibration_text: Annotated[str, Field(min_length=MIN_CALIBRATION_CHARS, max_length=MAX_CALIBRATION_BYTES)] | None = Field(
        None, description="text of the tenant's domain: its first 80 % distils the scales, the rest (held out) "
        "measures the version's fidelity")  # fmt: skip

    def recipe(self) -> Recipe:
        """The registry's Recipe of these settings; APIError 400 for distillation without calibration text."""
        if self.distill_steps and self.calibration_text is None:
            raise APIError(400, "distill_steps needs calibration text to distil on.", param="calibration_text")
        steps = self.distill_steps
        if steps is None:
            steps = DEFAULT_DISTILL_STEPS if self.calibration_text is not None else 0
        return Recipe(self.scale, steps, self.calibration_text)


class Fidelity(BaseModel):
    """How close a fine-tune's 1-bit version comes to the fine-tune, on held-out calibration text (the
    definitions of `deltaserve eval`: gain kept = (loss_base - loss_1bit) / (loss_base - loss_finetune))."""

    gain_kept: float | None
    top1_agreement: float
    perplexity: float
    finetune_perplexity: float
    base_perplexity: float
    held_out_tokens: int
    scale: Literal[SCALE_MODES]
    distill_steps: int


class AdapterObject(BaseModel):
    """The contract's adapter object (CONTRACT §2) plus size_bytes, rank and source_bytes: what the adapter routes
    answer. Never the tenant or the blobs (a registry record has them). source_bytes: a full fine-tune's upload as
    stored losslessly for `GET /v1/adapters/{name}/download` (null for the other formats, or when not kept).
    fidelity: a fine-tune version compressed with calibration text: how close it comes (else null)."""

    id: str
    name: str
    format: Literal[FORMATS]
    version: int
    sha256: str | None
    status: Literal[STATUSES]
    progress: float
    error: str | None
    created: int
    size_bytes: int | None
    rank: int | None
    source_bytes: int | None
    fidelity: Fidelity | None

    @classmethod
    def of(cls, record: Any) -> dict[str, Any]:
        """The JSON object of a registry.catalog.AdapterRecord."""
        fields = {f: getattr(record, f) for f in cls.model_fields if f != "fidelity"}
        fidelity = json.loads(record.fidelity) if record.fidelity else None
        return cls.model_validate({**fields, "fidelity": fidelity}).model_dump()


class ModelObject(BaseModel):
    """A model a tenant may name (vLLM's model card): the base (`parent` null, `root` its name) or one of the
    tenant's ready adapters (`parent` the base id, `root` "sha256:" + the content of the version served)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered with the base's chat template."""

    # "exactly one of prompt and messages" (the validator below), as a schema: each branch needs its field non-null
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )
    model: str = Field(min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    add_special_tokens: bool = True  # prompt only: the tokenizer's BOS and the like
    add_generation_prompt: bool = True  # messages only: open the assistant's turn
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=256)
    tokens: Annotated[list[int], Field(max_length=MAX_DETOKENIZE_IDS), TOKEN_IDS_SCHEMA]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


# ---- answers (what the routes return; /openapi.json documents them) -----------------------------------------
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TenantObject(BaseModel):
    name: str
    created: int


class TenantCreated(TenantObject):
    api_key: str  # shown once: the registry keeps only its hash


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantObject]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]


class Status(BaseModel):
    status: Literal["ok", "starting", "draining", "dead"]


# ---- usage (GET /v1/usage) ----------------------------------------------------------------------------------
# The longest window one report covers, in periods of its granularity (a month by the hour, over a year by day).
MAX_USAGE_PERIODS = {"hour": 24 * 31, "day": 400}
DEFAULT_USAGE_PERIODS = {"hour": 48, "day": 31}


class UsageQuery(BaseModel):
    """GET /v1/usage's query. The window [start, end) in unix seconds (default: up to now, the last 48 hours by
    the hour or 31 days by day); periods are UTC hours or days, each counting the requests that ended in it."""

    model_config = ConfigDict(extra="forbid")  # query values come as text: "3600" is read as 3600

    granularity: Literal["hour", "day"] = Field("day", description="periods of one hour or one day (UTC)")
    start: int | None = Field(None, ge=0, le=1 << 40, description="unix seconds (default: see above)")
    end: int | None = Field(None, ge=0, le=1 << 40, description="unix seconds, not included (default: now)")
    model: str | None = Field(
        None, min_length=1, max_length=256, description="only this model: an adapter's name, or the base's id"
    )
    tenant: str | None = Field(
        None, pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH, description="only this tenant (admin key only)"
    )


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageEntry(UsageTotals):
    tenant: str  # a deleted tenant's usage is kept as "<name>#deleted-<unix seconds>" (admin reports only)
    model: str  # the adapter's name, or the base's id
    period_start: int  # unix seconds, UTC


class UsageReport(BaseModel):
    object: Literal["list"] = "list"
    granularity: Literal["hour", "day"]
    start: int
    end: int
    data: list[UsageEntry]
    total: UsageTotals
