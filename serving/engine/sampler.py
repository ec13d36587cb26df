"""Next-token selection for a batch whose rows each carry their own sampling parameters.

Semantics, per row i of ``logits`` [B, V]:
    first, when the row asks (transformers' logits processors' semantics; see adjust_logits):
              l = logits[i] + logit_bias;  the tokens that would end it set to -inf while it has fewer than
              min_tokens;  repetition_penalty on the tokens of prompt and output;  minus frequency_penalty x count
              and presence_penalty x (count > 0) of each token in the output
    greedy (temperature < GREEDY_EPS):  token = argmax(l)
    sampled:  x = l / temperature;  keep the top_k largest x;  keep the smallest nucleus of mass >= top_p;
              drop what is less likely than min_p x the most likely;
              p = softmax(x);  token = argmax(p / q),  q ~ Exponential(1) per vocabulary entry
              (the "exponential race": P(token = j) = p[j]).
    A seeded row draws q from its own generator, so its tokens depend only on its logits and its seed, never on
    the other rows or its position. Unseeded rows share one draw from the sampler's generator.
    logprobs (when any row asks) are taken from log_softmax(logits[i]) of the RAW logits, as OpenAI reports them.

Nothing here reads a tensor back to the host: the engine syncs once per step after the call.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from serving.engine.sampling_params import SamplingParams

GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy (dividing by them would overflow)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: create one per request, once, and keep it for its life."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class RowSampling:
    """One batch row's sampling state.

    Attributes:
        params: the request's (validated) parameters.
        generator: the request's own generator (``make_generator(seed, logits.device)``), or None when unseeded.
        token_ids: the prompt and the tokens generated so far (the penalties and min_tokens read them).
        num_prompt_tokens: how many of ``token_ids`` are the prompt.
        end_token_ids: the tokens that would end the request (its stop_token_ids, and end-of-sequence unless it
            ignores it): masked while fewer than ``params.min_tokens`` are generated.
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: Sequence[int] = ()
    num_prompt_tokens: int = 0
    end_token_ids: Collection[int] = ()


@dataclass
class SamplerOutput:
    """What the sampler returns; all tensors live on the logits' device.

    Attributes:
        token_ids: [B] int64, the chosen tokens.
        logprobs: [B] float32, log-prob of each chosen token under log_softmax(raw logits); None unless some row
            asked for logprobs (values of rows that did not ask are computed but meaningless to them).
        top_logprobs: [B, K] float32, the K most likely tokens' raw log-probs in descending order, K = the largest
            ``logprobs`` requested in the batch (0 allowed); row i uses its first ``rows[i].params.logprobs``.
        top_ids: [B, K] int64, the token ids matching ``top_logprobs``.
    """

    token_ids: Tensor
    logprobs: Tensor | None = None
    top_logprobs: Tensor | None = None
    top_ids: Tensor | None = None


def _host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a device tensor, without a blocking copy (pinned + non_blocking on CUDA)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


def mask_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Masks (to -inf) what top-k and then top-p exclude; returns a new tensor.

    Semantics:  row i keeps its ``top_k[i]`` largest entries (ties broken by a stable sort), then, of those,
        the smallest prefix (by descending probability of the top-k-masked softmax) whose mass reaches
        ``top_p[i]``: an entry is kept when the mass strictly before it is < top_p[i]. The top entry is always kept.
    Args:
        logits: [B, V] float32 (already divided by the temperature).
        top_k: [B] int64 with values in [1, V] (V = off), or None for no top-k in any row.
        top_p: [B] float32 in (0, 1] (1 = off), or None for no top-p in any row.
    Returns:
        [B, V] float32, ``logits`` with excluded entries set to -inf.
    """
    if top_k is None and top_p is None:
        return logits.clone()
    B, V = logits.shape
    sorted_vals, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
    if top_k is not None:
        ranks = torch.arange(V, device=logits.device)  # [V]
        sorted_vals = sorted_vals.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = sorted_vals.softmax(dim=-1)  # [B, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V], exclusive cumulative sum
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        drop[:, 0] = False
        sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_vals)


def _token_table(rows: list[RowSampling], tokens_of, V: int, device: torch.device) -> Tensor:
    """[len(rows), V] float32: how many times each token occurs in ``tokens_of(row)``."""
    r_idx = [j for j, r in enumerate(rows) for _ in tokens_of(r)]
    t_idx = [t for r in rows for t in tokens_of(r)]
    counts = torch.zeros(len(rows), V, dtype=torch.float32, device=device)
    if t_idx:
        counts.index_put_(
            (_host_to_device(r_idx, torch.int64, device), _host_to_device(t_idx, torch.int64, device)),
            torch.ones(len(t_idx), dtype=torch.float32, device=device),
            accumulate=True,
        )
    return counts


def adjust_logits(logits: Tensor, rows: Sequence[RowSampling]) -> Tensor:
    """The logits each row chooses from: its logit_bias, min_tokens, repetition, frequency and presence penalties
    applied (rows that ask for none are left as they are); a new tensor, or ``logits`` itself when no row asks.

    Semantics, per row (token counts over the output only, except repetition: prompt and output):
        l = logits + logit_bias
        l[end_token_ids] = -inf                while len(output) < min_tokens
        l[t] = l[t] / rp if l[t] > 0 else l[t] * rp    for t in prompt + output   (rp = repetition_penalty)
        l -= frequency_penalty * count(t in output) + presence_penalty * (count > 0)
    Args:
        logits: [B, V] float32.
        rows: B entries.
    Returns:
        [B, V] float32.
    """
    B, V = logits.shape
    which = [i for i, r in enumerate(rows) if r.params.changes_logits]
    if not which:
        return logits
    device = logits.device
    out = logits.clone()
    # logit_bias and min_tokens: a few (row, token) entries each
    at_r, at_t, add = [], [], []
    for i in which:
        r = rows[i]
        for tid, bias in r.params.logit_bias.items():
            at_r.append(i), at_t.append(tid), add.append(bias)
        if len(r.token_ids) - r.num_prompt_tokens < r.params.min_tokens:
            for tid in r.end_token_ids:
                at_r.append(i), at_t.append(tid), add.append(float("-inf"))
    if at_r:
        out.index_put_(
            (_host_to_device(at_r, torch.int64, device), _host_to_device(at_t, torch.int64, device)),
            _host_to_device(add, torch.float32, device),
            accumulate=True,
        )
    rep = [i for i in which if rows[i].params.repetition_penalty != 1.0]
    if rep:
        seen = _token_table([rows[i] for i in rep], lambda r: r.token_ids, V, device) > 0  # [m, V]
        rp = _host_to_device([rows[i].params.repetition_penalty for i in rep], torch.float32, device)[:, None]
        index = _host_to_device(rep, torch.int64, device)
        x = out[index]
        out[index] = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
    pen = [i for i in which if rows[i].params.frequency_penalty or rows[i].params.presence_penalty]
    if pen:
        counts = _token_table([rows[i] for i in pen], lambda r: r.token_ids[r.num_prompt_tokens :], V, device)
        freq = _host_to_device([rows[i].params.frequency_penalty for i in pen], torch.float32, device)[:, None]
        pres = _host_to_device([rows[i].params.presence_penalty for i in pen], torch.float32, device)[:, None]
        index = _host_to_device(pen, torch.int64, device)
        out[index] = out[index] - freq * counts - pres * (counts > 0).float()
    return out


def mask_disallowed(logits: Tensor, allowed: Tensor) -> Tensor:
    """logits [B, V] with every token not allowed set to -inf (a new tensor). allowed: [B, ceil(V / 32)] int32 bits,
    token t allowed when bit t % 32 of word t // 32 is set (llguidance's and xgrammar's layout; all bits set:
    no constraint)."""
    B, V = logits.shape
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    unpacked = ((allowed.to(logits.device)[:, :, None] >> bits) & 1).reshape(B, -1)[:, :V]  # [B, V]
    return logits.masked_fill(unpacked == 0, float("-inf"))


def mask_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Masks (to -inf) the entries of row i whose probability is below ``min_p[i]`` x the row's largest (as
    transformers' MinPLogitsWarper; the top entry is always kept); returns a new tensor.

    Args:
        logits: [B, V] float32 (after temperature, top-k and top-p).
        min_p: [B] float32 in [0, 1] (0 = off).
    """
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Turns the last-position logits of a batch into next tokens, each row with its own parameters.

    Args:
        seed: seeds the sampler-level generator shared by unseeded rows (None = nondeterministic seed).
            One generator is kept per device, created on first use.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(self._seed)
            self._generators[device] = g
        return g

    def __call__(self, logits: Tensor, rows: Sequence[RowSampling], allowed: Tensor | None = None) -> SamplerOutput:
        """Picks one token per row.

        Args:
            logits: [B, V] (float32; other float dtypes are upcast), last-position logits; not modified.
            rows: B entries, row i's parameters and generator.
            allowed: structured outputs' [B, ceil(V / 32)] int32 bitmask of the tokens each row may take
                (mask_disallowed), applied before everything else; None: every token.
        Returns:
            SamplerOutput (token_ids [B] int64; logprobs/top_logprobs/top_ids when any row asked).
        """
        B, V = logits.shape
        assert len(rows) == B, f"{len(rows)} rows for a batch of {B}"
        device = logits.device
        logits = logits.float()
        adjusted = adjust_logits(logits if allowed is None else mask_disallowed(logits, allowed), rows)
        token_ids = adjusted.argmax(dim=-1)  # [B] int64; the answer for greedy rows

        sampled = [i for i, r in enumerate(rows) if r.params.temperature >= GREEDY_EPS]
        if sampled:
            picked = self._sample(adjusted, [rows[i] for i in sampled], sampled)
            if len(sampled) == B:
                token_ids = picked
            else:
                token_ids[_host_to_device(sampled, torch.int64, device)] = picked

        out = SamplerOutput(token_ids=token_ids)
        ks = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        if ks:
            raw = torch.log_softmax(logits, dim=-1)  # [B, V]
            out.logprobs = raw.gather(1, token_ids[:, None]).squeeze(1)  # [B]
            out.top_logprobs, out.top_ids = raw.topk(min(max(ks), V), dim=-1, sorted=True)  # [B, K] each
        return out

    def _sample(self, logits: Tensor, rows: list[RowSampling], index: list[int]) -> Tensor:
        """Samples the rows ``index`` of ``logits`` [B, V]; returns [len(index)] int64."""
        device = logits.device
        n, V = len(rows), logits.shape[1]
        x = logits if n == logits.shape[0] else logits[_host_to_device(index, torch.int64, device)]  # [n, V]

        temps = [r.params.temperature for r in rows]
        x = x / _host_to_device(temps, torch.float32, device)[:, None]

        ks = [r.params.effective_top_k for r in rows]
        ks = [k if 0 < k < V else V for k in ks]
        ps = [r.params.top_p for r in rows]
        top_k = _host_to_device(ks, torch.int64, device) if any(k < V for k in ks) else None
        top_p = _host_to_device(ps, torch.float32, device) if any(p < 1.0 for p in ps) else None
        if top_k is not None or top_p is not None:
            x = mask_top_k_top_p(x, top_k, top_p)
        min_ps = [r.params.min_p for r in rows]
        if any(min_ps):
            x = mask_min_p(x, _host_to_device(min_ps, torch.float32, device))
        probs = x.softmax(dim=-1)  # [n, V]

        q = torch.empty_like(probs)  # [n, V] Exponential(1) noise
        if any(r.generator is None for r in rows):
            q.exponential_(generator=self._shared_generator(device))
        for j, r in enumerate(rows):
            if r.generator is not None:
                q[j].exponential_(generator=r.generator)
        q.clamp_min_(torch.finfo(q.dtype).tiny)  # a zero draw would make 0/0 = nan for masked entries
        return (probs / q).argmax(dim=-1)
