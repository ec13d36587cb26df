"""Multi-tenant decode, end to end: deltaserve's engine beside the peers a user would pick, in the same run.

A random-weight Llama (CPU: hidden 1024, 8 layers, intermediate 2816, 16 heads / 4 KV heads, vocab 32000,
float32; GPU: the Llama-2-7B shape in bfloat16), a batch of B requests (default 32) with short prompts, greedy,
every request generating the same number of tokens. Scenarios:

  base              no delta                         peer: HF transformers `generate`
  lora T            T distinct LoRA r16 tenants      peers: HF+PEFT one mixed batch (`adapter_names=`), and
                                                            HF+PEFT one adapter at a time
  bitdelta T        T distinct 1-bit tenants         peer: merged fine-tunes swapped into HF one at a time
  mixed T           T/2 LoRA + T/2 1-bit tenants     peer: merged fine-tunes swapped one at a time

for T in 1, 8, 32 (mixed: 2, 8, 32), rows shared round-robin. Each measurement runs A B A B (ours, then each
peer, repeated), and medians are reported. Every round of a scenario with deltas also runs deltaserve on the same
batch without deltas: "vs own base-only" is the median of those paired ratios (the machine's noise cancels). Throughput is end to end (B x new tokens / wall time, prefill
included, as a client sees it); deltaserve's prefill time and decode-only throughput are reported too.

Byte floor: a decode step must read the base weights once (embeddings: only the rows used), each distinct
tenant's delta once and the KV cache; bytes / the read bandwidth measured in this run (CPU: a sum over 1 GiB;
GPU: a device-to-device copy, read + write as the anchors count it) gives the floor's tokens/s, and deltaserve's
decode-only tokens/s is reported as a fraction of it. Peak memory: process RSS high-water mark (CPU, reset
before each measurement) or torch's peak allocation (GPU), minus what was resident before it.

Tokens: every peer's greedy tokens are compared with deltaserve's, request by request ("agree"). Merged
fine-tunes and PEFT compute the same function in another order, so a near-tie can flip a token; the tests
(tests/engine/test_mixed_batch.py) hold exact equality on models built to avoid near-ties.

Usage:  python bench/decode.py [--quick] [--device cpu|cuda] [--out FILE.json]
        --quick: tenants 1 and 32 only, fewer tokens, one repeat of the slowest peers (CPU: under 5 minutes
        on 2 cores). Results go to bench/results/decode-<device>-<date>.json.

Over 400 lines on purpose: every scenario, its peers and the byte floor they are held to sit in one file, so
that a figure of the README can be checked against its baseline and its floor by reading one module.
Over 400 lines: one benchmark, its world, its scenarios and their peers side by side, and its report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and would shadow nothing, but keep the layout of
# bench/kernels.py: the repository root first, so `kernels` is ours.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loadtest.provenance import git_commit  # noqa: E402

LORA_RANK = 16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000


CPU_SHAPE = Shape(hidden=1024, layers=8, intermediate=2816, heads=16, kv_heads=4)
LLAMA2_7B = Shape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tenants 1 and 32 only, fewer tokens (CPU: < 5 min)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch", type=int, default=32, help="requests decoding together")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default CPU 16, GPU 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per request")
    p.add_argument("--repeats", type=int, default=None, help="A B A B rounds (median reported)")
    p.add_argument("--only", default="", help="comma-separated scenario names to run (e.g. base,bitdelta-32)")
    p.add_argument("--cuda-graphs", action="store_true", help="GPU: also measure decode from CUDA graphs")
    p.add_argument("--peer-sample", type=int, default=None,
                   help="the one-at-a-time peers serve only this many tenants' rows (their rate per tenant is "
                        "the same for every tenant; default: all, GPU --quick: 8)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/...)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    if args.prompt_len is None:
        args.prompt_len = 128 if gpu else 16
    if args.new_tokens is None:
        args.new_tokens = (32 if gpu else 16) if args.quick else (64 if gpu else 32)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.peer_sample is None and gpu and args.quick:
        args.peer_sample = 8
    if args.cuda_graphs and not gpu:
        p.error("--cuda-graphs needs --device cuda")
    return args


# ---- measuring --------------------------------------------------------------------------------------------


class Meter:
    """Wall time (synchronised on GPU) and the peak memory above what was resident when it started."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss_hwm(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self, fn: Callable[[], object]) -> tuple[float, int, object]:
        """(seconds, peak extra bytes, fn's result)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            try:  # resets VmHWM to the current RSS (Linux)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            before = self._rss()
        t0 = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else self._rss_hwm()
        return seconds, max(0, peak - before), out


def read_bandwidth_gbps(device: torch.device) -> float:
    """CPU: bytes/s of a sum over 1 GiB (all threads). GPU: device-to-device copy, read + write counted."""
    n = 1 << 30
    if device.type == "cuda":
        src = torch.empty(n, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del src, dst
        return 2 * n / statistics.median(times) / 1e9
    x = torch.ones(n // 4, dtype=torch.float32)
    for _ in range(2):
        x.sum()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    del x
    return n / statistics.median(times) / 1e9


def write_result(res: dict, out: Path) -> None:
    """A benchmark's JSON (device, commit, date, figures) to `out`, its folder made if need be."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"


# ---- the world: one base, its tenants, the peers' models --------------------------------------------------


@dataclass
class World:
    device: torch.device
    dtype: torch.dtype
    shape: Shape
    hf_config: object
    engine: object
    hf_plain: object  # transformers model: base generate, and merged fine-tunes swapped in
    hf_peft: object  # transformers model wrapped by PEFT with every LoRA tenant as a named adapter
    lora: list = field(default_factory=list)  # LoraDelta per LoRA tenant (PEFT adapter f"t{i}")
    bitdelta: list = field(default_factory=list)  # BitDelta per 1-bit tenant
    ia3: list = field(default_factory=list)  # Ia3Delta per (IA)^3 tenant (keys, values, down_proj: PEFT's Llama targets)
    base_state: dict = field(default_factory=dict)  # projection weights of the base (host copies, for swaps)


def hf_llama_config(shape: Shape, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, max_len), tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def random_hf_model(config, dtype: torch.dtype, device: torch.device, seed: int):
    """A transformers Llama with random weights scaled so activations stay O(1) through the layers."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model.eval()


def engine_for(hf_model, config, device: torch.device, dtype: torch.dtype, n_bitdelta: int, n_lora: int, max_len: int):
    """deltaserve's engine over a copy of the transformers model's weights (no files, no tokenizer)."""
    from torch import nn

    from registry.deltas import BaseSpec
    from registry.model_config import ModelConfig
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine
    from serving.models.llama import LlamaForCausalLM, RotaryEmbedding

    mc = ModelConfig.from_hf(config.to_dict(), name="bench")
    with torch.device("meta"):
        model = LlamaForCausalLM(mc)
    state = hf_model.state_dict()
    for name, _ in list(model.named_parameters()):
        module, _, attr = name.rpartition(".")
        model.get_submodule(module)._parameters[attr] = nn.Parameter(state[name].detach().clone(), requires_grad=False)
    model.rotary = RotaryEmbedding(mc).to(device)
    spec = BaseSpec("sha256:bench", {n: (tuple(t.shape), t.dtype) for n, t in state.items()},
                    frozenset(model.projection_paths()))  # fmt: skip
    cfg = EngineConfig(device=device.type, dtype=str(dtype).removeprefix("torch."), bitdelta_slots=max(1, n_bitdelta),
                       lora_slots=max(1, n_lora), ia3_slots=max(1, n_lora), max_lora_rank=LORA_RANK, max_model_len=max_len,
                       max_num_batched_tokens=max(4096, max_len), max_num_seqs=256)  # fmt: skip
    return LLMEngine(model.eval(), None, spec, cfg)


def build_world(args: argparse.Namespace, n_tenants: int) -> World:
    # Over 60 lines: the base and every kind of tenant (LoRA, 1-bit, IA3, merged peers) made from one seed, in order.
    from peft import LoraConfig, get_peft_model

    from registry.deltas import BitDelta, Ia3Delta, LoraDelta

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = LLAMA2_7B if device.type == "cuda" else CPU_SHAPE
    max_len = args.prompt_len + args.new_tokens + 8
    config = hf_llama_config(shape, max_len)
    print(f"building a random {shape} in {dtype} on {device} ...", flush=True)
    hf_plain = random_hf_model(config, dtype, device, seed=0)
    engine = engine_for(hf_plain, config, device, dtype, n_tenants, n_tenants, max_len)
    paths = engine.model.projection_paths()
    gen = torch.Generator().manual_seed(1)

    # LoRA tenants: PEFT adapters t0..t{n-1} on a second copy of the base; the same A, B as LoraDelta objects.
    hf_peft_base = random_hf_model(config, dtype, device, seed=0)
    lora_cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(PROJECTIONS), init_lora_weights=False)
    hf_peft = get_peft_model(hf_peft_base, lora_cfg, adapter_name="t0")
    for i in range(1, n_tenants):
        hf_peft.add_adapter(f"t{i}", lora_cfg)
    lora_deltas = []
    with torch.no_grad():
        for i in range(n_tenants):
            weights = {}
            for path, (out_f, in_f) in paths.items():
                a = torch.randn(LORA_RANK, in_f, generator=gen) / in_f**0.5
                b = torch.randn(out_f, LORA_RANK, generator=gen) * (0.5 / LORA_RANK**0.5)
                weights[path] = (a, b)
                module = hf_peft.base_model.model.get_submodule(path)
                module.lora_A[f"t{i}"].weight.copy_(a)
                module.lora_B[f"t{i}"].weight.copy_(b)
            lora_deltas.append(LoraDelta(sha256=f"lora{i}", rank=LORA_RANK, scaling=2.0, weights=weights))
    hf_peft.eval()

    # 1-bit tenants: random packed signs, per-row scales of the size BitDelta gives a fine-tune.
    bit_deltas = []
    sign_gen = torch.Generator(device).manual_seed(2)  # on the GPU: a 7B tenant has 0.8 GB of signs
    for i in range(n_tenants):
        projections = {}
        for path, (out_f, in_f) in paths.items():
            sign = torch.randint(0, 256, (out_f, (in_f + 7) // 8), dtype=torch.uint8, generator=sign_gen,
                                 device=device).cpu()  # fmt: skip
            if in_f % 8:
                sign[:, -1] &= (1 << (in_f % 8)) - 1
            scale = (torch.rand(out_f, generator=gen) * 0.05 + 0.025) / in_f**0.5  # ~5 % of |W|
            projections[path] = (sign, scale)
        bit_deltas.append(BitDelta(sha256=f"bit{i}", base_fingerprint="sha256:bench", projections=projections,
                                   replacements={}))  # fmt: skip
    # (IA)^3 tenants: vectors around 1 on keys and values (outputs) and down_proj (its input, feedforward).
    ia3_deltas = []
    for i in range(n_tenants):
        vectors, ff = {}, set()
        for path, (out_f, in_f) in paths.items():
            if path.endswith(("k_proj", "v_proj")):
                vectors[path] = 1.0 + 0.1 * torch.randn(out_f, generator=gen)
            elif path.endswith("down_proj"):
                vectors[path] = 1.0 + 0.1 * torch.randn(in_f, generator=gen)
                ff.add(path)
        ia3_deltas.append(Ia3Delta(sha256=f"ia3{i}", vectors=vectors, feedforward=frozenset(ff)))
    base_state = {p: hf_plain.get_submodule(p).weight.detach().to("cpu", copy=True) for p in paths}
    return World(device, dtype, shape, config, engine, hf_plain, hf_peft, lora_deltas, bit_deltas, ia3_deltas,
                 base_state)  # fmt: skip


# ---- one scenario ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # base | lora | bitdelta | ia3 | mixed | composed
    tenants: int

    def deltas(self, world: World, batch: int) -> list:
        """The delta of each request (None = base), tenants round-robin over the rows. composed: tenant i's
        LoRA at weight 1 with its 1-bit delta at weight 0.5 (a subject and a style), one Composition per tenant."""
        from registry.deltas import Composition

        if self.kind == "base":
            return [None] * batch
        if self.kind == "lora":
            pool = world.lora[: self.tenants]
        elif self.kind == "bitdelta":
            pool = world.bitdelta[: self.tenants]
        elif self.kind == "ia3":
            pool = world.ia3[: self.tenants]
        elif self.kind == "composed":
            pool = [Composition(((lo, 1.0), (bd, 0.5))) for lo, bd in zip(world.lora[: self.tenants], world.bitdelta)]
        else:
            half = self.tenants // 2
            pool = world.lora[:half] + world.bitdelta[: self.tenants - half]
        return [pool[i % len(pool)] for i in range(batch)]


def prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(100, vocab - 100, (args.batch, args.prompt_len), generator=gen).tolist()


def run_ours(world: World, deltas: list, ids: list[list[int]], new_tokens: int) -> dict:
    """Every request at once through the engine: (prefill seconds, decode seconds, tokens per request)."""
    from serving.engine.sampling_params import SamplingParams

    eng = world.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tag = f"r{eng.num_steps}"
    for i, (p, d) in enumerate(zip(ids, deltas)):
        eng.add_request(f"{tag}-{i}", p, params, d)
    sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
    tokens: dict[str, list[int]] = {f"{tag}-{i}": [] for i in range(len(ids))}
    t0 = time.perf_counter()
    first = True
    t_prefill = 0.0
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id].extend(out.new_token_ids)
        if first:
            sync()
            t_prefill = time.perf_counter() - t0
            first = False
    sync()
    total = time.perf_counter() - t0
    return {"prefill_s": t_prefill, "decode_s": total - t_prefill, "tokens": [tokens[f"{tag}-{i}"] for i in range(len(ids))]}


def hf_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, **kwargs)  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def peer_peft_mixed(world: World, deltas: list, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    names = [f"t{world.lora.index(d)}" for d in deltas]
    return hf_generate(world.hf_peft, ids, new_tokens, adapter_names=names)


def _groups(deltas: list, sample: int | None = None) -> list[list[int]]:
    """Row indices of each distinct delta, in order of first appearance; the first `sample` of them if given."""
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(deltas):
        groups.setdefault(id(d), []).append(i)
    return list(groups.values())[:sample]


def peer_peft_one_at_a_time(world: World, deltas: list, ids: torch.Tensor, new_tokens: int, sample) -> list:
    out: list[list[int]] = [[] for _ in deltas]
    for rows in _groups(deltas, sample):
        world.hf_peft.set_adapter(f"t{world.lora.index(deltas[rows[0]])}")
        for i, toks in zip(rows, hf_generate(world.hf_peft, ids[rows], new_tokens)):
            out[i] = toks
    return out


def run_peer(peer: str, world: World, deltas: list, ids: torch.Tensor, new_tokens: int, sample, timed: list) -> list:
    """One peer's tokens for the batch. The one-at-a-time peers serve the first `sample` tenants only when
    given (their rate per tenant does not depend on how many follow); the others get no tokens."""
    if peer == "hf_generate":
        return hf_generate(world.hf_plain, ids, new_tokens)
    if peer == "peft_mixed_batch":
        return peer_peft_mixed(world, deltas, ids, new_tokens)
    if peer == "peft_one_at_a_time":
        return peer_peft_one_at_a_time(world, deltas, ids, new_tokens, sample)
    return peer_merged_swapped(world, deltas, ids, new_tokens, sample, timed)


def merged_weights(world: World, delta) -> dict[str, torch.Tensor]:
    """Host copies of every projection of the merged fine-tune (what a swap copies in)."""
    from deltakernels.bitdelta import unpack_signs
    from registry.deltas import Composition, Ia3Delta, LoraDelta

    dev = world.device
    merged = {}
    parts = delta.parts if isinstance(delta, Composition) else ((delta, 1.0),)
    for path, base in world.base_state.items():
        base = base.to(dev, dtype=torch.float32, copy=True)  # never in place: base_state restores the base
        w = base.clone()
        for d, weight in parts:  # the weighted merge: W + sum_k w_k (W_k - W)
            if isinstance(d, LoraDelta):
                a, b = d.weights[path]
                w += weight * d.scaling * (b.to(dev) @ a.to(dev))
            elif isinstance(d, Ia3Delta):
                if path in d.vectors:
                    v = d.vectors[path].to(dev)
                    w += weight * base * ((v[None, :] if path in d.feedforward else v[:, None]) - 1.0)
            else:
                sign, scale = d.projections[path]
                w += weight * scale.to(dev)[:, None] * unpack_signs(sign.to(dev), w.shape[1])
        merged[path] = w.to(world.dtype).to("cpu")
        if dev.type == "cuda":
            merged[path] = merged[path].pin_memory()
    return merged


def peer_merged_swapped(world: World, deltas: list, ids: torch.Tensor, new_tokens: int, sample, meter_time: list) -> list:
    """Each distinct tenant in turn: its merged weights copied into the model (timed), then its rows generated
    (timed). Building the merged weights is not timed: a platform would keep them ready in host memory."""
    out: list[list[int]] = [[] for _ in deltas]
    elapsed = 0.0
    sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
    for rows in _groups(deltas, sample):
        merged = merged_weights(world, deltas[rows[0]])
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for path, w in merged.items():
                world.hf_plain.get_submodule(path).weight.copy_(w, non_blocking=True)
        for i, toks in zip(rows, hf_generate(world.hf_plain, ids[rows], new_tokens)):
            out[i] = toks
        sync()
        elapsed += time.perf_counter() - t0
        del merged
    with torch.no_grad():  # the base back in
        for path, w in world.base_state.items():
            world.hf_plain.get_submodule(path).weight.copy_(w)
    meter_time.append(elapsed)
    return out


# ---- byte floor ---------------------------------------------------------------------------------------------


def step_bytes(world: World, deltas: list, batch: int, mean_ctx: float) -> dict[str, float]:
    """Bytes one decode step must read: base weights, distinct deltas (as the slot pools hold them), KV cache."""
    from registry.deltas import Composition, Ia3Delta, LoraDelta

    model = world.engine.model
    esize = torch.finfo(world.dtype).bits // 8
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    base += batch * world.shape.hidden * esize  # the embedding rows used
    parts = [p for d in deltas if d is not None for p, _ in (d.parts if isinstance(d, Composition) else ((d, 1.0),))]
    distinct = {id(d): d for d in parts}.values()
    delta = 0
    for d in distinct:
        if isinstance(d, Ia3Delta):
            delta += sum(4 * v.numel() for v in d.vectors.values())
        elif isinstance(d, LoraDelta):
            delta += sum(LORA_RANK * (a.shape[1] + b.shape[0]) * esize for a, b in d.weights.values())
        else:
            delta += sum(sign.numel() + 4 * sign.shape[0] for sign, _ in d.projections.values())
    s = world.shape
    kv = batch * mean_ctx * s.layers * 2 * s.kv_heads * (s.hidden // s.heads) * esize
    return {"base": base, "deltas": delta, "kv": kv, "total": base + delta + kv}


# ---- the run --------------------------------------------------------------------------------------------------


def scenarios(quick: bool, gpu: bool) -> list[Scenario]:
    counts = ((32,) if gpu else (1, 32)) if quick else (1, 8, 32)
    mixed = (32,) if quick and gpu else (2, 32) if quick else (2, 8, 32)
    out = [Scenario("base", "base", 0)]
    out += [Scenario(f"lora-{t}", "lora", t) for t in counts]
    out += [Scenario(f"bitdelta-{t}", "bitdelta", t) for t in counts]
    out += [Scenario(f"mixed-{t}", "mixed", t) for t in mixed]
    out += [Scenario(f"ia3-{t}", "ia3", t) for t in counts]
    out += [Scenario(f"composed-{t}", "composed", t) for t in counts]
    return out


def peers_of(sc: Scenario, quick: bool) -> list[str]:
    if sc.kind == "base":
        return ["hf_generate"]
    if sc.kind == "lora":
        return ["peft_mixed_batch", "peft_one_at_a_time"]
    return ["merged_swapped"]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _ours_variants(world: World, graphs: bool) -> dict[str, object]:
    """deltaserve's ways to run: eager, and (GPU, --cuda-graphs) decode from CUDA graphs."""
    variants: dict[str, object] = {"deltaserve": None}
    if graphs:
        from serving.engine.cuda_graphs import DecodeGraphs

        r = world.engine.runner
        variants["deltaserve_graphs"] = DecodeGraphs(r, 256, world.engine.max_model_len, capture=True)
    return variants


def measure(args: argparse.Namespace, world: World, sc: Scenario, ids_list: list[list[int]], bw: float) -> dict:
    # Over 60 lines: one scenario's rounds, ours and the peers' interleaved (A B A B), and their medians, read in order.
    meter = Meter(world.device)
    deltas = sc.deltas(world, args.batch)
    ids = torch.tensor(ids_list, device=world.device)
    n_tokens = args.batch * args.new_tokens
    variants = _ours_variants(world, args.cuda_graphs)
    for graphs in variants.values():  # warm-up: the deltas into their slots, allocator, autotuning, graph capture
        world.engine.runner.graphs = graphs
        run_ours(world, deltas, ids_list, 3)
    ours_runs: dict[str, list[dict]] = {v: [] for v in variants}
    peer_runs: dict[str, list[float]] = {p: [] for p in peers_of(sc, args.quick)}
    ours_tokens: list[list[int]] = []
    peer_tokens: dict[str, list[list[int]]] = {}
    peaks: dict[str, int] = {}
    slow = {"peft_one_at_a_time", "merged_swapped"}
    sample = args.peer_sample if sc.tenants > (args.peer_sample or sc.tenants) else None
    base_runs: list[float] = []  # deltaserve without deltas, side by side with this scenario (A B A B)
    for rep in range(args.repeats):
        if sc.kind != "base":
            world.engine.runner.graphs = None
            base_runs.append(meter.run(partial(run_ours, world, [None] * args.batch, ids_list, args.new_tokens))[0])
        for name, graphs in variants.items():
            world.engine.runner.graphs = graphs
            secs, peak, res = meter.run(partial(run_ours, world, deltas, ids_list, args.new_tokens))
            ours_runs[name].append({"seconds": secs, "prefill_s": res["prefill_s"], "decode_s": res["decode_s"]})
            if name == "deltaserve":
                ours_tokens = res["tokens"]
            elif res["tokens"] != ours_tokens:
                print(f"  {sc.name}: {name} tokens differ from eager on "
                      f"{sum(a != b for a, b in zip(res['tokens'], ours_tokens))} requests", flush=True)  # fmt: skip
            peaks[name] = max(peaks.get(name, 0), peak)
        for peer in peer_runs:
            if args.quick and peer in slow and sc.tenants > 1 and rep > 0:
                continue  # quick mode: the slowest peers run once at many tenants
            timed: list[float] = []  # merged_swapped times itself (it leaves out building the merged weights)
            peer_sample = sample if peer in slow else None
            secs, peak, toks = meter.run(partial(run_peer, peer, world, deltas, ids, args.new_tokens, peer_sample, timed))
            peer_runs[peer].append(timed[0] if timed else secs)
            peer_tokens[peer] = toks
            peaks[peer] = max(peaks.get(peer, 0), peak)
    world.engine.runner.graphs = None
    sb = step_bytes(world, deltas, args.batch, args.prompt_len + args.new_tokens / 2)
    floor_tok_s = args.batch * bw * 1e9 / sb["total"]
    result = {"scenario": sc.name, "kind": sc.kind, "tenants": sc.tenants, "step_bytes": sb, "floor_tok_s": floor_tok_s,
              "peers": {}}  # fmt: skip
    for name, runs in ours_runs.items():
        decode_tok_s = args.batch * (args.new_tokens - 1) / median([r["decode_s"] for r in runs])
        result[name] = {
            "tok_s": n_tokens / median([r["seconds"] for r in runs]), "decode_tok_s": decode_tok_s,
            "prefill_s": median([r["prefill_s"] for r in runs]), "runs": runs, "peak_mb": peaks[name] / 2**20,
            "floor_fraction": decode_tok_s / floor_tok_s,
        }  # fmt: skip
    result["floor_fraction"] = result["deltaserve"]["floor_fraction"]
    if base_runs:  # each round's time over the base-only time of the same round: noise of the machine cancels
        own = [b / r["seconds"] for b, r in zip(base_runs, ours_runs["deltaserve"])]
        result["vs_own_base"] = {"ratio": median(own), "ratios": own, "base_tok_s": n_tokens / median(base_runs)}
    for peer, runs in peer_runs.items():
        served = [i for i, t in enumerate(peer_tokens[peer]) if t]  # a sampled peer serves some tenants' rows
        tok_s = len(served) * args.new_tokens / median(runs)
        agree = sum(ours_tokens[i] == peer_tokens[peer][i] for i in served) / len(served)
        result["peers"][peer] = {
            "tok_s": tok_s, "runs_s": runs, "ratio": result["deltaserve"]["tok_s"] / tok_s, "agree": agree,
            "peak_mb": peaks[peer] / 2**20, "rows_served": len(served),
        }  # fmt: skip
    return result


def targets(results: list[dict], gpu: bool) -> list[dict]:
    """The issue's targets, each with the measured value (met or not)."""
    by = {r["scenario"]: r for r in results}
    out = []

    def add(what: str, value: float | None, goal: float, higher: bool = True) -> None:
        if value is None:
            return
        out.append({"target": what, "value": value, "goal": goal, "met": value >= goal if higher else value <= goal})

    base = by.get("base")
    if base and not gpu:
        add("base-only >= 1.0x HF generate", base["peers"]["hf_generate"]["ratio"], 1.0)
    for kind, own, peer, goal in (("lora", 0.8, "peft_mixed_batch", 1.5), ("bitdelta", 0.4, "merged_swapped", 5.0)):
        r = by.get(f"{kind}-32")
        if r and not gpu:
            add(f"32 distinct {kind} >= {own}x own base-only (paired rounds)", r["vs_own_base"]["ratio"], own)
            add(f"32 distinct {kind} >= {goal}x {peer}", r["peers"][peer]["ratio"], goal)
    r = by.get("bitdelta-32")
    if r and base and not gpu:
        add("prefill, 32 distinct 1-bit <= 3x base-only prefill",
            r["deltaserve"]["prefill_s"] / base["deltaserve"]["prefill_s"], 3.0, higher=False)  # fmt: skip
    if r and gpu:
        best = max(r.get(v, {}).get("floor_fraction", 0.0) for v in ("deltaserve", "deltaserve_graphs"))
        add("GPU: decode with 32 distinct 1-bit >= 0.5 of its byte floor", best, 0.5)
    return out


def print_table(res: dict) -> None:
    print(f"\n{res['device']}; torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}; "
          f"read bandwidth {res['read_GBps']:.1f} GB/s; batch {res['batch']}, prompt {res['prompt_len']}, "
          f"{res['new_tokens']} new tokens\n")  # fmt: skip
    print("| scenario | deltaserve tok/s | vs own base-only | decode tok/s | prefill s | floor tok/s | of floor | peer "
          "| peer tok/s | ratio | agree | peak MB ours / peer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["results"]:
        d = r["deltaserve"]
        own = f"{r['vs_own_base']['ratio']:.2f}x" if "vs_own_base" in r else "1"
        for k, (peer, p) in enumerate(r["peers"].items()):
            head = (f"| {r['scenario']} | {d['tok_s']:.1f} | {own} | {d['decode_tok_s']:.1f} | {d['prefill_s']:.2f} | "
                    f"{r['floor_tok_s']:.0f} | {r['floor_fraction']:.2f} |") if k == 0 else "| | | | | | | |"  # fmt: skip
            print(f"{head} {peer} | {p['tok_s']:.1f} | {p['ratio']:.2f}x | {p['agree']:.2f} | "
                  f"{d['peak_mb']:.0f} / {p['peak_mb']:.0f} |")  # fmt: skip
    graphs = [r for r in res["results"] if "deltaserve_graphs" in r]
    if graphs:
        print("\n| scenario | eager tok/s | CUDA graphs tok/s | graphs decode tok/s | graphs of floor |\n|---|---|---|---|---|")
        for r in graphs:
            g = r["deltaserve_graphs"]
            print(f"| {r['scenario']} | {r['deltaserve']['tok_s']:.1f} | {g['tok_s']:.1f} | {g['decode_tok_s']:.1f} | "
                  f"{g['floor_fraction']:.2f} |")  # fmt: skip
    if res["targets"]:
        print("\n| target | measured | met |\n|---|---|---|")
        for t in res["targets"]:
            print(f"| {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/decode.py --device cuda: no CUDA GPU visible to torch; nothing measured.", file=sys.stderr)
        return 2
    import peft
    import transformers

    chosen = scenarios(args.quick, args.device == "cuda")
    if args.only:
        wanted = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in wanted]
    n_tenants = max([s.tenants for s in chosen] + [1])
    t_start = time.perf_counter()
    world = build_world(args, n_tenants)
    bw = read_bandwidth_gbps(world.device)
    print(f"read bandwidth: {bw:.1f} GB/s; delta kernels: {world.engine.runner.ops.name}", flush=True)
    ids = prompts(args, world.shape.vocab)
    results = []
    for sc in chosen:
        r = measure(args, world, sc, ids, bw)
        peers = ", ".join(f"{k} {v['tok_s']:.1f} ({v['ratio']:.2f}x)" for k, v in r["peers"].items())
        print(f"{sc.name:<12} deltaserve {r['deltaserve']['tok_s']:7.1f} tok/s (decode {r['deltaserve']['decode_tok_s']:.1f},"
              f" {r['floor_fraction']:.2f} of floor), {peers}", flush=True)  # fmt: skip
        results.append(r)
    res = {
        "device": device_name(world.device), "device_type": world.device.type,
        "date": dt.date.today().isoformat(), "git_commit": git_commit(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "delta_kernels": world.engine.runner.ops.name, "quick": args.quick,
        "model": {**world.shape.__dict__, "dtype": str(world.dtype).removeprefix("torch.")},
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "read_GBps": bw, "peer_sample": args.peer_sample, "cuda_graphs": args.cuda_graphs,
        "results": results, "targets": targets(results, world.device.type == "cuda"),
        "wall_s": time.perf_counter() - t_start,
    }  # fmt: skip
    print_table(res)
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", res["device"].lower()).strip("-")[:40]
        out = ROOT / "bench" / "results" / f"decode-{slug}-{res['date']}{'-quick' if args.quick else ''}.json"
    write_result(res, out)
    print(f"\nwrote {out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
