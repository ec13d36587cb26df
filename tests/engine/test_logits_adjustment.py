"""Penalties, logit bias, min_tokens and min_p, row by row in one batch, against transformers' logits processors
for the same settings (frequency and presence penalties, which transformers lacks, against OpenAI's formula)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from serving.engine.sampler import RowSampling, Sampler, adjust_logits, mask_min_p, mask_top_k_top_p
from serving.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.helpers import hf_processors

V = 50
EOS = 2


# One batch, every row its own settings (and some with none), histories of different lengths with repeats.
SETTINGS = [
    {},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"frequency_penalty": 0.8},
    {"presence_penalty": -1.5},
    {"frequency_penalty": -0.4, "presence_penalty": 1.1},
    {"logit_bias": {5: 100.0, 7: -3.5, 49: 2.0}},
    {"min_tokens": 6, "stop_token_ids": [11]},
    {"min_tokens": 7, "ignore_eos": True, "stop_token_ids": [4, 9]},
    {"min_tokens": 2},  # already past it: nothing masked
    {"repetition_penalty": 1.8, "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {3: -100.0},
     "min_tokens": 9},
    {"temperature": 0.8, "repetition_penalty": 1.2},
]


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(SETTINGS), V, generator=g) * 4
    rows = []
    for i, kwargs in enumerate(SETTINGS):
        params = SamplingParams(max_tokens=16, **kwargs)
        prompt = torch.randint(0, V, (3 + i,), generator=g).tolist()
        output = torch.randint(0, 12, (1 + i % 5,), generator=g).tolist()
        output += output[:1]  # a token generated twice: its count is 2
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
        rows.append(RowSampling(params, None, prompt + output, len(prompt), frozenset(ends)))
    return logits, rows


def test_each_row_is_adjusted_as_transformers_processors_would() -> None:
    logits, rows = _batch()
    got = adjust_logits(logits, rows)
    for i, r in enumerate(rows):
        ids = torch.tensor([list(r.token_ids)])
        want = hf_processors(r.params, r.num_prompt_tokens, r.end_token_ids)(ids, logits[i : i + 1].clone())[0]
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: {SETTINGS[i]}"
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[i][finite], want[finite], rtol=1e-6, atol=1e-5, msg=f"row {i}: {SETTINGS[i]}")
    # the settings really change rows (the test could fail): every row that asks differs from its raw logits
    for i, kwargs in enumerate(SETTINGS):
        changed = not torch.equal(got[i], logits[i])
        assert changed == (rows[i].params.changes_logits and kwargs != {"min_tokens": 2}), f"row {i}"


def test_a_batch_with_no_adjustment_is_not_copied() -> None:
    logits = torch.randn(3, V)
    rows = [RowSampling(SamplingParams(), None, [1, 2, 3], 2, frozenset({EOS})) for _ in range(3)]
    assert adjust_logits(logits, rows) is logits


def test_greedy_rows_choose_from_the_adjusted_logits_and_report_raw_logprobs() -> None:
    logits = torch.zeros(2, V)
    logits[:, 8] = 5.0
    rows = [RowSampling(SamplingParams(temperature=0.0, logit_bias={30: 10.0}, logprobs=1), None, [1], 1),
            RowSampling(SamplingParams(temperature=0.0, logprobs=1), None, [1], 1)]  # fmt: skip
    out = Sampler(seed=0)(logits, rows)
    assert out.token_ids.tolist() == [30, 8]
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw[[0, 1], [30, 8]])  # under the raw logits, as OpenAI reports


def test_min_tokens_keeps_the_end_tokens_from_being_drawn() -> None:
    logits = torch.full((1, V), -5.0)
    logits[0, EOS] = 20.0  # EOS all but certain
    row = RowSampling(SamplingParams(temperature=1.0, min_tokens=4), None, [1, 2, 3], 2, frozenset({EOS}))
    sampler = Sampler(seed=0)
    assert all(sampler(logits, [row]).token_ids.item() != EOS for _ in range(20))
    done = RowSampling(row.params, None, [1, 2, 3, 4, 5, 6], 2, frozenset({EOS}))  # 4 generated: EOS may come
    assert sampler(logits, [done]).token_ids.item() == EOS


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [(0, 1.0, 0.1, 1.0), (0, 1.0, 0.5, 0.7), (10, 0.9, 0.2, 1.3),
                                                            (5, 1.0, 0.05, 1.0), (0, 0.8, 0.3, 1.0)])  # fmt: skip
def test_min_p_after_top_k_and_top_p_keeps_what_transformers_keeps(top_k, top_p, min_p, temperature) -> None:
    g = torch.Generator().manual_seed(top_k + int(100 * min_p))
    logits = torch.randn(6, V, generator=g) * 3
    x = logits / temperature
    B = logits.shape[0]
    x = mask_top_k_top_p(x, torch.full((B,), top_k or V), torch.full((B,), top_p) if top_p < 1 else None)
    got = mask_min_p(x, torch.full((B,), min_p))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    warpers.append(MinPLogitsWarper(min_p))
    want = warpers(torch.zeros(B, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert (torch.isfinite(got).sum(-1) < V).all()  # min_p dropped something in every row


def test_sampled_rows_never_draw_what_min_p_drops() -> None:
    logits = torch.tensor([[4.0, 3.5, 1.0, 0.0] + [-2.0] * (V - 4)])
    row = RowSampling(SamplingParams(temperature=1.0, min_p=0.5))  # keeps p >= 0.5 p_max: tokens 0 and 1
    sampler = Sampler(seed=3)
    drawn = {sampler(logits, [row]).token_ids.item() for _ in range(200)}
    assert drawn == {0, 1}
    top_only = RowSampling(SamplingParams(temperature=1.0, min_p=1.0))  # the most likely token only, never none
    assert {sampler(logits, [top_only]).token_ids.item() for _ in range(20)} == {0}


@pytest.mark.parametrize("kwargs,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"logit_bias": {3: 100.5}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": 17}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])  # fmt: skip
def test_out_of_range_settings_are_refused_by_name(kwargs, param) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(max_tokens=16, **kwargs)
    assert e.value.param == param


def test_logit_bias_ids_are_checked_against_the_vocabulary() -> None:
    params = SamplingParams(logit_bias={V: 1.0})
    params.validate()
    with pytest.raises(SamplingParamsError) as e:
        params.validate(vocab_size=V)
    assert e.value.param == "logit_bias"
    SamplingParams(logit_bias={V - 1: -100.0, 0: 100.0}, min_tokens=16, max_tokens=16).validate(vocab_size=V)
