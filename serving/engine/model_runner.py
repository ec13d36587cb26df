"""Runs one scheduled step on the device: builds the step's metadata once, runs the model, samples.

Owns the KV cache (allocated once), the LoRA scratch buffer and the sampler. One host->device copy of
metadata per step (serving/engine/staging.py) and one device->host copy of the sampled tokens at the end;
nothing else syncs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from deltakernels import DeltaOps
from registry.slot_pool import SlotPool
from serving.engine.cuda_graphs import DecodeGraphs
from serving.engine.sampler import RowSampling, Sampler, make_generator
from serving.engine.scheduler import ScheduledSeq
from serving.engine.sequence import Sequence, TokenLogprob
from serving.engine.staging import StepStaging
from serving.engine.structured import StructuredOutputs
from serving.models.attention import build_attention_batch
from serving.models.llama import LlamaForCausalLM
from serving.models.tenant_layers import DeltaBatch


@dataclass(frozen=True)
class StepResult:
    token_ids: list[int | None]  # one per scheduled sequence; None for a prefill chunk short of its prompt's end
    logprobs: list[TokenLogprob | None]
    # per scheduled sequence asking for prompt logprobs: (index of the first prompt token scored, one entry per
    # prompt token this step's chunk scores), else None
    prompt_logprobs: list[tuple[int, list[TokenLogprob]] | None] | None = None


@dataclass(frozen=True)
class _PromptScoring:
    """Which hidden rows of a step score which prompt tokens (for the sequences asking for prompt logprobs)."""

    items: list[tuple[int, int, int, int]]  # (scheduled index, first prompt token scored, how many, top k)
    rows: torch.Tensor  # [M] int64, the hidden rows (each the position before its token)
    targets: torch.Tensor  # [M] int64, the prompt tokens they score
    deltas: DeltaBatch
    k: int  # top alternatives to report: the largest prompt_logprobs asked


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        slots: SlotPool,
        ops: DeltaOps,
        *,
        num_kv_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        decode_graphs: tuple[int, int, bool] | None = None,
    ):
        """decode_graphs: (largest batch, longest context in tokens, capture) to run decode steps through
        serving/engine/cuda_graphs.py (capture=False: its padded inputs run eagerly, as on a CPU); None: off."""
        self.model = model
        self.slots = slots
        self.ops = ops
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        c = model.config
        # num_kv_blocks usable blocks plus the NULL_BLOCK (serving/engine/block_manager.py)
        shape = (c.num_layers, 2, num_kv_blocks + 1, block_size, c.num_kv_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
        model.bind_kv_cache([(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(c.num_layers)])
        self.lora_scratch = torch.zeros(max_num_batched_tokens, slots.max_lora_rank, dtype=torch.float32, device=device)
        self.sampler = Sampler(seed)
        self.structured: StructuredOutputs | None = None  # set by the engine when it has a tokenizer
        self.staging = StepStaging(device)
        self.graphs: DecodeGraphs | None = None
        if decode_graphs is not None:
            max_batch, max_len, capture = decode_graphs
            self.graphs = DecodeGraphs(self, min(max_batch, max_num_batched_tokens), -(-max_len // block_size), capture)

    @staticmethod
    def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        c = model.config
        return c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8

    def _delta_batch(self, seqs: Seq[Sequence], lens: Seq[int], stage: StepStaging) -> DeltaBatch:
        """The deltas of rows laid out sequence after sequence, lens[j] rows for seqs[j]."""
        bd, lora, ia3 = zip(*(s.row_slots for s in seqs)) if seqs else ((), (), ())
        composed = [s.weighted_parts for s in seqs] if any(s.composed for s in seqs) else None
        return DeltaBatch.build(self.ops, self.slots, bd, lora, lens, self.lora_scratch, self.device, stage,
                                ia3_slots=ia3, composed=composed)  # fmt: skip

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> StepResult:
        seqs = [s.seq for s in scheduled]
        logits = None
        scored: list[tuple[int, list[TokenLogprob]] | None] | None = None
        if self.graphs is not None and all(s.num_tokens == 1 for s in scheduled) and not any(map(_scores_prompt, scheduled)):
            bd_slots = {s.bitdelta_slot for s in seqs if s.bitdelta_slot >= 0}
            key = self.graphs.key_for(seqs, self.slots.has_replacements and self.slots.replaces_any(bd_slots))
            if key is not None:
                logits = self.graphs.run(seqs, key)
        if logits is None:
            logits, scored = self._forward(scheduled)
        completing = [i for i, s in enumerate(scheduled) if s.completes]
        result = StepResult([None] * len(seqs), [None] * len(seqs), scored)
        if completing:
            sampled = self._sample([seqs[i] for i in completing], logits)
            for j, i in enumerate(completing):
                result.token_ids[i], result.logprobs[i] = sampled.token_ids[j], sampled.logprobs[j]
        return result

    def _forward(self, scheduled: list[ScheduledSeq]):
        """The last-position logits [C, V] float32 of the C sequences this step completes (eagerly; None if none
        does: every row a prefill chunk short of its prompt's end), and the prompt logprobs this step scores
        (StepResult.prompt_logprobs; None when no sequence asks)."""
        seqs = [s.seq for s in scheduled]
        query_lens = [s.num_tokens for s in scheduled]
        context_lens = [s.seq.num_computed + s.num_tokens for s in scheduled]
        input_ids: list[int] = []
        for s, n in zip(seqs, query_lens):
            input_ids.extend(s.token_ids[s.num_computed : s.num_computed + n])
        # Every host array of the step goes into one staged transfer (uploaded below, before any kernel).
        stage = self.staging.begin()
        ids = stage(input_ids, torch.int64)
        attn = build_attention_batch(
            query_lens,
            context_lens,
            [s.block_table for s in seqs],
            self.block_size,
            self.device,
            self.model.config.sliding_window,
            stage,
        )
        token_deltas = self._delta_batch(seqs, query_lens, stage)
        completing = [i for i, s in enumerate(scheduled) if s.completes]
        decode_only = all(n == 1 for n in query_lens)  # then the last positions are all rows, with the same deltas
        if not decode_only and completing:
            ends = list(itertools.accumulate(query_lens))
            last = stage([ends[i] - 1 for i in completing], torch.int64)
            seq_deltas = self._delta_batch([seqs[i] for i in completing], [1] * len(completing), stage)
        scoring = self._prompt_scoring(scheduled, stage)
        stage.upload()
        hidden = self.model(ids, attn, token_deltas)  # [N, D]
        scored = self._score_prompts(hidden, scoring, len(scheduled)) if scoring is not None else None
        if not completing:
            return None, scored
        if decode_only:
            last_hidden, seq_deltas = hidden, token_deltas
        else:
            last_hidden = hidden[last]  # [C, D]
        return self.model.compute_logits(last_hidden, seq_deltas), scored  # [C, V] float32

    def _prompt_scoring(self, scheduled, stage: StepStaging) -> _PromptScoring | None:
        """Stages the rows and targets of the prompt tokens this step scores (a chunk's position p scores prompt
        token p + 1); None when no scheduled sequence asks for prompt logprobs."""
        items, rows, targets = [], [], []
        start = 0
        for i, s in enumerate(scheduled):
            seq, first = s.seq, s.seq.num_computed
            if _scores_prompt(s):
                count = min(first + s.num_tokens, seq.num_prompt_tokens - 1) - first
                items.append((i, first + 1, count, seq.params.prompt_logprobs))
                rows.extend(range(start, start + count))
                targets.extend(seq.token_ids[first + 1 : first + 1 + count])
            start += s.num_tokens
        if not items:
            return None
        deltas = self._delta_batch([scheduled[i].seq for i, *_ in items], [n for _, _, n, _ in items], stage)
        k = max(k for *_, k in items)
        return _PromptScoring(items, stage(rows, torch.int64), stage(targets, torch.int64), deltas, k)

    def _score_prompts(self, hidden: torch.Tensor, scoring: _PromptScoring, n: int) -> list:
        """Each scored prompt token's log-probability under the raw distribution at the position before it, and
        the top alternatives there (one more device->host copy, in the steps that score prompts only)."""
        logprobs = self.model.compute_logits(hidden[scoring.rows], scoring.deltas).log_softmax(dim=-1)  # [M, V]
        chosen = logprobs.gather(1, scoring.targets[:, None]).squeeze(1).tolist()
        top_lp, top_ids = logprobs.topk(min(scoring.k, logprobs.shape[1]), dim=-1)  # [M, K] each
        top_lp, top_ids, targets = top_lp.tolist(), top_ids.tolist(), scoring.targets.tolist()
        out: list = [None] * n
        at = 0
        for i, first, count, k in scoring.items:
            out[i] = (first, [TokenLogprob(targets[j], chosen[j], list(zip(top_ids[j][:k], top_lp[j][:k])))
                              for j in range(at, at + count)])  # fmt: skip
            at += count
        return out

    def _sample(self, seqs: list, logits: torch.Tensor) -> StepResult:
        rows = []
        for s in seqs:
            if s.generator is None and s.params.seed is not None:
                s.generator = make_generator(s.params.seed, self.device)
            rows.append(RowSampling(s.params, s.generator, s.token_ids, s.num_prompt_tokens, s.end_token_ids))
        allowed = None
        if self.structured is not None and any(s.matcher is not None for s in seqs):
            allowed = self.structured.fill_bitmask([s.matcher for s in seqs])  # host: llguidance, per guided row
            allowed = allowed.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else allowed
        out = self.sampler(logits, rows, allowed)
        token_ids = out.token_ids.tolist()  # the step's one device->host sync
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if out.logprobs is not None:
            chosen = out.logprobs.tolist()
            top_lp, top_ids = out.top_logprobs.tolist(), out.top_ids.tolist()
            for i, s in enumerate(seqs):
                k = s.params.logprobs
                if k is not None:
                    logprobs[i] = TokenLogprob(token_ids[i], chosen[i], list(zip(top_ids[i][:k], top_lp[i][:k])))
        return StepResult(token_ids, logprobs)


def _scores_prompt(s: ScheduledSeq) -> bool:
    """True when this step's chunk of the sequence scores prompt tokens (it asks for prompt logprobs and the
    chunk starts before the prompt's last token)."""
    return s.seq.prompt_logprobs is not None and s.seq.num_computed < s.seq.num_prompt_tokens - 1
