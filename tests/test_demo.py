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
