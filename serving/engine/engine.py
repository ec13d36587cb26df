"""The engine: requests in, tokens and text out, one `step()` at a time.

    step() = schedule -> run -> postprocess

It owns the model, the KV cache, the delta slot pool and the scheduler. It is single-threaded: the
server drives it from one thread of its own; offline generation calls `generate()`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltakernels import select_delta_ops
from registry.checkpoint import Checkpoint
from registry.deltas import DELTA_KINDS, BaseSpec, Delta, Served
from registry.fingerprint import base_spec
from registry.host_tier import TierObserver
from registry.magnitudes import measure as measure_magnitudes
from registry.model_config import ModelConfig
from registry.slot_pool import SlotPool
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.errors import PromptTooLong, fit_context
from serving.engine.host_memory import bound_onednn_caches
from serving.engine.model_runner import ModelRunner
from serving.engine.sampling_params import Guide, SamplingParams, SamplingParamsError
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import SeqStatus, Sequence, TokenLogprob
from serving.engine.structured import StructuredOutputs
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import load_model_from_checkpoint, resolve_device, resolve_dtype
from serving.models.tenant_layers import cpu_weight_packing_available, pack_cpu_weights

log = logging.getLogger("deltaserve")


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed), and its totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    # with prompt_logprobs, on a request's first output: prompt tokens 1.. (the first has nothing before it)
    prompt_logprobs: list[TokenLogprob] | None = None
    # on a request's first output, when an engine replica of a cluster made it: that replica's id
    # (serving.cluster.replica; the API's x-deltaserve-replica header)
    replica: str | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request, as `generate()` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None = None  # with params.prompt_logprobs: prompt tokens 1..


@dataclass(frozen=True)
class EngineStats:
    """What the engine holds now (for metrics and health; read from any thread, a snapshot)."""

    num_waiting: int
    num_running: int
    kv_usage: float  # share of the KV blocks in use, 0..1
    slots_in_use: dict[str, int]  # delta kind -> slots holding a delta
    distinct_deltas_running: int
    num_preemptions: int  # since start


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, tokenizer, spec: BaseSpec, config: EngineConfig,
                 base_dir: Path | None = None):  # fmt: skip
        """base_dir: the checkpoint directory the model came from (compression of uploaded fine-tunes reads it).
        Over 60 lines: the engine's parts built in the order they depend on each other (model, KV cache, slots,
        runner, scheduler, structured outputs), a few lines each."""
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        mc: ModelConfig = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the engine on a CUDA device")
        self.eos_token_ids = set(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        # What the served weights look like, for refusing deltas absurd against them (before any repacking).
        self.spec = dataclasses.replace(spec, magnitudes=measure_magnitudes(dict(model.state_dict())))
        if self.device.type == "cpu" and config.pack_cpu_weights and cpu_weight_packing_available():
            bound_onednn_caches()  # before the first packed GEMM: its caches grow with every batch shape otherwise
            pack_cpu_weights(model, rows_hint=config.max_num_seqs)
        ops = select_delta_ops(config.kernel_backend, self.device)
        self.slots = SlotPool(
            model.projection_paths(),
            dict(model.state_dict()),
            bitdelta_slots=config.bitdelta_slots,
            lora_slots=config.lora_slots,
            max_lora_rank=config.max_lora_rank,
            ia3_slots=config.ia3_slots,
            dtype=self.dtype,
            device=self.device,
            sign_layout=ops.sign_layout,
        )
        num_blocks = config.num_kv_blocks or self._auto_num_blocks()
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {config.block_size}) cannot hold one sequence of max_model_len {self.max_model_len}"
            )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.slots)
        self.runner = ModelRunner(
            model,
            self.slots,
            ops,
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            device=self.device,
            dtype=self.dtype,
            seed=config.seed,
            decode_graphs=(config.max_num_seqs, self.max_model_len, True) if config.cuda_graphs else None,
        )
        self._no_structured = "structured outputs need the model's tokenizer"
        if tokenizer is not None:
            try:
                self.runner.structured = StructuredOutputs(tokenizer, mc.vocab_size, self.eos_token_ids)
            except Exception as e:  # noqa: BLE001 - a tokenizer llguidance cannot read: serve everything else
                self._no_structured = f"structured outputs are not available with this model's tokenizer ({e})"
                log.warning("%s", self._no_structured)
        self._seqs: dict[str, Sequence] = {}
        self.num_steps = 0
        self.base_dir = base_dir

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        from transformers import AutoTokenizer

        config = config or EngineConfig()
        ckpt = Checkpoint(model_dir)
        mc = ModelConfig.from_hf(ckpt.config, name=Path(model_dir).resolve().name)
        device = resolve_device(config.device)
        model = load_model_from_checkpoint(ckpt, mc, resolve_dtype(config.dtype, mc, device), device)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return cls(model, tokenizer, base_spec(ckpt), config, base_dir=Path(model_dir))

    def _auto_num_blocks(self) -> int:
        per_block = ModelRunner.kv_block_bytes(self.model, self.config.block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total
        else:
            budget = self.config.kv_cache_cpu_bytes
        wanted = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(wanted, int(budget // per_block) - 1))  # one more is the NULL_BLOCK

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        delta: Served | None = None,
        tenant: str = "",
    ) -> None:
        """Queues a request of `tenant` (the scheduler shares the batch fairly among tenants) on the base, one
        delta, or a composition of several (registry.deltas.Composition: their weighted merge).
        Raises SamplingParamsError / PromptTooLong / DeltaError for bad input."""
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate(self.model.config.vocab_size)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise SamplingParamsError("the prompt is empty", "prompt")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise SamplingParamsError("the prompt has token ids outside the vocabulary", "prompt")
        fit_context(len(ids), params.max_tokens, self.max_model_len)
        if delta is not None:
            self.slots.check_servable(delta)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens,
                                           params.include_stop_str_in_output, params.min_tokens)  # fmt: skip
        ends = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        matcher = None
        if params.guide is not None:
            if self.runner.structured is None:
                raise SamplingParamsError(self._no_structured, params.guide.param)
            matcher = self.runner.structured.matcher(params.guide, tenant)
        # Without fair scheduling every request counts as one tenant's: first come, first served.
        seq = Sequence(request_id, ids, params, delta, detok, tenant=tenant if self.config.fair_scheduling else "",
                       end_token_ids=ends, matcher=matcher)  # fmt: skip
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stops a request now, freeing its KV blocks and slot. False if it is unknown or done."""
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    # ---- deltas and state (what a server needs; engine-thread only unless said) --------------------
    def preload(self, delta: Delta) -> None:
        """Loads `delta` into a slot, left unpinned (it stays until the LRU needs the slot); a no-op when every
        slot of its kind is pinned."""
        if self.slots.acquire(delta) is not None:
            self.slots.release(delta)

    def forget_delta(self, kind: str, key: str) -> None:
        """A deleted or replaced delta: its slot is freed once no running request uses it."""
        self.slots.forget(kind, key)

    def holds_delta(self, kind: str, key: str) -> bool:
        """True when the delta of `key` sits in a GPU slot now. Any thread may ask; the answer can be stale at
        once (the engine thread may evict it next step), so use it for accounting, never for correctness."""
        return self.slots.holds(kind, key)

    def compile_guide(self, guide: Guide, tenant: str) -> None:
        """Compiles `guide`'s grammar into the tenant's cache, so that add_request finds it ready. Any thread (a
        large schema takes long: call it off the engine thread); a no-op without structured outputs (add_request
        then refuses the guide)."""
        if self.runner.structured is not None:
            self.runner.structured.matcher(guide, tenant)

    def observe_slots(self, observer: TierObserver) -> None:
        """observer(event, seconds) for the slot pool's hits, misses, loads and evictions (registry.host_tier's
        TierObserver: the host tier reports the same way)."""
        self.slots.observer = observer

    def stats(self) -> EngineStats:
        """A snapshot of the queues, KV blocks and slots (cheap: a metrics scrape may call it from another thread)."""
        # list() copies are atomic under the GIL: the engine thread may add a tenant's queue meanwhile
        running, queues = list(self.scheduler.running), list(self.scheduler.queues.values())
        return EngineStats(
            num_waiting=sum(len(q) for q in queues),
            num_running=len(running),
            kv_usage=self.blocks.usage,
            slots_in_use={kind: self.slots.num_resident(kind) for kind in DELTA_KINDS},
            distinct_deltas_running=len({d.key for s in running for d, _ in s.parts}),
            num_preemptions=self.scheduler.num_preemptions,
        )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        result = self.runner.run(scheduled)
        self.num_steps += 1
        return self._postprocess(scheduled, result)

    def _postprocess(self, scheduled, result) -> list[RequestOutput]:
        outputs = []
        for i, (item, token, logprob) in enumerate(zip(scheduled, result.token_ids, result.logprobs)):
            seq = item.seq
            seq.num_computed += item.num_tokens
            if result.prompt_logprobs is not None and result.prompt_logprobs[i] is not None:
                first, scored = result.prompt_logprobs[i]
                seq.prompt_logprobs[first - 1 : first - 1 + len(scored)] = scored  # a recomputed chunk: the same
            if token is None:  # a prefill chunk short of the prompt's end: no token yet
                continue
            seq.token_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            if seq.matcher is not None:
                seq.grammar_done = StructuredOutputs.advance(seq.matcher, token)
            text = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
            reason = self._finish_reason(seq, token)
            if reason is not None:
                if seq.detokenizer is not None and not seq.detokenizer.stopped:
                    text += seq.detokenizer.flush()
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token],
                    new_text=text,
                    finished=seq.finished,
                    finish_reason=seq.finish_reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=len(seq.output_token_ids),
                    new_logprobs=[logprob] if logprob is not None else [],
                    prompt_logprobs=list(seq.prompt_logprobs)
                    if seq.prompt_logprobs is not None and len(seq.output_token_ids) == 1
                    else None,
                )
            )
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.detokenizer is not None and seq.detokenizer.stopped:
            return "stop"
        if token in seq.end_token_ids or seq.grammar_done:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    # ---- offline ----------------------------------------------------------------------------------
    def generate(
        self, requests: Iterable[tuple[str | list[int], SamplingParams, Served | None]]
    ) -> list[Completion]:
        """Runs all requests together (mixed batches) to completion; results in input order."""
        ids = []
        texts: dict[str, list[str]] = {}
        for i, (prompt, params, delta) in enumerate(requests):
            rid = f"gen-{self.num_steps}-{i}"
            self.add_request(rid, prompt, params, delta)
            ids.append(rid)
            texts[rid] = []
        seqs = {rid: self._seqs[rid] for rid in ids}
        while any(not s.finished for s in seqs.values()):
            outputs = self.step()
            # Every queued request fits alone (checked in add_request), so an idle step means a bug.
            assert outputs or self.scheduler.running, "the scheduler admitted nothing with no sequence running"
            for out in outputs:
                if out.request_id in texts:
                    texts[out.request_id].append(out.new_text)
        return [
            Completion(
                request_id=rid,
                text="".join(texts[rid]),
                token_ids=seqs[rid].output_token_ids,
                finish_reason=seqs[rid].finish_reason or "stop",
                num_prompt_tokens=seqs[rid].num_prompt_tokens,
                logprobs=seqs[rid].logprobs,
                prompt_logprobs=seqs[rid].prompt_logprobs,
            )
            for rid in ids
        ]


__all__ = ["LLMEngine", "EngineConfig", "RequestOutput", "Completion", "PromptTooLong", "SeqStatus"]
