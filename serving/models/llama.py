"""The Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3): RMSNorm, RoPE, grouped-query attention, SwiGLU;
Qwen3's per-head RMSNorm of queries and keys before RoPE.

Module names mirror the Hugging Face state dict, so a checkpoint loads by name. Tenancy lives in the
layers (serving.models.tenant_layers); this file is the math. Shapes: N = tokens of the step (all
sequences laid out one after another), D = hidden size, H / Hkv = query / key-value heads.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from registry.model_config import ModelConfig, RopeConfig
from serving.models.attention import AttentionBatch, paged_attention
from serving.models.tenant_layers import DeltaBatch, TenantEmbedding, TenantLinear, TenantRMSNorm


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, rope: RopeConfig | None = None):
        """rope: another RoPE than the config's (a model whose layers differ: Gemma 3's local layers)."""
        super().__init__()
        inv_freq = (rope or config.rope).inv_freq(config.head_dim)  # [D/2] float32
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [N] -> cos, sin: [N, 1, head_dim], computed in float32 as the reference does
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = TenantLinear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, f"{prefix}.q_proj")
        self.k_proj = TenantLinear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, f"{prefix}.k_proj")
        self.v_proj = TenantLinear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, f"{prefix}.v_proj")
        self.o_proj = TenantLinear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, f"{prefix}.o_proj")
        self.q_norm = self.k_norm = None
        if c.qk_norm:
            self.q_norm = self.norm(c, c.head_dim, f"{prefix}.q_norm.weight")
            self.k_norm = self.norm(c, c.head_dim, f"{prefix}.k_norm.weight")
        self.scale = c.query_scale if c.query_scale is not None else c.head_dim**-0.5
        self.window: int | None | str = "batch"  # the attention batch's (a model whose layers differ sets its own)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # bound by the model runner

    @staticmethod
    def norm(config: ModelConfig, dim: int, name: str) -> TenantRMSNorm:
        return TenantRMSNorm(dim, config.rms_norm_eps, name)

    def forward(self, x, cos, sin, attn: AttentionBatch, deltas: DeltaBatch | None) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x, deltas).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x, deltas).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, deltas).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q, deltas), self.k_norm(k, deltas)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = paged_attention(q, k, v, attn, self.kv_cache, self.scale, self.window)  # [N, H, head_dim]
        return self.o_proj(o.reshape(n, -1), deltas)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = TenantLinear(d, f, b, f"{prefix}.gate_proj")
        self.up_proj = TenantLinear(d, f, b, f"{prefix}.up_proj")
        self.down_proj = TenantLinear(f, d, b, f"{prefix}.down_proj")
        self.act = ACTIVATIONS[config.hidden_act]  # SwiGLU, or Gemma's GeGLU

    def forward(self, x: torch.Tensor, deltas: DeltaBatch | None) -> torch.Tensor:
        gate = self.act(self.gate_proj(x, deltas))
        return self.down_proj(gate * self.up_proj(x, deltas), deltas)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = TenantRMSNorm(config.hidden_size, config.rms_norm_eps, f"{prefix}.input_layernorm.weight")
        self.self_attn = Attention(config, f"{prefix}.self_attn")
        self.post_attention_layernorm = TenantRMSNorm(
            config.hidden_size, config.rms_norm_eps, f"{prefix}.post_attention_layernorm.weight"
        )
        self.mlp = MLP(config, f"{prefix}.mlp")

    def forward(self, x, cos, sin, attn: AttentionBatch, deltas: DeltaBatch | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, deltas), cos, sin, attn, deltas)
        return x + self.mlp(self.post_attention_layernorm(x, deltas), deltas)


class Backbone(nn.Module):
    """`model.*` of the state dict: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = TenantEmbedding(config.vocab_size, config.hidden_size, "model.embed_tokens.weight")
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = TenantRMSNorm(config.hidden_size, config.rms_norm_eps, "model.norm.weight")


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.make_backbone(config)
        weight_name = "model.embed_tokens.weight" if config.tie_word_embeddings else None
        self.lm_head = TenantLinear(config.hidden_size, config.vocab_size, False, "lm_head", weight_name)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    @staticmethod
    def make_backbone(config: ModelConfig) -> nn.Module:
        return Backbone(config)

    def build_rotary(self, device: torch.device | str) -> None:
        """The RoPE tables (buffers, not in the checkpoint), on `device`: after a load onto the meta device."""
        self.rotary = RotaryEmbedding(self.config).to(device)

    def projection_paths(self) -> dict[str, tuple[int, int]]:
        """Module path -> (out, in) of every attention and MLP projection: where deltas apply."""
        return {
            m.path: (m.out_features, m.in_features)
            for m in self.modules()
            if isinstance(m, TenantLinear) and m is not self.lm_head
        }

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        for layer, cache in zip(self.model.layers, caches or [None] * len(self.model.layers)):
            layer.self_attn.kv_cache = cache

    def forward(self, input_ids: torch.Tensor, attn: AttentionBatch, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # input_ids: [N] -> hidden states [N, D] after the final norm
        x = self.model.embed_tokens(input_ids, deltas)
        cos, sin = self.rotary(attn.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn, deltas)
        return self.model.norm(x, deltas)

    def compute_logits(self, hidden: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        # hidden: [B, D] (each sequence's last position) -> [B, V] float32
        return self.lm_head(hidden, deltas).float()
