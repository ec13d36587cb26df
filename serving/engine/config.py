"""The engine's typed configuration: the one place its settings, defaults and limits are written.

`EngineOptions` are what an operator sets: `deltaserve generate` and `deltaserve serve` make their flags from
these fields (serving.flags), and the server's DELTASERVE_* variables come from the same fields
(serving.server.ServerSettings derives from this class). `EngineConfig` adds what only code and benchmarks set.
A bad value is refused when the config is made (pydantic's ValidationError, a ValueError), before anything loads.
No torch here: the API process reads these settings too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
KernelBackend = Literal["auto", "triton", "cpu", "torch"]  # deltakernels.BACKENDS (deltakernels.select_delta_ops)


class EngineOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Device = Field("auto", description="where the model runs (auto: cuda when there is one)")
    dtype: Dtype = Field("auto", description="the model's dtype (auto: float32 on CPU; on a GPU the checkpoint's half dtype, else bfloat16)")
    max_model_len: int | None = Field(None, ge=2, description="prompt + output tokens (default: the model's)")
    max_num_seqs: int = Field(64, ge=1, description="sequences in one step")
    max_num_batched_tokens: int = Field(4096, ge=1, description="tokens in one step (prefill chunks + decodes)")
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens of one sequence per step at most")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks (default: from the GPU's free memory, or 1 GiB on CPU)"
    )
    bitdelta_slots: int = Field(4, ge=0, description="GPU slots for 1-bit deltas")
    lora_slots: int = Field(8, ge=0, description="GPU slots for LoRA adapters")
    max_lora_rank: int = Field(64, ge=1, description="the largest LoRA rank the slots hold")
    ia3_slots: int = Field(8, ge=0, description="GPU slots for (IA)^3 adapters")
    kernel_backend: KernelBackend = Field("auto", description="the delta kernels (auto: triton on a GPU, cpu on CPU)")
    cuda_graphs: bool = Field(
        False, description="GPU: replay decode steps from CUDA graphs (not yet validated on a GPU; off by default)"
    )


class EngineConfig(EngineOptions):
    fair_scheduling: bool = True  # shares among tenants (serving/engine/scheduler.py); False: first come, first served
    block_size: int = Field(16, ge=1)  # tokens per KV-cache block
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # share of the GPU's memory for weights, slots and KV
    kv_cache_cpu_bytes: int = Field(1 << 30, ge=1)  # the KV cache's size on CPU, without num_kv_blocks
    pack_cpu_weights: bool = True  # CPU: base linear weights in oneDNN's packed layout (faster GEMMs)
    seed: int = 0  # the sampler's generator for unseeded requests
