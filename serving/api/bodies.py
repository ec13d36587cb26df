"""Request bodies and prompts of the JSON routes, checked the same way everywhere: the body's size and JSON, the
pydantic model (unknown fields refused by name), and a prompt's length before it is tokenized."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from serving.api.errors import APIError
from serving.engine.errors import Overloaded

MAX_JSON_BODY = 4 << 20


async def read_json(request: Request) -> Any:
    """The JSON body, with a size limit (413) and a contract-shaped 400 for malformed JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        raise APIError(413, f"Request body is over the {MAX_JSON_BODY}-byte limit.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise APIError(413, f"Request body is over the {MAX_JSON_BODY}-byte limit.")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    except RecursionError:
        raise APIError(400, "The request body nests too deeply.") from None
    try:  # "\ud800" is valid JSON but no valid Unicode: it must not reach the tokenizer
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "The request body contains a lone UTF-16 surrogate: not valid Unicode text.") from None
    except RecursionError:
        raise APIError(400, "The request body nests too deeply.") from None
    return value


def parse(model_cls, body: Any):
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def check_chars(backend, n_chars: int, param: str) -> None:
    """400 context_length_exceeded for a text too long to fit the context however it tokenizes (no tokenizing)."""
    if n_chars > backend.tokens.max_prompt_chars:
        raise APIError(400, f"This model's maximum context length is {backend.max_model_len} tokens; a text of "
                       f"{n_chars} characters cannot fit in it.", param=param, code="context_length_exceeded")  # fmt: skip


async def chat_prompt_ids(backend, messages, add_generation_prompt: bool = True) -> list[int]:
    """Chat messages (schemas.ChatMessage) as the base's chat template renders them, in token ids; 400 for a
    conversation too long to fit or one the template refuses."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    check_chars(backend, sum(len(m["content"]) for m in plain), "messages")
    try:
        return await backend.tokens.chat_prompt(plain, add_generation_prompt=add_generation_prompt)
    except Overloaded:
        raise
    except Exception as e:  # the template refused the conversation (e.g. roles out of order)
        raise APIError(400, f"The chat template could not render these messages: {e}", param="messages") from None
