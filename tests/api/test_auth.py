"""The key checks on their own (no server): the Bearer scheme, admin against tenant keys, the errors' codes,
messages and WWW-Authenticate header. tests/api/test_errors_and_isolation.py checks the same through HTTP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from starlette.requests import Request

from serving.api.auth import _bearer, require_admin, require_tenant, tenant_or_admin
from serving.api.errors import APIError

ADMIN, TENANT_KEY = "admin-key", "tenant-key"
ACME = SimpleNamespace(name="acme")


class FakeRegistry:
    def is_admin(self, key: str) -> bool:
        return key == ADMIN

    def authenticate(self, key: str):
        return ACME if key == TENANT_KEY else None


def request(authorization: str | None) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(backend=SimpleNamespace(registry=FakeRegistry())))
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "headers": headers, "app": app})


def refused(check, authorization: str | None) -> APIError:
    with pytest.raises(APIError) as info:
        check(request(authorization))
    return info.value


@pytest.mark.parametrize("header", [None, "", "Bearer", f"Basic {TENANT_KEY}", f"Token {TENANT_KEY}", TENANT_KEY,
                                    f"Bearer{TENANT_KEY}", "Bearer    "])  # fmt: skip
def test_no_bearer_key_is_a_401_that_says_how_to_send_one(header) -> None:
    e = refused(_bearer, header)
    assert (e.status, e.code) == (401, "invalid_api_key")
    assert e.message == "Missing API key: send `Authorization: Bearer <key>`."
    assert e.headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("header", [f"Bearer {TENANT_KEY}", f"bearer {TENANT_KEY}", f"BEARER   {TENANT_KEY}  "])
def test_the_bearer_scheme_in_any_case_gives_the_key_stripped(header) -> None:
    assert _bearer(request(header)) == TENANT_KEY


def test_admin_routes() -> None:
    assert require_admin(request(f"Bearer {ADMIN}")) is None
    e = refused(require_admin, f"Bearer {TENANT_KEY}")
    assert (e.status, e.code, e.message) == (403, "admin_required", "This route needs the admin key.")
    e = refused(require_admin, "Bearer wrong")
    assert (e.status, e.code, e.message) == (401, "invalid_api_key", "Incorrect API key.")
    assert e.headers == {"WWW-Authenticate": "Bearer"}
    assert refused(require_admin, None).status == 401


def test_tenant_routes() -> None:
    assert require_tenant(request(f"Bearer {TENANT_KEY}")) is ACME
    e = refused(require_tenant, f"Bearer {ADMIN}")
    assert (e.status, e.code) == (403, "tenant_required")
    assert e.message == "This route needs a tenant key; the admin key owns no models."
    e = refused(require_tenant, "Bearer wrong")
    assert (e.status, e.code, e.message) == (401, "invalid_api_key", "Incorrect API key.")
    assert e.headers == {"WWW-Authenticate": "Bearer"}
    assert refused(require_tenant, None).status == 401


def test_routes_for_either_key() -> None:
    """vLLM's load/unload routes: a tenant acts for itself, the admin key (None) for any tenant it names."""
    assert tenant_or_admin(request(f"Bearer {TENANT_KEY}")) is ACME
    assert tenant_or_admin(request(f"Bearer {ADMIN}")) is None
    e = refused(tenant_or_admin, "Bearer wrong")
    assert (e.status, e.code, e.message) == (401, "invalid_api_key", "Incorrect API key.")
    assert e.headers == {"WWW-Authenticate": "Bearer"}
    assert refused(tenant_or_admin, None).status == 401
