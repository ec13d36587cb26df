"""The FastAPI application: routes, error handlers, per-request metrics. Imports no torch."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import FastAPI

from serving.api import admin_routes, lora_routes, model_routes, openai_routes, openapi, usage_routes
from serving.api.errors import error_body, install_handlers
from serving.api.model_routes import package_version

KNOWN_ROUTES = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tenants", "/v1/adapters", "/metrics", "/health", "/ready",
    "/tokenize", "/detokenize", "/version", "/docs", "/openapi.json", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/v1/usage",
}
DESCRIPTION = (
    "Many tenants' fine-tunes of one base model, served as OpenAI's API (completions, chat completions, models) "
    "plus the tenant and adapter routes. Every error is OpenAI's error object. See docs/reference.md."
)


def route_label(path: str) -> str:
    """A bounded label: the route template, never a user-chosen name."""
    if path in KNOWN_ROUTES:
        return path
    for prefix in ("/v1/tenants/", "/v1/adapters/"):
        if path.startswith(prefix):
            return prefix + "{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


def create_app(backend, *, public_metrics: bool = False, local_adapter_dir: Path | None = None) -> FastAPI:
    """backend: a serving.backend.Backend (or anything with its interface, for tests). local_adapter_dir: the
    folder POST /v1/load_lora_adapter may read (None: loading by path is off)."""
    app = FastAPI(title="deltaserve", version=package_version(), description=DESCRIPTION, docs_url="/docs", redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None)  # fmt: skip
    app.state.backend = backend
    app.state.public_metrics = public_metrics
    app.state.local_adapter_dir = local_adapter_dir
    install_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(model_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(lora_routes.router)
    app.include_router(usage_routes.router)
    openapi.install(app)
    zero_request_series(app, backend.metrics)

    app.add_middleware(RequestMetrics, metrics=backend.metrics)
    app.add_middleware(RefuseAmbiguousFraming)
    return app


GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")  # the routes that set a model_kind
MODEL_KINDS = ("base", "lora", "ia3", "bitdelta", "composed", "none")  # "none": refused before the model was resolved


def zero_request_series(app: FastAPI, metrics) -> None:
    """Every (route, status, model_kind) a route documents is a series at 0 from the start. rate() and increase()
    need two samples of a series: without this, the first burst of each status after a restart (the first 429s,
    the first 503s) would read as nothing. Statuses: the route's success, its documented errors, 500, and for the
    generation routes 499 (the client went away)."""
    for path, operations in app.openapi()["paths"].items():  # what each route documents it answers
        statuses = {"500", *(code for op in operations.values() for code in op.get("responses", {}) if code.isdigit())}
        kinds = MODEL_KINDS if path in GENERATION_ROUTES else ("none",)
        if path in GENERATION_ROUTES:
            statuses.add("499")
        for status in statuses:
            for kind in kinds:
                metrics.requests.labels(route_label(path), status, kind)


class RefuseAmbiguousFraming:
    """A request with both Content-Length and Transfer-Encoding has two possible ends: a proxy in front may take
    one and this server the other, and the bytes between become a request of their own ("request smuggling").
    Such a request is refused with 400 and the connection is closed, so nothing after it is ever served."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            names = {k.lower() for k, _ in scope.get("headers", [])}
            if b"content-length" in names and b"transfer-encoding" in names:
                body = json.dumps(error_body(400, "A request may not carry both Content-Length and Transfer-Encoding."))
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Pure ASGI middleware (streams and disconnects pass through untouched): counts requests by route,
    status and model kind, and stamps each request's arrival time for the latency histograms."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["arrival"], state["model_kind"] = time.perf_counter(), "none"
        status = {"code": 500}

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.requests.labels(route_label(scope["path"]), str(status["code"]), state["model_kind"]).inc()
