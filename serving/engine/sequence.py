"""A request inside the engine: its tokens, its KV blocks, its delta and its sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from registry.deltas import Composition, Delta, Served
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    delta: Served | None = None  # a delta, or several of its tenant's with weights (a Composition)
    detokenizer: IncrementalDetokenizer | None = None
    tenant: str = ""  # whose request: the scheduler's fair shares are per tenant
    end_token_ids: frozenset[int] = frozenset()  # tokens that end it: stop_token_ids, and EOS unless ignored
    matcher: Any = None  # structured outputs: its llguidance matcher (serving.engine.structured), else None
    grammar_done: bool = False  # the matcher allows nothing more
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    block_table: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # per part: its GPU slot while pinned (its kind's space), else -1
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # with params.prompt_logprobs: entry j is prompt token j + 1's (filled as the prompt is computed), else None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_parks: int = 0  # times taken out of the batch for another tenant's fair share (its KV kept)
    arrival: int = 0  # order of arrival at the scheduler: whose delta is loaded next when slots are short

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [-1] * len(self.parts)
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * (len(self.prompt_token_ids) - 1)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose keys and values are not in the cache yet: 1 when decoding, more while prefilling."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    # ---- its deltas and their slots ----------------------------------------------------------------------
    @property
    def parts(self) -> tuple[tuple[Delta, float], ...]:
        """(delta, weight) of each delta it runs on: one of weight 1, a composition's, or none."""
        if self.delta is None:
            return ()
        return self.delta.parts if isinstance(self.delta, Composition) else ((self.delta, 1.0),)

    @property
    def composed(self) -> bool:
        """True when its rows add weighted changes (a Composition) rather than run one delta as it is."""
        return isinstance(self.delta, Composition)

    @property
    def holds_slots(self) -> bool:
        """True while its deltas are pinned in their slots (all are acquired and released together)."""
        return any(s >= 0 for s in self.slots)

    def _plain_slot(self, kind: str) -> int:
        if self.delta is None or self.composed or self.delta.kind != kind:
            return -1
        return self.slots[0]

    @property
    def bitdelta_slot(self) -> int:
        return self._plain_slot("bitdelta")

    @property
    def lora_slot(self) -> int:
        return self._plain_slot("lora")

    @property
    def ia3_slot(self) -> int:
        return self._plain_slot("ia3")

    @property
    def row_slots(self) -> tuple[int, int, int]:
        """(1-bit, LoRA, (IA)^3) slot of its rows when it runs one delta as it is, -1 where none (all -1 for a
        composition, whose parts are `weighted_parts`): what DeltaBatch.build takes per sequence."""
        return self.bitdelta_slot, self.lora_slot, self.ia3_slot

    @property
    def weighted_parts(self) -> list[tuple[str, int, float]]:
        """A composition's parts as (kind, slot, weight), [] otherwise: DeltaBatch.build's `composed`."""
        if not self.composed:
            return []
        return [(d.kind, slot, w) for (d, w), slot in zip(self.parts, self.slots)]
