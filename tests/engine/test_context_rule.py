"""serving.engine.errors.fit_context, the one rule of the context, at its edges (the API's tests reach it through a
live server, which mutation testing cannot use)."""

from __future__ import annotations

import pytest

from serving.engine.errors import PromptTooLong, fit_context


def test_tokens_that_fill_the_context_exactly_fit_and_one_more_does_not() -> None:
    assert fit_context(10, 6, 16) == 6
    with pytest.raises(PromptTooLong) as raised:
        fit_context(10, 7, 16, tokens_param="max_completion_tokens")
    assert raised.value.param == "max_completion_tokens"
    assert str(raised.value) == ("This model's maximum context length is 16 tokens; the prompt has 10 and "
                                 "max_completion_tokens is 7.")  # fmt: skip


def test_without_max_tokens_the_rest_of_the_context_is_given() -> None:
    assert fit_context(10, None, 16) == 6
    assert fit_context(15, None, 16) == 1


def test_a_prompt_that_fills_the_context_leaves_nothing_and_is_refused_naming_the_prompt() -> None:
    with pytest.raises(PromptTooLong) as raised:
        fit_context(16, None, 16, prompt_param="messages")
    assert raised.value.param == "messages"
    assert str(raised.value) == "This model's maximum context length is 16 tokens, but the prompt has 16."
