"""Errors the engine raises for a request, importable without torch (the API maps them to HTTP)."""

from __future__ import annotations

from serving.engine.sampling_params import SamplingParamsError


class PromptTooLong(SamplingParamsError):
    """The prompt plus max_tokens does not fit the context: CONTRACT code context_length_exceeded."""

    code = "context_length_exceeded"


def fit_context(num_prompt: int, max_tokens: int | None, max_model_len: int, prompt_param: str = "prompt",
                tokens_param: str = "max_tokens") -> int:
    """The one rule of the context: the prompt and the tokens to generate fit in max_model_len. Returns the
    max_tokens to use (None: as many as fit); PromptTooLong otherwise, naming `prompt_param` (the request's field
    holding the prompt) when the prompt alone is too long, else `tokens_param` (the field that asked for them)."""
    if num_prompt >= max_model_len:
        raise PromptTooLong(f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{num_prompt}.", prompt_param)  # fmt: skip
    if max_tokens is None:
        return max_model_len - num_prompt
    if num_prompt + max_tokens > max_model_len:
        raise PromptTooLong(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{num_prompt} and {tokens_param} is {max_tokens}.", tokens_param)  # fmt: skip
    return max_tokens


class Overloaded(Exception):
    """Too many requests queued or running: 503 overloaded with Retry-After."""


class EngineDead(Exception):
    """The engine thread stopped on an error."""


class TenantBusy(Exception):
    """One tenant has too many requests in flight: 429 with Retry-After."""

