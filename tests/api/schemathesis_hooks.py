"""Schemathesis hooks for tests/api/test_openapi.py (loaded by the `schemathesis` run it starts)."""

import os

import schemathesis


@schemathesis.hook
def map_body(ctx, body):
    """The served model's id in place of a generated one: model ids are per tenant, so the schema cannot list them,
    and with a random id every generated request would stop at 404 before the engine sees its sampling settings.
    Only a value the schema allows is replaced (a negative case's invalid `model` stays invalid)."""
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and 1 <= len(model) <= 256:
        body["model"] = os.environ["DELTASERVE_SCHEMATHESIS_MODEL"]
    return body
