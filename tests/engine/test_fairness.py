"""Fair scheduling through the engine: under a flooding tenant a light tenant's request is admitted at the next
step, where first come, first served makes it wait for the flood; the batch stays as full either way."""

from __future__ import annotations

import pytest

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from tests.helpers import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("fair") / "m", arch="llama")


def _run(model_dir, fair: bool) -> tuple[int, float]:
    """(steps until the light request's first token, tokens per step over the run)."""
    cfg = EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", max_num_seqs=8, max_model_len=128,
                       max_num_batched_tokens=256, fair_scheduling=fair)  # fmt: skip
    engine = LLMEngine.from_model_dir(model_dir, cfg)
    flood = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(24):  # three times the batch
        engine.add_request(f"flood-{i}", "The quick brown fox", flood, None, tenant="flood")
    tokens = 0
    for _ in range(3):
        tokens += len(engine.step())
    engine.add_request("light", "To be", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), None,
                       tenant="light")  # fmt: skip
    steps, first = 0, None
    for _ in range(60):
        out = engine.step()
        steps += 1
        tokens += len(out)
        if first is None and any(o.request_id == "light" for o in out):
            first = steps
    return first if first is not None else 10**6, tokens / (steps + 3)


def test_a_light_tenant_is_admitted_at_the_next_step_under_a_flood(model_dir) -> None:
    fair_first, fair_rate = _run(model_dir, fair=True)
    fcfs_first, fcfs_rate = _run(model_dir, fair=False)
    assert fair_first == 1  # the step after it arrived: one flood sequence was preempted to make room
    assert fcfs_first > 30  # first come, first served: behind a batch of 40-token flood requests
    assert fair_rate >= 0.9 * fcfs_rate  # the batch stays full
