"""Layers that apply each row's own tenant delta on top of the shared base weights.

The model code builds its projections, norms and embeddings from these classes and passes a
`DeltaBatch` down; it holds no tenancy logic itself. With `deltas=None` they are the plain layers.

Per row i (a token, or a sequence's last position for the lm_head):
  TenantLinear:    y[i] = x[i] @ W.T + b   (one GEMM for all rows)
                        + scale[s] * (x[i] @ sign[s].T)          if row i has 1-bit slot s
                        + scaling[l] * (x[i] @ A[l].T) @ B[l].T  if row i has LoRA slot l
                   where a 1-bit delta replaces W or b exactly, row i uses its tenant's tensor instead.
  TenantRMSNorm / TenantEmbedding: row i uses its tenant's replaced weight if there is one.

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
from registry.slot_pool import SlotPool


@dataclass(frozen=True)
class DeltaBatch:
    """Which delta each row of the layer inputs uses; built once per step by the model runner.

    bitdelta / lora:     rows grouped by slot (deltakernels.segments), for the delta kernels.
    bitdelta_row_slot:   [N] int64, each row's 1-bit slot (-1 = none), for replaced tensors.
    lora_buf:            [N, r_max] float32 scratch for the LoRA shrink (a view of a buffer owned by the runner).
    """

    ops: DeltaOps
    pools: SlotPool
    bitdelta: SlotTiles
    lora: SlotTiles
    bitdelta_row_slot: torch.Tensor
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
    ) -> DeltaBatch:
        """For rows laid out sequence after sequence: sequence j owns lens[j] consecutive rows and uses 1-bit
        slot bitdelta_slots[j] and LoRA slot lora_slots[j] (-1 = none). lora_buf: scratch of at least
        [sum(lens), r_max] float32, owned by the caller (allocated once). stage: how the host arrays reach
        the device (the engine's one transfer per step; default one copy each). pad_tiles_to: fixed-size tile
        arrays for a CUDA graph (deltakernels.segments.build_slot_tiles)."""
        stage = stage or copy_stage(device)
        row_slot: list[int] = []
        for slot, n in zip(bitdelta_slots, lens):
            row_slot.extend([slot] * n)
        return cls(
            ops=ops,
            pools=pools,
            bitdelta=build_slot_tiles(bitdelta_slots, lens, device, stage, pad_tiles_to),
            lora=build_slot_tiles(lora_slots, lens, device, stage, pad_tiles_to),
            bitdelta_row_slot=stage(row_slot, torch.int64),
            lora_buf=lora_buf[: len(row_slot)],
        )

    @property
    def touches_replacements(self) -> bool:
        """True when a row of this batch uses a delta that replaces some base tensor (host-side decisions follow)."""
        if self.bitdelta.empty or not self.pools.has_replacements:
            return False
        return self.pools.replaces_any(self.bitdelta.slots)

    def gather_rows(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """[N, *base.shape]: each row's copy of tensor `name` (its tenant's replacement, else the base);
        None when no resident delta replaces `name` (the caller uses the base for every row)."""
        rep = self.pools.replacement(name) if not self.bitdelta.empty else None
        if rep is None or not rep.replaced_slots.intersection(self.bitdelta.slots):
            return None
        slot = self.bitdelta_row_slot
        rows = rep.pool[slot.clamp(min=0)]
        has = (slot >= 0).view(-1, *([1] * base.dim()))
        return torch.where(has, rows, base)


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
        if self.weight.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if deltas is None:
            return y
        ops = deltas.ops
        pools = deltas.pools.projection(self.path)
        if pools is not None and not deltas.bitdelta.empty and pools.signs is not None:
            ops.bitdelta_apply(y, x, pools.signs, pools.scales, deltas.bitdelta)
        if pools is not None and not deltas.lora.empty and pools.lora_a is not None:
            ops.lora_apply(y, x, pools.lora_a, pools.lora_bt, pools.lora_scaling, pools.lora_ranks, deltas.lora,
                           deltas.lora_buf)  # fmt: skip
        if deltas.pools.has_replacements and not deltas.bitdelta.empty:
            self._apply_replacements(y, x, deltas)
        return y

    def _apply_replacements(self, y: torch.Tensor, x: torch.Tensor, deltas: DeltaBatch) -> None:
        if self.bias is not None:
            bias_rows = deltas.gather_rows(f"{self.path}.bias", self.bias)
            if bias_rows is not None:
                y += bias_rows - self.bias
        rep = deltas.pools.replacement(self.weight_name)
        if rep is None:
            return
        tiles = deltas.bitdelta
        for slot, start, end in tiles.slot_ranges:
            if slot not in rep.replaced_slots:
                continue
            # A whole weight replaced for this tenant: its rows get their own GEMM (rare: lm_head, embeddings).
            rows = tiles.order[start:end].long()
            bias = None
            if self.bias is not None:
                bias_rep = deltas.pools.replacement(f"{self.path}.bias")
                bias = bias_rep.pool[slot] if bias_rep is not None else self.bias
            y[rows] = F.linear(x[rows], rep.pool[slot], bias)


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
    def __init__(self, dim: int, eps: float, name: str):
        super().__init__()
        self.eps = eps
        self.name = name  # state-dict name of the weight
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # x: [N, D]; normalised in float32 as in the reference implementations, then cast back.
        dtype = x.dtype
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        weight = deltas.gather_rows(self.name, self.weight) if deltas is not None else None
        return h * (self.weight if weight is None else weight)


class TenantEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, name: str):
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # ids: [N] -> [N, D]
        h = F.embedding(ids, self.weight)
        if deltas is None or deltas.bitdelta.empty:
            return h
        rep = deltas.pools.replacement(self.name)
        if rep is None or not rep.replaced_slots.intersection(deltas.bitdelta.slots):
            return h
        slot = deltas.bitdelta_row_slot
        rows = rep.pool[slot.clamp(min=0), ids]
        return torch.where((slot >= 0).unsqueeze(-1), rows, h)
