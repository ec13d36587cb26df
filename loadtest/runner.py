"""Drive an OpenAI-compatible server with many concurrent requests and measure each one.

`run_load(config)` sends `config.requests` requests (fewer when `config.duration` runs out first) to the one
server at `config.url`, at most `config.concurrency` at a time, each with one of the (key, model) targets, and
returns a `RunResult` with one `RequestResult` per request. No torch: this runs on any machine that reaches
the server. Only relative paths of that one base URL are ever requested, and redirects are not followed.

Over 400 lines: one concept, one run's requests and their measurements (the streamed and plain request
paths, their timings and the report are one data flow).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

COMPLETIONS_PATH = "/v1/completions"
SLO_METRICS = ("ttft", "tpot", "e2e")
CHAT_PATH = "/v1/chat/completions"
MAX_ERROR_MESSAGE = 300


@dataclass(frozen=True)
class Target:
    """One tenant key and one model name (the base id or one of that tenant's adapters)."""

    key: str
    model: str


@dataclass(frozen=True)
class Prompt:
    """One prompt: a completion prompt `text`, or chat `messages`; `max_tokens` overrides the run's."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None

    def as_messages(self) -> list[dict[str, Any]]:
        """The chat messages of this prompt (a plain prompt becomes one user message)."""
        return self.messages if self.messages is not None else [{"role": "user", "content": self.text or ""}]


@dataclass
class LoadConfig:
    """What one load-test run does. Checked by `validate()`; keys never leave this object into a report."""

    url: str
    targets: list[Target]
    prompts: list[Prompt]
    requests: int = 100
    concurrency: int = 8
    max_tokens: int = 64
    temperature: float | None = None
    stream: bool = True
    chat: bool = False
    duration: float | None = None
    seed: int | None = None
    assign: str = "round-robin"  # or "random" (seeded by `seed`)
    retry: int = 0  # retries of a 429/503 answer, each after its Retry-After (capped by retry_max_wait)
    retry_max_wait: float = 10.0
    timeout: float = 120.0  # whole-request limit, retries included
    ignore_eos: bool = False  # vLLM/deltaserve extension: always generate max_tokens tokens
    prompts_source: str = "inline"
    # Arrivals (as `vllm bench serve`): None = each worker sends its next request as soon as its last one ends;
    # a rate = Poisson arrivals at that many requests/s (still at most `concurrency` in flight); a ramp = the
    # rate goes linearly from its first to its second value over the run's requests.
    request_rate: float | None = None
    ramp: tuple[float, float] | None = None
    zipf: float | None = None  # target popularity: the k-th target (from 1) drawn with weight k ** -zipf
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in seconds: "ttft", "tpot", "e2e"

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.targets:
            raise ValueError("at least one (key, model) target is needed")
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        if self.requests < 1:
            raise ValueError("--requests must be at least 1")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be positive")
        if self.assign not in ("round-robin", "random"):
            raise ValueError("--assign must be round-robin or random")
        if self.retry < 0 or self.retry_max_wait < 0 or self.timeout <= 0:
            raise ValueError("--retry, --retry-max-wait must be >= 0 and --timeout > 0")
        if not self.chat and any(p.messages is not None and p.text is None for p in self.prompts):
            raise ValueError("prompts with `messages` need --chat")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError("--request-rate must be positive")
        if self.ramp is not None and (self.request_rate is not None or min(self.ramp) <= 0):
            raise ValueError("--ramp needs two positive rates, and no --request-rate")
        if self.zipf is not None and not self.zipf > 0:
            raise ValueError("--zipf must be positive")
        if set(self.goodput) - set(SLO_METRICS) or any(not v > 0 for v in self.goodput.values()):
            raise ValueError(f"--goodput takes {', '.join(SLO_METRICS)} with positive limits")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must be an http(s) URL, not {public_url(self.url)!r}")

    def public_params(self) -> dict[str, Any]:
        """The run's parameters for a report: everything but the keys (only how many there were)."""
        return {
            "url": public_url(self.url),
            "models": [t.model for t in self.targets],
            "num_keys": len({t.key for t in self.targets}),
            "num_targets": len(self.targets),
            "requests": self.requests,
            "concurrency": self.concurrency,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
            "chat": self.chat,
            "duration": self.duration,
            "seed": self.seed,
            "assign": self.assign,
            "retry": self.retry,
            "retry_max_wait": self.retry_max_wait,
            "timeout": self.timeout,
            "ignore_eos": self.ignore_eos,
            "prompts": self.prompts_source,
            "num_prompts": len(self.prompts),
            "request_rate": self.request_rate,
            "ramp": list(self.ramp) if self.ramp else None,
            "zipf": self.zipf,
            "goodput": dict(self.goodput),
        }


@dataclass
class RequestResult:
    """What one request did. Times in seconds; `start` is relative to the run's start."""

    index: int
    target: int  # index into config.targets (never the key itself)
    model: str
    stream: bool
    start: float = 0.0
    offered_rate: float | None = None  # with arrivals at a rate: the rate (requests/s) when this one arrived
    status: int | None = None  # HTTP status of the last attempt; None when no answer came
    ok: bool = False
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    ttft: float | None = None  # send -> first streamed chunk (text or not); not streamed: the whole answer
    itl: list[float] = field(default_factory=list)  # streaming only: gaps between chunks (tokens)
    e2e: float | None = None  # send -> last byte (of the last attempt)
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    usage_reported: bool = False  # False: output_tokens counted from chunks
    retries: int = 0

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def error_key(self) -> str | None:
        """The error's code, else its type; None for a success."""
        return None if self.ok else (self.error_code or self.error_type or "unknown")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (no key in it)."""
        return {
            "index": self.index, "target": self.target, "model": self.model, "stream": self.stream,
            "start": self.start, "offered_rate": self.offered_rate, "status": self.status, "ok": self.ok, "error_type": self.error_type,
            "error_code": self.error_code, "error_message": self.error_message, "ttft": self.ttft,
            "itl": self.itl, "tpot": self.tpot, "e2e": self.e2e, "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens, "usage_reported": self.usage_reported, "retries": self.retries,
        }


@dataclass
class RunResult:
    """All the requests of one run, with its wall time (first send to last answer) and start time."""

    config: LoadConfig
    results: list[RequestResult]
    started_at: str
    wall_time: float


def public_url(url: str) -> str:
    """`url` without any user:password part, for reports."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    return str(u.copy_with(userinfo=b"")) if u.userinfo else str(u)


def base_url(url: str) -> str:
    """The server root: a trailing `/` or `/v1` (as OpenAI clients write base URLs) is dropped."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def load_prompts(path: Path) -> list[Prompt]:
    """Prompts from a JSONL file: each line a JSON string, or an object with `prompt` (str) or `messages`
    (a chat message list), and optionally `max_tokens`. Blank lines are skipped."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if isinstance(item, str):
            prompts.append(Prompt(text=item))
            continue
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: expected a string or an object")
        text, messages, max_tokens = item.get("prompt"), item.get("messages"), item.get("max_tokens")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{n}: `prompt` must be a string")
        if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            raise ValueError(f"{path}:{n}: `messages` must be a list of objects")
        if text is None and messages is None:
            raise ValueError(f"{path}:{n}: needs `prompt` or `messages`")
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"{path}:{n}: `max_tokens` must be a positive integer")
        prompts.append(Prompt(text=text, messages=messages, max_tokens=max_tokens))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def pair_targets(keys: Sequence[str], models: Sequence[str]) -> list[Target]:
    """(key, model) targets: keys and models paired in order when there are as many of each; one key with
    many models, or many keys with one model, pairs the single one with each of the others."""
    if not keys or not models:
        raise ValueError("at least one --key and one --model are needed")
    if len(keys) == len(models):
        return [Target(k, m) for k, m in zip(keys, models)]
    if len(keys) == 1:
        return [Target(keys[0], m) for m in models]
    if len(models) == 1:
        return [Target(k, models[0]) for k in keys]
    raise ValueError(f"{len(keys)} keys and {len(models)} models: give as many of each, or one of either")


def plan(config: LoadConfig) -> list[tuple[int, int]]:
    """(target index, prompt index) for each of the run's requests: round-robin or seeded-random, or with
    `zipf` the targets drawn by Zipf popularity (the first the most popular; prompts random), seeded."""
    nt, npr = len(config.targets), len(config.prompts)
    rng = random.Random(config.seed)
    if config.zipf is not None:
        weights = [(k + 1) ** -config.zipf for k in range(nt)]
        targets = rng.choices(range(nt), weights=weights, k=config.requests)
        return [(t, rng.randrange(npr)) for t in targets]
    if config.assign == "random":
        return [(rng.randrange(nt), rng.randrange(npr)) for _ in range(config.requests)]
    return [(i % nt, i % npr) for i in range(config.requests)]


def arrivals(config: LoadConfig) -> list[tuple[float, float]] | None:
    """(arrival time from the run's start in s, the rate then) of each request, or None without a rate: gaps are
    exponential (Poisson arrivals) at `request_rate`, or at the ramp's rate for the request's place in the run."""
    if config.request_rate is None and config.ramp is None:
        return None
    rng = random.Random(None if config.seed is None else config.seed + 1)
    out, t, n = [], 0.0, config.requests
    for i in range(n):
        if config.ramp is not None:
            a, b = config.ramp
            rate = a + (b - a) * (i / (n - 1) if n > 1 else 0.0)
        else:
            rate = config.request_rate  # type: ignore[assignment]
        if i:
            t += rng.expovariate(rate)
        out.append((t, rate))
    return out


def request_body(config: LoadConfig, target: Target, prompt: Prompt) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of one request."""
    body: dict[str, Any] = {"model": target.model, "max_tokens": prompt.max_tokens or config.max_tokens,
                            "stream": config.stream}
    if config.chat:
        path, body["messages"] = CHAT_PATH, prompt.as_messages()
    else:
        path, body["prompt"] = COMPLETIONS_PATH, prompt.text
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    return path, body


def _set_error(res: RequestResult, payload: Any, fallback_type: str, fallback_message: str = "") -> None:
    """Fill the error fields from an OpenAI-shaped error body, or from the fallbacks."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        res.error_type = str(err.get("type") or fallback_type)
        res.error_code = str(err["code"]) if err.get("code") is not None else None
        res.error_message = str(err.get("message") or "")[:MAX_ERROR_MESSAGE]
    else:
        res.error_type = fallback_type
        res.error_code = None
        res.error_message = (fallback_message or (str(err) if err else ""))[:MAX_ERROR_MESSAGE]


def _take_usage(res: RequestResult, payload: Any) -> None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            res.output_tokens = usage["completion_tokens"]
            res.usage_reported = True
        if isinstance(usage.get("prompt_tokens"), int):
            res.prompt_tokens = usage["prompt_tokens"]


async def _read_stream(response: httpx.Response, res: RequestResult, sent: float) -> None:
    """Read an SSE body: `data: {...}` chunks, `data: {"error": ...}` events and the final `data: [DONE]`."""
    last: float | None = None
    chunks = 0
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # comments, `event:`/`id:` lines, blank separators
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            _set_error(res, None, "stream_error", f"bad SSE data: {data[:80]}")
            res.error_code = "bad_event"
            return
        if isinstance(event, dict) and "error" in event:
            _set_error(res, event, "stream_error")
            continue  # the server still sends [DONE] after an error event
        if not isinstance(event, dict):
            continue
        _take_usage(res, event)
        # Every chunk with a choice is a token (the server streams one per token, its text held back or not), as
        # vllm bench serve counts them: the first's time is the TTFT, the gaps between the next ones the ITL.
        if event.get("choices"):
            now = time.perf_counter()
            if res.ttft is None:
                res.ttft = now - sent
            if last is not None:
                res.itl.append(now - last)
            last = now
            chunks += 1
    if not res.usage_reported:
        res.output_tokens = chunks
    if res.error_type is None and not done:
        res.error_type, res.error_code, res.error_message = "stream_error", "incomplete_stream", "no data: [DONE]"
    res.ok = res.error_type is None


async def _attempt(client: httpx.AsyncClient, config: LoadConfig, target: Target, path: str, body: dict[str, Any],
                   res: RequestResult, sent: float) -> float | None:
    """One HTTP exchange, filling `res`; times count from `sent` (the first attempt's send, so retries show in
    the latencies). Returns the wait before a retry (429/503 with retries left), else None."""
    for name in ("ok", "ttft", "output_tokens", "prompt_tokens", "error_type", "error_code", "error_message"):
        setattr(res, name, False if name == "ok" else None)
    res.itl, res.usage_reported = [], False
    headers = {"Authorization": f"Bearer {target.key}"}
    try:
        async with client.stream("POST", path, json=body, headers=headers) as response:
            res.status = response.status_code
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = None
                _set_error(res, payload, f"http_{response.status_code}", raw[:MAX_ERROR_MESSAGE].decode("utf-8", "replace"))
                res.e2e = time.perf_counter() - sent
                if response.status_code in (429, 503) and res.retries < config.retry:
                    return retry_after_seconds(response.headers.get("Retry-After"), config.retry_max_wait)
                return None
            if config.stream:
                await _read_stream(response, res, sent)
            else:
                raw = await response.aread()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = None
                if isinstance(payload, dict) and "choices" in payload:
                    _take_usage(res, payload)
                    res.ok = True
                else:
                    _set_error(res, payload, "bad_response", raw[:MAX_ERROR_MESSAGE].decode("utf-8", "replace"))
            res.e2e = time.perf_counter() - sent
            if not config.stream and res.ok:
                res.ttft = res.e2e  # the first token arrives with the whole answer
    except httpx.TimeoutException as e:
        res.e2e = time.perf_counter() - sent
        res.error_type, res.error_code, res.error_message = "timeout", type(e).__name__, str(e)[:MAX_ERROR_MESSAGE]
    except httpx.HTTPError as e:
        res.e2e = time.perf_counter() - sent
        res.error_type, res.error_code = "connection_error", type(e).__name__
        res.error_message = str(e)[:MAX_ERROR_MESSAGE]
    return None


def retry_after_seconds(header: str | None, cap: float) -> float:
    """The wait a Retry-After header asks for (seconds or an HTTP date), within [0, cap]; 1 s when absent."""
    if header is None:
        return min(1.0, cap)
    try:
        wait = float(header)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            wait = (parsedate_to_datetime(header) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            wait = 1.0
    return max(0.0, min(wait, cap))


async def _one_request(client: httpx.AsyncClient, config: LoadConfig, res: RequestResult, prompt: Prompt) -> None:
    """Send one request (with its bounded retries), filling `res`; never raises for a server's answer."""
    target = config.targets[res.target]
    path, body = request_body(config, target, prompt)
    sent = time.perf_counter()
    while True:
        wait = await _attempt(client, config, target, path, body, res, sent)
        if wait is None:
            return
        await asyncio.sleep(wait)
        res.retries += 1


async def _run(config: LoadConfig, transport: httpx.AsyncBaseTransport | None) -> RunResult:
    assignments = plan(config)
    results: list[RequestResult] = []
    next_index = 0
    t0 = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stop_at = None if config.duration is None else t0 + config.duration
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 10.0))
    last_end = t0

    async def send(client: httpx.AsyncClient, i: int, rate: float | None) -> None:
        """Request i now, measured into a new RequestResult (a timeout is a result, not an exception)."""
        nonlocal last_end
        ti, pi = assignments[i]
        res = RequestResult(index=i, target=ti, model=config.targets[ti].model, stream=config.stream,
                            start=time.perf_counter() - t0, offered_rate=rate)  # fmt: skip
        results.append(res)
        try:
            await asyncio.wait_for(_one_request(client, config, res, config.prompts[pi]), config.timeout)
        except asyncio.TimeoutError:
            res.ok = False
            res.error_type, res.error_code = "timeout", "request_timeout"
            res.error_message = f"no complete answer within {config.timeout} s"
            res.e2e = time.perf_counter() - t0 - res.start
        last_end = max(last_end, time.perf_counter())

    async def worker(client: httpx.AsyncClient) -> None:
        """Closed loop: the next request as soon as this worker's last one ended."""
        nonlocal next_index
        while next_index < len(assignments) and (stop_at is None or time.perf_counter() < stop_at):
            next_index += 1
            await send(client, next_index - 1, None)

    async def timed(client: httpx.AsyncClient, schedule: list[tuple[float, float]]) -> None:
        """Open loop: requests at their arrival times, at most `concurrency` in flight (later arrivals wait for a
        place, as `vllm bench serve --max-concurrency`)."""
        places = asyncio.Semaphore(config.concurrency)

        async def placed(i: int, rate: float) -> None:
            async with places:
                await send(client, i, rate)

        tasks = []
        for i, (at, rate) in enumerate(schedule):
            if stop_at is not None and t0 + at >= stop_at:
                break
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(placed(i, rate)))
        await asyncio.gather(*tasks)

    schedule = arrivals(config)
    async with httpx.AsyncClient(base_url=base_url(config.url), limits=limits, timeout=timeout,
                                 follow_redirects=False, transport=transport) as client:
        if schedule is None:
            await asyncio.gather(*(worker(client) for _ in range(min(config.concurrency, len(assignments)))))
        else:
            await timed(client, schedule)
    results.sort(key=lambda r: r.index)
    return RunResult(config=config, results=results, started_at=started_at, wall_time=last_end - t0)


def run_load(config: LoadConfig, transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Run the load test described by `config` (validated first) and return every request's measurements.

    Bounded in count (`requests`) and in time: no request starts after `duration` seconds, and each request,
    retries included, is given up after `timeout` seconds. `transport` replaces the network (tests)."""
    config.validate()
    return asyncio.run(_run(config, transport))


async def run_load_async(config: LoadConfig, transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """`run_load` for callers already inside an event loop."""
    config.validate()
    return await _run(config, transport)
