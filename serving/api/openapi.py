"""What /openapi.json (and /docs) say about each route: its request body, its answers and its errors.

The routes read their bodies themselves (a size limit before parsing, the contract's messages for bad JSON, the
unsupported OpenAI fields refused by name, a multipart stream written to disk as it arrives), so FastAPI cannot
infer the request schemas: `documented(...)` declares them, from the same pydantic models the routes parse with,
and `install` adds those models to the document's components. The errors are the contract's JSON error object.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from registry.names import MAX_NAME_LENGTH, NAME_PATTERN
from registry.upload_formats import FORMATS

# What each status means on this server (the `type` of the error object follows from the status: errors.TYPES).
ERROR_MEANINGS = {
    400: "Invalid request: the message names the field (`param`) at fault.",
    401: "Missing or incorrect API key (`Authorization: Bearer <key>`).",
    403: "The key is valid but of the wrong kind: a tenant key on an admin route, or the admin key on a tenant's.",
    404: "No such model, adapter or tenant -- or one that belongs to another tenant (never told apart).",
    409: "The name is taken.",
    413: "The body is over its size limit.",
    415: "The body is not of the documented content type.",
    429: "This tenant has too many requests in flight; retry after `Retry-After` seconds.",
    503: "Overloaded, draining, or the engine is not running; retry after `Retry-After` seconds.",
    507: "The registry's disk is full; nothing was stored.",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error of every route (OpenAI's error object)."""

    error: ErrorDetail


_BODY_MODELS: dict[str, type[BaseModel]] = {}  # request bodies named by `documented`, added by `install`


def _errors(codes: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    # JSON whatever the route's own media type (/metrics answers text, its errors JSON)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {code: {"model": ErrorResponse, "description": ERROR_MEANINGS[code], "content": content} for code in codes}


KEYS = {
    "tenant": "a tenant's key",
    "admin": "the admin key",
    "tenant or admin": "a tenant's key (its own adapters) or the admin key (any tenant's, named in the body)",
    "admin unless public": "the admin key, unless the server runs with --public-metrics",
    "own or all": "a tenant's key (its own usage) or the admin key (every tenant's)",
}


def documented(
    *,
    key: str | None = None,
    body: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    streams: bool = False,
    multipart: bool = False,
    answers: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Route keyword arguments that document a route: `key` which bearer key it needs (see KEYS; None: public),
    `body` its JSON request body, `errors` the statuses it may answer with besides success, `streams` a
    `text/event-stream` answer when the body asks for `"stream": true`, `multipart` the adapter upload's form,
    `answers` other documented answers ({status: FastAPI's response description})."""
    extra: dict[str, Any] = {"security": [] if key is None else [{"bearer": []}]}
    if key == "admin unless public":
        extra["security"].append({})
    if key is not None:
        errors = tuple(sorted({401, 403, *errors}))
    if body is not None:
        _BODY_MODELS[body.__name__] = body
        ref = {"$ref": f"#/components/schemas/{body.__name__}"}
        extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    if multipart:
        extra["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": UPLOAD_FORM}}}
    responses = _errors(errors)
    if streams:
        responses[200] = {
            "description": "The whole answer as JSON, or with `stream: true` server-sent events: one `data:` line "
            "per chunk (the same object with `choices` of the new text), then `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    responses.update(answers or {})
    description = f"Needs {KEYS[key]}." if key is not None else "Public: no key."
    return {"responses": responses, "openapi_extra": extra, "description": description}


# One server-sent event of a streamed answer (the schema applies to each event).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk as JSON (the answer's object, its choices holding the new text), an error object "
            "if the request fails after its first chunk, or `[DONE]`.",
        }
    },
}

UPLOAD_FORM = {
    "type": "object",
    "required": ["name", "format", "files"],
    "properties": {
        "name": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_NAME_LENGTH,
            "pattern": NAME_PATTERN,
            "description": "The adapter's name: 1-64 of a-z A-Z 0-9 . _ -, no '..', not the base model's id.",
        },
        "format": {"type": "string", "enum": list(FORMATS)},
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "The adapter's files (docs/reference.md, section 4: file formats), each part with its file name.",
        },
    },
}


def _bound_token_ids(node: Any, vocab_size: int | None) -> None:
    """Every token id schema (marked "x-vocabulary" in serving/api/schemas.py) gets the served vocabulary's bound."""
    if isinstance(node, dict):
        if node.pop("x-vocabulary", False) and vocab_size is not None:
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def install(app: FastAPI) -> None:
    """/openapi.json with the request bodies of every `documented` route among its components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"}
            }
            components = schema["components"].setdefault("schemas", {})
            # FastAPI's own 422 for a path parameter it could not convert: every parameter here is a string, and
            # the error handler answers any validation error with the contract's 400 anyway.
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            for name, model in _BODY_MODELS.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for sub, definition in body.pop("$defs", {}).items():
                    components.setdefault(sub, definition)
                components[name] = body
            tokens = getattr(app.state.backend, "tokens", None)
            _bound_token_ids(components, tokens.vocab_size if tokens is not None else None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
