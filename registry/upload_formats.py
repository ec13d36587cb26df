"""What an upload may contain, by format (CONTRACT §2), checked before a byte of a file is written:
- "lora":     exactly `adapter_config.json` and `adapter_model.safetensors` (a PEFT LoRA directory).
- "ia3":      the same two files (a PEFT (IA)^3 directory).
- "bitdelta": one `*.safetensors` file (a deltaserve.bitdelta v1 file, CONTRACT §4).
- "finetune": `config.json`, `*.safetensors` weight files and optionally `model.safetensors.index.json` (and
              the JSON files of FINETUNE_OPTIONAL).
File names are plain names; pickle files (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, ...) are refused by name and never
loaded; so is any other file. No torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from registry.errors import InvalidName, PickleRefused, UnsupportedFormat, is_pickle_name

FORMATS = ("lora", "ia3", "bitdelta", "finetune")
"""The upload formats of CONTRACT §2 (the `format` form field)."""
PEFT_FORMATS = ("lora", "ia3")
"""The formats that are a PEFT adapter directory (adapter_config.json and adapter_model.safetensors)."""

LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
FINETUNE_CONFIG = "config.json"
FINETUNE_INDEX = "model.safetensors.index.json"
FINETUNE_SINGLE = "model.safetensors"
SAFETENSORS_SUFFIX = ".safetensors"

DEFAULT_MAX_UPLOAD_BYTES = 64 << 30
"""Default cap on the total size of one upload (all its files), in bytes."""
MAX_FILES = 256
"""The most files one upload may have (a fine-tune's shards)."""
MAX_FILE_NAME_LENGTH = 200
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_format(format: str) -> str:
    """Returns `format` if it is one of FORMATS, else raises UnsupportedFormat(param="format")."""
    if format not in FORMATS:
        raise UnsupportedFormat(f"format must be one of {', '.join(FORMATS)}, got {format!r}", param="format")
    return format


def check_file_name(filename: str) -> str:
    """A plain file name: 1-200 characters of A-Z a-z 0-9 . _ -, not starting with '.', '_' or '-', no
    '..' (so no '/', '\\', NUL, hidden file or path). Raises InvalidName(param="files") otherwise."""
    if not isinstance(filename, str):
        raise InvalidName(f"file name must be a string, got {type(filename).__name__}", "files")
    shown = repr(filename if len(filename) <= 80 else filename[:80] + "...")
    if (
        not filename
        or len(filename) > MAX_FILE_NAME_LENGTH
        or not _FILE_NAME_RE.fullmatch(filename)
        or ".." in filename
    ):
        raise InvalidName(
            f"file name {shown} is not a plain file name (1 to {MAX_FILE_NAME_LENGTH} characters of "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..', no directories)",
            "files",
        )
    return filename


def expected_files(format: str) -> str:
    """What a `format` upload holds, in words (for error messages)."""
    return {
        "lora": f"{LORA_CONFIG} and {LORA_WEIGHTS}",
        "ia3": f"{LORA_CONFIG} and {LORA_WEIGHTS}",
        "bitdelta": f"one {SAFETENSORS_SUFFIX} file",
        "finetune": f"{FINETUNE_CONFIG}, {SAFETENSORS_SUFFIX} weight files and optionally {FINETUNE_INDEX}",
    }[format]


# JSON files of a Hugging Face directory a fine-tune upload may carry along: never executed, only parsed
# (tokenizer.json lets compression check the fine-tune uses the base's vocabulary).
FINETUNE_OPTIONAL = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def refuse_pickle_name(filename: str) -> None:
    """Raises PickleRefused (param = the file name) for a file named as torch.save / pickle name theirs."""
    if is_pickle_name(filename):
        raise PickleRefused(f"{filename}: pickle files are never loaded; upload safetensors files instead", param=filename)


def check_file_allowed(format: str, filename: str, present: Iterable[str] = ()) -> None:
    """Raises UnsupportedFormat (param = the file name) unless `filename` (already a plain name) may be
    part of a `format` upload that already holds `present`: pickle files never, anything the format does
    not name never, no name twice, one weights file for "bitdelta", at most MAX_FILES files."""
    present = set(present)
    refuse_pickle_name(filename)
    if filename in present:
        raise UnsupportedFormat(f"file {filename} is given twice", param=filename)
    if len(present) >= MAX_FILES:
        raise UnsupportedFormat(f"an upload may have at most {MAX_FILES} files", param=filename)
    is_weights = filename.endswith(SAFETENSORS_SUFFIX)
    if format in PEFT_FORMATS:
        ok = filename in (LORA_CONFIG, LORA_WEIGHTS)
    elif format == "bitdelta":
        ok = is_weights
        if ok and any(p.endswith(SAFETENSORS_SUFFIX) for p in present):
            raise UnsupportedFormat(
                f"{filename}: a bitdelta upload is exactly one {SAFETENSORS_SUFFIX} file", param=filename
            )
    else:
        ok = is_weights or filename in (FINETUNE_CONFIG, FINETUNE_INDEX, *FINETUNE_OPTIONAL)
    if not ok:
        raise UnsupportedFormat(
            f"file {filename} is not part of a {format} upload (expected {expected_files(format)})", param=filename
        )
