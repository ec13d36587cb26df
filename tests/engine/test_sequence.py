"""A sequence's own state, apart from the scheduler that moves it."""

from __future__ import annotations

from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence


def test_a_sequence_asking_for_prompt_logprobs_has_a_place_for_each_prompt_token_after_the_first() -> None:
    with_lp = Sequence("r", [5, 6, 7, 8], SamplingParams(max_tokens=1, prompt_logprobs=2), None, tenant="t")
    assert with_lp.prompt_logprobs == [None, None, None]
    assert Sequence("r", [5, 6], SamplingParams(max_tokens=1), None, tenant="t").prompt_logprobs is None
