"""Request bodies of the OpenAI-style routes, checked at the boundary.

Unknown fields are refused (400 naming them). Known OpenAI fields that deltaserve does not implement are
refused by name when set to anything but their no-op default — never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from registry.catalog import STATUSES
from registry.upload_formats import FORMATS
from serving.api.errors import APIError
from serving.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS

MAX_N = 16
MAX_PROMPTS = 32  # prompts in one completions request

# field -> its no-op values (anything else is refused)
UNSUPPORTED_COMPLETION_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
}
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "web_search_options": (None,),
}


def refuse_unsupported(body: Any, table: dict[str, tuple[Any, ...]]) -> None:
    if not isinstance(body, dict):
        return
    for field, allowed in table.items():
        if field in body and body[field] not in allowed:
            raise APIError(400, f"`{field}` is not supported by this server.", param=field, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = False  # extension (as in vLLM): keep generating past the end-of-sequence token

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    # fields of the unsupported tables, accepted here only at their no-op values (checked before parsing)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

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
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # accepted at their no-op values only (see UNSUPPORTED_CHAT_FIELDS)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict | None = None
    modalities: list | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: str | None = None
    web_search_options: Any = None


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)


class AdapterObject(BaseModel):
    """The contract's adapter object (CONTRACT §2) plus size_bytes and rank: what the adapter routes answer.
    Never the tenant or the blob (a registry record has both)."""

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

    @classmethod
    def of(cls, record: Any) -> dict[str, Any]:
        """The JSON object of a registry.catalog.AdapterRecord."""
        return cls.model_validate({f: getattr(record, f) for f in cls.model_fields}).model_dump()


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

    model_config = ConfigDict(extra="forbid")
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
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    tokens: list[int] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
