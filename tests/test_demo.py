"""The embedded demo through the product: `generate` and `eval` without --model, and `serve`'s demo tenant."""

from __future__ import annotations

import json

import pytest

from serving.cli import main
from serving.demo import demo_tenants

TENANTS = [t.name for t in demo_tenants()]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_without_model_for_the_base_and_every_tenant(capsys):
    outputs = {}
    for name in [None, *TENANTS]:
        prompt = next((t.example_prompt for t in demo_tenants() if t.name == name), "A wise man once said")
        extra = ["--tenant", name] if name else []
        code, out, err = run(capsys, "generate", *extra, "--prompt", prompt, "--max-tokens", "12", "--temperature", "0",
                             "--json", "--device", "cpu")
        assert code == 0, err
        outputs[name] = (prompt, json.loads(out)["token_ids"])
        assert len(outputs[name][1]) >= 1
    for name in TENANTS:  # each tenant's own output differs from the base's on its own prompt
        prompt, tokens = outputs[name]
        code, out, _ = run(capsys, "generate", "--prompt", prompt, "--max-tokens", "12", "--temperature", "0", "--json",
                           "--device", "cpu")
        assert json.loads(out)["token_ids"] != tokens, name


def test_generate_demo_tenant_errors(capsys):
    code, _, err = run(capsys, "generate", "--tenant", "klingon", "--prompt", "hi")
    assert code == 2 and "not a demo tenant" in err


@pytest.mark.parametrize("tenant", ["bofh", "italian"])
def test_eval_tenant(capsys, tenant):
    code, out, err = run(capsys, "eval", "--tenant", tenant, "--json", "--max-tokens", "300", "--device", "cpu",
                         "--kernel-backend", "torch")
    assert code == 0, err
    report = json.loads(out)
    forms = report["forms"]
    assert {"base", "finetune"} <= set(forms)
    assert forms["finetune"]["perplexity"] < forms["base"]["perplexity"]
    if tenant == "italian":  # its fine-tune is its LoRA merged: the LoRA served per row must equal it
        assert forms["lora"]["gain_kept"] == pytest.approx(1.0, abs=1e-3)
    else:
        assert forms["bitdelta_distilled"]["gain_kept"] > 0.9


def test_serve_registers_the_demo_tenant(tmp_path):
    from registry.catalog import Registry
    from serving.server import ServerSettings, build_backend

    settings = ServerSettings(model=None, registry=tmp_path / "reg", device="cpu", kernel_backend="torch")
    with Registry(settings.registry) as registry:
        backend = build_backend(settings, registry)
        names = sorted(a.name for a in registry.list_adapters("demo") if a.status == "ready")
        assert names == sorted(TENANTS)
        assert backend.model_id == "base"
        backend.stop()



def test_the_readme_composition_runs_on_the_demo(tmp_path, capsys):
    """README: German in the BOFH's style, two of the demo tenant's 1-bit deltas composed with weights."""
    from tests.api.conftest import start_server, stop_server

    live = start_server(tmp_path, None, model=None, max_model_len=256, max_upload_mb=64)
    try:
        key = capsys.readouterr().err.split("its API key (shown once): ")[1].split()[0]
        body = {"model": "base", "prompt": "Das Leben ist", "max_tokens": 24, "temperature": 0}
        with live.client(key) as c:
            composed = c.post("/v1/completions", json={**body, "adapters": [{"name": "german", "weight": 1.0},
                                                                             {"name": "bofh", "weight": 0.5}]})  # fmt: skip
            german = c.post("/v1/completions", json={**body, "model": "german"})
        assert composed.status_code == german.status_code == 200, composed.text
        assert composed.json()["choices"][0]["text"] != german.json()["choices"][0]["text"]
    finally:
        stop_server(live)
