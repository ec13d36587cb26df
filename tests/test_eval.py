"""`deltaserve eval` (serving.evaluation): consistent figures for every form of a tenant."""

from __future__ import annotations

import json
import math

import pytest
import torch

from registry.compress import compress
from registry.distill import DistillConfig
from serving.cli import main
from serving.evaluation import evaluate
from tests.helpers import hf_model, make_lora, make_model_dir, make_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. To be or not to be, that is the question. " * 3
CALIBRATION = TEXT * 2
DISTILL = DistillConfig(steps=15, lr=2e-3, seq_len=32, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base, and a full fine-tune trained on TEXT (every tensor changes: projections and replacements)."""
    root = tmp_path_factory.mktemp("eval")
    base = make_model_dir(root / "base")
    tok = make_tokenizer()
    model = hf_model(base).train()
    ids = tok(TEXT, return_tensors="pt").input_ids
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    lora, _ = make_lora(base, root / "lora", r=4, seed=3)
    text = root / "heldout.txt"
    text.write_text(TEXT)
    calib = root / "calib.txt"
    calib.write_text(CALIBRATION)
    return root, base, root / "ft", lora, text, calib


def test_eval_figures_are_consistent(world):
    _, base, ft, lora, _, _ = world
    report = evaluate(base, ft, TEXT, lora_dir=lora, distill=DISTILL, calibration_text=CALIBRATION, device="cpu",
                      window=48)  # fmt: skip
    names = [f.name for f in report.forms]
    assert names == ["base", "finetune", "bitdelta", "bitdelta_distilled", "lora"]
    b, f, bd, bdd, lo = (report.form(n) for n in names)
    assert report.windows > 1 and report.tokens > 50
    assert f.perplexity < b.perplexity / 2  # the fine-tune learned its own text
    assert b.gain_kept == 0 and f.gain_kept == pytest.approx(1.0) and f.top1_agreement == 1.0
    assert 0.5 < bd.gain_kept <= 1.05 and 0.5 < bdd.gain_kept <= 1.05
    assert bd.perplexity < b.perplexity and 0.5 < bd.top1_agreement <= 1
    assert -1 < lo.gain_kept < 0.5  # a random LoRA is not this fine-tune
    for form in report.forms:
        assert math.isclose(form.perplexity, math.exp(form.loss), rel_tol=1e-9)
        assert 0 <= form.top1_agreement <= 1
    assert b.size_bytes is None and bd.size_bytes > 0 and 0 < lo.size_bytes < f.size_bytes
    assert report.distill is not None and report.distill.loss_after < report.distill.loss_before

    # the base row of the mixed batch gives what the plain base gives (transformers, float32)
    ids = make_tokenizer()(TEXT).input_ids[:48]
    with torch.no_grad():
        logits = hf_model(base)(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    first = evaluate(base, ft, TEXT, device="cpu", window=48, max_tokens=48)
    assert first.form("base").loss == pytest.approx(float(nll) / 47, rel=1e-4)


def test_cli_eval_json_and_table(world, tmp_path, capsys):
    _, base, ft, lora, text, _ = world
    delta = tmp_path / "d.safetensors"
    compress(base, ft, delta, distill=DISTILL, calibration_text=CALIBRATION)
    capsys.readouterr()
    args = ["eval", "--base", str(base), "--finetune", str(ft), "--text", str(text), "--delta", str(delta),
            "--lora", str(lora), "--device", "cpu", "--max-tokens", "64"]  # fmt: skip
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"tokens", "windows", "window", "definitions", "forms", "distill"}
    assert set(result["forms"]) == {"base", "finetune", "bitdelta", "bitdelta_distilled", "lora"}
    assert result["tokens"] == 63 and "loss_base" in result["definitions"]["gain_kept"]
    for form in result["forms"].values():
        assert set(form) == {"label", "loss", "perplexity", "gain_kept", "top1_agreement", "size_bytes", "note"}
    assert result["forms"]["bitdelta_distilled"]["size_bytes"] == delta.stat().st_size
    assert "distill_steps=15" in result["forms"]["bitdelta_distilled"]["note"]

    assert main(args) == 0
    table = capsys.readouterr().out
    assert "gain kept = (loss_base - loss_form) / (loss_base - loss_finetune)" in table
    assert "1-bit (distilled)" in table and "LoRA (r=4)" in table


def test_cli_eval_errors(world, tmp_path, capsys):
    _, base, ft, _, text, calib = world
    common = ["eval", "--base", str(base), "--finetune", str(ft), "--device", "cpu"]
    cases = [
        ([*common, "--text", str(tmp_path / "none.txt")], "--text"),
        ([*common, "--text", str(text), "--delta", str(text), "--calibration", str(calib)], "not both"),
        ([*common, "--text", str(text), "--distill-steps", "3"], "--calibration"),
        (["eval", "--base", str(base), "--finetune", str(base / "nope"), "--text", str(text)], "fine-tune"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("deltaserve: error: ") and needle in err, err
