"""GPU slots for tenants' deltas: allocated once at start-up; loading a delta into a slot is a copy.

Independent slot spaces, one per kind (a row carries a 1-bit slot, a LoRA slot and an (IA)^3 slot, each -1
when unused), so no index ever means two things. A slot holding a delta that a running request uses is
pinned; when a new delta needs a slot and none is free, the least recently used unpinned slot is
reused.

Per projection P (module path as in the HF state dict):
  1-bit: signs uint8 in the delta kernels' layout (formats.signs.SignLayout: the contract's [S_bd, out, ceil(in/8)],
         or [S_bd, ceil(out/16), ceil(in/8), 16] for the CPU kernels), scales [S_bd, out] float32 (0 where the
         delta leaves P alone)
  LoRA:  a [S_lora, r_max, in], bt [S_lora, r_max, out] (B transposed; ranks below r_max zero-padded),
         scaling [S_lora] float32, ranks [S_lora] int32
  (IA)^3: ia3_in [S_ia3 + 1, in], ia3_out [S_ia3 + 1, out] float32: each slot's input (feedforward) and output
         scaling vectors, 1 where its delta leaves them alone; the last row is all ones, the row of "no (IA)^3
         delta" (`ia3_ones_slot`), so one gather serves a batch mixing (IA)^3 rows and others
Replacements (1-bit files may replace any other base tensor exactly, CONTRACT §4): one pool per replaced
tensor name, [S_bd, *shape], created the first time a delta replaces that name; the rows of slots whose
delta does not replace it hold the base tensor, so a row's lookup never needs to know which slots replace.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from formats.signs import ROWS, SignLayout
from registry.deltas import DELTA_KINDS, BitDelta, Composition, Delta, Ia3Delta, LoraDelta
from registry.errors import AdapterMismatch
from registry.host_tier import TierObserver


@dataclass
class ProjectionPools:
    out_features: int
    in_features: int
    signs: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_bt: torch.Tensor | None = None
    lora_scaling: torch.Tensor | None = None
    lora_ranks: torch.Tensor | None = None
    ia3_in: torch.Tensor | None = None
    ia3_out: torch.Tensor | None = None
    # host: the slots whose (IA)^3 delta scales this projection's input / output (others hold ones there)
    ia3_in_slots: set[int] = field(default_factory=set)
    ia3_out_slots: set[int] = field(default_factory=set)


@dataclass
class Replacement:
    """The per-slot copies of one replaced base tensor, and which slots really replace it (host)."""

    pool: torch.Tensor
    replaced_slots: set[int] = field(default_factory=set)


class _SlotTable:
    """Which delta sits in which slot of one kind, pin counts, and LRU order of the unpinned ones."""

    def __init__(self, num_slots: int):
        self.owner: list[str | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.by_id: dict[str, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # unpinned slots
        self.doomed: set[int] = set()  # slots to free as soon as their last pin goes (deleted or replaced deltas)

    def find(self, delta_id: str) -> int | None:
        return self.by_id.get(delta_id)

    def victim(self) -> int | None:
        """A free slot first, else the least recently used unpinned one; None when every slot is pinned."""
        for slot in self.lru:
            if self.owner[slot] is None:
                return slot
        return next(iter(self.lru), None)

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self.lru.pop(slot, None)

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, "unpin of an unpinned slot"
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self.lru[slot] = None  # most recently used at the end
            if slot in self.doomed:
                self.free(slot)

    def free(self, slot: int) -> None:
        owner = self.owner[slot]
        if owner is not None:
            del self.by_id[owner]
        self.owner[slot] = None
        self.doomed.discard(slot)

    def assign(self, slot: int, delta_id: str) -> None:
        old = self.owner[slot]
        if old is not None:
            del self.by_id[old]
        self.owner[slot] = delta_id
        self.by_id[delta_id] = slot


class SlotPool:
    """Preallocated GPU slots for 1-bit, LoRA and (IA)^3 deltas, with pinning and LRU reuse."""

    def __init__(
        self,
        projections: Mapping[str, tuple[int, int]],
        base_tensors: Mapping[str, torch.Tensor],
        *,
        bitdelta_slots: int,
        lora_slots: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
        sign_layout: SignLayout = ROWS,
        observer: TierObserver | None = None,
        ia3_slots: int = 0,
    ):
        """projections: module path -> (out, in). base_tensors: every tensor of the served model by
        state-dict name (on `device`): the source of replacement pools' base rows (a CPU linear weight may be
        oneDNN-packed: it is unpacked when a replacement pool needs its rows). sign_layout: how the
        1-bit kernels that will read the pool want the packed signs (DeltaOps.sign_layout). observer(event,
        seconds): "hit", "miss", "load" (with the host time of the copies) and "evict", as the host tier's."""
        if bitdelta_slots < 0 or lora_slots < 0 or ia3_slots < 0 or max_lora_rank < 1:
            raise ValueError("slot counts must be >= 0 and max_lora_rank >= 1")
        self.num_bitdelta_slots = bitdelta_slots
        self.num_lora_slots = lora_slots
        self.num_ia3_slots = ia3_slots
        self.max_lora_rank = max_lora_rank
        self.sign_layout = sign_layout
        self._base = base_tensors
        self._projections: dict[str, ProjectionPools] = {}
        for path, (out_f, in_f) in projections.items():
            p = ProjectionPools(out_f, in_f)
            if bitdelta_slots:
                shape = sign_layout.pool_shape(bitdelta_slots, out_f, in_f)
                p.signs = torch.zeros(shape, dtype=torch.uint8, device=device)
                p.scales = torch.zeros(bitdelta_slots, out_f, dtype=torch.float32, device=device)
            if lora_slots:
                p.lora_a = torch.zeros(lora_slots, max_lora_rank, in_f, dtype=dtype, device=device)
                p.lora_bt = torch.zeros(lora_slots, max_lora_rank, out_f, dtype=dtype, device=device)
                p.lora_scaling = torch.zeros(lora_slots, dtype=torch.float32, device=device)
                p.lora_ranks = torch.zeros(lora_slots, dtype=torch.int32, device=device)
            if ia3_slots:
                p.ia3_in = torch.ones(ia3_slots + 1, in_f, dtype=torch.float32, device=device)
                p.ia3_out = torch.ones(ia3_slots + 1, out_f, dtype=torch.float32, device=device)
            self._projections[path] = p
        self._replacements: dict[str, Replacement] = {}
        self.ia3_layout = 0  # changes whenever a projection starts or stops being scaled by some slot's (IA)^3 delta
        counts = {"bitdelta": bitdelta_slots, "lora": lora_slots, "ia3": ia3_slots}
        self._tables = {kind: _SlotTable(counts[kind]) for kind in DELTA_KINDS}
        self.observer: TierObserver = observer or (lambda event, seconds: None)

    # ---- what the layers read -------------------------------------------------------------------
    @property
    def ia3_ones_slot(self) -> int:
        """The row of the (IA)^3 pools that scales by 1: where rows without an (IA)^3 delta look."""
        return self.num_ia3_slots

    def projection(self, path: str) -> ProjectionPools | None:
        return self._projections.get(path)

    def replacement(self, name: str) -> Replacement | None:
        return self._replacements.get(name)

    @property
    def has_replacements(self) -> bool:
        return bool(self._replacements)

    def replaces_any(self, bitdelta_slots) -> bool:
        """True when one of these 1-bit slots holds a delta that replaces a base tensor."""
        return any(rep.replaced_slots.intersection(bitdelta_slots) for rep in self._replacements.values())

    # ---- checks ------------------------------------------------------------------------------------
    def check_servable(self, delta: Delta | Composition) -> None:
        """Raises AdapterMismatch if this pool cannot hold `delta` (independent of what is loaded); for a
        composition, if it cannot hold all its parts at once.

        Why the loaders' shape checks (registry.*_format) are not enough: they check *files* against the BaseSpec
        and name the file's tensors; this checks a delta *in memory* against the model these slots were built for,
        whatever made it (a loader, the engine's Python API, a composition), because a delta that does not fit
        would be written out of bounds into the slot tensors. It is the slots' invariant, not the upload rule."""
        if isinstance(delta, Composition):
            self._check_composition(delta)
            return
        if isinstance(delta, LoraDelta):
            if not self.num_lora_slots:
                raise AdapterMismatch("this server has no LoRA slots (lora_slots=0)")
            if delta.rank > self.max_lora_rank:
                raise AdapterMismatch(
                    f"LoRA rank {delta.rank} is above this server's max_lora_rank {self.max_lora_rank}", param="r"
                )
            for path in delta.weights:
                if path not in self._projections:
                    raise AdapterMismatch(f"LoRA targets {path!r}, which is not a projection of the base", param=path)
            return
        if isinstance(delta, Ia3Delta):
            if not self.num_ia3_slots:
                raise AdapterMismatch("this server has no (IA)^3 slots (ia3_slots=0)")
            for path, vector in delta.vectors.items():
                p = self._projections.get(path)
                if p is None:
                    raise AdapterMismatch(f"(IA)^3 targets {path!r}, which is not a projection of the base", param=path)
                size = p.in_features if path in delta.feedforward else p.out_features
                if vector.shape != (size,):
                    raise AdapterMismatch(f"(IA)^3 vector of {path} has {vector.numel()} entries, expected {size}",
                                          param=path)  # fmt: skip
            return
        if not self.num_bitdelta_slots:
            raise AdapterMismatch("this server has no 1-bit delta slots (bitdelta_slots=0)")
        for path in delta.projections:
            if path not in self._projections:
                raise AdapterMismatch(f"{path!r} is not a projection of the base", param=path)
            if path + ".weight" in delta.replacements:
                raise AdapterMismatch(
                    f"{path}.weight is both replaced and given as sign/scale; keep one", param=path + ".weight"
                )
        for name, tensor in delta.replacements.items():
            base = self._base.get(name)
            if base is None:
                raise AdapterMismatch(f"replacement {name!r} is not a tensor of the base", param=name)
            if tuple(base.shape) != tuple(tensor.shape):
                raise AdapterMismatch(
                    f"replacement {name!r} has shape {tuple(tensor.shape)}, the base has {tuple(base.shape)}",
                    param=name,
                )

    def _check_composition(self, composition: Composition) -> None:
        """Every part servable, one tenant's, no more parts of a kind than its slots (it takes them all at
        once), and no projection scaled on its input by one (IA)^3 part and on its output by another (their
        weighted merge is not a product of scalings)."""
        owners = {d.owner for d, _ in composition.parts}
        if len(owners) != 1:
            raise AdapterMismatch("a composition's deltas must all be one tenant's", param="adapters")
        for d, _ in composition.parts:
            self.check_servable(d)
        counts = {"bitdelta": self.num_bitdelta_slots, "lora": self.num_lora_slots, "ia3": self.num_ia3_slots}
        for kind in DELTA_KINDS:
            n = len({d.key for d, _ in composition.parts if d.kind == kind})
            if n > counts[kind]:
                raise AdapterMismatch(f"the composition has {n} deltas of kind {kind}; this server has {counts[kind]} "
                                      f"{kind} slots", param="adapters")  # fmt: skip
        roles: dict[str, bool] = {}  # projection -> scales its input
        for d, _ in composition.parts:
            if isinstance(d, Ia3Delta):
                for path in d.vectors:
                    if roles.setdefault(path, path in d.feedforward) != (path in d.feedforward):
                        raise AdapterMismatch(
                            f"(IA)^3 parts scale {path} on its input and on its output: such a composition is not "
                            "supported", param="adapters")  # fmt: skip

    def _dense_base(self, name: str) -> torch.Tensor:
        t = self._base[name]
        return t.to_dense() if t.is_mkldnn else t  # a CPU-packed linear weight (serving.models.tenant_layers)

    # ---- acquire / release -------------------------------------------------------------------------
    def slot_of(self, delta: Delta) -> int | None:
        return self._tables[delta.kind].find(delta.key)

    def forget(self, kind: str, key: str) -> None:
        """A deleted or replaced delta: its slot is free now, or when the requests running on it finish."""
        table = self._tables[kind]
        slot = table.find(key)
        if slot is None:
            return
        if table.pins[slot]:
            table.doomed.add(slot)
        else:
            table.free(slot)

    def is_resident(self, delta: Delta) -> bool:
        """True when `delta` is in a slot now: acquiring it loads nothing."""
        return self.holds(delta.kind, delta.key)

    def holds(self, kind: str, key: str) -> bool:
        """True when the delta of `key` is in a slot now (one dict lookup: a snapshot any thread may take)."""
        return self._tables[kind].find(key) is not None

    def has_room(self, kind: str) -> bool:
        """True when a delta of this kind could be loaded now (a slot free, or an unpinned one to reuse)."""
        return self._tables[kind].victim() is not None

    def room(self, kind: str, keeping: frozenset[str] | set[str] = frozenset()) -> int:
        """How many deltas of this kind could be loaded now without evicting those of the keys in `keeping`."""
        table = self._tables[kind]
        return sum(1 for slot in table.lru if table.owner[slot] not in keeping)

    def acquire(self, delta: Delta) -> int | None:
        """Pins `delta` in a slot, loading it (a copy) if it is not resident. None when every slot of its
        kind is pinned by other deltas: the caller waits and tries again after some request finishes."""
        table = self._tables[delta.kind]
        slot = table.find(delta.key)
        if slot is not None:
            self.observer("hit", 0.0)
        else:
            slot = table.victim()
            if slot is None:
                return None
            self.observer("miss", 0.0)
            if table.owner[slot] is not None:
                self.observer("evict", 0.0)
            table.assign(slot, delta.key)
            t0 = time.perf_counter()
            with torch.no_grad():  # the pools are plain buffers: copies into them record no autograd history
                if isinstance(delta, LoraDelta):
                    self._load_lora(slot, delta)
                elif isinstance(delta, Ia3Delta):
                    self._load_ia3(slot, delta)
                else:
                    self._load_bitdelta(slot, delta)
            self.observer("load", time.perf_counter() - t0)
        table.pin(slot)
        return slot

    def release(self, delta: Delta) -> None:
        table = self._tables[delta.kind]
        slot = table.find(delta.key)
        assert slot is not None, "release of a delta that holds no slot"
        table.unpin(slot)

    def num_resident(self, kind: str) -> int:
        return sum(owner is not None for owner in self._tables[kind].owner)

    def resident(self, kind: str) -> list[str | None]:
        """The delta id in each slot of a kind (None = empty)."""
        return list(self._tables[kind].owner)

    # ---- loading (copies into the preallocated pools) ---------------------------------------------
    def _load_bitdelta(self, slot: int, delta: BitDelta) -> None:
        for path, p in self._projections.items():
            assert p.signs is not None and p.scales is not None
            entry = delta.projections.get(path)
            if entry is None:
                p.scales[slot].zero_()  # this delta leaves P as in the base
                continue
            sign, scale = entry
            p.signs[slot].copy_(self.sign_layout.to_slot(sign), non_blocking=True)
            p.scales[slot].copy_(scale.to(torch.float32).expand(p.out_features), non_blocking=True)
        for name, rep in self._replacements.items():
            if name not in delta.replacements and slot in rep.replaced_slots:
                rep.pool[slot].copy_(self._dense_base(name))
                rep.replaced_slots.discard(slot)
        for name, tensor in delta.replacements.items():
            rep = self._replacements.get(name)
            if rep is None:
                base = self._dense_base(name)
                # Created once, on the first delta that replaces this name; every row starts as the base.
                rep = Replacement(base.unsqueeze(0).repeat(self.num_bitdelta_slots, *([1] * base.dim())))
                self._replacements[name] = rep
            rep.pool[slot].copy_(tensor, non_blocking=True)
            rep.replaced_slots.add(slot)

    def _load_ia3(self, slot: int, delta: Ia3Delta) -> None:
        for path, p in self._projections.items():
            assert p.ia3_in is not None and p.ia3_out is not None
            before = (bool(p.ia3_in_slots), bool(p.ia3_out_slots))
            p.ia3_in[slot].fill_(1.0)
            p.ia3_out[slot].fill_(1.0)
            p.ia3_in_slots.discard(slot)
            p.ia3_out_slots.discard(slot)
            vector = delta.vectors.get(path)
            if vector is not None:
                feedforward = path in delta.feedforward
                (p.ia3_in if feedforward else p.ia3_out)[slot].copy_(vector, non_blocking=True)
                (p.ia3_in_slots if feedforward else p.ia3_out_slots).add(slot)
            if (bool(p.ia3_in_slots), bool(p.ia3_out_slots)) != before:
                self.ia3_layout += 1

    def _load_lora(self, slot: int, delta: LoraDelta) -> None:
        ranks = torch.zeros(len(self._projections), dtype=torch.int32)
        scaling = torch.zeros(len(self._projections), dtype=torch.float32)
        for i, (path, p) in enumerate(self._projections.items()):
            assert p.lora_a is not None and p.lora_bt is not None
            p.lora_a[slot].zero_()
            p.lora_bt[slot].zero_()
            entry = delta.weights.get(path)
            if entry is None:
                continue
            a, b = entry  # a: [r, in], b: [out, r]
            r = a.shape[0]
            p.lora_a[slot, :r].copy_(a, non_blocking=True)
            p.lora_bt[slot, :r].copy_(b.t(), non_blocking=True)
            ranks[i] = r
            scaling[i] = delta.scaling
        for i, p in enumerate(self._projections.values()):
            assert p.lora_ranks is not None and p.lora_scaling is not None
            p.lora_ranks[slot] = ranks[i]
            p.lora_scaling[slot] = scaling[i]
