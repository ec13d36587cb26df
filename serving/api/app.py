"""The FastAPI application: routes, error handlers, per-request metrics. Imports no torch."""

from __future__ import annotations

import time

from fastapi import FastAPI

from serving.api import admin_routes, openai_routes
from serving.api.errors import install_handlers

KNOWN_ROUTES = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tenants", "/v1/adapters", "/metrics", "/health", "/ready",
}


def route_label(path: str) -> str:
    """A bounded label: the route template, never a user-chosen name."""
    if path in KNOWN_ROUTES:
        return path
    for prefix in ("/v1/tenants/", "/v1/adapters/"):
        if path.startswith(prefix):
            return prefix + "{name}"
    return "other"


def create_app(backend, *, public_metrics: bool = False) -> FastAPI:
    """backend: a serving.backend.Backend (or anything with its interface, for tests)."""
    app = FastAPI(title="deltaserve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.state.public_metrics = public_metrics
    install_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)

    app.add_middleware(RequestMetrics, metrics=backend.metrics)
    return app


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
