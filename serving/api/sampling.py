"""A request's fields -> the engine's SamplingParams for one choice (both completion routes): the OpenAI and vLLM
sampling fields, and the structured output it asks for."""

from __future__ import annotations

import json

from serving.engine.sampling_params import Guide, SamplingParams


def sampling_for(req, max_tokens: int, choice: int, logprobs: int | None, echo: bool = False) -> SamplingParams:
    """The engine's parameters for one choice; echo with logprobs also scores the prompt's tokens."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=None if req.seed is None else req.seed + choice,
        stop=list(req.stop or []),
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
        stop_token_ids=list(req.stop_token_ids or []),
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        min_p=req.min_p or 0.0,
        min_tokens=req.min_tokens,
        prompt_logprobs=logprobs if echo else None,
        guide=guide_of(req),
    )


def guide_of(req) -> Guide | None:
    """The structured output a request asks for (at most one field: the schema checked that), or None."""
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        return Guide("json_object", "", "response_format")
    if rf is not None and rf.type == "json_schema":
        return Guide("json_schema", json.dumps(rf.json_schema.schema_), "response_format")
    if req.guided_json is not None:
        spec = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
        return Guide("json_schema", spec, "guided_json")
    if req.guided_regex is not None:
        return Guide("regex", req.guided_regex, "guided_regex")
    if req.guided_choice is not None:
        return Guide("choice", json.dumps(req.guided_choice), "guided_choice")
    return None
