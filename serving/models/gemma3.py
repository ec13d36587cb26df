"""Gemma 3 (text): the Llama family's attention and MLP projections with Gemma's differences.

RMSNorm as x * (1 + w) in float32, around attention and the MLP both before and after (four norms per layer),
per-head query/key norms of that form, GeGLU (gelu tanh) MLP, embeddings scaled by sqrt(hidden), attention
scores scaled by query_pre_attn_scalar ** -0.5, sliding-window layers (with their own RoPE base) interleaved
with global ones, and an optional final logit soft-cap. Projections are the same TenantLinear as everywhere, so
every delta kind applies unchanged; this file is the math. Shapes as in serving/models/llama.py.
"""

from __future__ import annotations

import torch
from torch import nn

from registry.model_config import ModelConfig
from serving.models.attention import AttentionBatch
from serving.models.llama import MLP, Attention, LlamaForCausalLM, RotaryEmbedding
from serving.models.tenant_layers import DeltaBatch, TenantEmbedding, TenantRMSNorm


def _norm(config: ModelConfig, dim: int, name: str) -> TenantRMSNorm:
    return TenantRMSNorm(dim, config.rms_norm_eps, name, unit_offset=True)


class Gemma3Attention(Attention):
    norm = staticmethod(_norm)  # the per-head query/key norms, Gemma's form

    def __init__(self, config: ModelConfig, prefix: str, window: int | None):
        super().__init__(config, prefix)
        self.window = window  # this layer's sliding window (None: a global layer)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        prefix = f"model.layers.{index}"
        d = config.hidden_size
        self.sliding = config.layer_windows[index] is not None
        self.input_layernorm = _norm(config, d, f"{prefix}.input_layernorm.weight")
        self.self_attn = Gemma3Attention(config, f"{prefix}.self_attn", config.layer_windows[index])
        self.post_attention_layernorm = _norm(config, d, f"{prefix}.post_attention_layernorm.weight")
        self.pre_feedforward_layernorm = _norm(config, d, f"{prefix}.pre_feedforward_layernorm.weight")
        self.mlp = MLP(config, f"{prefix}.mlp")
        self.post_feedforward_layernorm = _norm(config, d, f"{prefix}.post_feedforward_layernorm.weight")

    def forward(self, x, cos, sin, attn: AttentionBatch, deltas: DeltaBatch | None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x, deltas), cos, sin, attn, deltas)
        x = x + self.post_attention_layernorm(h, deltas)
        h = self.mlp(self.pre_feedforward_layernorm(x, deltas), deltas)
        return x + self.post_feedforward_layernorm(h, deltas)


class Gemma3Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = TenantEmbedding(config.vocab_size, config.hidden_size, "model.embed_tokens.weight")
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = _norm(config, config.hidden_size, "model.norm.weight")


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.local_rotary = RotaryEmbedding(config, config.local_rope)
        # sqrt(hidden) rounded to the weights' dtype first, as the reference does (a bfloat16 model scales by 50.5,
        # not 50.596, for hidden 2560); set by build_rotary, once the dtype is known
        self.embed_scale = config.hidden_size**0.5

    @staticmethod
    def make_backbone(config: ModelConfig) -> nn.Module:
        return Gemma3Backbone(config)

    def build_rotary(self, device: torch.device | str) -> None:
        super().build_rotary(device)
        self.local_rotary = RotaryEmbedding(self.config, self.config.local_rope).to(device)
        dtype = self.model.embed_tokens.weight.dtype
        self.embed_scale = float(torch.tensor(self.config.hidden_size**0.5, dtype=dtype))

    def forward(self, input_ids: torch.Tensor, attn: AttentionBatch, deltas: DeltaBatch | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids, deltas)
        x = x * self.embed_scale
        ropes = {False: self.rotary(attn.positions, x.dtype), True: self.local_rotary(attn.positions, x.dtype)}
        for layer in self.model.layers:
            x = layer(x, *ropes[layer.sliding], attn, deltas)
        return self.model.norm(x, deltas)

    def compute_logits(self, hidden: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        logits = super().compute_logits(hidden, deltas)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
