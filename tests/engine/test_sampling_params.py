"""SamplingParams: defaults, normalisation, and the field named by each out-of-range error."""

from __future__ import annotations

import math

import pytest

from serving.engine.sampling_params import SamplingParams, SamplingParamsError


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, 0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.ignore_eos is False and p.skip_special_tokens is True
    assert not p.greedy
    assert SamplingParams().stop is not p.stop  # no shared mutable default


def test_greedy_and_normalisation() -> None:
    assert SamplingParams(temperature=0).greedy
    assert isinstance(SamplingParams(temperature=0).temperature, float)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).effective_top_k == 0
    assert SamplingParams(top_k=0).effective_top_k == 0
    assert SamplingParams(top_k=5).effective_top_k == 5


def test_valid_edges() -> None:
    SamplingParams(max_tokens=1, temperature=2.0, top_p=1.0, top_k=-1, seed=0, logprobs=0)
    SamplingParams(temperature=0.0, top_p=1e-6, seed=2**63 - 1, logprobs=20, stop=["a", "b", "c", "d"])
    SamplingParams(stop_token_ids=[0, 319]).validate(vocab_size=320)
    SamplingParams(stop_token_ids=list(range(64))).validate()  # the most stop ids


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"top_p": False}, "top_p"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": 0}, "skip_special_tokens"),
    ],
)
def test_out_of_range(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)
    assert param in str(info.value)


def test_stop_token_ids_checked_against_vocab() -> None:
    p = SamplingParams(stop_token_ids=[5, 320])  # fine without a vocabulary
    with pytest.raises(SamplingParamsError) as info:
        p.validate(vocab_size=320)
    assert info.value.param == "stop_token_ids" and "[0, 320)" in str(info.value)  # the bound it broke
    with pytest.raises(SamplingParamsError, match=">= 0"):
        SamplingParams(stop_token_ids=[-3])
    assert SamplingParams(stop=None).stop == [] and SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_structured_output_errors_name_the_field_that_asked_for_it() -> None:
    from serving.engine.sampling_params import MAX_GUIDE_CHARS, Guide

    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(guide=Guide("regex", "a" * (MAX_GUIDE_CHARS + 1), param="guided_regex")).validate()
    assert raised.value.param == "guided_regex" and str(MAX_GUIDE_CHARS) in str(raised.value)
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(guide=Guide("regex", "a+", param="guided_regex"), min_tokens=2).validate()
    assert raised.value.param == "min_tokens"
    assert str(raised.value) == "min_tokens cannot be combined with structured outputs"
