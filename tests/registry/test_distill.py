"""Scale distillation (registry.distill): only the scales train, and the logit error on calibration text drops."""

from __future__ import annotations

import pytest
import torch

from registry.checkpoint import Checkpoint
from registry.compress import CompressOptions, check_pair, compress, compress_pair
from registry.distill import (
    DistillConfig,
    _SignScaleAdd,
    build_student,
    calibration_chunks,
    distill_scales,
    logit_error,
)
from registry.fingerprint import base_spec
from registry.loading import load_delta
from tests.helpers import CORPUS, hf_model, make_model_dir, make_tokenizer, save_finetune

CALIBRATION = " ".join(CORPUS[:6])
FAST = DistillConfig(steps=25, lr=2e-3, seq_len=32, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base = make_model_dir(root / "base")
    ft = save_finetune(base, root / "ft", seed=4, touch=lambda n: "proj" in n, std=0.06)
    return root, base, ft


def test_sign_scale_gradient():
    torch.manual_seed(0)
    w = torch.randn(5, 11, dtype=torch.float64)
    sign = (torch.randn(5, 11) > 0)
    from deltakernels.bitdelta import pack_signs

    packed = pack_signs(sign)
    for shape in ((5,), (1,)):
        scale = torch.rand(shape, dtype=torch.float64, requires_grad=True)
        x = torch.randn(3, 11, dtype=torch.float64)
        s_float = torch.where(sign, 1.0, -1.0).double()
        out = (x @ _SignScaleAdd.apply(w, packed, scale).T).sin().sum()
        out_ref = (x @ (w + scale.view(-1, 1) * s_float).T).sin().sum()
        g, = torch.autograd.grad(out, scale)
        g_ref, = torch.autograd.grad(out_ref, scale)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)  # the op computes in float32


def test_distillation_lowers_the_logit_error(world):
    _, base, ft = world
    pair = check_pair(base, ft)
    delta = compress_pair(pair, CompressOptions(scale="per-row"))
    scales, report = distill_scales(base, ft, delta.projections, delta.replacements, CALIBRATION, FAST)
    assert report.kept == "distilled" and report.loss_after < 0.9 * report.loss_before, report
    assert set(scales) == set(delta.projections)
    changed = [p for p, s in scales.items() if not torch.equal(s, delta.projections[p][1])]
    assert changed and all(scales[p].shape == delta.projections[p][1].shape for p in scales)

    # Measured independently: students built with the initial and the distilled scales, against the teacher.
    chunks = calibration_chunks(make_tokenizer(), CALIBRATION, FAST.seq_len)
    teacher = hf_model(ft)
    errors = []
    for chosen in ({p: v[1] for p, v in delta.projections.items()}, scales):
        projections = {p: (delta.projections[p][0], chosen[p]) for p in delta.projections}
        student, _ = build_student(base, projections, delta.replacements, torch.float32, torch.device("cpu"))
        errors.append(logit_error(student, teacher, chunks, "mse", 4))
    assert errors[1] < 0.9 * errors[0]
    assert errors[0] == pytest.approx(report.loss_before, rel=1e-5)
    assert errors[1] == pytest.approx(report.loss_after, rel=1e-5)


def test_only_scales_train(world):
    _, base, ft = world
    delta = compress_pair(check_pair(base, ft))
    student, scales = build_student(base, delta.projections, delta.replacements, torch.float32, torch.device("cpu"))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("parametrizations.weight.0.scale") for n in trainable)
    assert len(trainable) == len(delta.projections)


def test_bad_learning_rate_keeps_initial_scales(world):
    _, base, ft = world
    delta = compress_pair(check_pair(base, ft))
    config = DistillConfig(steps=3, lr=50.0, seq_len=32, batch_size=2, device="cpu", loss="kl")
    scales, report = distill_scales(base, ft, delta.projections, delta.replacements, CALIBRATION, config)
    assert report.kept == "initial" and report.loss_after == report.loss_before
    assert all(torch.equal(scales[p], delta.projections[p][1]) for p in scales)


def test_compress_with_distillation_writes_the_distilled_scales(world, tmp_path):
    _, base, ft = world
    out = tmp_path / "d.safetensors"
    result = compress(base, ft, out, distill=FAST, calibration_text=CALIBRATION)
    delta = load_delta(out, base_spec(Checkpoint(base)))
    meta = delta.metadata
    assert meta["distill_steps"] == "25" and meta["distill_loss"] == "mse" and meta["distill_kept"] == "distilled"
    assert float(meta["distill_loss_after"]) < float(meta["distill_loss_before"])
    assert result.distill is not None and result.distill.loss_after == float(meta["distill_loss_after"])
    plain = compress_pair(check_pair(base, ft))
    assert any(not torch.equal(delta.projections[p][1], plain.projections[p][1]) for p in plain.projections)
    for p in plain.projections:  # the signs never change
        assert torch.equal(delta.projections[p][0], plain.projections[p][0])


@pytest.mark.parametrize("field,value,needle", [("device", "auto", "cpu or cuda"), ("device", "gpu", "cpu or cuda"),
                                                ("loss", "l1", "mse, kl"), ("steps", -1, ">= 0")])  # fmt: skip
def test_distill_config_is_checked_when_made(field, value, needle):
    # the device is resolved by the caller ("auto" becomes cpu or cuda there): the registry takes only a real one
    with pytest.raises(ValueError, match=needle):
        DistillConfig(**{field: value})
