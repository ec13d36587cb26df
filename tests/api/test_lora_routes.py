"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter on the registry: the admin loads a PEFT directory of
the allowed folder as a tenant's adapter (the same tokens as an upload of it), nothing outside the folder is read,
a tenant key may only unload its own."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.api.conftest import start_server, stop_server
from tests.helpers import make_ia3, make_lora, make_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-routes")
    base = make_model_dir(root / "base", arch="llama")
    allowed = root / "allowed"
    allowed.mkdir()
    make_lora(base, allowed / "support", r=2, seed=7)
    make_ia3(base, allowed / "terse", seed=9)
    (allowed / "support" / "training_args.bin").write_bytes(b"\x80\x04 a pickle: never read")
    outside, _ = make_lora(base, root / "outside", r=2, seed=8)
    os.symlink(outside, allowed / "link-out")
    (allowed / "sneaky").mkdir()  # a folder inside whose weights are a link to a file outside
    shutil.copy(outside / "adapter_config.json", allowed / "sneaky")
    os.symlink(outside / "adapter_model.safetensors", allowed / "sneaky" / "adapter_model.safetensors")
    srv = start_server(root, base, allowed_local_adapter_dir=allowed)
    srv.files.update(allowed=allowed, outside=outside)
    with srv.client() as admin:
        for name in ("acme", "other"):
            srv.files[name] = admin.post("/v1/tenants", json={"name": name}).json()["api_key"]
    yield srv
    stop_server(srv)


def _generate(srv, key: str, model: str) -> list[int]:
    with srv.client(key) as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": "To be", "max_tokens": 6, "temperature": 0,
                                            "logprobs": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["tokens"]


def test_the_admin_loads_a_local_adapter_for_a_tenant_and_it_serves_as_an_upload(world):
    with world.client() as admin:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "support", "lora_path": "support", "tenant": "acme"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'support' added successfully.", r.text
        again = admin.post("/v1/load_lora_adapter", json={"lora_name": "support", "lora_path": "support", "tenant": "acme"})
        assert again.status_code == 409 and again.json()["error"]["param"] == "lora_name"
        inplace = {"lora_name": "support", "lora_path": str(world.files["allowed"] / "support"), "tenant": "acme",
                   "load_inplace": True}  # an absolute path inside the folder  # fmt: skip
        assert admin.post("/v1/load_lora_adapter", json=inplace).status_code == 200
    with world.client(world.files["acme"]) as c:
        record = c.get("/v1/adapters/support").json()
    assert (record["format"], record["status"], record["version"]) == ("lora", "ready", 2)
    with world.client(world.files["acme"]) as c:  # the same adapter uploaded over HTTP gives the same tokens
        files = [("files", (n, (world.files["allowed"] / "support" / n).read_bytes())) for n in
                 ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
        assert c.post("/v1/adapters", data={"name": "uploaded", "format": "lora"}, files=files).status_code == 201
    assert _generate(world, world.files["acme"], "support") == _generate(world, world.files["acme"], "uploaded")
    with world.client(world.files["other"]) as c:  # another tenant's: as missing
        assert c.post("/v1/completions", json={"model": "support", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("../outside", 400, "inside the allowed adapter directory"),
        ("link-out", 400, "inside the allowed adapter directory"),  # a link out of the folder
        ("/etc", 400, "inside the allowed adapter directory"),
        ("nope", 400, "is not a directory"),
        ("sneaky", 400, "adapter_model.safetensors cannot be read"),  # a file link is never followed
        ("", 400, "non-empty path"),
    ],
)
def test_nothing_outside_the_allowed_folder_is_read(world, path, status, message):
    with world.client() as admin:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path, "tenant": "acme"})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "lora_path"
    with world.client(world.files["acme"]) as c:
        assert c.get("/v1/adapters/x").status_code == 404


def test_a_tenant_key_may_only_unload_its_own(world):
    with world.client() as admin:
        body = {"lora_name": "gone", "lora_path": "support", "tenant": "acme"}
        assert admin.post("/v1/load_lora_adapter", json=body).status_code == 200
    with world.client(world.files["acme"]) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "support"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "gone", "tenant": "other"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"
    with world.client(world.files["other"]) as c:  # not its adapter: as missing, and it stays
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "gone"}).status_code == 404
    with world.client(world.files["acme"]) as c:
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "gone", "lora_int_id": 3})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gone' removed successfully."
        assert c.get("/v1/adapters/gone").status_code == 404


def test_the_admin_names_the_tenant_and_a_missing_one_is_404(world):
    with world.client() as admin:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "support"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "support", "tenant": "ghost"})
        assert r.status_code == 404
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "x", "tenant": "ghost"}).status_code == 404


def test_an_ia3_folder_is_refused_by_the_lora_route_naming_lora_path(world):
    with world.client() as admin:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "t", "lora_path": "terse", "tenant": "acme"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora_path" and "format ia3" in r.json()["error"]["message"]


def test_loading_by_path_is_off_without_the_flag(tmp_path):
    base = make_model_dir(tmp_path / "base", arch="llama")
    srv = start_server(tmp_path, base)
    try:
        with srv.client() as admin:
            admin.post("/v1/tenants", json={"name": "acme"})
            lora = make_lora(base, tmp_path / "lora", r=2, seed=1)[0]
            r = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(lora), "tenant": "acme"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "local_path_forbidden"
    finally:
        stop_server(srv)
        shutil.rmtree(tmp_path / "lora", ignore_errors=True)
