"""Continuous batching, fair among tenants: which sequences run in the next step, and with how many tokens each.

Every step decodes the running sequences (one token each), then spends the rest of the step's token budget on
prefill chunks: of sequences still prefilling, and of waiting ones it admits. Requests join the running batch
between steps and leave when they finish.

Fairness is the virtual token counter of "Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024;
S-LoRA implements it): each tenant's counter adds up the service it received, a prompt token counting 1 and a
generated token DECODE_WEIGHT. Prefill chunks go to the tenant with the lowest counter first, so one tenant's
prompts cannot take the step's budget from the others. A tenant that becomes active again is lifted to the lowest
counter among the active ones (idle time banks no credit), and no active tenant's counter leads the lowest by more
than one step's token budget (past service is not paid back for ever).

While other tenants wait, no tenant keeps more than its max-min fair share of the running sequences (by demand:
tenants wanting less than an equal part get what they want, the others divide the rest; see fair_shares): one
sequence of the tenant most over its share is parked (out of the batch, its KV blocks kept, resumed without
recompute) to admit a waiting tenant under its share. Nobody waiting, a tenant may fill the batch: fairness never
leaves places empty. With one tenant this is first come, first served.

Chunked prefill: a prompt is computed `prefill_chunk` tokens at a time at most, so a long prompt never holds
other tenants' decodes for more than one chunk. Preempted sequences (KV blocks run out) give back their blocks
and their delta slot and wait at the head of their tenant's queue, to be recomputed from their tokens. KV memory
short, the running sequences come first: a step that had to free blocks admits nobody, a parked sequence gives its
blocks before a running one is preempted, and one sequence without blocks for its next chunk does not hold its
tenant's others (tests/engine/test_scheduler_properties.py checks, over random workloads, that every request
finishes and nothing is left held).

Delta slots: a waiting sequence whose delta finds every slot of its kind pinned keeps its place while the
sequences behind it go ahead, and waiting for a slot is not waiting for a place in the batch. Slots are loaded
first come, first served across tenants: a freed slot goes to the oldest waiting sequence whose delta is not
resident (its "load turn"), whatever its tenant's counter, so a tenant whose delta was evicted waits in line
rather than behind every newcomer with a lower counter. Nothing crashes. A sequence on several deltas (a
composition) takes all their slots or none: it is admitted when, for each kind it must load, its first delta
not resident has that kind's load turn, and gives back what it took when a slot is short.
Over 400 lines: one concept, the step's choice; most of it is the fairness rules' explanations beside their code.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from registry.slot_pool import SlotPool
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.sequence import SeqStatus, Sequence

DECODE_WEIGHT = 2.0  # a generated token's service against a prompt token's (the paper's w_q / w_p)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step: 1 for a decode, a chunk of the uncomputed prompt otherwise

    @property
    def completes(self) -> bool:
        """True when this step computes the sequence's last uncomputed token: it then yields a new token."""
        return self.num_tokens == self.seq.num_uncomputed


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, slots: SlotPool):
        self.config = config
        self.blocks = blocks
        self.slots = slots
        self.queues: dict[str, deque[Sequence]] = {}  # per tenant, arrival order; preempted ones at the head
        self.running: list[Sequence] = []  # admission order
        self.counters: dict[str, float] = {}
        self.num_preemptions = 0  # sequences whose KV blocks were given back (recomputed later)
        self.num_parked = 0  # sequences taken out of the batch for fair shares, their KV kept
        self._arrivals = 0
        self._load_turn: dict[str, str] = {}  # per delta kind: the delta to load next (_next_loads, every step)

    # ---- state -------------------------------------------------------------------------------------
    @property
    def waiting(self) -> list[Sequence]:
        """Every waiting sequence, tenants' queues one after another."""
        return [s for q in self.queues.values() for s in q]

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def has_unfinished(self) -> bool:
        return bool(self.running) or any(self.queues.values())

    def _active(self) -> set[str]:
        return {s.tenant for s in self.running} | {t for t, q in self.queues.items() if q}

    def _running_of(self, tenant: str) -> int:
        return sum(s.tenant == tenant for s in self.running)

    def fair_shares(self) -> dict[str, float]:
        """Each active tenant's max-min fair share of the batch's places, by demand (its running sequences and
        those waiting that could run): tenants wanting less than an equal part get what they want, the rest is
        divided equally among the others (water-filling). A tenant may hold its share while others wait."""
        demand = {t: 0 for t in self._active()}
        for s in self.running:
            demand[s.tenant] += 1
        for t, q in self.queues.items():
            demand[t] = demand.get(t, 0) + sum(self._could_run(s) for s in q)
        shares: dict[str, float] = {}
        remaining, left = float(self.config.max_num_seqs), sorted(demand, key=demand.__getitem__)
        while left:
            equal = remaining / len(left)
            if demand[left[0]] > equal:
                shares.update(dict.fromkeys(left, equal))
                break
            t = left.pop(0)
            shares[t] = demand[t]
            remaining -= demand[t]
        return shares

    def _over_share(self, tenant: str, shares: dict[str, float]) -> bool:
        """True when the tenant holds at least its share (at least one place is always its share)."""
        return self._running_of(tenant) >= max(1.0, shares[tenant])

    # ---- requests ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        active = self._active()
        if seq.tenant not in active:
            others = [self.counters[t] for t in active]
            lifted = min(others) if others else 0.0
            self.counters[seq.tenant] = max(self.counters.get(seq.tenant, 0.0), lifted)
        self._arrivals += 1
        seq.arrival = self._arrivals
        self.queues.setdefault(seq.tenant, deque()).append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (done, or aborted) wherever it is, freeing its blocks and slot."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            queue = self.queues.get(seq.tenant)
            if queue is not None and seq in queue:
                queue.remove(seq)
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self, admit: bool = True) -> list[ScheduledSeq]:
        """The next step's sequences and tokens. admit=False: no waiting sequence joins the batch this step.

        One function on purpose (over 60 lines): the step's order — decodes, prefill chunks by tenant, the
        no-progress rule — reads top to bottom, as in nano-vllm."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preemptions = self.num_preemptions
        self._bound_leads()
        self._load_turn = self._next_loads()
        self._make_room_for_waiting_tenants()
        # 1. Decodes: every decoding sequence gets one token, preempting from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed != 1:  # still prefilling: step 2
                i += 1
                continue
            while not self.blocks.can_append(seq):
                if self._reclaim_parked():  # parked sequences give their blocks back first
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                scheduled.append(ScheduledSeq(seq, 1))
                self._charge(seq.tenant, DECODE_WEIGHT)
                budget -= 1
                i += 1
        # 2. Prefill chunks, tenant by tenant in counter order: running sequences still prefilling first, then the
        # head of the tenant's queue if the batch has room. A step that had to free KV blocks admits nobody (as
        # vLLM): the freed blocks are for the running sequences, or a new one would take them and none progress.
        admit = admit and self.num_preemptions == preemptions
        blocked: set[str] = set()  # tenants that cannot be served more this step
        skipped: dict[str, list[Sequence]] = {}  # waiting for a delta slot: they keep their place
        # Prefilling sequences done for this step: served, or no KV blocks for their next chunk (step 1's decodes
        # are not prefilling: they never come up here).
        chunked: set[int] = set()
        while budget > 0:
            tenant = self._next_tenant(blocked, chunked)
            if tenant is None:
                break
            seq = next((s for s in self.running if s.tenant == tenant and s.num_uncomputed > 1 and id(s) not in chunked), None)
            if seq is None:
                seq = self._admit(tenant, skipped) if admit else None
                if seq is None:
                    blocked.add(tenant)
                    continue
                if seq.num_uncomputed == 1:  # a parked sequence resumes: its next decode, nothing to recompute
                    if not self.blocks.can_append(seq):
                        self._unadmit(seq)
                        blocked.add(tenant)
                        continue
                    self.blocks.append(seq)
                    scheduled.append(ScheduledSeq(seq, 1))
                    chunked.add(id(seq))
                    self._charge(tenant, DECODE_WEIGHT)
                    budget -= 1
                    continue
            n = min(seq.num_uncomputed, self.config.prefill_chunk, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                if seq.num_computed == 0 and not seq.block_table:  # just admitted: back to its place
                    self._unadmit(seq)
                    blocked.add(tenant)
                else:  # the tenant's other running sequences may still fit (and, finishing, free blocks)
                    chunked.add(id(seq))
                continue
            self.blocks.grow(seq, seq.num_computed + n)
            scheduled.append(ScheduledSeq(seq, n))
            chunked.add(id(seq))
            self._charge(tenant, n)
            budget -= n
        for tenant, seqs in skipped.items():
            self.queues[tenant].extendleft(reversed(seqs))
        if not scheduled and self.running and not any(s.num_uncomputed == 1 for s in self.running):
            # Only part-prefilled sequences, and no blocks for any next chunk: a parked sequence's blocks, else the
            # newest one's, go to the older ones (admitting anyone while some run would take them back: no step
            # would progress).
            if not self._reclaim_parked():
                self._preempt(self.running[-1])
            return self.schedule(admit=not self.running)
        return scheduled

    # ---- inside ------------------------------------------------------------------------------------
    def _charge(self, tenant: str, tokens: float) -> None:
        self.counters[tenant] += tokens  # every tenant with work has a counter (add sets it)

    def _bound_leads(self) -> None:
        """No active tenant's counter leads the lowest active one by more than one step's token budget. The
        counters order who is served next; without a bound, a tenant that once had the batch to itself would
        wait, with work queued, until every other tenant had caught up with all of its past service."""
        active = self._active()
        if len(active) < 2:
            return
        ceiling = min(self.counters[t] for t in active) + self.config.max_num_batched_tokens
        for t in active:
            if self.counters[t] > ceiling:
                self.counters[t] = ceiling

    def _next_tenant(self, blocked: set[str], chunked: set[int]) -> str | None:
        """The lowest-counter tenant with prefill work this step (ties: fewer running sequences, then name)."""
        candidates = {s.tenant for s in self.running if s.num_uncomputed > 1 and id(s) not in chunked}
        candidates |= {t for t, q in self.queues.items() if q}
        candidates -= blocked
        if not candidates:
            return None
        return min(candidates, key=lambda t: (self.counters[t], self._running_of(t), t))

    def _admit(self, tenant: str, skipped: dict[str, list[Sequence]]) -> Sequence | None:
        """Moves the head of the tenant's queue into the running batch (with its delta slot), or None."""
        queue = self.queues.get(tenant)
        if len(self.running) >= self.config.max_num_seqs:
            return None
        # Over its share a tenant gets more of the batch only while no other tenant waits for a place it could
        # take: the batch is never left part empty for fairness' sake.
        others_wait = any(self._admittable(q) for t, q in self.queues.items() if t != tenant)
        if others_wait and self._over_share(tenant, self.fair_shares()):
            return None
        while queue:
            seq = queue.popleft()
            if seq.delta is not None and not seq.holds_slots:  # a parked sequence still holds its slots
                missing = self._first_missing(seq)
                if any(self._load_turn.get(kind) != key for kind, key in missing.items()):
                    skipped.setdefault(tenant, []).append(seq)  # an older request loads first: it keeps its place
                    continue
                if not self._acquire_all(seq):  # a slot of its kind all pinned: it waits, keeping its place
                    skipped.setdefault(tenant, []).append(seq)
                    continue
                if missing:
                    self._load_turn = self._next_loads()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            return seq
        return None

    def _first_missing(self, seq: Sequence) -> dict[str, str]:
        """Per delta kind, the key of the sequence's first delta of that kind that is not resident."""
        missing: dict[str, str] = {}
        for delta, _ in seq.parts:
            if not self.slots.is_resident(delta):
                missing.setdefault(delta.kind, delta.key)
        return missing

    def _fits(self, seq: Sequence) -> bool:
        """True when every delta of the sequence that is not resident could be loaded now without evicting
        another of its deltas (a composition may need several slots of one kind at once)."""
        if not seq.composed:
            return seq.delta is None or self.slots.is_resident(seq.delta) or self.slots.has_room(seq.delta.kind)
        keys = {delta.key for delta, _ in seq.parts}
        for kind in {delta.kind for delta, _ in seq.parts}:
            needed = len({d.key for d, _ in seq.parts if d.kind == kind and not self.slots.is_resident(d)})
            if needed and needed > self.slots.room(kind, keeping=keys):
                return False
        return True

    def _acquire_all(self, seq: Sequence) -> bool:
        """Pins every delta of the sequence in a slot, or none (False: one kind's slots are all pinned)."""
        if seq.composed and not self._fits(seq):  # loading one part would only evict another of them
            return False
        # the resident parts pinned first, so that loading the others cannot evict them
        order = sorted(range(len(seq.parts)), key=lambda i: not self.slots.is_resident(seq.parts[i][0]))
        for i in order:
            delta = seq.parts[i][0]
            slot = self.slots.acquire(delta)
            if slot is None:
                self._release_slot(seq)
                return False
            seq.slots[i] = slot
        return True

    def _admittable(self, queue: deque[Sequence]) -> bool:
        """True when some sequence of this queue could join the batch now (see _could_run)."""
        return any(self._could_run(s) for s in queue)

    def _could_run(self, seq: Sequence) -> bool:
        """A waiting sequence with no delta, holding its slot (parked), whose delta is resident, or whose turn it
        is to load one where there is room. Waiting for a delta slot is not waiting for a place in the batch."""
        if seq.delta is None or seq.holds_slots:
            return True
        missing = self._first_missing(seq)
        return all(self._load_turn.get(kind) == key for kind, key in missing.items()) and self._fits(seq)

    def _next_loads(self) -> dict[str, str]:
        """Per delta kind, the delta of the oldest waiting sequence whose delta is not resident: the next one a
        freed slot goes to. A composition that needs more slots of a kind than it could have now does not hold
        the turn meanwhile (it would hold every cold load of that kind behind it): the oldest that fits has it,
        and the oldest of all only when none fits."""
        oldest: dict[str, tuple[bool, int, str]] = {}  # kind -> (does not fit, arrival, delta key)
        for queue in self.queues.values():
            for seq in queue:
                if seq.delta is None or seq.holds_slots:
                    continue
                missing = self._first_missing(seq)
                rank = not self._fits(seq) if missing else False
                for kind, key in missing.items():
                    if kind not in oldest or (rank, seq.arrival) < oldest[kind][:2]:
                        oldest[kind] = (rank, seq.arrival, key)
        return {kind: key for kind, (_, _, key) in oldest.items()}

    def _unadmit(self, seq: Sequence) -> None:
        """An admitted sequence that found no KV blocks: back at the head of its queue (a new one gives its
        slot back; a parked one stays parked)."""
        self.running.remove(seq)
        if not seq.block_table:
            self._release_slot(seq)
        seq.status = SeqStatus.WAITING
        self.queues[seq.tenant].appendleft(seq)

    def _make_room_for_waiting_tenants(self) -> None:
        """Fair shares: while the batch is full and a tenant under its share waits, a sequence of the tenant most
        over its share is parked (one per step: the place it frees ends the batch's being full)."""
        if len(self.running) < self.config.max_num_seqs:
            return
        shares = self.fair_shares()
        waiting = [t for t, q in self.queues.items() if self._admittable(q)]
        for tenant in sorted(waiting, key=lambda t: self.counters[t]):
            if len(self.running) < self.config.max_num_seqs or self._over_share(tenant, shares):
                continue
            counts: dict[str, int] = {}
            for s in self.running:
                counts[s.tenant] = counts.get(s.tenant, 0) + 1
            over = max(counts, key=lambda t: (counts[t] - shares[t], self.counters[t]))
            if counts[over] <= max(1.0, shares[over]):
                return
            # The one parked least so far (then the newest): the delay is spread over the tenant's sequences,
            # rather than one of them parked at every arrival and finishing long after the others.
            candidates = [s for s in self.running if s.tenant == over]
            victim = min(reversed(candidates), key=lambda s: s.num_parks)
            self._park(victim)

    def _park(self, seq: Sequence) -> None:
        """Takes a sequence out of the batch for its tenant's fair share, keeping its KV blocks, its computed
        tokens and its delta slot: it resumes where it was, at the head of its tenant's queue, with nothing to
        recompute (unless KV memory runs short meanwhile: _reclaim_parked)."""
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_parks += 1
        self.num_parked += 1
        self.queues[seq.tenant].appendleft(seq)

    def _reclaim_parked(self) -> bool:
        """Frees the KV blocks of one parked sequence (it will be recomputed); False when none holds any."""
        for queue in self.queues.values():
            for seq in queue:
                if seq.block_table:
                    self.blocks.free(seq)
                    self._release_slot(seq)
                    seq.num_computed = 0
                    self.num_preemptions += 1
                    return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Gives back the sequence's blocks and slot; it will be recomputed from its tokens."""
        self.running.remove(seq)
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self.queues.setdefault(seq.tenant, deque()).appendleft(seq)

    def _release_slot(self, seq: Sequence) -> None:
        for i, (delta, _) in enumerate(seq.parts):
            if seq.slots[i] >= 0:
                self.slots.release(delta)
                seq.slots[i] = -1
