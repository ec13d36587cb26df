"""No value another sequence left in the KV cache can reach a row: stale blocks, block-table padding and the null
block all poisoned with NaN or Inf (what an absurd delta of another tenant leaves behind), the same tokens."""

from __future__ import annotations

import pytest

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from tests.helpers import make_model_dir

PROMPTS = ["The quick brown fox", "To be", "A journey of a thousand miles begins with a single step, and then",
           "def main():", "Caf\u00e9"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("isolation") / "m", arch="mistral", sliding_window=6)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_poisoned_cache_entries_never_reach_a_row(model_dir, backend, poison) -> None:
    def run(value):
        cfg = EngineConfig(device="cpu", dtype="float32", kernel_backend=backend, max_model_len=96,
                           max_num_batched_tokens=256, block_size=4, num_kv_blocks=80)  # fmt: skip
        engine = LLMEngine.from_model_dir(model_dir, cfg)
        if value is not None:
            engine.runner.kv_cache.fill_(value)  # every block: as if freed by a tenant whose values overflowed
        greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
        return [c.token_ids for c in engine.generate([(p, greedy, None) for p in PROMPTS])]

    assert run(poison) == run(None)
