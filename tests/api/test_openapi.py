"""/openapi.json and /docs: every route declares its request body, its answers and its errors, and Schemathesis
(`--checks all`) finds nothing against a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from registry.names import NAME_PATTERN, validate_name
from serving.api.schemas import UNSUPPORTED_CHAT_FIELDS, UNSUPPORTED_COMPLETION_FIELDS
from tests.api.conftest import ADMIN_KEY

# Every check runs on every operation (no --checks on the command line: `--checks all` would override the
# per-operation setting below), but one: rules a schema cannot state, so a request the schema allows may still be
# refused (400) by these routes, and Schemathesis' positive_data_acceptance check is off for them alone:
#   - the completion routes: the prompt's tokens plus max_tokens must fit the model's context, which depends on
#     how the tokenizer splits the text; the names in `adapters` must be distinct, and `model` then the base's;
#   - the adapter upload: the files must be an adapter of this base (a PEFT adapter, a 1-bit delta, a fine-tune
#     with the base's tensor names and shapes), which is the content of binary files.
#   - the usage report: `start` must come before `end` and the window span at most a month by the hour (a year
#     by day), relations between two parameters that a schema cannot state.
SCHEMATHESIS_CONFIG = """\
hooks = "tests.api.schemathesis_hooks"
headers = { Authorization = "Bearer ${DELTASERVE_TEST_TENANT_KEY}" }

[[operations]]
include-path-regex = "^/(v1/tenants|metrics|v1/load_lora_adapter)"
headers = { Authorization = "Bearer ${DELTASERVE_TEST_ADMIN_KEY}" }

[[operations]]
include-path-regex = "^/v1/(completions|chat/completions|adapters)$"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "^/v1/usage$"
checks.positive_data_acceptance.enabled = false
"""


ALL_CHECKS = {
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "negative_data_rejection", "positive_data_acceptance", "missing_required_header",
    "unsupported_method", "allow_header_conformance", "use_after_free", "ensure_resource_availability", "ignored_auth",
    "object_level_authorization",
}  # fmt: skip


def _operations(schema: dict):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield path, method.upper(), operation


def test_every_route_documents_its_body_answers_errors_and_key(live):
    with live.client(None) as c:
        schema = c.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    from serving.api.app import create_app
    from serving.api.errors import leaf_routes

    routes = leaf_routes(create_app(live.backend).routes)
    served = {(r.path.replace(":path", ""), m) for r in routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    documented = {(p, m) for p, m, _ in _operations(schema)}
    assert served - {("/docs", "GET"), ("/openapi.json", "GET")} == documented

    for path, method, op in _operations(schema):
        where = f"{method} {path}"
        if method == "POST":
            (content,) = op["requestBody"]["content"].values()
            ref = content["schema"].get("$ref")
            assert ref is None or ref.removeprefix("#/components/schemas/") in components, where
        public = path in ("/version", "/health", "/ready")
        if not public:
            assert {"401", "403"} <= set(op["responses"]) and {"bearer": []} in op["security"], where
        for status, answer in op["responses"].items():
            if status >= "400" and path not in ("/health", "/ready"):
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    paths = schema["paths"]
    assert "text/event-stream" in paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert paths["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == [
        "name", "format", "files"]  # fmt: skip
    # the fields refused unless at their no-op value are documented as exactly those values
    chat = components["ChatCompletionRequest"]["properties"]
    assert chat["best_of"]["anyOf"] == [{"type": "number", "const": 1}, {"type": "null"}]
    penalty = next(s for s in chat["presence_penalty"]["anyOf"] if s["type"] == "number")
    assert (penalty["minimum"], penalty["maximum"]) == (-2, 2)
    assert chat["logit_bias"]["anyOf"][0]["maxProperties"] == 300
    assert chat["echo"]["anyOf"] == [{"type": "boolean", "const": False}, {"type": "null"}]
    vocab = live.backend.tokens.vocab_size
    assert components["DetokenizeRequest"]["properties"]["tokens"]["items"] == {
        "type": "integer", "minimum": 0, "maximum": vocab - 1}  # fmt: skip


def test_docs_serve_the_interactive_reference(live):
    with live.client(None) as c:
        r = c.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "/openapi.json" in r.text


def test_the_allow_header_names_every_method_of_the_path(live):
    with live.client(live.new_tenant("allow")) as c:
        r = c.put("/v1/adapters/x")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["allow"] == "DELETE, GET"  # both routes of the path (Starlette alone names the first)


@pytest.mark.parametrize(
    "name", ["a", "A9", "x.y", "x.", "a-b_c.d", "a..b", ".a", "-a", "a b", "é", "a.-", "a/b", "a" * 64, "a" * 65]
)
def test_the_documented_name_pattern_is_the_rule(name):
    try:
        validate_name("tenant", name)
        valid = True
    except Exception:
        valid = False
    assert valid == (bool(re.fullmatch(NAME_PATTERN.strip("^$"), name)) and len(name) <= 64), name


def test_schemathesis_finds_nothing(live, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    env = {**os.environ, "DELTASERVE_TEST_TENANT_KEY": live.new_tenant("fuzz"), "DELTASERVE_TEST_ADMIN_KEY": ADMIN_KEY,
           "DELTASERVE_SCHEMATHESIS_MODEL": live.backend.model_id, "PYTHONPATH": str(Path(__file__).parents[2])}  # fmt: skip
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{live.url}/openapi.json",
           "--max-examples", "25", "--seed", "1", "--no-shrink", "--report", "ndjson", "--report-dir", str(tmp_path)]  # fmt: skip
    # run in tmp_path: Schemathesis keeps a cache (.schemathesis/) in its working directory
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("*.ndjson")
    ran = set(re.findall(r'"name": ?"([a-z_]+)"', report.read_text()))
    assert ran >= ALL_CHECKS, f"checks that did not run: {ALL_CHECKS - ran}"


@pytest.fixture(scope="module")
def tenant_key(live):
    return live.new_tenant("unsupported")


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/completions", f) for f in UNSUPPORTED_COMPLETION_FIELDS]
    # every field of the completions table is a chat request's field too (both take the same sampling fields)
    + [("/v1/chat/completions", f) for f in {**UNSUPPORTED_COMPLETION_FIELDS, **UNSUPPORTED_CHAT_FIELDS}],
)
def test_an_unsupported_field_is_refused_by_name_unless_at_its_no_op_value(live, tenant_key, path, field):
    body = {"model": live.backend.model_id, "max_tokens": 1}
    body |= {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    with live.client(tenant_key) as c:
        r = c.post(path, json={**body, field: "a value that does something"})
        assert r.status_code == 400, r.text
        assert r.json()["error"] | {"message": None} == {"message": None, "type": "invalid_request_error", "param": field,
                                                            "code": "unsupported_parameter"}  # fmt: skip
        for no_op in {**UNSUPPORTED_COMPLETION_FIELDS, **UNSUPPORTED_CHAT_FIELDS}[field]:
            assert c.post(path, json={**body, field: no_op}).status_code == 200, (field, no_op)
