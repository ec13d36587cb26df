"""The embedded demo: a tiny Llama base model and its tenants, served when no `--model` is given.

The assets under `assets/` are made by `scripts/demo/build_demo.py` (see `PROVENANCE.md`):

    assets/base/                         the base model: config, float16 safetensors, tokenizer (+ chat template)
    assets/finetunes/<name>/             full fine-tunes (config + safetensors), the sources of the 1-bit deltas
    assets/deltas/<name>.bitdelta.safetensors   1-bit deltas, made from them with `deltaserve compress`
    assets/lora/<name>/                  PEFT LoRA adapters
    assets/heldout/<name>.txt            held-out evaluation text (fortune format: entries between '%' lines)
    assets/tenants.json                  what the tenants are

No torch here: this module only knows paths and the tenant list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoBase", "DemoTenant", "demo_base", "demo_dir", "demo_tenants", "read_heldout"]

KINDS = ("bitdelta", "lora")


@dataclass(frozen=True)
class DemoBase:
    path: Path  # the base model directory
    language: str
    description: str
    heldout_path: Path
    example_prompt: str


@dataclass(frozen=True)
class DemoTenant:
    name: str
    kind: str  # "bitdelta" or "lora"
    language: str
    description: str
    adapter_path: Path  # the 1-bit delta file (may not exist before `deltaserve compress`) or the PEFT directory
    finetune_path: Path | None  # the full fine-tune a 1-bit delta is made from; None for LoRA
    heldout_path: Path
    example_prompt: str


def demo_dir() -> Path:
    """The directory of the demo assets."""
    return Path(__file__).resolve().parent / "assets"


def _manifest() -> dict:
    path = demo_dir() / "tenants.json"
    if not path.is_file():
        raise FileNotFoundError(f"the demo assets are missing ({path}); build them with scripts/demo/build_demo.py")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != "deltaserve.demo" or data.get("version") != 1:
        raise ValueError(f"{path}: not a deltaserve.demo v1 manifest")
    return data


def demo_base() -> DemoBase:
    """The demo base model."""
    root, base = demo_dir(), _manifest()["base"]
    return DemoBase(root / base["path"], base["language"], base["description"], root / base["heldout"],
                    base["example_prompt"])


def demo_tenants() -> list[DemoTenant]:
    """The demo tenants, in the order of tenants.json."""
    root, out, seen = demo_dir(), [], set()
    for t in _manifest()["tenants"]:
        if t["kind"] not in KINDS:
            raise ValueError(f"demo tenant {t['name']!r}: unknown kind {t['kind']!r}")
        if t["name"] in seen:
            raise ValueError(f"demo tenant {t['name']!r} listed twice")
        seen.add(t["name"])
        out.append(DemoTenant(
            name=t["name"],
            kind=t["kind"],
            language=t["language"],
            description=t["description"],
            adapter_path=root / t["adapter"],
            finetune_path=root / t["finetune"] if t.get("finetune") else None,
            heldout_path=root / t["heldout"],
            example_prompt=t["example_prompt"],
        ))
    return out


def read_heldout(path: Path) -> list[str]:
    """The entries of a held-out file (fortune format: entries separated by lines holding only '%')."""
    entries, current = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e for e in entries if e.strip()]
