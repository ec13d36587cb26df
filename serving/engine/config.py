"""The engine's typed configuration, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 4096  # tokens in one step (prefill chunks + one per decode)
    prefill_chunk: int = 512  # prompt tokens of one sequence computed in one step at most (chunked prefill)
    fair_scheduling: bool = True  # shares among tenants (serving/engine/scheduler.py); False: first come, first served
    max_model_len: int | None = None  # prompt + output; default: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # default: from gpu_memory_utilization (GPU) or kv_cache_cpu_bytes (CPU)
    gpu_memory_utilization: float = 0.85
    kv_cache_cpu_bytes: int = 1 << 30
    bitdelta_slots: int = 4  # GPU slots for 1-bit deltas
    lora_slots: int = 8  # GPU slots for LoRA deltas
    max_lora_rank: int = 64
    kernel_backend: str = "auto"  # auto | triton | cpu | torch (see kernels.select_delta_ops)
    pack_cpu_weights: bool = True  # CPU: base linear weights in oneDNN's packed layout (faster GEMMs)
    cuda_graphs: bool = False  # GPU: decode steps replayed from CUDA graphs (serving/engine/cuda_graphs.py)
    seed: int = 0  # the sampler's generator for unseeded requests

    def __post_init__(self) -> None:
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.prefill_chunk >= 1, "prefill_chunk must be >= 1"),
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.bitdelta_slots >= 0 and self.lora_slots >= 0, "slot counts must be >= 0"),
            (self.max_lora_rank >= 1, "max_lora_rank must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
