"""Loading a Llama-family model from a local Hugging Face directory (safetensors only)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from registry.checkpoint import Checkpoint
from registry.model_config import GEMMA3, ModelConfig, UnsupportedModel
from serving.models.gemma3 import Gemma3ForCausalLM
from serving.models.llama import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": float32 on the CPU (where half-precision matmuls are slow); on a GPU the checkpoint's
    half-precision dtype, or bfloat16 for a float32 checkpoint."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return config.checkpoint_dtype if config.checkpoint_dtype != torch.float32 else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LlamaForCausalLM:
    """Builds the model and fills every parameter from the checkpoint, one tensor at a time.

    Missing or unexpected tensors are refused with a message naming them."""
    ckpt = Checkpoint(model_dir)
    config = ModelConfig.from_hf(ckpt.config, name=Path(model_dir).resolve().name)
    return load_model_from_checkpoint(ckpt, config, dtype, device)


def load_model_from_checkpoint(
    ckpt: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = build_model(config)
    expected = dict(model.named_parameters())  # a tied lm_head shares the embedding: listed once
    present = set(ckpt.served_names())
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        raise UnsupportedModel(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise UnsupportedModel(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}")
    for name, meta in expected.items():
        tensor = ckpt.get(name)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise UnsupportedModel(f"tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(meta.shape)}")
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[param_name] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.build_rotary(device)
    return model.eval()


def build_model(config: ModelConfig) -> LlamaForCausalLM:
    """The model of the config's architecture (its family's model file), with uninitialised weights."""
    return Gemma3ForCausalLM(config) if config.architecture == GEMMA3 else LlamaForCausalLM(config)
