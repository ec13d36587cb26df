"""The model routes a vLLM user calls: the model cards (`GET /v1/models`, `GET /v1/models/{id}`), `/tokenize`,
`/detokenize` with the base's tokenizer (the same for every adapter of it), and `/version`.

A model id is the base's or one of the caller's ready adapters; another tenant's adapter is answered as a
missing one (404 model_not_found). Bodies are checked as the completion routes' are (size, JSON, unknown fields).
"""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request

from serving.api.auth import TenantDep
from serving.api.bodies import chat_prompt_ids, check_chars, parse, read_json
from serving.api.errors import APIError
from serving.api.openapi import documented
from serving.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    ModelObject,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, **documented(key="tenant"))
async def list_models(request: Request, tenant: TenantDep):
    return {"object": "list", "data": request.app.state.backend.adapters.list_models(tenant)}


@router.get("/v1/models/{model_id:path}", response_model=ModelObject, **documented(key="tenant", errors=(404,)))
async def retrieve_model(request: Request, tenant: TenantDep, model_id: str):
    return request.app.state.backend.adapters.model_card(tenant, model_id)


@router.post(
    "/tokenize", response_model=TokenizeResponse, **documented(key="tenant", body=TokenizeRequest, errors=(400, 404, 413))
)
async def tokenize(request: Request, tenant: TenantDep):
    req: TokenizeRequest = parse(TokenizeRequest, await read_json(request))
    backend = request.app.state.backend
    backend.adapters.model_card(tenant, req.model)  # the caller's model, or 404
    if req.prompt is not None:
        check_chars(backend, len(req.prompt), "prompt")
        ids = await backend.tokens.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        ids = await chat_prompt_ids(backend, req.messages, req.add_generation_prompt)
    strs = [backend.tokens.token_text(t) for t in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": backend.max_model_len, "tokens": ids, "token_strs": strs}


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    **documented(key="tenant", body=DetokenizeRequest, errors=(400, 404, 413)),
)
async def detokenize(request: Request, tenant: TenantDep):
    req: DetokenizeRequest = parse(DetokenizeRequest, await read_json(request))
    backend = request.app.state.backend
    backend.adapters.model_card(tenant, req.model)
    try:
        return {"prompt": backend.tokens.decode(req.tokens)}
    except ValueError as e:
        raise APIError(400, str(e), param="tokens") from None


def package_version() -> str:
    try:
        return metadata.version("deltaserve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@router.get("/version", response_model=VersionResponse, **documented())
async def version():
    return {"version": package_version()}
