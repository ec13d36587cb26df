"""Tenant isolation, authentication, and bad inputs answered per CONTRACT §3 — then the server still works."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch

from tests.api.helpers import upload
from tests.helpers import staged_files

ROUTES_TENANT = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                 ("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/v1/adapters/x"), ("DELETE", "/v1/adapters/x")]
ROUTES_ADMIN = [("POST", "/v1/tenants"), ("GET", "/v1/tenants"), ("DELETE", "/v1/tenants/x"), ("GET", "/metrics")]


def assert_error(r, status: int, type_: str, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["type"] == type_ and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text
    return err


@pytest.fixture(scope="module")
def tenants(live):
    a, b = live.new_tenant("alice"), live.new_tenant("bob")
    with live.client(a) as c:
        assert upload(c, "secret-lora", "lora", live.files["lora"]).status_code == 201
    return a, b


def test_authentication(live, tenants):
    a, _ = tenants
    for method, path in ROUTES_TENANT + ROUTES_ADMIN:
        with live.client(None) as c:
            assert_error(c.request(method, path), 401, "authentication_error")
        with live.client("ds-wrong-key") as c:
            assert_error(c.request(method, path), 401, "authentication_error")
    for method, path in ROUTES_ADMIN:  # a tenant key on admin routes
        with live.client(a) as c:
            assert_error(c.request(method, path), 403, "permission_error")
    with live.client(None) as c:  # a valid key under any scheme but Bearer (or none) is no key
        for header in (f"Basic {a}", f"Token {a}", a, f"Bearer{a}", "Bearer"):
            r = c.get("/v1/models", headers={"Authorization": header})
            assert_error(r, 401, "authentication_error", code="invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": f"bearer  {a}"}).status_code == 200  # case-insensitive
    with live.client(None) as c:  # public
        assert c.get("/health").json() == {"status": "ok"} and c.get("/ready").json() == {"status": "ok"}


def test_isolation_same_404_as_missing(live, tenants):
    a, b = tenants
    with live.client(b) as c:
        mine_missing = c.get("/v1/adapters/no-such-adapter")
        theirs = c.get("/v1/adapters/secret-lora")
        assert_error(theirs, 404, "not_found_error")
        assert theirs.json()["error"] == {**mine_missing.json()["error"], "message": theirs.json()["error"]["message"]}
        assert "secret-lora" not in json.dumps(c.get("/v1/models").json())
        assert "secret-lora" not in json.dumps(c.get("/v1/adapters").json())
        for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions",
                                                                  {"messages": [{"role": "user", "content": "hi"}]})):
            r1 = c.post(path, json={"model": "secret-lora", "max_tokens": 2, **body})
            r2 = c.post(path, json={"model": "no-such-adapter", "max_tokens": 2, **body})
            e1 = assert_error(r1, 404, "not_found_error", code="model_not_found", param="model")
            e2 = assert_error(r2, 404, "not_found_error", code="model_not_found", param="model")
            assert e1["message"].replace("secret-lora", "X") == e2["message"].replace("no-such-adapter", "X")
        assert_error(c.delete("/v1/adapters/secret-lora"), 404, "not_found_error")
    with live.client(a) as c:  # still there for its owner
        assert c.get("/v1/adapters/secret-lora").json()["status"] == "ready"


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_bad_inputs(live, tenants, tmp_path):
    a, _ = tenants
    base = live.backend.model_id
    long_prompt = list(range(3, 3 + live.backend.max_model_len))
    nan_file = tmp_path / "nan.safetensors"
    good = live.files["bd"].read_bytes()
    cases = [
        # (description, method, path, kwargs, status, type, code, param)
        ("malformed JSON", "POST", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None, "invalid_request_error"),
        ("body not an object", "POST", "/v1/completions", {"json": [1, 2]}, 400, None, "invalid_request_error"),
        ("missing model", "POST", "/v1/completions", {"json": {"prompt": "hi"}}, 400, "model", "invalid_request_error"),
        ("missing prompt", "POST", "/v1/completions", {"json": {"model": base}}, 400, "prompt", "invalid_request_error"),
        ("prompt wrong type", "POST", "/v1/completions", {"json": {"model": base, "prompt": {"a": 1}}}, 400, None, "invalid_request_error"),
        ("max_tokens wrong type", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "max_tokens": "lots"}}, 400, "max_tokens", "invalid_request_error"),
        ("temperature out of range", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "temperature": 5}}, 400, "temperature", "invalid_request_error"),
        ("top_p out of range", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "top_p": 0}}, 400, "top_p", "invalid_request_error"),
        ("negative max_tokens", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "max_tokens": -1}}, 400, "max_tokens", "invalid_request_error"),
        ("huge max_tokens", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "max_tokens": 10**9}}, 400, "max_tokens", "invalid_request_error"),
        ("huge n", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "n": 10000}}, 400, "n", "invalid_request_error"),
        ("logprobs too many", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "logprobs": 99}}, 400, "logprobs", "invalid_request_error"),
        ("too many stops", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "stop": list("abcde")}}, 400, "stop", "invalid_request_error"),
        ("prompt too long", "POST", "/v1/completions", {"json": {"model": base, "prompt": long_prompt}}, 400, "prompt", "invalid_request_error"),
        ("unsupported field", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "best_of": 3}}, 400, "best_of", "invalid_request_error"),
        ("unknown field", "POST", "/v1/completions", {"json": {"model": base, "prompt": "hi", "frobnicate": 1}}, 400, "frobnicate", "invalid_request_error"),
        ("chat tools unsupported", "POST", "/v1/chat/completions", {"json": {"model": base, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}}, 400, "tools", "invalid_request_error"),
        ("chat bad role", "POST", "/v1/chat/completions", {"json": {"model": base, "messages": [{"role": "wizard", "content": "hi"}]}}, 400, None, "invalid_request_error"),
        ("chat empty messages", "POST", "/v1/chat/completions", {"json": {"model": base, "messages": []}}, 400, "messages", "invalid_request_error"),
        ("chat image part", "POST", "/v1/chat/completions", {"json": {"model": base, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}}, 400, None, "invalid_request_error"),
        ("unknown model", "POST", "/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}, 404, "model", "not_found_error"),
        ("unknown route", "GET", "/v1/nothing-here", {}, 404, None, "not_found_error"),
        ("tenant name with slash", "POST", "/v1/tenants", {"json": {"name": "a/b"}, "admin": True}, 400, "name", "invalid_request_error"),
        ("tenant name dotdot", "POST", "/v1/tenants", {"json": {"name": ".."}, "admin": True}, 400, "name", "invalid_request_error"),
        ("tenant exists", "POST", "/v1/tenants", {"json": {"name": "alice"}, "admin": True}, 409, None, "conflict_error"),
        ("pickle upload", "UPLOAD", "bitdelta", {"name": "evil", "files": [("model.safetensors", b"\x80\x04\x95" + b"\0" * 100)]}, 400, None, "invalid_request_error"),
        (".bin upload", "UPLOAD", "lora", {"name": "evil2", "files": [("adapter_model.bin", b"\x80\x04" + b"\0" * 10)]}, 400, None, "invalid_request_error"),
        ("adapter name with ..", "UPLOAD", "bitdelta", {"name": "../escape", "files": [("d.safetensors", good)]}, 400, "name", "invalid_request_error"),
        ("file name with slash", "UPLOAD", "bitdelta", {"name": "ok", "files": [("../../d.safetensors", good)]}, 400, None, "invalid_request_error"),
        ("truncated safetensors", "UPLOAD", "bitdelta", {"name": "trunc", "files": [("d.safetensors", good[: len(good) // 2])]}, 400, None, "invalid_request_error"),
        ("lying header", "UPLOAD", "bitdelta", {"name": "liar", "files": [("d.safetensors", safetensors_bytes({"x.sign": {"dtype": "U8", "shape": [4, 4], "data_offsets": [0, 1000]}}, b"\0" * 16))]}, 400, None, "invalid_request_error"),
        ("unknown format", "UPLOAD", "gguf", {"name": "x", "files": [("d.safetensors", good)]}, 400, "format", "invalid_request_error"),
        ("adapter for another base", "UPLOAD", "bitdelta", {"name": "other", "files": [("d.safetensors", "OTHERBASE")]}, 400, None, "invalid_request_error"),
        ("wrong-shape lora", "UPLOAD", "lora", {"name": "shape", "files": "WRONGSHAPE"}, 400, None, "invalid_request_error"),
        ("NaN weights", "UPLOAD", "bitdelta", {"name": "nan", "files": "NAN"}, 400, None, "invalid_request_error"),
        ("upload over the limit", "UPLOAD", "bitdelta", {"name": "big", "files": [("d.safetensors", b"\0" * (live.backend.config.max_upload_bytes + 10))]}, 413, None, "invalid_request_error"),
        ("not multipart", "POST", "/v1/adapters", {"json": {"name": "x"}}, 415, None, "invalid_request_error"),
        ("JSON nested 50,000 deep", "POST", "/v1/completions", {"content": b"[" * 50000 + b"]" * 50000, "headers": {"content-type": "application/json"}}, 400, None, "invalid_request_error"),
        ("JSON nested deep, admin route", "POST", "/v1/tenants", {"content": b'{"name": ' + b"[" * 50000 + b"]" * 50000 + b"}", "headers": {"content-type": "application/json"}, "admin": True}, 400, None, "invalid_request_error"),
        ("lone surrogate in a prompt", "POST", "/v1/completions", {"content": b'{"model": "' + base.encode() + b'", "prompt": "hi \\ud800"}', "headers": {"content-type": "application/json"}}, 400, None, "invalid_request_error"),
        ("lone surrogate in chat", "POST", "/v1/chat/completions", {"content": b'{"model": "' + base.encode() + b'", "messages": [{"role": "user", "content": "\\udfff"}]}', "headers": {"content-type": "application/json"}}, 400, None, "invalid_request_error"),
        ("a 3.9 MB prompt", "POST", "/v1/completions", {"json": {"model": base, "prompt": "word " * 780_000}}, 400, "prompt", "invalid_request_error"),
        ("1,023 chat messages of 4 KB", "POST", "/v1/chat/completions", {"json": {"model": base, "messages": [{"role": "user", "content": "x" * 4000}] * 1023}}, 400, "messages", "invalid_request_error"),
        ("absurd 1-bit scales", "UPLOAD", "bitdelta", {"name": "absurd", "files": "ABSURD"}, 400, None, "invalid_request_error"),
    ]
    from registry.bitdelta_format import load_bitdelta_file, save_bitdelta_file

    delta = load_bitdelta_file(live.files["bd"], live.backend.generation.engine.spec)
    save_bitdelta_file(tmp_path / "other.safetensors", delta.projections, {}, "sha256:" + "0" * 64)
    path, (sign, scale) = next(iter(delta.projections.items()))
    save_bitdelta_file(nan_file, {path: (sign, scale * float("nan"))}, {}, delta.base_fingerprint)
    lora_dir = live.files["lora"]
    import safetensors.torch as st

    lora = st.load_file(lora_dir / "adapter_model.safetensors")
    k = next(iter(lora))
    lora[k] = lora[k][:, :-1].contiguous()
    buf = io.BytesIO(st.save(lora))
    save_bitdelta_file(tmp_path / "absurd.safetensors",
                       {p: (sg, torch.full_like(sc, 3e38)) for p, (sg, sc) in delta.projections.items()},
                       {}, delta.base_fingerprint)  # fmt: skip
    specials = {
        "ABSURD": [("d.safetensors", (tmp_path / "absurd.safetensors").read_bytes())],
        "OTHERBASE": [("d.safetensors", (tmp_path / "other.safetensors").read_bytes())],
        "NAN": [("d.safetensors", nan_file.read_bytes())],
        "WRONGSHAPE": [("adapter_config.json", (lora_dir / "adapter_config.json").read_bytes()),
                       ("adapter_model.safetensors", buf.getvalue())],
    }
    assert len(cases) >= 25
    for desc, method, path_or_fmt, kw, status, param, type_ in cases:
        kw = dict(kw)
        with live.client(ADMIN if kw.pop("admin", False) else a) as c:
            if method == "UPLOAD":
                files = kw["files"]
                files = specials[files] if isinstance(files, str) else files
                for i, item in enumerate(files):
                    if isinstance(item[1], str):
                        files[i] = (item[0], specials[item[1]][0][1])
                r = c.post("/v1/adapters", data={"name": kw["name"], "format": path_or_fmt},
                           files=[("files", (n, b, "application/octet-stream")) for n, b in files])
            else:
                r = c.request(method, path_or_fmt, **kw)
        try:
            assert_error(r, status, type_, param=param)
        except AssertionError as e:
            raise AssertionError(f"{desc}: {e}") from None
    # every refused upload left nothing behind, and the server still answers normally
    with live.client(a) as c:
        assert [x["name"] for x in c.get("/v1/adapters").json()["data"]] == ["secret-lora"]
        r = c.post("/v1/completions", json={"model": "secret-lora", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert not staged_files(live.files["root"] / "registry")


ADMIN = "test-admin-key-0123456789"


def test_a_draining_server_refuses_new_work_the_same_way_everywhere(live, tenants):
    a, _ = tenants
    live.backend.draining = True
    try:
        with live.client(a) as c:
            bodies = [("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1}),
                      ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}]})]
            for path, body in bodies:
                r = c.post(path, json=body)
                assert r.headers["retry-after"] == "5"
                assert_error(r, 503, "server_error", code="overloaded")
            r = upload(c, "late-lora", "lora", live.files["lora"])
            assert r.headers["retry-after"] == "5"
            assert_error(r, 503, "server_error", code="overloaded")
            assert c.get("/v1/adapters/late-lora").status_code == 404  # nothing was stored
            assert c.get("/v1/models").status_code == 200  # reads still answer
    finally:
        live.backend.draining = False
