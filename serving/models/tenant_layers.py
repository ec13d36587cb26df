"""Layers that apply each row's own tenant delta on top of the shared base weights.

The model code builds its projections, norms and embeddings from these classes and passes a
`DeltaBatch` down; it holds no tenancy logic itself. With `deltas=None` they are the plain layers.

Per row i (a token, or a sequence's last position for the lm_head):
  TenantLinear:    y[i] = ((x[i] * l_in[a]) @ W.T + b) * l_out[a]   (one GEMM for all rows; a = row i's (IA)^3
                                                   slot, whose vectors are 1 where its delta leaves them alone)
                        + scale[s] * (x[i] @ sign[s].T)          if row i has 1-bit slot s
                        + scaling[l] * (x[i] @ A[l].T) @ B[l].T  if row i has LoRA slot l
                   where a 1-bit delta replaces W or b exactly, row i uses its tenant's tensor instead.
  TenantRMSNorm / TenantEmbedding: row i uses its tenant's replaced weight if there is one.
A row on a composition (registry.deltas.Composition: parts k with weights w_k) computes the weighted merge
W + sum_k w_k (W_k - W) without forming it: l_in/l_out = 1 + sum_k w_k (l_k - 1), each 1-bit or LoRA part reads
w_k * x (every change is linear in x), and a replaced tensor R_k adds w_k (R_k - base). The parts go through
the kernels in extra passes (DeltaBatch.passes), the same slots and pools as when served alone.

On the CPU the engine repacks the base weights of the linears once (pack_cpu_weights): oneDNN's blocked layout
runs the decode-sized GEMMs about 3x faster than the default (MKL) path on the CPUs we measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltakernels import DeltaOps
from deltakernels.segments import SlotTiles, Stage, build_slot_tiles, copy_stage
from registry.deltas import DELTA_KINDS
from registry.slot_pool import ProjectionPools, Replacement, SlotPool


@dataclass(frozen=True)
class DeltaPass:
    """At most one delta of each kind per row: what one call of each delta kernel applies.

    bitdelta / lora:     rows grouped by slot (deltakernels.segments), for the delta kernels.
    bitdelta_row_slot:   [N] int64, each row's 1-bit slot (-1 = none), for replaced tensors.
    ia3_row_slot:        [N] int64, each row's (IA)^3 slot (the pools' row of ones for none); None when no row
                         has one in this pass (the layers then skip the scaling altogether).
    weight:              None for the first pass: each row runs its one delta as it is (a replaced tensor is
                         the row's tensor). [N, 1] float32 for a composition's parts: row i adds weight[i] times
                         its part's change (a replaced tensor R adds weight * (R - base)).
    """

    bitdelta: SlotTiles
    lora: SlotTiles
    bitdelta_row_slot: torch.Tensor
    ia3_row_slot: torch.Tensor | None
    weight: torch.Tensor | None

    @classmethod
    def build(cls, pools: SlotPool, slots: Sequence[tuple[int, int, int]], lens: Sequence[int], device: torch.device,
              stage: Stage, pad_tiles_to: int | None, weights: Sequence[float] | None = None) -> DeltaPass:  # fmt: skip
        """slots[j]: sequence j's (1-bit, LoRA, (IA)^3) slot, -1 = none; weights[j] its weight (None: the first
        pass)."""
        bd = [s[0] for s in slots]
        bd_rows: list[int] = []
        for slot, n in zip(bd, lens):
            bd_rows.extend([slot] * n)
        ia3_rows = None
        if any(s[2] >= 0 for s in slots):
            ones, rows = pools.ia3_ones_slot, []
            for s, n in zip(slots, lens):
                rows.extend([s[2] if s[2] >= 0 else ones] * n)
            ia3_rows = stage(rows, torch.int64)
        weight = None
        if weights is not None:
            w_rows: list[float] = []
            for w, n in zip(weights, lens):
                w_rows.extend([w] * n)
            weight = stage(w_rows, torch.float32).view(-1, 1)
        return cls(
            bitdelta=build_slot_tiles(bd, lens, device, stage, pad_tiles_to),
            lora=build_slot_tiles([s[1] for s in slots], lens, device, stage, pad_tiles_to),
            bitdelta_row_slot=stage(bd_rows, torch.int64),
            ia3_row_slot=ia3_rows,
            weight=weight,
        )

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """What this pass's deltas read: x, or x times each row's weight (every delta is linear in x)."""
        return x if self.weight is None else (x * self.weight).to(x.dtype)


@dataclass(frozen=True)
class DeltaBatch:
    """Which deltas each row of the layer inputs uses; built once per step by the model runner.

    passes:    the first holds every row's one delta run as it is; a composition's k-th part is in pass k + 1
               (with its weight), so that each pass has at most one delta of each kind per row.
    lora_buf:  [N, r_max] float32 scratch for the LoRA shrink (a view of a buffer owned by the runner).
    """

    ops: DeltaOps
    pools: SlotPool
    passes: tuple[DeltaPass, ...]
    lora_buf: torch.Tensor

    @classmethod
    def build(
        cls,
        ops: DeltaOps,
        pools: SlotPool,
        bitdelta_slots: Sequence[int],
        lora_slots: Sequence[int],
        lens: Sequence[int],
        lora_buf: torch.Tensor,
        device: torch.device,
        stage: Stage | None = None,
        pad_tiles_to: int | None = None,
        ia3_slots: Sequence[int] | None = None,
        composed: Sequence[Sequence[tuple[str, int, float]]] | None = None,
    ) -> DeltaBatch:
        """For rows laid out sequence after sequence: sequence j owns lens[j] consecutive rows and uses 1-bit
        slot bitdelta_slots[j], LoRA slot lora_slots[j] and (IA)^3 slot ia3_slots[j] (-1 = none; ia3_slots
        None: none at all), and the parts (kind, slot, weight) of composed[j] (a composition's; [] for none).
        lora_buf: scratch of at least [sum(lens), r_max] float32, owned by the caller (allocated once). stage: how
        the host arrays reach the device (the engine's one transfer per step; default one copy each).
        pad_tiles_to: fixed-size tile arrays for a CUDA graph (deltakernels.segments.build_slot_tiles)."""
        stage = stage or copy_stage(device)
        ia3 = ia3_slots if ia3_slots is not None else [-1] * len(lens)
        passes = [DeltaPass.build(pools, list(zip(bitdelta_slots, lora_slots, ia3)), lens, device, stage, pad_tiles_to)]
        for k in range(max((len(parts) for parts in composed or ()), default=0)):
            slots, weights = [], []
            for parts in composed:  # type: ignore[union-attr]
                kind, slot, weight = parts[k] if k < len(parts) else ("", -1, 0.0)
                slots.append(tuple(slot if kind == name else -1 for name in DELTA_KINDS))  # (1-bit, LoRA, (IA)^3)
                weights.append(weight)
            passes.append(DeltaPass.build(pools, slots, lens, device, stage, pad_tiles_to, weights))
        return cls(ops=ops, pools=pools, passes=tuple(passes), lora_buf=lora_buf[: sum(lens)])

    # The first pass: what a batch without compositions is (the CUDA graphs' and most tests' view).
    @property
    def bitdelta(self) -> SlotTiles:
        return self.passes[0].bitdelta

    @property
    def lora(self) -> SlotTiles:
        return self.passes[0].lora

    @property
    def bitdelta_row_slot(self) -> torch.Tensor:
        return self.passes[0].bitdelta_row_slot

    @property
    def ia3_row_slot(self) -> torch.Tensor | None:
        return self.passes[0].ia3_row_slot

    def replacing_passes(self, rep: Replacement | None) -> list[DeltaPass]:
        """The passes in which some row's 1-bit delta replaces the tensor of `rep` (none when rep is None)."""
        if rep is None:
            return []
        return [p for p in self.passes if not p.bitdelta.empty and rep.replaced_slots.intersection(p.bitdelta.slots)]

    def gather_rows(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """[N, *base.shape]: each row's copy of tensor `name` (its tenant's replacement, else the base; for a
        composition the base plus each part's weighted change); None when no row's delta replaces `name` (the
        caller uses the base for every row)."""
        out = None
        rep = self.pools.replacement(name)
        for p in self.replacing_passes(rep):
            slot = p.bitdelta_row_slot
            rows = rep.pool[slot.clamp(min=0)]  # type: ignore[union-attr]
            has = (slot >= 0).view(-1, *([1] * base.dim()))
            if p.weight is None:  # the first pass
                out = torch.where(has, rows, base)
            else:
                # the weight is float32: the change comes back in the tensor's dtype (bf16 stays bf16)
                change = (torch.where(has, rows - base, 0.0) * p.weight.view(-1, *([1] * base.dim()))).to(base.dtype)
                out = (base if out is None else out) + change
        return out

    def ia3_scales(self, pools: ProjectionPools) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each row's (input, output) scaling of one projection, [N, in] and [N, out] float32: 1 + the weighted
        sum of its parts' (l - 1); None for a side that no row scales: no row has an (IA)^3 delta, or no slot's
        delta scales that side of this projection (all ones there: nothing to gather or multiply)."""
        if pools.ia3_in is None or pools.ia3_out is None:
            return None, None
        return (self._ia3_scale(pools.ia3_in) if pools.ia3_in_slots else None,
                self._ia3_scale(pools.ia3_out) if pools.ia3_out_slots else None)  # fmt: skip

    def _ia3_scale(self, pool: torch.Tensor) -> torch.Tensor | None:
        scale = None
        for p in self.passes:
            if p.ia3_row_slot is None:
                continue
            vectors = pool[p.ia3_row_slot]
            if p.weight is None:  # the first pass
                scale = vectors
            else:
                scale = (vectors - 1.0) * p.weight + (1.0 if scale is None else scale)
        return scale


class TenantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, path: str, weight_name: str | None = None):
        """path: the module path in the HF state dict (e.g. "model.layers.0.mlp.down_proj"), the key of its
        delta pools. weight_name: the state-dict name of its weight when shared (tied lm_head)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.path = path
        self.weight_name = weight_name or f"{path}.weight"
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def pack_for_cpu(self, rows_hint: int) -> None:
        """Replaces the weight by oneDNN's prepacked copy (an opaque CPU tensor of the same shape and dtype);
        `rows_hint` is the typical number of rows per call. state_dict() then holds the packed tensor, whose
        .to_dense() gives the usual layout back."""
        assert self.weight.device.type == "cpu" and not self.weight.is_mkldnn
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), rows_hint)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # x: [N, in] -> y: [N, out]
        pools = deltas.pools.projection(self.path) if deltas is not None else None
        scale_in, scale_out = deltas.ia3_scales(pools) if pools is not None else (None, None)  # type: ignore[union-attr]
        # (IA)^3 scales what the base weight reads and gives (PEFT's order: float32 products, cast back); the other
        # deltas of a row read the unscaled x, as in the weighted merge W + (W * l - W) + ...
        y = self._base(x if scale_in is None else (x * scale_in).to(x.dtype), self.bias)
        if deltas is None:
            return y
        if scale_out is not None:
            y.mul_(scale_out)
        ops = deltas.ops
        for p in deltas.passes if pools is not None else ():
            xp = None
            if not p.bitdelta.empty and pools.signs is not None:
                xp = p.scaled(x)
                ops.bitdelta_apply(y, xp, pools.signs, pools.scales, p.bitdelta)
            if not p.lora.empty and pools.lora_a is not None:
                xp = p.scaled(x) if xp is None else xp
                ops.lora_apply(y, xp, pools.lora_a, pools.lora_bt, pools.lora_scaling, pools.lora_ranks, p.lora,
                               deltas.lora_buf)  # fmt: skip
        if deltas.pools.has_replacements:
            self._apply_replacements(y, x, deltas)
        return y

    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T (+ bias) with the base weight, in whichever layout it is kept."""
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def _apply_replacements(self, y: torch.Tensor, x: torch.Tensor, deltas: DeltaBatch) -> None:
        if self.bias is not None:
            bias_rows = deltas.gather_rows(f"{self.path}.bias", self.bias)
            if bias_rows is not None:
                y += bias_rows - self.bias
        rep = deltas.pools.replacement(self.weight_name)
        for p in deltas.replacing_passes(rep):
            tiles = p.bitdelta
            for slot, start, end in tiles.slot_ranges:
                if slot not in rep.replaced_slots:  # type: ignore[union-attr]
                    continue
                # A whole weight replaced for this tenant: its rows get their own GEMM (rare: lm_head, embeddings).
                rows = tiles.order[start:end].long()
                weight = rep.pool[slot]  # type: ignore[union-attr]
                if p.weight is None:
                    bias = None
                    if self.bias is not None:
                        bias_rep = deltas.pools.replacement(f"{self.path}.bias")
                        bias = bias_rep.pool[slot] if bias_rep is not None else self.bias
                    y[rows] = F.linear(x[rows], weight, bias)
                else:  # a composition's part: its weighted change (the bias's came with gather_rows above)
                    y[rows] += p.weight[rows] * (F.linear(x[rows], weight) - self._base(x[rows], None))


def cpu_weight_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs on this CPU: bfloat16 only where it has the instructions for it (AVX-512
    BW/VL/DQ or AVX-NE-CONVERT; elsewhere the packing call raises), float16 never (no faster path here)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def pack_cpu_weights(model: nn.Module, rows_hint: int) -> int:
    """Packs every TenantLinear's weight for the CPU (TenantLinear.pack_for_cpu), except a weight shared with
    another module (a tied lm_head: the embedding lookup needs the dense table). Returns how many were packed."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    packed = 0
    for m in model.modules():
        if isinstance(m, TenantLinear) and owners[id(m.weight)] == 1 and m.weight.dtype in _packable_dtypes():
            m.pack_for_cpu(rows_hint)
            packed += 1
    return packed


class TenantRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, name: str, unit_offset: bool = False):
        """unit_offset: Gemma's form, x * (1 + w) with the product in float32 (Llama's casts, then multiplies by w)."""
        super().__init__()
        self.eps = eps
        self.name = name  # state-dict name of the weight
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # x: [N, D], or [N, heads, D] (per-head query/key norms); normalised in float32 as in the reference
        # implementations, then cast back.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = deltas.gather_rows(self.name, self.weight) if deltas is not None else None
        if weight is None:
            weight = self.weight
        elif x.dim() == 3:
            weight = weight[:, None, :]  # each row's weight, the same for all its heads
        if self.unit_offset:
            return (h * (1.0 + weight.float())).to(dtype)
        return h.to(dtype) * weight


class TenantEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, name: str):
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # ids: [N] -> [N, D]
        h = F.embedding(ids, self.weight)
        if deltas is None:
            return h
        rep = deltas.pools.replacement(self.name)
        out = h
        for p in deltas.replacing_passes(rep):
            slot = p.bitdelta_row_slot
            rows = rep.pool[slot.clamp(min=0), ids]  # type: ignore[union-attr]
            has = (slot >= 0).unsqueeze(-1)
            if p.weight is None:  # the first pass
                out = torch.where(has, rows, out)
            else:
                out = out + (torch.where(has, rows - h, 0.0) * p.weight).to(h.dtype)
        return out
