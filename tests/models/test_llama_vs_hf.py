"""Our Llama-family forward against transformers', on tiny random models saved to disk and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from registry.model_config import ModelConfig, UnsupportedModel
from serving.models.attention import build_attention_batch
from serving.models.loader import load_model
from tests.helpers import make_model_dir

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "llama-gqa-tied": dict(arch="llama"),
    "llama-linear-rope-bias": dict(
        arch="llama", attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "llama3-rope": dict(
        arch="llama",
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=500000.0,
    ),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=5),
    "qwen2-bias-sharded": dict(arch="qwen2", max_shard_size="60KB"),
    "qwen2-all-layers-sliding": dict(arch="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=0),
    "qwen2-window-on-no-layer": dict(arch="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "qwen3-qk-norm-head-dim": dict(arch="qwen3"),
    "qwen3-tied-bias": dict(arch="qwen3", tie_word_embeddings=True, attention_bias=True),
    "gemma3-interleaved-softcap": dict(arch="gemma3"),
    "gemma3-untied-no-cap": dict(arch="gemma3", tie_word_embeddings=False, final_logit_softcapping=None),
}


def hf_logits(model_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0] for p in prompt_ids]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kwargs = dict(CASES[case])
    model_dir = make_model_dir(tmp_path / case, **kwargs)
    prompts = [[5, 17, 99, 3, 250, 7, 7, 40, 41, 42, 11], [9, 8, 7], list(range(20, 40))]
    model = load_model(model_dir)
    # Our model: one batched prefill of all prompts (different lengths), no KV cache.
    attn = build_attention_batch([len(p) for p in prompts], [len(p) for p in prompts], None, 16, "cpu",
                                 model.config.sliding_window)
    with torch.no_grad():
        hidden = model(torch.tensor(sum(prompts, [])), attn)
        ours = model.compute_logits(hidden)
    expected = hf_logits(model_dir, prompts)
    start = 0
    for p, exp in zip(prompts, expected):
        got = ours[start : start + len(p)]
        start += len(p)
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def test_paged_cache_decode_matches_full_prefill(tmp_path):
    """Prefill then token-by-token decode through the paged KV cache gives the same logits as one prefill."""
    model_dir = make_model_dir(tmp_path / "m", arch="qwen2")
    model = load_model(model_dir)
    c = model.config
    block_size, num_blocks = 4, 16
    cache = torch.zeros(c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
    model.bind_kv_cache([(cache[i, 0], cache[i, 1]) for i in range(c.num_layers)])
    tokens = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]
    table = [7, 2, 11]  # blocks in no particular order
    with torch.no_grad():
        full = model.compute_logits(
            model(torch.tensor(tokens), build_attention_batch([len(tokens)], [len(tokens)], [table], block_size, "cpu"))
        )
        n0 = 5
        out = [model.compute_logits(model(torch.tensor(tokens[:n0]), build_attention_batch([n0], [n0], [table], block_size, "cpu")))]
        for t in range(n0, len(tokens)):
            attn = build_attention_batch([1], [t + 1], [table], block_size, "cpu")
            out.append(model.compute_logits(model(torch.tensor([tokens[t]]), attn)))
    torch.testing.assert_close(torch.cat(out), full, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_is_refused(tmp_path):
    model_dir = make_model_dir(tmp_path / "m")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        load_model(model_dir)
    cfg.pop("rope_parameters", None)  # the older config style: rope_theta + rope_scaling
    with pytest.raises(UnsupportedModel, match="yarn"):
        ModelConfig.from_hf({**cfg, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UnsupportedModel, match="gelu"):
        ModelConfig.from_hf({**cfg, "architectures": ["LlamaForCausalLM"], "hidden_act": "gelu"})
    qwen = {**cfg, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 4}
    with pytest.raises(UnsupportedModel, match="only some layers"):  # layer 1 of 2 slides, layer 0 does not
        ModelConfig.from_hf({**qwen, "max_window_layers": 1})
    gemma = {**cfg, "architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu_pytorch_tanh"}
    for option, value in (("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True)):
        with pytest.raises(UnsupportedModel, match=option):
            ModelConfig.from_hf({**gemma, option: value})
    with pytest.raises(UnsupportedModel, match="sliding_window"):  # sliding layers without a window
        ModelConfig.from_hf({**gemma, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": None})


def test_half_precision_loads(tmp_path):
    model_dir = make_model_dir(tmp_path / "m", dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        model = load_model(model_dir, dtype=dtype)
        attn = build_attention_batch([3], [3], None, 16, "cpu")
        with torch.no_grad():
            logits = model.compute_logits(model(torch.tensor([1, 2, 3]), attn))
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# Half precision: our forward must be as close to the float32 truth as transformers' own forward in that dtype
# (within HALF_VS_HF of it), and within HALF_ATOL x max|logit| of transformers' logits.
HALF_ATOL = {torch.bfloat16: 0.05, torch.float16: 0.01}
HALF_VS_HF = 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_half_precision_matches_transformers_in_the_same_dtype(tmp_path, arch, dtype):
    from transformers import AutoModelForCausalLM

    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine
    from serving.engine.sampling_params import SamplingParams

    model_dir = make_model_dir(tmp_path / "m", arch=arch, max_position_embeddings=1024)
    # positions past 256, where bf16 no longer holds every integer (RoPE must be computed in float32)
    prompts = [[5, 17, 99, 3, 250, 7, 7, 40, 41, 42, 11], [9, 8, 7], [(7 * i) % 300 + 1 for i in range(400)]]
    truth = hf_logits(model_dir, prompts)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()
    model = load_model(model_dir, dtype=dtype)
    attn = build_attention_batch([len(p) for p in prompts], [len(p) for p in prompts], None, 16, "cpu")
    with torch.no_grad():
        ours = model.compute_logits(model(torch.tensor(sum(prompts, [])), attn)).float()
        theirs = torch.cat([hf(torch.tensor([p])).logits[0].float() for p in prompts])
    truth = torch.cat(truth)
    scale = truth.abs().max().item()
    tol = HALF_ATOL[dtype] * scale
    assert (ours - theirs).abs().max().item() <= tol
    assert (ours - truth).abs().max().item() <= HALF_VS_HF * (theirs - truth).abs().max().item()

    # The engine in this dtype (the GPU default is bf16), 64 greedy tokens per prompt. Along its own tokens,
    # each one must be transformers' argmax in the same dtype, or within `tol` of it (a near tie, where the
    # rounding of either may pick either).
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig(device="cpu", dtype=str(dtype).removeprefix("torch."),
                                                              kernel_backend="torch", max_model_len=512))  # fmt: skip
    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    outs = engine.generate([(p, greedy, None) for p in prompts])
    exact = total = 0
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == 64
        ids = prompt + out.token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1].float()  # the logits each token was drawn from
        chosen = logits.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        best = logits.max(dim=-1).values
        assert ((best - chosen) <= tol).all(), (best - chosen).max()
        exact += int((logits.argmax(dim=-1) == torch.tensor(out.token_ids)).sum())
        total += len(out.token_ids)
    assert exact >= 0.9 * total  # near ties are the exception


def test_our_kernels_package_does_not_confuse_transformers(tmp_path):
    """transformers imports Hugging Face's `kernels` package; ours is `deltakernels` and must not shadow it."""
    import importlib.util

    import deltakernels  # noqa: F401  (ours, importable beside theirs)

    spec = importlib.util.find_spec("kernels")
    assert spec is None or not spec.origin or Path(spec.origin).parents[1] != ROOT, spec.origin  # not a folder of ours
    from tests.helpers import make_hf_model, tiny_config

    model = make_hf_model(tiny_config("llama"))
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)
