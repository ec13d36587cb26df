"""CONTRACT §3: every error, from every route, as OpenAI's JSON error object."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from registry.errors import (
    DeltaError,
    InsufficientStorage,
    InvalidName,
    NameTaken,
    NotFound,
    NotStored,
    UploadTooLarge,
)
from serving.cluster.errors import ReplicaLost
from serving.engine.errors import EngineDead, Overloaded, PromptTooLong, TenantBusy
from serving.engine.sampling_params import SamplingParamsError

log = logging.getLogger("deltaserve.api")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    507: "server_error",
}
RETRY_AFTER_SECONDS = "1"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


def to_api_error(e: BaseException) -> APIError:
    """Maps the typed errors of the engine and the registry onto the contract."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param=e.param, code="context_length_exceeded")
    if isinstance(e, SamplingParamsError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, NotFound):
        return APIError(404, e.message, param=e.param, code="model_not_found" if e.param == "model" else None)
    if isinstance(e, NameTaken):
        return APIError(409, e.message, param=e.param)
    if isinstance(e, NotStored):
        return APIError(409, e.message, param=e.param, code="not_stored")
    if isinstance(e, InvalidName):
        return APIError(400, e.message, param=e.param)
    if isinstance(e, UploadTooLarge):
        return APIError(413, e.message, param=e.param)
    if isinstance(e, InsufficientStorage):
        return APIError(507, e.message, param=e.param, code="insufficient_storage")
    if isinstance(e, DeltaError):
        return APIError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, TenantBusy):
        return APIError(429, str(e), headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(e, Overloaded):
        return APIError(503, f"The server is overloaded: {e}", code="overloaded", headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(e, ReplicaLost):
        return APIError(503, f"{str(e)[:1].upper()}{str(e)[1:]}.", code="replica_lost", headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(e, EngineDead):
        return APIError(503, "The engine is not running.", code="engine_dead")
    log.exception("internal error", exc_info=e)
    return APIError(500, "Internal server error.")


def leaf_routes(routes) -> list:
    """The routes that answer requests, through included routers (FastAPI wraps those; no prefixes here)."""
    leaves = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        leaves += leaf_routes(inner.routes) if inner is not None else [route]
    return leaves


def _methods_of(request: Request) -> set[str]:
    """Every method some route serves at this request's path."""
    methods: set[str] = set()
    for route in leaf_routes(request.app.routes):
        match, _ = route.matches({**request.scope, "method": "GET"})  # any method: the path alone decides
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        param = ".".join(loc) or None
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif kind == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        else:
            message = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request")
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else "error"
        headers = dict(e.headers or {})
        if e.status_code == 404:
            message = f"No route {request.method} {request.url.path}."
        if e.status_code == 405:  # Starlette's Allow names the first route of the path only (GET and DELETE are two)
            headers["Allow"] = ", ".join(sorted(_methods_of(request)))
        return error_response(APIError(e.status_code, message, headers=headers))

    @app.exception_handler(Exception)
    async def _any(request: Request, e: Exception):
        return error_response(to_api_error(e))

    for cls in (PromptTooLong, SamplingParamsError, NotFound, NameTaken, InvalidName, UploadTooLarge, DeltaError,
                TenantBusy, Overloaded, EngineDead, InsufficientStorage, NotStored):
        app.add_exception_handler(cls, lambda request, e: error_response(to_api_error(e)))


def refuse_when_draining(backend) -> None:
    """The one check every route that starts new work makes: a draining server finishes what it has and takes
    nothing new (503, retry shortly; a load balancer sends the retry to another replica)."""
    if backend.draining:
        raise APIError(503, "The server is draining and accepts no new requests.", code="overloaded",
                       headers={"Retry-After": "5"})  # fmt: skip
