"""Attention over a paged KV cache, for batches that mix prefills and decodes.

The KV cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]. Token t of a
sequence lives in block `block_table[t // block_size]` at offset `t % block_size`. Every step writes the
new tokens' keys and values at their slots, then each sequence's queries attend to all its cached tokens.

Sequences are processed in groups of similar query length (decodes: 1 query; prefills: many), each
padded to its group's longest query and context, with a mask (causal, context length, sliding window)
computed on the device once per step, from each query's position and each sequence's length, and shared by
every layer. This is the pure-torch path used everywhere for now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from deltakernels.segments import Stage, copy_stage


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences of one step padded together.

    token_index:  [B, max_q] int64, row of the step's flat token array for each query (padding points at row 0:
                  its output is dropped, and as a key it lies beyond every context length, so it is masked).
    valid_flat:   [R] int64, positions of the real queries in the flattened [B * max_q] grid.
    valid_rows:   [R] int64, their rows in the step's flat token array (integer indices, computed on the
                  host, so scattering the output back needs no device sync).
    block_tables: [B, max_blocks] int64 (None without a KV cache: keys are the step's own tokens).
    q_pos:        [B, max_q] int64, each query's position (padding queries: 0).
    ctx:          [B] int64, each sequence's context length.
    window:       the sliding window (None: none).
    mask:         [B, 1, max_q, max_ctx] bool, True = may attend: key k <= the query's position, k < ctx, and
                  within the window. Computed on first use, after the step's metadata reached the device; a
                  padding query (position 0) attends to key 0 only, so no row is fully masked.
    """

    token_index: torch.Tensor
    valid_flat: torch.Tensor
    valid_rows: torch.Tensor
    block_tables: torch.Tensor | None
    q_pos: torch.Tensor
    ctx: torch.Tensor
    window: int | None
    max_ctx: int

    @cached_property
    def own_keys(self) -> torch.Tensor:
        """[B, max_ctx, 1, 1] bool: the key positions that hold this sequence's own tokens (k < ctx)."""
        k_pos = torch.arange(self.max_ctx, device=self.ctx.device)
        return (k_pos[None, :] < self.ctx[:, None])[:, :, None, None]

    @cached_property
    def mask(self) -> torch.Tensor:
        return self.mask_for(self.window)

    @cached_property
    def _masks(self) -> dict[int | None, torch.Tensor]:
        return {}

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask with another sliding window (models whose layers differ: Gemma 3), computed once per step."""
        if window not in self._masks:
            k_pos = torch.arange(self.max_ctx, device=self.ctx.device)
            mask = (k_pos[None, None, :] <= self.q_pos[:, :, None]) & (k_pos[None, None, :] < self.ctx[:, None, None])
            if window is not None:
                mask &= k_pos[None, None, :] > self.q_pos[:, :, None] - window
            self._masks[window] = mask.unsqueeze(1)
        return self._masks[window]


@dataclass(frozen=True)
class AttentionBatch:
    """positions: [N] int64. slot_mapping: [N] int64 flat cache slot of each new token (None: no cache)."""

    positions: torch.Tensor
    slot_mapping: torch.Tensor | None
    groups: tuple[AttentionGroup, ...]
    num_tokens: int


def build_attention_batch(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]] | None,
    block_size: int,
    device: torch.device | str,
    sliding_window: int | None = None,
    stage: Stage | None = None,
    pad_ctx_to: int | None = None,
) -> AttentionBatch:
    """Metadata of one step. Sequence j contributes `query_lens[j]` new tokens (laid out one sequence after
    another) and has `context_lens[j]` tokens in all, the new ones included, so its queries sit at
    positions context_lens[j] - query_lens[j] ... context_lens[j] - 1. Without block tables (no KV cache)
    every sequence must be a whole prefill (query_len == context_len). stage: how host arrays reach the
    device (the engine's one transfer per step; default one copy each). pad_ctx_to: the decode group's keys
    padded to at least this many (a CUDA graph replays fixed shapes)."""
    stage = stage or copy_stage(device)
    n = sum(query_lens)
    positions: list[int] = []
    slots: list[int] = []
    starts: list[int] = []
    for j, (q, c) in enumerate(zip(query_lens, context_lens)):
        starts.append(len(positions))
        positions.extend(range(c - q, c))
        if block_tables is not None:
            table = block_tables[j]
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c - q, c))
        elif q != c:
            raise ValueError("without a KV cache every sequence must be a whole prefill")
    decodes = [j for j, q in enumerate(query_lens) if q == 1]
    prefills = [j for j, q in enumerate(query_lens) if q > 1]
    groups = []
    for members, pad in ((decodes, pad_ctx_to), (prefills, None)):
        if members:
            groups.append(
                _group(members, query_lens, context_lens, starts, block_tables, block_size, sliding_window, stage, pad)
            )
    return AttentionBatch(
        positions=stage(positions, torch.int64),
        slot_mapping=stage(slots, torch.int64) if block_tables is not None else None,
        groups=tuple(groups),
        num_tokens=n,
    )


def _group(members, query_lens, context_lens, starts, block_tables, block_size, window, stage, pad_ctx_to) -> AttentionGroup:
    max_q = max(query_lens[j] for j in members)
    max_ctx = max([context_lens[j] for j in members] + [pad_ctx_to or 0])
    b = len(members)
    token_index = torch.zeros((b, max_q), dtype=torch.int64)
    q_pos = torch.zeros(b, max_q, dtype=torch.int64)  # padding queries sit at position 0: they attend to key 0 only
    ctx = torch.zeros(b, dtype=torch.int64)
    valid = torch.zeros(b, max_q, dtype=torch.bool)
    for i, j in enumerate(members):
        q, c = query_lens[j], context_lens[j]
        token_index[i, :q] = torch.arange(starts[j], starts[j] + q)
        valid[i, :q] = True
        q_pos[i, :q] = torch.arange(c - q, c)
        ctx[i] = c
    tables = None
    if block_tables is not None:
        max_blocks = (max_ctx + block_size - 1) // block_size
        host_tables = torch.zeros(b, max_blocks, dtype=torch.int64)
        for i, j in enumerate(members):
            row = list(block_tables[j])[:max_blocks]
            host_tables[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        tables = stage(host_tables, torch.int64).view(b, max_blocks)
    valid_flat = valid.flatten().nonzero().squeeze(1)
    return AttentionGroup(
        token_index=stage(token_index, torch.int64).view(b, max_q),
        valid_flat=stage(valid_flat, torch.int64),
        valid_rows=stage(token_index.flatten()[valid_flat], torch.int64),
        block_tables=tables,
        q_pos=stage(q_pos, torch.int64).view(b, max_q),
        ctx=stage(ctx, torch.int64),
        window=window,
        max_ctx=max_ctx,
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AttentionBatch,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    window: int | None | str = "batch",
) -> torch.Tensor:
    """q: [N, H, D], k, v: [N, Hkv, D] (the step's new tokens, RoPE applied) -> [N, H, D].

    Writes k, v into the cache at `batch.slot_mapping`, then attends each query to its sequence's keys, within
    the batch's sliding window, or this layer's `window` (None: none) when given."""
    n, h, d = q.shape
    hkv = k.shape[1]
    if kv_cache is not None:
        k_cache, v_cache = kv_cache  # [num_blocks, block_size, Hkv, D]
        assert batch.slot_mapping is not None
        k_cache.view(-1, hkv, d).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, hkv, d).index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    for g in batch.groups:
        qg = q[g.token_index]  # [B, max_q, H, D]
        if kv_cache is not None:
            assert g.block_tables is not None
            kg = k_cache[g.block_tables].flatten(1, 2)[:, : g.max_ctx]  # [B, max_ctx, Hkv, D]
            vg = v_cache[g.block_tables].flatten(1, 2)[:, : g.max_ctx]
        else:
            kg, vg = k[g.token_index], v[g.token_index]  # a whole prefill: the keys are the queries' tokens
        # Keys at and past a sequence's length are not its own: stale entries of other sequences in its last
        # block, block-table padding (the null block), padding rows. The mask excludes them, but a masked Inf or
        # NaN still propagates (0 * NaN = NaN), so they are zeroed: no value another tenant left in the cache can
        # reach this row.
        own = g.own_keys  # [B, max_ctx, 1, 1]
        kg, vg = kg.where(own, 0.0), vg.where(own, 0.0)
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2),
            attn_mask=g.mask if window == "batch" else g.mask_for(window), scale=scale, enable_gqa=h != hkv
        )  # [B, H, max_q, D]
        b, max_q = g.token_index.shape
        out[g.valid_rows] = o.transpose(1, 2).reshape(b * max_q, h, d)[g.valid_flat]
    return out
