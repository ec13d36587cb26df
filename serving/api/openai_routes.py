"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streamed or not)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api.auth import TenantDep
from serving.api.bodies import chat_prompt_ids, check_chars, parse, read_json
from serving.api.errors import APIError, error_body, refuse_when_draining, to_api_error
from serving.api.openapi import documented
from serving.api.sampling import sampling_for
from serving.api.schemas import (
    UNSUPPORTED_CHAT_FIELDS,
    UNSUPPORTED_COMPLETION_FIELDS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    refuse_unsupported,
)
from serving.engine.errors import fit_context
from serving.engine.sampling_params import SamplingParams

router = APIRouter()
@dataclass
class Job:
    """One choice to generate: prompt index, choice index, tokens and sampling."""

    index: int
    prompt_index: int
    prompt: list[int]
    params: SamplingParams
    echo: str | None = None  # completions' echo: the prompt's text, sent before the generated text
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    streamed_offset: int = 0  # a streamed completion's next text_offset: its tokens' texts so far

    @property
    def first_prompt_token(self) -> int | None:
        """With echo and logprobs, the prompt's first token: reported first, with no logprob (nothing before it)."""
        return self.prompt[0] if self.echo is not None and self.params.logprobs is not None else None


async def run_jobs(request: Request, tenant, resolved, jobs: list[Job]) -> AsyncIterator[tuple[Job, Any]]:
    """Runs all jobs concurrently; yields (job, RequestOutput) as they come. Metrics: TTFT, ITL, latency."""
    backend = request.app.state.backend
    metrics = backend.metrics
    arrival = request.state.arrival
    queue: asyncio.Queue = asyncio.Queue()

    async def one(job: Job) -> None:
        last = None
        try:
            async for out in backend.generate(tenant, resolved, job.prompt, job.params):
                now = time.perf_counter()
                if last is None:
                    metrics.ttft.observe(now - arrival)
                else:
                    metrics.inter_token.observe(now - last)
                last = now
                await queue.put((job, out))
            metrics.e2e.observe(time.perf_counter() - arrival)
            metrics.prompt_tokens.inc(len(job.prompt))
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer, which raises it
            await queue.put((job, e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await queue.put((job, None))

    tasks = [asyncio.create_task(one(j)) for j in jobs]
    try:
        remaining = len(jobs)
        while remaining:
            job, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield job, item
    finally:
        for t in tasks:
            t.cancel()


# What a log-probability that is not a finite number is reported as (-inf, or NaN from non-finite logits of a
# tenant's own model): JSON has neither, and vLLM reports -9999.0 the same way.
NOT_FINITE_LOGPROB = -9999.0


def _logprob(v: float) -> float:
    return v if math.isfinite(v) else NOT_FINITE_LOGPROB


def completion_logprobs(vocab, outs, offset: int, first_token: int | None = None) -> dict:
    """OpenAI's completions logprobs object; `offset` is the text offset of the first token. vocab: has
    token_text(id) (serving.tokenizing.Tokenizing). first_token: an echoed prompt's first token, which comes
    first with null logprobs (as OpenAI's)."""
    tokens, lps, tops, offsets = [], [], [], []
    if first_token is not None:
        tok = vocab.token_text(first_token)
        tokens.append(tok), lps.append(None), tops.append(None), offsets.append(offset)
        offset += len(tok)
    for lp in outs:
        tok = vocab.token_text(lp.token_id)
        tokens.append(tok)
        lps.append(_logprob(lp.logprob))
        tops.append({vocab.token_text(t): _logprob(v) for t, v in lp.top})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(vocab, outs) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        tok = vocab.token_text(token_id)
        return {"token": tok, "logprob": _logprob(logprob), "bytes": list(tok.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in outs]}


def usage_of(jobs: list[Job]) -> dict:
    prompt = sum({j.prompt_index: len(j.prompt) for j in jobs}.values())  # each prompt once, whatever n
    completion = sum(len(j.token_ids) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def bill(request: Request, tenant, resolved, jobs: list[Job]) -> None:
    """Counts an answered request's usage (serving.usage): what its `usage` field reports, also when the client
    left before the end."""
    u = usage_of(jobs)
    request.app.state.backend.usage.record(tenant.name, resolved.usage_name, u["prompt_tokens"], u["completion_tokens"])


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n".encode()


def absorb(job: Job, out) -> tuple[str, list]:
    """Adds one step's output of a job to what the job has produced; returns the text and logprobs it added (on
    an echoing job's first output: the prompt's first)."""
    text, lps = out.new_text, list(out.new_logprobs)
    if job.echo is not None and not job.text:
        text = job.echo + text
        lps = list(out.prompt_logprobs or ()) + lps
    job.text.append(text)
    job.token_ids.extend(out.new_token_ids)
    job.logprobs.extend(lps)
    if out.finished:
        job.finish_reason = "length" if out.finish_reason == "length" else "stop"
    return text, lps


@dataclass
class Reply:
    """The response being built for one request: its id and what a chat and a completion choice look like."""

    tokens: Any  # serving.tokenizing.Tokenizing: token ids to text
    model: str
    chat: bool
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    started: set[int] = field(default_factory=set)  # choices whose first chunk (chat: with the role) is sent

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def whole(self, jobs: list[Job]) -> dict:
        """The non-streamed response."""
        choices = []
        for job in jobs:
            text = "".join(job.text)
            wanted = job.params.logprobs is not None
            if self.chat:
                choices.append({"index": job.index, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(self.tokens, job.logprobs) if wanted else None,
                                "finish_reason": job.finish_reason})  # fmt: skip
            else:
                lps = completion_logprobs(self.tokens, job.logprobs, 0, job.first_prompt_token) if wanted else None
                choices.append({"index": job.index, "text": text, "logprobs": lps, "finish_reason": job.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage_of(jobs)}  # fmt: skip

    def chunk(self, choices: list[dict], usage: dict | None, with_usage: bool) -> dict:
        payload = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": choices}  # fmt: skip
        if with_usage:
            payload["usage"] = usage
        return payload

    def chunk_choice(self, job: Job, out, added: tuple[str, list]) -> dict | None:
        """The streamed choice for one step's output of `job`, which added `added` (absorb's text and logprobs)
        to it; None when the step has nothing to send (no token: a step of a prompt's prefill)."""
        text, lps = added
        finish = job.finish_reason if out.finished else None
        if self.chat:
            delta: dict = {"content": text} if text else {}
            first = job.index not in self.started
            if first:
                delta = {"role": "assistant", **delta, "content": text}
                self.started.add(job.index)
            choice = {"index": job.index, "delta": delta,
                      "logprobs": chat_logprobs(self.tokens, lps) if lps else None, "finish_reason": finish}  # fmt: skip
        else:
            head = job.first_prompt_token if job.index not in self.started else None  # an echoed prompt's
            self.started.add(job.index)
            first = head is not None
            wanted = job.params.logprobs is not None and (lps or first)
            lp = completion_logprobs(self.tokens, lps, job.streamed_offset, head) if wanted else None
            if lp is not None and lp["tokens"]:  # offsets count tokens' texts, as the whole response's do
                job.streamed_offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
            choice = {"index": job.index, "text": text, "logprobs": lp, "finish_reason": finish}
        # A chunk for every generated token, its text held back or not (a partial UTF-8 character, a possible stop
        # string), as vLLM streams: clients time tokens by chunks (vllm bench serve, loadtest), as /metrics does.
        return choice if text or finish or lps or first or out.new_token_ids else None


async def respond(request: Request, tenant, resolved, jobs: list[Job], req, chat: bool) -> Response:
    reply = Reply(request.app.state.backend.tokens, req.model, chat)
    stream = run_jobs(request, tenant, resolved, jobs)
    # Prime the stream: errors before the first token (overloaded, busy tenant, bad input) are plain HTTP errors.
    try:
        first = [await anext(stream)]
    except StopAsyncIteration:
        first = []
    on_end = (lambda: bill(request, tenant, resolved, jobs)) if first else (lambda: None)  # noqa: E731
    if not req.stream:
        return await respond_whole(request, reply, jobs, first, stream, on_end)
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(stream_events(reply, jobs, first, stream, with_usage, on_end),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **replica_header(out for _, out in first)})  # fmt: skip


def replica_header(outs) -> dict[str, str]:
    """`x-deltaserve-replica`: the engine replicas of a cluster that served the request's choices (those known when
    the headers go: a stream's first output; a whole response's every choice); none from one server."""
    replicas = sorted({out.replica for out in outs if out.replica is not None})
    return {"x-deltaserve-replica": ", ".join(replicas)} if replicas else {}


async def respond_whole(request: Request, reply: Reply, jobs: list[Job], first: list, stream, on_end) -> Response:
    served = [out for _, out in first]
    for job, out in first:
        absorb(job, out)

    async def collect() -> None:
        async for job, out in stream:
            absorb(job, out)
            if out.replica is not None:
                served.append(out)

    try:
        if not await until_done_or_disconnected(request, collect()):
            await stream.aclose()  # the client went away: its sequences are aborted within a step
            return Response(status_code=499)
    finally:
        on_end()
    return JSONResponse(reply.whole(jobs), headers=replica_header(served))


async def stream_events(
    reply: Reply, jobs: list[Job], first: list, stream, with_usage: bool, on_end
) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed response; an error after the stream started is one error event."""

    async def outputs():
        for item in first:
            yield item
        async for item in stream:
            yield item

    try:
        async for job, out in outputs():
            added = absorb(job, out)
            choice = reply.chunk_choice(job, out, added)
            if choice is not None:
                yield sse(reply.chunk([choice], None, with_usage))
        if with_usage:
            yield sse(reply.chunk([], usage_of(jobs), True))
    except Exception as e:  # after the stream started: one error event, then [DONE]
        err = to_api_error(e)
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        await stream.aclose()
        on_end()
    yield sse("[DONE]")


async def until_done_or_disconnected(request: Request, work) -> bool:
    """Runs `work` unless the client disconnects first (then cancels it and returns False). A non-streaming
    response is sent only at the end, so without this a client that left would keep its sequences running to
    max_tokens, holding its tenant's concurrency and the server's places."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only the disconnect is left
            pass

    task, watch = asyncio.create_task(work), asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
    if task in done:
        task.result()  # raises the work's error, if any
        return True
    await asyncio.gather(task, return_exceptions=True)  # its cancellation done (an outer one still propagates)
    return False


def _prompt_text(backend, ids: list[int]) -> str:
    try:
        return backend.tokens.decode(ids)
    except ValueError as e:  # an id outside the vocabulary
        raise APIError(400, f"The prompt has {e}.", param="prompt") from None


async def _parsed(request: Request, model, unsupported):
    """The request's body as `model`, known OpenAI fields deltaserve does not implement refused by name."""
    body = await read_json(request)
    refuse_unsupported(body, unsupported)
    return parse(model, body)


async def _admitted(request: Request, tenant, req):
    """(backend, the resolved model) for a generation that may start: refused while draining, the model the
    tenant's own (or the base), or the composition of its own adapters that `adapters` names, on the base; the
    model's kind labels the request's metrics."""
    backend = request.app.state.backend
    refuse_when_draining(backend)
    if req.adapters is not None:
        if req.model != backend.adapters.model_id:
            raise APIError(400, f"A request with `adapters` runs them on the base: `model` must be "
                                f"{backend.adapters.model_id!r}.", param="model")  # fmt: skip
        resolved = await backend.adapters.resolve_composition(tenant, [(p.name, p.weight) for p in req.adapters])
    else:
        resolved = await backend.adapters.resolve(tenant, req.model)
    request.state.model_kind = resolved.kind
    return backend, resolved


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    **documented(key="tenant", body=CompletionRequest, errors=(400, 404, 413, 429, 503), streams=True),
)
async def completions(request: Request, tenant: TenantDep):
    req: CompletionRequest = await _parsed(request, CompletionRequest, UNSUPPORTED_COMPLETION_FIELDS)
    backend, resolved = await _admitted(request, tenant, req)
    p = req.prompt
    texts = [p] if isinstance(p, str) else list(p) if isinstance(p[0], str) else []
    for text in texts:
        check_chars(backend, len(text), "prompt")
    if texts:
        prompts = [await backend.tokens.encode(text) for text in texts]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    jobs = []
    for pi, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        max_tokens = fit_context(len(ids), req.max_tokens, backend.max_model_len, "prompt")
        # echo: the prompt as given (token prompts: as the base's tokenizer writes them)
        echo = (texts[pi] if texts else _prompt_text(backend, ids)) if req.echo else None
        for c in range(req.n):
            params = sampling_for(req, max_tokens, c, req.logprobs, echo=bool(req.echo))
            jobs.append(Job(pi * req.n + c, pi, ids, params, echo))
    return await respond(request, tenant, resolved, jobs, req, chat=False)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    **documented(key="tenant", body=ChatCompletionRequest, errors=(400, 404, 413, 429, 503), streams=True),
)
async def chat_completions(request: Request, tenant: TenantDep):
    req: ChatCompletionRequest = await _parsed(request, ChatCompletionRequest, UNSUPPORTED_CHAT_FIELDS)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    backend, resolved = await _admitted(request, tenant, req)
    ids = await chat_prompt_ids(backend, req.messages)
    asked = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = fit_context(len(ids), req.max_completion_tokens or req.max_tokens, backend.max_model_len, "messages",
                             asked)  # fmt: skip
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    jobs = [Job(c, 0, ids, sampling_for(req, max_tokens, c, logprobs)) for c in range(req.n)]
    return await respond(request, tenant, resolved, jobs, req, chat=True)
