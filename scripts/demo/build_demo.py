#!/usr/bin/env python
"""Builds the embedded demo of deltaserve: a tiny Llama base model, three full fine-tunes and one LoRA.
(Over 400 lines: one offline recipe, run once by a maintainer, read top to bottom: corpora, tokenizer, training.)

Everything is made here from text that may be redistributed, taken from Debian packages of fortune
cookies (no model hub is ever contacted):

  base      English       fortunes, fortunes-min        LlamaForCausalLM trained from scratch
  german    German        fortunes-de                   full fine-tune   (served as a 1-bit delta)
  spanish   Spanish       fortunes-es                   full fine-tune   (served as a 1-bit delta)
  bofh      BOFH excuses  fortunes-bofh-excuses         full fine-tune   (served as a 1-bit delta)
  italian   Italian       fortunes-it                   LoRA r=8 on all 7 projections (PEFT format)

Steps: fetch the packages (`apt-get download` + `dpkg-deb -x` into a cache directory, nothing is installed),
parse the fortune files, hold out ~5 % of every corpus (by a hash of each entry, so the split does not depend
on order), train a byte-level BPE tokenizer on all corpora, train the base, fine-tune the tenants, sample
every model, and write safetensors + JSON only (no pickle) under --out, and PROVENANCE.md beside it.

    python scripts/demo/build_demo.py --out serving/demo/assets --cache /tmp/deltaserve-demo-cache
    python scripts/demo/build_demo.py --out /tmp/demo-smoke --steps-scale 0.05     # a quick smoke run

Deterministic for a given seed, package versions and thread count (float32 on CPU, `torch.set_num_threads`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------------------
# What is built
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    name: str
    version: str  # the version the committed assets were built from (bookworm); another one is used with a warning
    licence: str  # summary, checked by hand against usr/share/doc/<pkg>/copyright
    licence_check: str  # a phrase that must appear in that copyright file (fails loudly if the licence changes)
    root: str  # folder of the fortune files inside the package
    skip: tuple[str, ...] = ()  # files (or folders) not used: ASCII art, offensive files


PACKAGES = {
    p.name: p
    for p in [
        Package("fortunes", "1:1.99.1-7.3", "BSD-3-Clause (fortune-mod, Regents of the University of California)",
                "This program falls under the BSD copyright", "usr/share/games/fortunes", ("ascii-art",)),
        Package("fortunes-min", "1:1.99.1-7.3", "BSD-3-Clause (fortune-mod, Regents of the University of California)",
                "This program falls under the BSD copyright", "usr/share/games/fortunes"),
        Package("fortunes-de", "0.35-1", "GPL-2+ (Andreas Tille)", "License: GPL-2+",
                "usr/share/games/fortunes/de", ("asciiart",)),
        Package("fortunes-es", "1.36", "texts presumed public domain; the package's scripts GPL-2+",
                "presumed to be in the public domain", "usr/share/games/fortunes/es", ("off",)),
        Package("fortunes-bofh-excuses", "1.2-3", "public domain", "Public Domain", "usr/share/games/fortunes"),
        Package("fortunes-it", "1.99-4.1", "public domain / freeware: \"You may do whatever you want with this package\"",
                "You may do whatever you want with this package", "usr/share/games/fortunes/it", ("banner",)),
    ]
}


@dataclass(frozen=True)
class Corpus:
    name: str  # "base" or the tenant's name
    packages: tuple[str, ...]
    language: str
    description: str
    kind: str  # "base", "bitdelta" (a full fine-tune, compressed later) or "lora"
    example_prompt: str
    chat_questions: tuple[str, ...]


CORPORA = [
    Corpus("base", ("fortunes", "fortunes-min"), "en", "English fortune cookies (the base model)", "base",
           "A wise man once said", ("Tell me a fortune.", "Say something wise.", "Give me a quote.")),
    Corpus("german", ("fortunes-de",), "de", "German fortune cookies, quotations and jokes", "bitdelta",
           "Das Leben ist", ("Erzähl mir etwas.", "Sag etwas Weises.", "Tell me a fortune.")),
    Corpus("spanish", ("fortunes-es",), "es", "Spanish proverbs and quotations", "bitdelta",
           "La vida es", ("Dime un refrán.", "Dime algo sabio.", "Tell me a fortune.")),
    Corpus("bofh", ("fortunes-bofh-excuses",), "en", "Bastard Operator From Hell excuses (a style)", "bitdelta",
           "BOFH excuse #", ("Why is the server down?", "What broke?", "Give me an excuse.")),
    Corpus("italian", ("fortunes-it",), "it", "Italian fortune cookies and quotations", "lora",
           "La vita", ("Dimmi qualcosa.", "Raccontami una barzelletta.", "Tell me a fortune.")),
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0..5
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODEL = dict(  # about 2.4 M parameters: 4.8 MB in float16
    hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    initializer_range=0.02,
)
VOCAB_SIZE = 4096
SEQ_LEN = 128
BATCH = 16
HELDOUT_EVERY = 20  # ~5 %: entries whose hash is 0 mod 20
HELDOUT_MAX_CHARS = 48_000  # the saved held-out file is capped (the rest of the held-out entries stay unused)
TOKENIZER_MAX_CHARS = 1_500_000  # per corpus, so the big German corpus does not dominate the vocabulary
CHAT_FRACTION = 0.1  # share of training samples wrapped in the chat template (so chat completions work)
STORE_DTYPE = torch.float16  # 10 mantissa bits: the fine-tune deltas survive the rounding better than in bfloat16


@dataclass
class Phase:
    steps: int
    lr: float
    warmup: int
    weight_decay: float
    min_lr_ratio: float = 0.1


PHASES = {
    "base": Phase(steps=750, lr=2.5e-3, warmup=30, weight_decay=0.1),
    "german": Phase(steps=150, lr=7e-4, warmup=10, weight_decay=0.0),
    "spanish": Phase(steps=150, lr=7e-4, warmup=10, weight_decay=0.0),
    "bofh": Phase(steps=40, lr=5e-4, warmup=5, weight_decay=0.0),  # 431 short entries: a few epochs are enough
    "italian": Phase(steps=180, lr=3e-3, warmup=10, weight_decay=0.0),  # LoRA
}

SAMPLE_PROMPTS = ["", "Life is"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Fetched:
    package: Package
    version: str
    deb_sha256: str
    root: Path  # the extracted tree
    copyright_sha256: str
    files_used: list[str] = field(default_factory=list)
    files_skipped: list[str] = field(default_factory=list)


def fetch(pkg: Package, cache: Path) -> Fetched:
    """`apt-get download` (the pinned version if the archive has it) and `dpkg-deb -x`; nothing is installed."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{pkg.name}_*.deb"))
    if not found:
        for spec in (f"{pkg.name}={pkg.version}", pkg.name):
            r = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True, text=True)
            if r.returncode == 0:
                break
            log(f"apt-get download {spec} failed: {r.stderr.strip().splitlines()[-1:]}")
        else:
            sys.exit(f"cannot download {pkg.name}: run `apt-get update` first (Debian/Ubuntu only)")
        found = sorted(debs.glob(f"{pkg.name}_*.deb"))
    deb = found[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    if version != pkg.version:
        log(f"WARNING: {pkg.name} {version} differs from the version the assets were built from ({pkg.version})")
    root = cache / "x" / pkg.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    copyright_file = root / "usr/share/doc" / pkg.name / "copyright"
    text = copyright_file.read_text(encoding="utf-8", errors="replace")
    if pkg.licence_check not in text:
        sys.exit(f"{pkg.name}: the copyright file no longer says {pkg.licence_check!r}: review the licence")
    return Fetched(pkg, version, hashlib.sha256(deb.read_bytes()).hexdigest(), root,
                   hashlib.sha256(copyright_file.read_bytes()).hexdigest())


_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(entry: str) -> str:
    entry = _OVERSTRIKE.sub("", entry)  # "_\bX" underlines and bolds of old terminals
    entry = _ANSI.sub("", entry)
    entry = _CONTROL.sub("", entry)
    return "\n".join(line.rstrip() for line in entry.strip("\n").splitlines()).strip()


def parse_fortune_file(path: Path) -> list[str]:
    """Entries of a fortune file: separated by lines holding only '%'."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e for e in (clean(x) for x in entries) if e]


def fortune_files(f: Fetched) -> list[Path]:
    """The fortune text files of a package: not the .dat indexes, links, offensive (-o, off/) or art files."""
    base = f.root / f.package.root
    used = []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(f.root).as_posix()
        parts = p.relative_to(base).parts
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        if any(part in f.package.skip for part in parts) or p.name.endswith("-o") or "off" in parts[:-1]:
            f.files_skipped.append(rel)
            continue
        used.append(p)
        f.files_used.append(rel)
    return used


def is_heldout(entry: str) -> bool:
    return int.from_bytes(hashlib.sha256(entry.encode("utf-8")).digest()[:8], "little") % HELDOUT_EVERY == 0


@dataclass
class Split:
    train: list[str]
    heldout: list[str]


def load_corpus(corpus: Corpus, fetched: dict[str, Fetched]) -> Split:
    seen, train, heldout = set(), [], []
    for name in corpus.packages:
        for path in fortune_files(fetched[name]):
            for e in parse_fortune_file(path):
                if e in seen:
                    continue
                seen.add(e)
                (heldout if is_heldout(e) else train).append(e)
    return Split(train, heldout)


def heldout_to_save(entries: list[str]) -> list[str]:
    """The held-out entries in hash order, up to HELDOUT_MAX_CHARS (deterministic, order-independent)."""
    ordered = sorted(entries, key=lambda e: hashlib.sha256(e.encode("utf-8")).hexdigest())
    out, size = [], 0
    for e in ordered:
        if size + len(e) > HELDOUT_MAX_CHARS and out:
            break
        out.append(e)
        size += len(e) + 3
    return out


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def train_tokenizer(splits: dict[str, Split]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    texts = []
    for split in splits.values():
        ordered = sorted(split.train, key=lambda e: hashlib.sha256(e.encode("utf-8")).hexdigest())
        size = 0
        for e in ordered:
            if size > TOKENIZER_MAX_CHARS:
                break
            texts.append(e)
            size += len(e)
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=MODEL["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that transformers 4.45+ and 5 both read (chat template inside)."""
    tokenizer.save_pretrained(out)
    for name in ("chat_template.jinja", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": MODEL["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def encode_docs(tokenizer, corpus: Corpus, entries: list[str], seed: int) -> list[list[int]]:
    """Token ids of each training sample: `<s> text </s>`, or (CHAT_FRACTION of them) a chat exchange."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for e in entries:
        if torch.rand((), generator=g).item() < CHAT_FRACTION:
            q = corpus.chat_questions[int(torch.randint(len(corpus.chat_questions), (), generator=g))]
            chat = tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": e}], tokenize=False
            )
            texts.append(chat.rstrip("\n"))  # ends with </s>
        else:
            texts.append(e + "</s>")
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]  # adds <s>
    assert all(x[0] == 1 and x[-1] == 2 for x in ids)
    return ids


def token_stream(docs: list[list[int]], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    return torch.tensor([t for i in order for t in docs[i]], dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def lr_at(step: int, ph: Phase) -> float:
    if step < ph.warmup:
        return ph.lr * (step + 1) / ph.warmup
    t = (step - ph.warmup) / max(1, ph.steps - ph.warmup)
    return ph.lr * (ph.min_lr_ratio + (1 - ph.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, stream: torch.Tensor, ph: Phase, seed: int, name: str) -> dict:
    """AdamW on random windows of the packed token stream; returns the loss log."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ph.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=ph.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    t0, losses, ema = time.time(), [], None
    n = stream.numel() - SEQ_LEN - 1
    for step in range(ph.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, ph)
        starts = torch.randint(0, n, (BATCH,), generator=g)
        batch = torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == ph.steps - 1:
            el = time.time() - t0
            log(f"  {name} step {step + 1}/{ph.steps} loss {loss.item():.3f} (ema {ema:.3f}) "
                f"lr {lr_at(step, ph):.2e} {el:.0f}s ({(step + 1) / el:.2f} step/s)")
    model.eval()
    final = sum(losses[-20:]) / len(losses[-20:])
    return {"steps": ph.steps, "lr": ph.lr, "batch": BATCH, "seq_len": SEQ_LEN, "first_loss": round(losses[0], 4),
            "final_loss": round(final, 4), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def heldout_loss(model, docs: list[list[int]]) -> float:
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    total, count = 0.0, 0
    for s in range(0, stream.numel() - 1, SEQ_LEN * 16):
        chunk = stream[s : s + SEQ_LEN * 16 + 1]
        usable = (chunk.numel() - 1) // SEQ_LEN * SEQ_LEN
        if usable == 0:
            continue
        x = chunk[:usable].view(-1, SEQ_LEN)
        y = chunk[1 : usable + 1].view(-1, SEQ_LEN)
        logits = model(input_ids=x).logits.float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                   reduction="sum").item()
        count += y.numel()
    return total / max(count, 1)


@torch.no_grad()
def sample(model, tokenizer, prompt: str, seed: int, max_new_tokens: int = 48) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=0.8, top_k=40, pad_token_id=0, eos_token_id=2)
    return prompt + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def round_to_store_dtype(model) -> None:
    """What is saved is what is fine-tuned from: W_ft - W_base is exactly the trained change."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(STORE_DTYPE).float())


def save_model(model, out: Path, with_generation_config: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy = copy.to(STORE_DTYPE)
    copy.config.dtype = STORE_DTYPE
    copy.save_pretrained(out, safe_serialization=True)
    if not with_generation_config:
        (out / "generation_config.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    # Over 60 lines: the demo's recipe, run once offline by a maintainer, reads in order (corpora, base, each
    # fine-tune, the LoRA, the checks, the provenance); splitting it would hide the order that makes it reproducible.
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("serving/demo/assets"))
    ap.add_argument("--provenance", type=Path, default=None, help="default: PROVENANCE.md beside --out")
    ap.add_argument("--cache", type=Path, default=None, help="where the .deb files are downloaded (default: a temp dir)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every training phase's steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t_start = time.time()
    out: Path = args.out
    provenance = args.provenance or out.parent / "PROVENANCE.md"
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="deltaserve-demo-")
        cache = Path(tmp.name)
    else:
        cache = args.cache
    phases = {k: Phase(max(2, round(v.steps * args.steps_scale)), v.lr, max(1, round(v.warmup * min(1.0, args.steps_scale * 4))),
                       v.weight_decay, v.min_lr_ratio) for k, v in PHASES.items()}

    # 1. data
    log(f"fetching {len(PACKAGES)} Debian packages into {cache}")
    fetched = {name: fetch(pkg, cache) for name, pkg in PACKAGES.items()}
    splits = {c.name: load_corpus(c, fetched) for c in CORPORA}
    for c in CORPORA:
        s = splits[c.name]
        log(f"  {c.name:8s} train {len(s.train):6d} entries ({sum(map(len, s.train)) / 1e6:.2f} M chars), "
            f"held out {len(s.heldout)}")

    if out.exists():
        shutil.rmtree(out)
    (out / "heldout").mkdir(parents=True)
    saved_heldout = {}
    for c in CORPORA:
        saved_heldout[c.name] = heldout_to_save(splits[c.name].heldout)
        (out / "heldout" / f"{c.name}.txt").write_text("\n%\n".join(saved_heldout[c.name]) + "\n", encoding="utf-8")

    # 2. tokenizer
    log("training the tokenizer")
    tokenizer = train_tokenizer(splits)
    base_dir = out / "base"
    save_tokenizer(tokenizer, base_dir)
    for c in CORPORA:
        sample_text = splits[c.name].train[0]
        n_tok = len(tokenizer(sample_text, add_special_tokens=False).input_ids)
        log(f"  {c.name:8s} {len(sample_text) / max(n_tok, 1):.2f} chars/token on {sample_text[:40]!r}")
    train_docs = {c.name: encode_docs(tokenizer, c, splits[c.name].train, args.seed + i) for i, c in enumerate(CORPORA)}
    eval_docs = {c.name: [tokenizer(e + "</s>").input_ids for e in saved_heldout[c.name]] for c in CORPORA}
    streams = {name: token_stream(docs, args.seed + 100) for name, docs in train_docs.items()}
    for name, s in streams.items():
        log(f"  {name:8s} {s.numel() / 1e6:.2f} M training tokens")

    # 3. base model
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0, **MODEL)
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in base.parameters())
    log(f"base model: {n_params / 1e6:.2f} M parameters, {phases['base'].steps} steps")
    report = {"seed": args.seed, "steps_scale": args.steps_scale, "threads": args.threads, "parameters": n_params,
              "packages": {n: f.version for n, f in fetched.items()}, "models": {}}
    report["models"]["base"] = train(base, streams["base"], phases["base"], args.seed + 1, "base")
    round_to_store_dtype(base)
    save_model(base, base_dir, with_generation_config=True)
    base.generation_config.save_pretrained(base_dir)

    # 4. tenants
    tenants_models = {"base": base}
    for i, c in enumerate(CORPORA[1:], start=2):
        torch.manual_seed(args.seed + i)
        model = LlamaForCausalLM(config).float()
        model.load_state_dict(base.state_dict())
        if c.kind == "bitdelta":
            log(f"full fine-tune {c.name}: {phases[c.name].steps} steps")
            report["models"][c.name] = train(model, streams[c.name], phases[c.name], args.seed + i, c.name)
            round_to_store_dtype(model)
            save_model(model, out / "finetunes" / c.name, with_generation_config=False)
        else:
            from peft import LoraConfig, get_peft_model

            log(f"LoRA {c.name}: {phases[c.name].steps} steps")
            lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=PROJECTIONS,
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
            report["models"][c.name] = train(model, streams[c.name], phases[c.name], args.seed + i, c.name)
            lora_dir = out / "lora" / c.name
            model.save_pretrained(lora_dir, safe_serialization=True)
            (lora_dir / "README.md").unlink(missing_ok=True)
            cfg_path = lora_dir / "adapter_config.json"
            acfg = json.loads(cfg_path.read_text())
            acfg["base_model_name_or_path"] = "deltaserve-demo-base"
            acfg["target_modules"] = sorted(acfg["target_modules"])  # a set in PEFT: fix the order
            cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        tenants_models[c.name] = model

    # 5. evaluation and samples
    log("held-out loss (nats/token), rows = model, columns = held-out text")
    report["heldout_loss"] = {}
    for m_name, model in tenants_models.items():
        row = {c.name: round(heldout_loss(model, eval_docs[c.name]), 3) for c in CORPORA}
        report["heldout_loss"][m_name] = row
        log(f"  {m_name:8s} " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
    report["samples"] = {}
    for m_name, model in tenants_models.items():
        own = next(c for c in CORPORA if c.name == m_name).example_prompt
        prompts = [*SAMPLE_PROMPTS, own, "<|user|>\nTell me a fortune.</s>\n<|assistant|>\n"]
        report["samples"][m_name] = {p: sample(model, tokenizer, p, args.seed + 7) for p in prompts}
        for p, text in report["samples"][m_name].items():
            log(f"  [{m_name} | {p!r}] {text!r}")

    # 6. tenants.json, build info, provenance
    tenants = {
        "format": "deltaserve.demo",
        "version": 1,
        "base": {"path": "base", "language": "en", "description": CORPORA[0].description,
                 "heldout": "heldout/base.txt", "example_prompt": CORPORA[0].example_prompt},
        "heldout_format": "fortune: entries separated by lines holding only '%'",
        "tenants": [],
    }
    for c in CORPORA[1:]:
        entry = {"name": c.name, "kind": c.kind, "language": c.language, "description": c.description}
        if c.kind == "bitdelta":
            entry["adapter"] = f"deltas/{c.name}.bitdelta.safetensors"
            entry["finetune"] = f"finetunes/{c.name}"
        else:
            entry["adapter"] = f"lora/{c.name}"
            entry["finetune"] = None
        entry["heldout"] = f"heldout/{c.name}.txt"
        entry["example_prompt"] = c.example_prompt
        tenants["tenants"].append(entry)
    (out / "tenants.json").write_text(json.dumps(tenants, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report["seconds_total"] = round(time.time() - t_start, 1)
    (out / "build_info.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_provenance(provenance, fetched, splits, saved_heldout)
    for p in out.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"done in {report['seconds_total']:.0f}s; {out} holds {size / 1e6:.1f} MB")
    if tmp is not None:
        tmp.cleanup()
    return 0


def write_provenance(path: Path, fetched: dict[str, Fetched], splits: dict[str, Split], saved: dict[str, list[str]]):
    # Over 60 lines: most of it is the text of PROVENANCE.md, written as it reads.
    uses = {p: c for c in CORPORA for p in c.packages}
    lines = [
        "# Provenance of the embedded demo",
        "",
        "Generated by `scripts/demo/build_demo.py` (do not edit by hand). Every text the demo model and its tenants",
        "were trained on comes from the Debian packages below (bookworm), fetched with `apt-get download` and",
        "unpacked with `dpkg-deb -x`; no model or data set was downloaded from a model hub. Licences are read from",
        "each package's `usr/share/doc/<package>/copyright`; the script stops if the phrase it checks is gone.",
        "",
        "| package | version | licence (summary) | used for |",
        "|---|---|---|---|",
    ]
    for name, f in fetched.items():
        c = uses[name]
        role = "base model (trained from scratch), tokenizer" if c.kind == "base" else \
            f"tenant `{c.name}` ({'full fine-tune, served as a 1-bit delta' if c.kind == 'bitdelta' else 'LoRA'}), tokenizer"
        lines.append(f"| {name} | {f.version} | {f.package.licence} | {role} |")
    lines += ["", "## Files used", ""]
    for name, f in fetched.items():
        lines.append(f"- **{name}** ({len(f.files_used)} files): " + ", ".join(f"`{Path(x).name}`" for x in f.files_used))
        if f.files_skipped:
            lines.append("  - not used (ASCII art, offensive `off/` or `-o` files): "
                         + ", ".join(f"`{Path(x).relative_to(f.package.root)}`" for x in f.files_skipped))
        lines.append(f"  - `.deb` sha256 `{f.deb_sha256}`; copyright file sha256 `{f.copyright_sha256}`")
    lines += [
        "",
        "Entries are separated by lines holding only `%`; `.dat` index files and `.u8` links are skipped; old",
        "terminal overstrike sequences (`_\\bX`) and escape codes are removed; duplicate entries are dropped.",
        "",
        "## Held-out evaluation text",
        "",
        "About 5 % of every corpus is held out: an entry is held out when the first 8 bytes of its SHA-256",
        f"(little-endian) are 0 modulo {HELDOUT_EVERY}. Held-out entries are used neither for the tokenizer nor for",
        "training. `assets/heldout/<name>.txt` holds the first held-out entries in SHA-256 order, up to",
        f"{HELDOUT_MAX_CHARS // 1000} kB, in fortune format (entries separated by `%` lines); `deltaserve eval` reads them.",
        "",
        "| file | entries (held out / train) | source | licence of the text |",
        "|---|---|---|---|",
    ]
    for c in CORPORA:
        lic = "; ".join(PACKAGES[p].licence for p in c.packages if PACKAGES[p].licence not in
                        [PACKAGES[q].licence for q in c.packages[: c.packages.index(p)]])
        lines.append(f"| `heldout/{c.name}.txt` | {len(saved[c.name])} / {len(splits[c.name].train)} | "
                     f"{', '.join(c.packages)} | {lic} |")
    lines += [
        "",
        "Redistributing these excerpts is allowed by every licence above: BSD-3-Clause (keep the copyright",
        "notice: fortune-mod, Copyright (c) 1991 The Regents of the University of California), public domain",
        "(fortunes-bofh-excuses, fortunes-it, the texts of fortunes-es), and GPL-2+ for `heldout/german.txt`",
        "(fortunes-de, Copyright 1999-2012 Andreas Tille): that file is verbatim GPL-2+ text, distributed under",
        "GPL-2+ beside the rest of the repository (mere aggregation); its complete source is the Debian package.",
        "",
        "## Weights",
        "",
        "All weights were trained here from random initialisation by the script, from the texts above only.",
        "Whether trained weights are a derivative work of their training text is unsettled; to be safe, treat",
        "`finetunes/german` and any delta made from it as GPL-2+ like the text it was trained on. The other",
        "models derive from BSD-3-Clause and public-domain texts only.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
