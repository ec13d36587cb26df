"""The engine and the server on a CUDA GPU (skipped without one): the central mixed-batch test with the Triton
kernels, decode from CUDA graphs against eager decode, and the OpenAI-compatible server end to end."""

from __future__ import annotations

import pytest
import torch

from registry.loading import load_delta
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from tests.engine.test_families import family  # noqa: F401, F811 (a fixture: Qwen3 and Gemma 3 with their tenants)
from tests.helpers import MIXED_PROMPTS, greedy_tokens, mixed_tenants, run_in_waves

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mixed_tenants(tmp_path_factory.mktemp("gpu-mixed"))


def _requests(tenants, per_tenant: int = 2):
    return [(f"{name}/{i}", name, MIXED_PROMPTS[(i + j) % len(MIXED_PROMPTS)])
            for j, name in enumerate(tenants) for i in range(per_tenant)]  # fmt: skip


def _engine(base_dir, dtype: str, **kw) -> LLMEngine:
    cfg = EngineConfig(device="cuda", dtype=dtype, kernel_backend="triton", bitdelta_slots=3, lora_slots=3,
                       max_lora_rank=8, max_model_len=128, max_num_batched_tokens=256, **kw)  # fmt: skip
    return LLMEngine.from_model_dir(base_dir, cfg)


def test_mixed_batch_on_cuda_matches_merged_finetunes(world) -> None:
    base_dir, tenants = world
    engine = _engine(base_dir, "float32")
    assert engine.device.type == "cuda" and engine.runner.ops.name == "triton"
    deltas = {name: load_delta(path, engine.spec, 8) if path else None for name, (path, _) in tenants.items()}
    requests = _requests(tenants)
    got = run_in_waves(engine, requests, deltas, SamplingParams(max_tokens=12, temperature=0.0))
    for rid, name, prompt in requests:
        assert got[rid] == greedy_tokens(tenants[name][1], engine.tokenizer, prompt, 12), rid


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_gives_the_eager_tokens(world, dtype: str) -> None:
    base_dir, tenants = world
    names = [n for n in tenants if n != "bd-repl"]  # a replacing delta runs eagerly by design
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    results = []
    for graphs in (False, True):
        engine = _engine(base_dir, dtype, cuda_graphs=graphs)
        deltas = {n: load_delta(tenants[n][0], engine.spec, 8) if tenants[n][0] else None for n in names}
        results.append(run_in_waves(engine, _requests(names), deltas, params))
        if graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.replays > 10
            assert all(g.graph is not None for g in engine.runner.graphs.graphs.values())
    assert results[1] == results[0]
    torch.cuda.synchronize()


def test_server_on_cuda_with_the_openai_client(world, tmp_path) -> None:
    from openai import OpenAI

    from tests.api.conftest import start_server, stop_server
    from tests.api.helpers import upload

    base_dir, tenants = world
    live = start_server(tmp_path, base_dir, device="cuda", dtype="float32", kernel_backend="auto")
    try:
        assert live.backend.generation.engine.device.type == "cuda"
        key = live.new_tenant("acme")
        with live.client(key) as c:
            assert upload(c, "row", "bitdelta", tenants["bd-row"][0]).status_code == 201
            assert upload(c, "r2", "lora", tenants["lora-r2"][0]).status_code == 201
        client = OpenAI(base_url=live.url + "/v1", api_key=key)
        for model, tenant in (("row", "bd-row"), ("r2", "lora-r2"), (live.backend.model_id, "base")):
            r = client.completions.create(model=model, prompt="To be", max_tokens=8, temperature=0)
            want = greedy_tokens(tenants[tenant][1], live.backend.generation.engine.tokenizer, "To be", 8)
            assert r.choices[0].text == live.backend.generation.engine.tokenizer.decode(want, skip_special_tokens=True), model
    finally:
        stop_server(live)


def test_new_families_every_kind_and_a_composition_on_cuda(family) -> None:  # noqa: F811
    """tests/engine/test_families.py's mixed batch (Qwen3, Gemma 3: LoRA r4/r16, 1-bit, (IA)^3, a composition)
    on the GPU with the Triton kernels, float32: the greedy tokens of transformers on each merged fine-tune."""
    import dataclasses

    from registry.deltas import Composition
    from tests.engine.test_families import SOUP
    from tests.helpers import weighted_merge

    arch, base, tenants = family
    cfg = EngineConfig(device="cuda", dtype="float32", kernel_backend="triton", bitdelta_slots=2, lora_slots=2,
                       ia3_slots=1, max_lora_rank=16, max_model_len=128, max_num_batched_tokens=256)  # fmt: skip
    engine = LLMEngine.from_model_dir(base, cfg)
    deltas = {n: dataclasses.replace(load_delta(p, engine.spec, 16), owner="t") if p else None
              for n, (p, _) in tenants.items()}  # fmt: skip
    deltas["soup"] = Composition(tuple((deltas[n], w) for n, w in SOUP))
    refs = {n: m for n, (_, m) in tenants.items()} | {"soup": weighted_merge(base, [(tenants[n][1], w) for n, w in SOUP])}
    requests = _requests(deltas)
    got = run_in_waves(engine, requests, deltas, SamplingParams(max_tokens=10, temperature=0.0))
    for rid, name, prompt in requests:
        assert got[rid] == greedy_tokens(refs[name], engine.tokenizer, prompt, 10), f"{arch} {rid}"
