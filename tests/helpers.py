"""Shared test fixtures: tiny tokenizers and tiny Hugging Face model directories made on the spot."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import torch

from deltakernels.bitdelta import pack_signs, unpack_signs

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00fcber sch\u00f6n, \u65e5\u672c\u8a9e\u306e\u6587\u7ae0, emoji \U0001f600\U0001f680.",
    "def main():\n    print('hello world')\n    return 0\n",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (so multi-byte characters span several tokens), with <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 320, **overrides):
    """A transformers config of a tiny model: GQA (4 heads, 2 KV heads), 2 layers."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        cfg = LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    elif arch == "mistral":
        cfg = MistralConfig(**{**common, "tie_word_embeddings": False, "sliding_window": None, **overrides})
    elif arch == "qwen2":
        cfg = Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    elif arch == "qwen3":  # an explicit head_dim other than hidden / heads; per-head q/k norms
        cfg = Qwen3Config(**{**common, "head_dim": 24, "tie_word_embeddings": False, **overrides})
    elif arch == "gemma3":  # global and sliding layers interleaved (a window the test prompts exceed), two RoPE
        # bases, a query scale other than head_dim's, a final soft-cap
        cfg = Gemma3TextConfig(**{
            **common, "num_hidden_layers": 3, "head_dim": 16, "tie_word_embeddings": True, "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 5.0, "architectures": ["Gemma3ForCausalLM"],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
            **overrides})  # fmt: skip
    else:
        raise ValueError(arch)
    return cfg


def make_hf_model(config, seed: int = 0, std: float = 0.15):
    """A transformers model with random weights, scaled up so greedy tokens are not near-ties."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def make_model_dir(
    path: Path, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None, dtype=torch.float32, **overrides
) -> Path:
    """Saves a tiny random model (+ tokenizer) as a local HF directory with safetensors; returns the path."""
    tokenizer = make_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    model = make_hf_model(config, seed=seed).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(path)
    return path


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_model(model_dir: Path):
    """The transformers model of a local directory, float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_lora(base_dir: Path, out: Path, r: int, seed: int, rslora: bool = False, targets=None):
    """A PEFT adapter with random (non-zero) A and B; returns (adapter dir, merged transformers model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets or PROJECTIONS, init_lora_weights=False, use_rslora=rslora
    )
    peft_model = get_peft_model(hf_model(base_dir), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(out)
    return out, peft_model.merge_and_unload().eval()


def make_ia3(base_dir: Path, out: Path, seed: int, targets=("k_proj", "v_proj", "down_proj"),
             feedforward=("down_proj",)):  # fmt: skip
    """A PEFT (IA)^3 adapter with random vectors around 1; returns (adapter dir, merged transformers model)."""
    from peft import IA3Config, get_peft_model

    torch.manual_seed(seed)
    cfg = IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward), init_ia3_weights=False)
    peft_model = get_peft_model(hf_model(base_dir), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out, peft_model.merge_and_unload().eval()


def weighted_merge(base_dir: Path, parts):
    """Plain transformers on W_base + sum_k w_k (W_k - W_base) for every tensor; parts: (merged fine-tune, w_k)."""
    model = hf_model(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = {k: v.clone() for k, v in base.items()}
    for finetune, w in parts:
        for k, v in finetune.state_dict().items():
            merged[k] += w * (v - base[k])
    model.load_state_dict(merged)
    return model.eval()


def make_bitdelta(base_dir: Path, out: Path, seed: int, per_row: bool, replace: bool):
    """A 1-bit delta of a random fine-tune; returns (file, transformers model with W + scale * sign)."""
    from registry.bitdelta_format import save_bitdelta_file
    from registry.checkpoint import Checkpoint
    from registry.fingerprint import fingerprint_checkpoint

    torch.manual_seed(seed)
    merged = hf_model(base_dir)
    state = merged.state_dict()
    projections, replacements = {}, {}
    layers = [0, 1] if per_row else [1]  # a delta may leave some layers alone
    for layer in layers:
        for proj in PROJECTIONS:
            group = "self_attn" if proj[0] in "qkvo" else "mlp"
            path = f"model.layers.{layer}.{group}.{proj}"
            w = state[path + ".weight"]
            delta = 0.05 * torch.randn_like(w)
            scale = delta.abs().mean(dim=1) if per_row else delta.abs().mean().reshape(1)
            sign = pack_signs(delta > 0)
            projections[path] = (sign, scale)
            w += scale[:, None] * unpack_signs(sign, w.shape[1]) if per_row else scale * unpack_signs(sign, w.shape[1])
    if replace:
        names = ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.k_proj.bias",
                 "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_norm.weight"]
        if merged.config.tie_word_embeddings:
            names.remove("lm_head.weight")  # the same tensor as the embeddings: replaced with them
        for name in [n for n in names if n in state]:  # the bias exists in Qwen2 only, q_norm in Qwen3 and Gemma 3
            new = state[name] + 0.2 * torch.randn_like(state[name])
            state[name].copy_(new)
            replacements[name] = new.clone()
    save_bitdelta_file(out, projections, replacements, fingerprint_checkpoint(Checkpoint(base_dir)))
    return out, merged




def greedy_tokens(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """transformers' greedy generation (stopping at EOS id 2): the generated ids only."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    return out[0, ids.shape[1] :].tolist()


def hf_processors(params, num_prompt: int, end_ids):
    """The logits processors transformers' generate() builds for these SamplingParams, in its order; frequency
    and presence penalties, which transformers lacks, as OpenAI documents them (over the generated tokens)."""
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            counts = torch.zeros_like(scores)
            for b in range(input_ids.shape[0]):
                for t in input_ids[b, num_prompt:].tolist():
                    counts[b, t] += 1
            return scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()

    procs = LogitsProcessorList()
    if params.logit_bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias.items()]))
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.min_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(num_prompt, params.min_tokens, sorted(end_ids)))
    if params.frequency_penalty or params.presence_penalty:
        procs.append(OpenAIPenalties())
    return procs


def save_finetune(base: Path, out: Path, seed: int, *, touch=lambda name: True, std: float = 0.03,
                  max_shard_size: str | None = None) -> Path:  # fmt: skip
    """A fine-tune of `base`: every tensor for which touch(name) holds gets noise whose size varies per
    row (so per-row scales differ from per-matrix ones); saved with the base tokenizer."""
    model = hf_model(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if touch(name):
                rows = torch.rand(p.shape[0], *([1] * (p.dim() - 1)), generator=gen) + 0.2
                p.add_(std * rows * torch.randn(p.shape, generator=gen))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    make_tokenizer().save_pretrained(out)
    return out


MIXED_PROMPTS = [
    "The quick brown fox",
    "To be",
    "A journey of a thousand miles begins with a single step, and then",
    "def main():",
    "All that glitters",
    "Caf\u00e9 cr\u00e8me",
]


def mixed_tenants(root: Path):
    """The central test's world: a Qwen2 base (untied, q/k/v biases, GQA) and its tenants — LoRA r2, r8 (three
    targets) and rsLoRA r4 saved by peft; 1-bit deltas with per-row and per-matrix scales, and one that also
    replaces norms, a bias, the embeddings and the lm_head; (IA)^3 adapters on keys, values (biased: PEFT
    scales the bias too) and down_proj, and on q, o and two feedforward modules. Returns (base_dir, {name: (file or None, merged HF
    model)})."""
    base_dir = make_model_dir(root / "base", arch="qwen2")
    tenants = {"base": (None, hf_model(base_dir))}
    tenants["lora-r2"] = make_lora(base_dir, root / "lora-r2", r=2, seed=1)
    tenants["lora-r8"] = make_lora(base_dir, root / "lora-r8", r=8, seed=2, targets=["q_proj", "v_proj", "down_proj"])
    tenants["lora-r4-rs"] = make_lora(base_dir, root / "lora-r4", r=4, seed=3, rslora=True)
    tenants["bd-row"] = make_bitdelta(base_dir, root / "bd-row.safetensors", seed=4, per_row=True, replace=False)
    tenants["bd-mat"] = make_bitdelta(base_dir, root / "bd-mat.safetensors", seed=5, per_row=False, replace=False)
    tenants["bd-repl"] = make_bitdelta(base_dir, root / "bd-repl.safetensors", seed=6, per_row=True, replace=True)
    tenants["ia3-kvd"] = make_ia3(base_dir, root / "ia3-kvd", seed=7)
    tenants["ia3-qoud"] = make_ia3(base_dir, root / "ia3-qoud", seed=8, targets=("q_proj", "o_proj", "up_proj", "down_proj"),
                                   feedforward=("up_proj", "down_proj"))  # fmt: skip
    return base_dir, tenants


def run_in_waves(engine, requests, deltas, params) -> dict[str, list[int]]:
    """Runs (request id, tenant, prompt) requests joining in three waves, every other step, while earlier ones
    decode (deltas: tenant -> Delta or None); returns each request's generated tokens."""
    waves = [requests[0::3], requests[1::3], requests[2::3]]
    got: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
    steps = 0
    while waves or engine.has_unfinished():
        if waves and steps % 2 == 0:
            for rid, name, prompt in waves.pop(0):
                engine.add_request(rid, prompt, params, deltas[name])
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        steps += 1
    return got


@contextlib.contextmanager
def small_filesystem(path: Path, megabytes: int):
    """A tmpfs of `megabytes` mounted at `path` (a disk that fills up for real); the test is skipped, saying
    why, where this process may not mount one (it needs root)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"a full disk is simulated with a small tmpfs, which this process cannot mount: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Writes a file into `folder` until its filesystem is full; returns the file (delete it to free the space)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: the full disk shows at the write, not at close
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def staged_files(registry_root: Path) -> list[Path]:
    """What uploads in progress left in a registry's tmp/ (each process that has it open keeps a folder there,
    empty when nothing is staged)."""
    tmp = registry_root / "tmp"
    return sorted(p for folder in (tmp.iterdir() if tmp.is_dir() else []) for p in folder.rglob("*"))
