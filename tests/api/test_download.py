"""GET /v1/adapters/{name}/download and `deltaserve adapters pull`: every version comes back as it was uploaded; a
full fine-tune byte for byte from its lossless store (registry.source_files), streamed as a tar archive."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import start_server, stop_server
from tests.api.helpers import upload
from tests.helpers import make_bitdelta, make_finetune, make_lora, make_model_dir


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_ready(c: httpx.Client, name: str) -> dict:
    deadline = time.time() + 120
    while (a := c.get(f"/v1/adapters/{name}").json())["status"] == "compressing":
        assert time.time() < deadline
        time.sleep(0.05)
    assert a["status"] == "ready", a
    return a


def members(body: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the sha256 of its pax header) of a downloaded tar."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        for m in tar:
            assert m.isreg()
            out[m.name] = (tar.extractfile(m).read(), m.pax_headers["DELTASERVE.sha256"])
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    base = make_model_dir(root / "base", arch="llama")
    live = start_server(root, base, max_upload_mb=4)
    live.files["ft"] = make_finetune(base, root / "ft", seed=3)
    live.files["lora"], _ = make_lora(base, root / "lora", r=4, seed=1)
    live.files["bd"], _ = make_bitdelta(base, root / "bd.safetensors", seed=2, per_row=True, replace=False)
    live.files["root"] = root
    yield live
    stop_server(live)


def test_a_finetune_comes_back_byte_for_byte_through_the_api_and_the_cli(srv, tmp_path):
    from serving.cli import main

    ft = srv.files["ft"]
    uploaded = {p.name: sha(p) for p in ft.iterdir() if p.suffix in (".json", ".safetensors")}
    assert "model.safetensors" in uploaded and "config.json" in uploaded
    key = srv.new_tenant("keeper")
    with srv.client(key) as c:
        assert upload(c, "full", "finetune", ft).status_code == 202
        a = wait_ready(c, "full")
        r = c.get("/v1/adapters/full/download")
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        assert int(r.headers["content-length"]) == len(r.content)
        got = members(r.content)
    assert {n: hashlib.sha256(data).hexdigest() for n, (data, _) in got.items()} == uploaded
    assert {n: s for n, (_, s) in got.items()} == uploaded
    raw = sum((ft / n).stat().st_size for n in uploaded)
    assert 0 < a["source_bytes"] < raw  # stored smaller than uploaded (the deltas to the base are small)
    out = tmp_path / "pulled"
    assert main(["adapters", "pull", "full", "--out", str(out), "--url", srv.url, "--key", key]) == 0
    assert {p.name: sha(p) for p in out.iterdir()} == uploaded  # nothing else (no partial file) is left there


def test_lora_and_bitdelta_versions_come_back_as_uploaded(srv):
    key = srv.new_tenant("plain")
    with srv.client(key) as c:
        assert upload(c, "bot", "lora", srv.files["lora"]).status_code == 201
        assert upload(c, "legal", "bitdelta", srv.files["bd"]).status_code == 201
        lora = members(c.get("/v1/adapters/bot/download").content)
        bd = members(c.get("/v1/adapters/legal/download").content)
    assert {n: data for n, (data, _) in lora.items()} == {
        p.name: p.read_bytes() for p in srv.files["lora"].iterdir() if p.suffix in (".json", ".safetensors")}  # fmt: skip
    assert list(bd) == ["bitdelta.safetensors"] and bd["bitdelta.safetensors"][0] == srv.files["bd"].read_bytes()


def test_another_tenants_adapter_is_not_found_like_a_missing_one(srv):
    owner, other = srv.new_tenant("owner-a"), srv.new_tenant("other-b")
    with srv.client(owner) as c:
        assert upload(c, "mine", "lora", srv.files["lora"]).status_code == 201
    with srv.client(other) as c:
        theirs, missing = c.get("/v1/adapters/mine/download"), c.get("/v1/adapters/nothing/download")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["message"] == missing.json()["error"]["message"].replace("nothing", "mine")
    with httpx.Client(base_url=srv.url) as anonymous:
        assert anonymous.get("/v1/adapters/mine/download").status_code == 401


def test_downloads_of_one_tenant_are_limited_and_released(srv):
    from registry.errors import NotFound
    from serving.adapters import MAX_DOWNLOADS_PER_TENANT
    from serving.engine.errors import TenantBusy

    adapters = srv.backend.adapters
    key = srv.new_tenant("hoarder")
    with srv.client(key) as c:
        assert upload(c, "bot", "lora", srv.files["lora"]).status_code == 201
    tenant = srv.backend.registry.authenticate(key)
    held = [adapters.download(tenant, "bot") for _ in range(MAX_DOWNLOADS_PER_TENANT)]
    with pytest.raises(TenantBusy, match="downloads are streaming"):
        adapters.download(tenant, "bot")
    with srv.client(key) as c:
        busy = c.get("/v1/adapters/bot/download")
    assert busy.status_code == 429 and busy.headers.get("retry-after")
    with pytest.raises(NotFound):  # a refused one takes no slot
        adapters.download(tenant, "missing")
    b"".join(held.pop())  # read to its end: released
    held.pop().close()  # given up: released
    with srv.client(key) as c:
        assert c.get("/v1/adapters/bot/download").status_code == 200
    deadline = time.time() + 10  # the client has every byte a moment before the server's stream ends
    while adapters._downloads:
        assert time.time() < deadline, adapters._downloads
        time.sleep(0.01)


def test_a_damaged_stored_file_ends_the_download_short_and_pull_writes_nothing(srv, tmp_path):
    from serving.cli import main

    key = srv.new_tenant("damaged")
    with srv.client(key) as c:
        assert upload(c, "full", "finetune", srv.files["ft"]).status_code == 202
        wait_ready(c, "full")
    record = srv.backend.registry.resolve("damaged", "full")
    container = srv.backend.registry.source_path(record) / "model.safetensors.fmd"
    data = bytearray(container.read_bytes())
    data[len(data) // 2] ^= 0x40  # in the middle of the weights' frames
    container.chmod(0o600)
    container.write_bytes(bytes(data))
    with srv.client(key) as c, pytest.raises(httpx.HTTPError):  # shorter than its Content-Length
        c.get("/v1/adapters/full/download")
    out = tmp_path / "pulled"
    assert main(["adapters", "pull", "full", "--out", str(out), "--url", srv.url, "--key", key]) == 2
    assert not (out / "model.safetensors").exists() and not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_a_lost_stored_finetune_still_serves_and_its_download_says_why(tmp_path):
    import shutil

    base = make_model_dir(tmp_path / "base", arch="llama")
    ft = make_finetune(base, tmp_path / "ft", seed=5)
    live = start_server(tmp_path, base, max_upload_mb=4)
    try:
        key = live.new_tenant("acme")
        with live.client(key) as c:
            assert upload(c, "full", "finetune", ft).status_code == 202
            wait_ready(c, "full")
            body = {"model": "full", "prompt": "The quick", "max_tokens": 4, "temperature": 0}
            before = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        source = live.backend.registry.source_path(live.backend.registry.resolve("acme", "full"))
    finally:
        stop_server(live)
    shutil.rmtree(source)
    live = start_server(tmp_path, base, max_upload_mb=4)
    try:
        with live.client(key) as c:
            a = c.get("/v1/adapters/full").json()
            assert a["status"] == "ready" and a["source_bytes"] is None
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == before
            r = c.get("/v1/adapters/full/download")
            assert r.status_code == 409 and r.json()["error"]["code"] == "not_stored"
            assert "upload the fine-tune again" in r.json()["error"]["message"]
    finally:
        stop_server(live)
