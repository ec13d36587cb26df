"""Errors the engine raises for a request, importable without torch (the API maps them to HTTP)."""

from __future__ import annotations

from serving.engine.sampling_params import SamplingParamsError


class PromptTooLong(SamplingParamsError):
    """The prompt plus max_tokens does not fit the context: CONTRACT code context_length_exceeded."""

    code = "context_length_exceeded"


class Overloaded(Exception):
    """Too many requests queued or running: 503 overloaded with Retry-After."""


class EngineDead(Exception):
    """The engine thread stopped on an error."""


class TenantBusy(Exception):
    """One tenant has too many requests in flight: 429 with Retry-After."""
