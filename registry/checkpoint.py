"""A local Hugging Face model directory, read lazily one tensor at a time.

Used for the served base (`--model DIR`) and for full fine-tunes to compress. The directory must hold
`config.json` and its weights as safetensors: `model.safetensors`, or shards listed by
`model.safetensors.index.json` (the same precedence as `transformers`: the single file wins when both
exist). Pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...) are refused, never loaded. No other file
name is looked at or guessed from.

All headers are validated at construction (registry.safetensors_io.read_header); tensor data is read only
by `get`, `get_rows` and `iter_tensors`, one tensor at a time, so a checkpoint larger than memory can be
streamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from registry.errors import PickleRefused, UnsupportedFormat, is_pickle_name
from registry.safetensors_io import TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def tie_word_embeddings(config: dict) -> bool:
    """config.json's tie_word_embeddings; absent means False (the Llama, Mistral and Qwen2 defaults)."""
    value = config.get("tie_word_embeddings", False)
    if not isinstance(value, bool):
        raise UnsupportedFormat(
            f"config.json: tie_word_embeddings must be true or false, got {value!r}", param="config.json"
        )
    return value


def _is_plain_file_name(name: str) -> bool:
    """A file directly inside the directory: no separators, no '.' / '..'."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


class Checkpoint:
    """A validated HF model directory.

    Raises UnsupportedFormat (param = the file at fault) when: the path is not a directory; config.json
    is missing or not a JSON object; there are no safetensors weights (with a pickle-specific message
    when only `.bin`/`.pt` files are there); the index is malformed, names a shard that is missing (the
    message names it) or a tensor its shard does not hold, or a shard holds a tensor the index does not
    list; any shard fails read_header.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UnsupportedFormat(
                f"model directory {self.path} does not exist or is not a directory", param=str(path)
            )
        self._config = self._read_config()
        # tensor name -> shard file name; shard file name -> its header
        self._shard_of: dict[str, str] = {}
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        if (self.path / SINGLE_FILE).is_file():
            header, _ = read_header(self.path / SINGLE_FILE)
            self._headers[SINGLE_FILE] = header
            self._shard_of = dict.fromkeys(header, SINGLE_FILE)
        elif (self.path / INDEX_FILE).is_file():
            self._read_index()
        else:
            self._refuse_missing_weights()

    # --- construction -------------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.is_file():
            raise UnsupportedFormat(f"{self.path} has no {CONFIG_FILE}", param=CONFIG_FILE)
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UnsupportedFormat(f"{CONFIG_FILE} is not valid JSON: {e}", param=CONFIG_FILE) from e
        if not isinstance(config, dict):
            raise UnsupportedFormat(f"{CONFIG_FILE} must hold a JSON object", param=CONFIG_FILE)
        return config

    def _read_index(self) -> None:
        try:
            index = json.loads((self.path / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UnsupportedFormat(f"{INDEX_FILE} is not valid JSON: {e}", param=INDEX_FILE) from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnsupportedFormat(f"{INDEX_FILE} has no weight_map object", param=INDEX_FILE)
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or not _is_plain_file_name(shard):
                raise UnsupportedFormat(
                    f"{INDEX_FILE} maps {tensor!r} to {shard!r}, which is not a file of this directory",
                    param=INDEX_FILE,
                )
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise UnsupportedFormat(
                    f"shard {shard} listed in {INDEX_FILE} is missing from {self.path}", param=shard
                )
            header, _ = read_header(self.path / shard)
            listed = {t for t, s in weight_map.items() if s == shard}
            unlisted = sorted(set(header) - listed)
            if unlisted:
                raise UnsupportedFormat(
                    f"shard {shard} holds tensor {unlisted[0]!r} that {INDEX_FILE} does not map to it", param=shard
                )
            self._headers[shard] = header
        for tensor, shard in weight_map.items():
            if tensor not in self._headers[shard]:
                raise UnsupportedFormat(f"{INDEX_FILE} maps tensor {tensor!r} to {shard}, which lacks it", param=shard)
        self._shard_of = dict(weight_map)

    def _refuse_missing_weights(self) -> None:
        pickles = sorted(p.name for p in self.path.iterdir() if is_pickle_name(p.name))
        if pickles:
            raise PickleRefused(
                f"{self.path} holds only pickle checkpoints ({', '.join(pickles)}); pickle checkpoints are not "
                f"loaded: save the model as safetensors ({SINGLE_FILE} or sharded with {INDEX_FILE})",
                param=pickles[0],
            )
        raise UnsupportedFormat(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}", param=SINGLE_FILE)

    # --- reading ------------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The parsed config.json (do not modify)."""
        return self._config

    def names(self) -> list[str]:
        """All tensor names of the state dict, sorted."""
        return sorted(self._shard_of)

    def served_names(self) -> list[str]:
        """The tensors of the served model, sorted: all but rotary buffers (`*rotary_emb.inv_freq`, recomputed
        from the config) and, with tied embeddings, a stored copy of lm_head.weight (the embedding serves)."""
        tied = tie_word_embeddings(self.config)
        return [n for n in self.names() if not n.endswith("rotary_emb.inv_freq") and not (tied and n == "lm_head.weight")]

    def __contains__(self, name: object) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def shards(self) -> list[str]:
        """The weight files, as file names inside the directory."""
        return sorted(self._headers)

    def info(self, name: str) -> TensorInfo:
        """dtype and shape (and file offsets) of a tensor, from the header only. KeyError if unknown."""
        shard = self._shard(name)
        return self._headers[shard][name]

    def file_of(self, name: str) -> Path:
        """The weight file holding tensor `name` (its bytes are info(name).start..end there). KeyError if unknown."""
        return self.path / self._shard(name)

    def _shard(self, name: str) -> str:
        try:
            return self._shard_of[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}") from None

    def _checked(
        self, name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A copy of the tensor as read (in `dtype` if given), owning its memory rather than viewing the file's
        mmap, after checking that the file still agrees with the header validated at construction."""
        info = self.info(name)
        if tensor.dtype != info.dtype or tuple(tensor.shape) != shape:
            raise UnsupportedFormat(f"{self._shard(name)} changed on disk while being read", param=self._shard(name))
        return tensor.to(dtype=dtype or tensor.dtype, copy=True)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reads one tensor onto the CPU (in `dtype` if given, else as stored). KeyError if unknown."""
        shard = self._shard(name)
        with safe_open(os.fspath(self.path / shard), framework="pt", device="cpu") as f:
            return self._checked(name, f.get_tensor(name), self.info(name).shape, dtype)

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Reads only the given indices of dim 0 of a tensor: [len(rows), *shape[1:]], as stored.

        A 0-d tensor is returned whole (rows are ignored). Indices must lie in [0, shape[0]).
        """
        info = self.info(name)
        shard = self._shard(name)
        with safe_open(os.fspath(self.path / shard), framework="pt", device="cpu") as f:
            if not info.shape:
                return self._checked(name, f.get_tensor(name), ())
            sl = f.get_slice(name)
            for r in rows:
                if not 0 <= r < info.shape[0]:
                    raise IndexError(f"row {r} out of range for {name} of shape {info.shape}")
            parts = [sl[r : r + 1] for r in rows]
        if not parts:
            return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        out = torch.cat(parts)
        return self._checked(name, out, (len(rows), *info.shape[1:]))

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) one at a time, shard by shard in file order (each shard opened once)."""
        for shard in self.shards():
            header = self._headers[shard]
            ordered = sorted(header, key=lambda n: header[n].start)
            with safe_open(os.fspath(self.path / shard), framework="pt", device="cpu") as f:
                for name in ordered:
                    yield name, self._checked(name, f.get_tensor(name), header[name].shape, dtype)
