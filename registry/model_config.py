"""The model's configuration, read from a Hugging Face `config.json` and checked at the boundary: which
architectures deltaserve serves. In the registry because checking an uploaded fine-tune needs it as much as
loading the model does (serving imports it from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Gemma3ForCausalLM")
GEMMA3 = "Gemma3ForCausalLM"  # its own model file (serving/models/gemma3.py); the others are the Llama family's
SUPPORTED_ACTIVATIONS = {"LlamaForCausalLM": "silu", "MistralForCausalLM": "silu", "Qwen2ForCausalLM": "silu",
                         "Qwen3ForCausalLM": "silu", GEMMA3: "gelu_pytorch_tanh"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    """A checkpoint deltaserve cannot serve; the message names what is unsupported."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim / 2] float32 inverse frequencies, with this config's scaling applied."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q, k, v projections have biases (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # o_proj has a bias (Llama with attention_bias)
    mlp_bias: bool = False
    sliding_window: int | None = None  # every layer attends to at most this many previous positions (Mistral)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU, Gemma 3)
    query_scale: float | None = None  # attention's score scale; None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar)
    # Gemma 3: which layers use a sliding window (the others attend globally), its size, and their RoPE
    layer_windows: tuple[int | None, ...] = ()  # per layer; () = every layer `sliding_window`
    local_rope: RopeConfig | None = None  # RoPE of the sliding-window layers (None: `rope` for all)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: torch.dtype = torch.float32
    name: str = "model"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "model") -> ModelConfig:
        # Over 60 lines: every family's config fields read in one place, in one order (the families differ in a
        # line each; the Gemma 3 dialect has a function of its own), so that a new family's fields are seen beside the rest.
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act != SUPPORTED_ACTIVATIONS[arch]:
            raise UnsupportedModel(f"hidden_act {act!r} is not supported for {arch} (only {SUPPORTED_ACTIVATIONS[arch]!r})")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise UnsupportedModel(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")

        gemma: dict[str, Any] = {}
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            # Qwen2: q/k/v biases always; Qwen3: attention_bias on all four projections, as Llama's
            qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False))
            o_bias = arch == "Qwen3ForCausalLM" and bool(cfg.get("attention_bias", False))
            window = _qwen_window(cfg)
        elif arch == GEMMA3:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            window = None
            gemma = _gemma3_from_hf(cfg, head_dim)
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            window = cfg.get("sliding_window") if arch == "MistralForCausalLM" else None

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        checkpoint_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            str(dtype_name), torch.float32
        )
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=gemma.pop("rope") if gemma else _rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            qk_norm=arch in ("Qwen3ForCausalLM", GEMMA3),
            hidden_act=act,
            **gemma,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=checkpoint_dtype,
            name=name,
        )


def _qwen_window(cfg: dict[str, Any]) -> int | None:
    """Qwen2/Qwen3's window, as transformers reads it: layers i >= max_window_layers slide when use_sliding_window
    (or as `layer_types` lists them). deltaserve serves none or all sliding; a mix is refused."""
    n = int(cfg["num_hidden_layers"])
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", n)) if window else n
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"} and window:
        return int(window)
    raise UnsupportedModel("a sliding window on only some layers (max_window_layers / layer_types) is not supported "
                           "for this architecture")


def _gemma3_from_hf(cfg: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Gemma 3's fields: interleaved sliding-window and global layers (`layer_types`, or the older
    `sliding_window_pattern`: every n-th layer global), their two RoPEs (transformers 5's `rope_parameters` per
    layer type, or `rope_theta` + `rope_scaling` global and `rope_local_base_freq` local), the query scale and the
    final logit soft-cap. Attention soft-capping and bidirectional attention are refused."""
    for option in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(option):
            raise UnsupportedModel(f"Gemma 3 with {option}={cfg[option]!r} is not supported")
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
        raise UnsupportedModel(f"layer_types {types!r}: one of full_attention / sliding_attention per layer")
    window = int(cfg["sliding_window"]) if cfg.get("sliding_window") else None
    if window is None and "sliding_attention" in types:
        raise UnsupportedModel("Gemma 3 with sliding_attention layers needs a sliding_window")
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one RoPE per layer type
        rope = _rope_from_hf({"rope_parameters": params["full_attention"]})
        local = _rope_from_hf({"rope_parameters": params.get("sliding_attention") or params["full_attention"]})
    else:
        rope = _rope_from_hf(cfg)
        local = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10000.0)))
    cap = cfg.get("final_logit_softcapping")
    return {
        "rope": rope,
        "layer_windows": tuple(window if t == "sliding_attention" else None for t in types),
        "local_rope": local,
        "query_scale": float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        "final_logit_softcap": float(cap) if cap else None,
    }


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    """Reads RoPE settings from both config styles: `rope_parameters` (transformers 5) and
    `rope_theta` + `rope_scaling` (earlier releases, and most checkpoints on disk)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModel("partial_rotary_factor other than 1.0 is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(
            f"RoPE scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    factor = float(params["factor"])
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=factor,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
