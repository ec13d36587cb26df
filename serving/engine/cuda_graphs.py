"""Decode steps replayed from CUDA graphs (EngineConfig.cuda_graphs).

A decode step launches hundreds of small kernels (every projection's GEMM and delta kernels, norms, RoPE,
attention, per layer); at decode sizes their launch overhead is a large share of the step. A CUDA graph
captures them once and replays them with one launch. A graph replays fixed shapes and fixed addresses, so a
decode-only step of B sequences runs padded to the graph of its key:

    batch   B rounded up to a bucket (BATCH_BUCKETS); padded rows decode token 0 at position 0 with no delta,
            write their keys and values into the NULL_BLOCK (never a sequence's), and their logits are dropped
    ctx     the longest context's blocks rounded up to a power of two: attention reads that many keys, masked
    deltas  whether any row has a 1-bit delta, and whether any has a LoRA: the delta tiles are padded to one tile
            per padded row, the empty ones skipped by the kernels

Each graph owns its inputs: a StepStaging buffer written in the same layout at every step of its key, so the
step's one host->device copy lands where the graph reads. Before capture the step runs twice eagerly on a side
stream (Triton autotuning benchmarks its candidates then, never during capture). Steps a graph cannot
replay run eagerly as before: prefills, batches above the largest bucket, and batches touching a delta that
replaces base tensors (those take host-side decisions per step).

On a CPU (tests) `capture=False` runs exactly the padded inputs eagerly: the padding is what is tested there;
capture and replay need a GPU (tests/gpu, bench/gpu_check.sh).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serving.engine.block_manager import NULL_BLOCK
from serving.engine.staging import StepStaging
from serving.models.attention import build_attention_batch
from serving.models.tenant_layers import DeltaBatch

if TYPE_CHECKING:
    from serving.engine.model_runner import ModelRunner
    from serving.engine.sequence import Sequence

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class GraphKey:
    batch: int  # padded rows
    ctx_blocks: int  # KV blocks every row attends over
    bitdelta: bool
    lora: bool
    ia3: int = 0  # 0: no (IA)^3 row; else 1 + the slot pool's ia3_layout (which projections it scales)


@dataclass
class _Graph:
    staging: StepStaging
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class DecodeGraphs:
    runner: ModelRunner
    max_batch: int
    max_ctx_blocks: int
    capture: bool = True
    graphs: dict[GraphKey, _Graph] = field(default_factory=dict)
    replays: int = 0  # steps served by a graph (or, without capture, by the padded eager path)
    pool: object = None

    def __post_init__(self) -> None:
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def key_for(self, seqs: list[Sequence], deltas_touch_replacements: bool) -> GraphKey | None:
        """The graph of a decode-only step, or None when it must run eagerly."""
        if not seqs or len(seqs) > self.max_batch or deltas_touch_replacements or any(s.composed for s in seqs):
            return None  # compositions run eagerly: their extra passes are not part of any graph
        batch = next((b for b in BATCH_BUCKETS if len(seqs) <= b <= self.max_batch), self.max_batch)
        bs = self.runner.block_size
        blocks = max(-(-(s.num_computed + 1) // bs) for s in seqs)
        ctx_blocks = min(1 << (blocks - 1).bit_length(), self.max_ctx_blocks)
        return GraphKey(
            batch=batch,
            ctx_blocks=max(ctx_blocks, blocks),
            bitdelta=any(s.bitdelta_slot >= 0 for s in seqs),
            lora=any(s.lora_slot >= 0 for s in seqs),
            ia3=1 + self.runner.slots.ia3_layout if any(s.ia3_slot >= 0 for s in seqs) else 0,
        )

    def run(self, seqs: list[Sequence], key: GraphKey) -> torch.Tensor:
        """[len(seqs), V] float32 logits of a decode-only step, through the graph of `key`."""
        g = self.graphs.get(key)
        if g is None:
            g = self._build(seqs, key)
        else:
            inputs = self._stage(g.staging, seqs, key)
            if g.graph is not None:
                g.graph.replay()
            else:
                g.logits = self._forward(*inputs)
        self.replays += 1
        assert g.logits is not None
        return g.logits[: len(seqs)]

    # ---- inside ----------------------------------------------------------------------------------------------
    def _stage(self, staging: StepStaging, seqs: list[Sequence], key: GraphKey):
        """Writes the padded step into the graph's buffer (one copy) and returns the model's inputs over it."""
        r = self.runner
        pad = key.batch - len(seqs)
        stage = staging.begin()
        ids = stage([s.token_ids[s.num_computed] for s in seqs] + [0] * pad, torch.int64)
        attn = build_attention_batch(
            [1] * key.batch,
            [s.num_computed + 1 for s in seqs] + [1] * pad,
            [s.block_table for s in seqs] + [[NULL_BLOCK]] * pad,
            r.block_size,
            r.device,
            r.model.config.sliding_window,
            stage,
            pad_ctx_to=key.ctx_blocks * r.block_size,
        )
        deltas = DeltaBatch.build(
            r.ops,
            r.slots,
            [s.bitdelta_slot for s in seqs] + [-1] * pad,
            [s.lora_slot for s in seqs] + [-1] * pad,
            [1] * key.batch,
            r.lora_scratch,
            r.device,
            stage,
            pad_tiles_to=key.batch,
            ia3_slots=[s.ia3_slot for s in seqs] + [-1] * pad,
        )
        assert deltas.bitdelta.empty != key.bitdelta and deltas.lora.empty != key.lora
        assert (deltas.ia3_row_slot is not None) == bool(key.ia3)
        stage.upload()
        if stage.copies != 1:  # a buffer too small would move inputs the graph reads: a bug in the sizing below
            raise RuntimeError(f"the graph inputs of {key} took {stage.copies} transfers")
        return ids, attn, deltas

    def _forward(self, ids, attn, deltas) -> torch.Tensor:
        model = self.runner.model
        return model.compute_logits(model(ids, attn, deltas), deltas)

    def _build(self, seqs: list[Sequence], key: GraphKey) -> _Graph:  # pragma: no mutate block (CUDA capture: GPU only)
        # Every array of the padded step, generously: 17 int64 per row (16, and the (IA)^3 row slots), the block tables, the alignment.
        capacity = key.batch * (17 * 8 + 8 * key.ctx_blocks) + 64 * 16 + 4096
        # Separate host and device buffers even on a CPU (capture=False): the layout a graph relies on is what runs.
        g = _Graph(StepStaging(self.runner.device, capacity=capacity, separate_buffers=True))
        inputs = self._stage(g.staging, seqs, key)
        if not self.capture:
            g.logits = self._forward(*inputs)
            self.graphs[key] = g
            return g
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # autotuning, allocator and library workspaces, before capture
                self._forward(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        # Fresh input objects over the same buffer (same addresses): the attention mask is computed on first
        # use and cached, and it must be computed inside the graph, from the buffer.
        inputs = self._stage(g.staging, seqs, key)
        torch.cuda.synchronize()
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.logits = self._forward(*inputs)
        g.graph.replay()  # the capture only recorded the kernels: run them for this step
        self.graphs[key] = g
        return g
