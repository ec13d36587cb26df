"""Continuous batching: which sequences run in the next step, and with how many tokens each.

Every step decodes all running sequences (one token each) and admits waiting ones (their whole prompt)
while the step's token budget, the sequence limit, the KV blocks and the delta slots allow: requests
join the running batch between steps and leave when they finish. When the KV cache is full, the most
recently admitted running sequences are preempted: their blocks and their delta slot are given back and
they wait at the head of the queue, to be recomputed from their tokens later. Nothing crashes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from registry.slot_pool import SlotPool
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step: 1 for a decode, the uncomputed prompt for a prefill


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, slots: SlotPool):
        self.config = config
        self.blocks = blocks
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # 1. Decodes: every running sequence gets one token, preempting from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while not self.blocks.can_append(seq):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                scheduled.append(ScheduledSeq(seq, 1))
                budget -= 1
                i += 1
        # 2. Prefills: admit waiting sequences in arrival order while the token budget and the KV blocks allow.
        # One whose delta finds every slot of its kind pinned waits (keeping its place) and the next ones go
        # ahead, so a crowd of cold adapters never stalls the base or other tenants.
        skipped: list[Sequence] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = len(seq.token_ids)
            if need > budget or not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            if seq.delta is not None:
                slot = self.slots.acquire(seq.delta)
                if slot is None:
                    skipped.append(seq)
                    continue
                seq.slot = slot
            self.blocks.allocate(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, need))
            budget -= need
        self.waiting.extendleft(reversed(skipped))
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Gives back the sequence's blocks and slot; it will be recomputed from its tokens."""
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (done, or aborted) wherever it is, freeing its blocks and slot."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _release_slot(self, seq: Sequence) -> None:
        if seq.delta is not None and seq.slot >= 0:
            self.slots.release(seq.delta)
            seq.slot = -1
