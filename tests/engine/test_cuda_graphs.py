"""Decode steps through the CUDA-graph path's padded, fixed-size inputs (serving/engine/cuda_graphs.py), run
eagerly on the CPU: the same greedy tokens as the plain path, for mixed tenants and contexts that cross block
and bucket boundaries. Capture and replay themselves need a GPU (tests/gpu/test_engine_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from registry.loading import load_delta
from serving.engine.config import EngineConfig
from serving.engine.cuda_graphs import BATCH_BUCKETS, DecodeGraphs
from serving.engine.engine import LLMEngine
from serving.engine.model_runner import ModelRunner
from serving.engine.sampling_params import SamplingParams
from tests.helpers import make_bitdelta, make_ia3, make_lora, make_model_dir

PROMPTS = ["The quick brown fox", "To be", "A journey of a thousand miles begins with a single step", "def main():",
           "All that glitters", "Caf\u00e9 cr\u00e8me"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    base = make_model_dir(root / "base", arch="qwen2")
    lora, _ = make_lora(base, root / "lora", r=4, seed=1)
    bd, _ = make_bitdelta(base, root / "bd.safetensors", seed=2, per_row=True, replace=False)
    repl, _ = make_bitdelta(base, root / "repl.safetensors", seed=3, per_row=True, replace=True)
    ia3, _ = make_ia3(base, root / "ia3", seed=4)
    return base, {"lora": lora, "bd": bd, "repl": repl, "ia3": ia3}


def _engine(base, graphs: bool) -> LLMEngine:
    cfg = EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", bitdelta_slots=3, lora_slots=2,
                       max_lora_rank=8, max_model_len=96, max_num_batched_tokens=256, block_size=4)  # fmt: skip
    engine = LLMEngine.from_model_dir(base, cfg)
    if graphs:  # the runner as a CUDA engine builds it, but running the padded inputs eagerly
        r = engine.runner
        engine.runner = ModelRunner(r.model, r.slots, r.ops, num_kv_blocks=r.kv_cache.shape[2] - 1, block_size=4,
                                    max_num_batched_tokens=cfg.max_num_batched_tokens, device=r.device, dtype=r.dtype,
                                    decode_graphs=(64, cfg.max_model_len, False))  # fmt: skip
    return engine


def test_the_runner_sizes_its_graphs_by_batch_budget_and_context(world) -> None:
    graphs = _engine(world[0], True).runner.graphs
    assert (graphs.max_batch, graphs.max_ctx_blocks, graphs.capture) == (64, 24, False)  # 96 tokens: 24 blocks of 4
    r = graphs.runner
    few_tokens = ModelRunner(r.model, r.slots, r.ops, num_kv_blocks=40, block_size=8, max_num_batched_tokens=16,
                             device=r.device, dtype=r.dtype, decode_graphs=(64, 90, False))  # fmt: skip
    assert (few_tokens.graphs.max_batch, few_tokens.graphs.max_ctx_blocks) == (16, 12)  # a batch within the budget


def _check_inputs_live_in_the_graph_buffer(graphs: DecodeGraphs) -> None:
    """Every device array a graph reads must sit in its staging buffer: a replay reads those addresses only."""
    real_stage = graphs._stage

    def checked(staging, seqs, key):
        ids, attn, deltas = real_stage(staging, seqs, key)
        arrays = [ids, attn.positions, attn.slot_mapping, deltas.bitdelta_row_slot, deltas.ia3_row_slot]
        arrays += [t for g in attn.groups for t in vars(g).values() if isinstance(t, torch.Tensor)]
        for tiles in (deltas.bitdelta, deltas.lora):
            arrays += [tiles.order, tiles.tile_slot, tiles.tile_start, tiles.tile_rows]
        lo = staging.dev.data_ptr()
        hi = lo + staging.dev.numel()
        outside = [tuple(t.shape) for t in arrays if t is not None and t.numel() and not lo <= t.data_ptr() < hi]
        assert not outside, f"graph inputs outside the staging buffer: {outside}"
        return ids, attn, deltas

    graphs._stage = checked


@pytest.mark.parametrize("tenants", [("base",), ("base", "lora", "bd", "ia3"), ("lora", "bd", "repl", "base")])
def test_padded_decode_gives_the_same_tokens(world, tenants) -> None:
    base, files = world
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)  # 30 tokens: contexts cross buckets

    builds: list = []

    def run(graphs: bool):
        engine = _engine(base, graphs)
        if graphs:
            _check_inputs_live_in_the_graph_buffer(engine.runner.graphs)
            real_build = engine.runner.graphs._build
            engine.runner.graphs._build = lambda seqs, key: builds.append(key) or real_build(seqs, key)
        deltas = {n: load_delta(p, engine.spec, 8) for n, p in files.items()}
        reqs = [(p, greedy, deltas.get(tenants[i % len(tenants)])) for i, p in enumerate(PROMPTS[:5])]
        return [c.token_ids for c in engine.generate(reqs)], engine.runner.graphs

    plain, _ = run(False)
    padded, graphs = run(True)
    assert padded == plain
    assert sorted(builds, key=repr) == sorted(graphs.graphs, key=repr)  # each key's graph built once, then reused
    if "repl" in tenants:  # a delta that replaces base tensors: its steps run eagerly
        assert all(not k.bitdelta for k in graphs.graphs) or graphs.replays < 29
    else:
        assert graphs.replays == 29  # every decode step (the first step of 30 is the prefill)
        keys = set(graphs.graphs)
        assert {k.batch for k in keys} == {8}  # 5 rows padded to the bucket of 8
        assert len({k.ctx_blocks for k in keys}) >= 2  # contexts of 5..58 tokens cross the 4- and 8-block buckets
        assert all(k.bitdelta == ("bd" in tenants) and k.lora == ("lora" in tenants) for k in keys)
        assert all(bool(k.ia3) == ("ia3" in tenants) for k in keys)


def test_keys() -> None:
    class Seq:
        def __init__(self, computed, bd=-1, lora=-1, ia3=-1):
            self.num_computed, self.bitdelta_slot, self.lora_slot, self.ia3_slot = computed, bd, lora, ia3
            self.composed = False

    class Runner:
        block_size = 16

        class slots:
            ia3_layout = 3

    g = DecodeGraphs(Runner(), max_batch=40, max_ctx_blocks=8, capture=False)  # type: ignore[arg-type]
    k = g.key_for([Seq(15), Seq(16, bd=0)], False)
    assert (k.batch, k.ctx_blocks, k.bitdelta, k.lora, k.ia3) == (2, 2, True, False, 0)  # 17 tokens: 2 blocks
    assert g.key_for([Seq(15), Seq(3, ia3=0)], False).ia3 == 4  # which projections (IA)^3 scales: part of the key
    Runner.slots.ia3_layout = 4
    assert g.key_for([Seq(15), Seq(3, ia3=0)], False).ia3 == 5
    assert g.key_for([Seq(40, lora=1)] * 3, False).batch == 4 and g.key_for([Seq(40)] * 3, False).ctx_blocks == 4
    assert g.key_for([Seq(1)] * 33, False).batch == 40  # above the last bucket under the limit: the limit
    assert g.key_for([Seq(1)] * 41, False) is None  # above max_batch: eager
    assert g.key_for([Seq(1)], True) is None  # a delta that replaces base tensors: eager
    assert g.key_for([Seq(120)], False).ctx_blocks == 8  # capped at the longest context
    assert BATCH_BUCKETS[0] == 1 and list(BATCH_BUCKETS) == sorted(BATCH_BUCKETS)


def test_cuda_graphs_need_a_gpu(world) -> None:
    base, _ = world
    with pytest.raises(ValueError, match="cuda_graphs needs the engine on a CUDA device"):
        LLMEngine.from_model_dir(base, EngineConfig(device="cpu", cuda_graphs=True, max_model_len=64))
