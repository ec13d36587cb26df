"""The GPU launch path of the Triton kernels, run on CPU: config pruning as plain Python, and the autotuner
itself under Triton's interpreter with a stand-in benchmarker, so that what only a GPU would otherwise exercise
(pruning by shape, the choice of the fastest config, `restore_value` undoing the benchmark runs of kernels that
add into their output) is tested everywhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deltakernels import bitdelta, lora, triton_common  # noqa: E402
from deltakernels.bitdelta import bitdelta_apply, bitdelta_apply_ref, pack_signs  # noqa: E402
from deltakernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref  # noqa: E402
from deltakernels.segments import build_slot_tiles  # noqa: E402

# Llama-7B's projections (in, out), block-sized ones, odd ones, a tiny one.
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024), (256, 128), (300, 100), (64, 32)]


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_bitdelta_pruning_keeps_the_configs_that_fit(in_f: int, out_f: int) -> None:
    configs = bitdelta._bitdelta_apply_tuned.configs
    kept = bitdelta._prune_bitdelta_configs(configs, {"in_features": in_f, "out_features": out_f})
    assert kept
    fits = [c for c in configs if c.kwargs["BLOCK_K"] <= max(64, pow2(in_f)) and c.kwargs["BLOCK_N"] <= max(32, pow2(out_f))]
    assert kept == (fits or configs[:1])
    if min(in_f, out_f) >= 1024:
        assert kept == configs  # at model sizes every block size is a candidate


@pytest.mark.parametrize("r_max", [1, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_lora_pruning_keeps_the_configs_that_fit(in_f: int, out_f: int, r_max: int) -> None:
    r_pow2 = pow2(r_max)
    shrink = lora._lora_shrink_tuned.configs
    kept = lora._prune_shrink_configs(shrink, {"r_max": r_max, "in_features": in_f})
    fits = [c for c in shrink if c.kwargs["BLOCK_R"] <= max(16, r_pow2) and c.kwargs["BLOCK_K"] <= max(64, pow2(in_f))]
    assert kept and kept == (fits or shrink[:1])
    expand = lora._lora_expand_tuned.configs
    kept = lora._prune_expand_configs(expand, {"r_max": r_max, "out_features": out_f})
    fits = [c for c in expand if c.kwargs["BLOCK_R"] <= max(16, r_pow2) and c.kwargs["BLOCK_N"] <= max(32, pow2(out_f))]
    assert kept and kept == (fits or expand[:1])
    if r_max <= 16:
        assert all(c.kwargs["BLOCK_R"] == 16 for c in kept)  # no rank block wider than the rank


@pytest.fixture
def autotuned(monkeypatch):
    """Launches through the autotuners (the GPU path) while the kernels run in the interpreter. Triton's
    benchmarker is replaced: each candidate runs 3 times (each run adding into the output again, as do_bench's
    runs would) and gets a made-up time that makes `fastest` win; the candidates benchmarked are recorded."""
    monkeypatch.setattr(triton_common, "triton_interpreting", lambda: False)
    timings: dict[str, list] = {}

    def patch(name, tuned, fastest):
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "_current", None, raising=False)  # the candidate being benchmarked

        def bench(kernel_call, quantiles=None, **_):
            for _ in range(3):
                kernel_call()
            config = tuned._current  # set by the wrapped _bench below
            timings.setdefault(name, []).append(config)
            return [1.0 if config.kwargs == fastest else 2.0] * 3

        real_bench = tuned._bench

        def _bench(*args, config, **meta):
            tuned._current = config
            return real_bench(*args, config=config, **meta)

        monkeypatch.setattr(tuned, "_do_bench", bench)
        monkeypatch.setattr(tuned, "_bench", _bench)
        return tuned

    return patch, timings


def _tiles():
    return build_slot_tiles([0, 1, -1, 0], [3, 5, 2, 4], "cpu")  # two tenants, a base sequence, prefill rows


def test_bitdelta_autotuner_prunes_benchmarks_and_restores_the_output(autotuned) -> None:
    patch, timings = autotuned
    in_f, out_f = 256, 64
    fastest = {"BLOCK_N": 64, "BLOCK_K": 128}
    tuned = patch("bitdelta", bitdelta._bitdelta_apply_tuned, fastest)
    gen = torch.Generator().manual_seed(0)
    signs = torch.stack([pack_signs(torch.rand(out_f, in_f, generator=gen) > 0.5) for _ in range(2)])
    scales = torch.rand(2, out_f, generator=gen) * 0.05
    tiles = _tiles()
    x = torch.randn(14, in_f, generator=gen)
    y = torch.randn(14, out_f, generator=gen)
    expected = y.clone()
    bitdelta_apply_ref(expected, x, signs, scales, tiles)
    bitdelta_apply(y, x, signs, scales, tiles)
    torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)  # added once, whatever the benchmark ran
    pruned = bitdelta._prune_bitdelta_configs(tuned.configs, {"in_features": in_f, "out_features": out_f})
    assert len(timings["bitdelta"]) == len(pruned) > 1  # every candidate that fits, and only those
    assert list(tuned.cache.values())[0].kwargs == fastest
    y2 = torch.randn(14, out_f, generator=gen)
    expected2 = y2.clone()
    bitdelta_apply_ref(expected2, x, signs, scales, tiles)
    bitdelta_apply(y2, x, signs, scales, tiles)  # the same key: the tuned config, no new benchmark
    torch.testing.assert_close(y2, expected2, rtol=2e-5, atol=2e-5)
    assert len(timings["bitdelta"]) == len(pruned)


def test_lora_autotuners_prune_benchmark_and_restore(autotuned) -> None:
    patch, timings = autotuned
    in_f, out_f, r_max = 256, 96, 32
    shrink_fastest, expand_fastest = {"BLOCK_R": 32, "BLOCK_K": 256}, {"BLOCK_N": 64, "BLOCK_R": 32}
    shrink_tuned = patch("shrink", lora._lora_shrink_tuned, shrink_fastest)
    expand_tuned = patch("expand", lora._lora_expand_tuned, expand_fastest)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, r_max, in_f, generator=gen) / in_f**0.5
    bt = torch.randn(2, r_max, out_f, generator=gen) / r_max**0.5
    ranks = torch.tensor([32, 8], dtype=torch.int32)
    scaling = torch.tensor([0.5, 2.0])
    tiles = _tiles()
    x = torch.randn(14, in_f, generator=gen)
    buf, buf_ref = torch.full((14, r_max), 7.0), torch.full((14, r_max), 7.0)
    lora_shrink(buf, x, a, ranks, tiles)
    lora_shrink_ref(buf_ref, x, a, ranks, tiles)
    torch.testing.assert_close(buf, buf_ref, rtol=2e-5, atol=2e-5)
    y = torch.randn(14, out_f, generator=gen)
    expected = y.clone()
    lora_expand_ref(expected, buf_ref, bt, scaling, ranks, tiles)
    lora_expand(y, buf, bt, scaling, ranks, tiles)
    torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)  # added once, whatever the benchmark ran
    n_shrink = len(lora._prune_shrink_configs(shrink_tuned.configs, {"r_max": r_max, "in_features": in_f}))
    n_expand = len(lora._prune_expand_configs(expand_tuned.configs, {"r_max": r_max, "out_features": out_f}))
    assert len(timings["shrink"]) == n_shrink > 1 and len(timings["expand"]) == n_expand > 1
    assert list(shrink_tuned.cache.values())[0].kwargs == shrink_fastest
    assert list(expand_tuned.cache.values())[0].kwargs == expand_fastest
