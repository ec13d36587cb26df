"""Bearer keys: the admin key, and tenant keys created by the admin (stored hashed in the registry)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.api.errors import APIError


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return key.strip()


def _incorrect_key() -> APIError:
    return APIError(401, "Incorrect API key.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request) -> None:
    key = _bearer(request)
    registry = request.app.state.backend.registry
    if registry.is_admin(key):
        return
    if registry.authenticate(key) is not None:
        raise APIError(403, "This route needs the admin key.", code="admin_required")
    raise _incorrect_key()


def require_tenant(request: Request):
    key = _bearer(request)
    registry = request.app.state.backend.registry
    tenant = registry.authenticate(key)
    if tenant is not None:
        return tenant
    if registry.is_admin(key):
        raise APIError(403, "This route needs a tenant key; the admin key owns no models.", code="tenant_required")
    raise _incorrect_key()


def tenant_or_admin(request: Request):
    """The caller's tenant, or None for the admin key (routes that serve both)."""
    key = _bearer(request)
    registry = request.app.state.backend.registry
    tenant = registry.authenticate(key)
    if tenant is not None or registry.is_admin(key):
        return tenant
    raise _incorrect_key()


Admin = Annotated[None, Depends(require_admin)]
TenantDep = Annotated[object, Depends(require_tenant)]
TenantOrAdmin = Annotated[object, Depends(tenant_or_admin)]
