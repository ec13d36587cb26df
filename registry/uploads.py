"""Uploads: a tenant's files streamed into a private staging directory, checked, then committed.

A `Staging` is a fresh directory under the registry's `tmp/` (made by `Registry.stage`). The HTTP layer
streams each uploaded file into it with `add_file` (never holding a whole file in memory; the total size
of one upload is capped), then calls `validate`, then `Registry.commit_adapter` (or, for a full fine-tune,
`Registry.create_pending` and a background compression). Staging directories are on the same filesystem
as the blob store, so committing is a rename.

What is accepted, by format, is registry.upload_formats' (file names are plain names, checked before a byte is
written; pickle files are refused by name and never loaded; so is any file a format does not name).

This module imports no torch at import time (validation imports the loaders when it runs). Over 400 lines: one
concept, a staging directory (`Staging`) and the writer that fills one of its files (`UploadWriter`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from registry.errors import (
    AdapterMismatch,
    InsufficientStorage,
    InvalidName,
    UnsupportedFormat,
    UploadTooLarge,
    is_disk_full,
)
from registry.fsync import fsync_dir
from registry.upload_formats import (
    DEFAULT_MAX_UPLOAD_BYTES,
    FINETUNE_CONFIG,
    FINETUNE_INDEX,
    FINETUNE_SINGLE,
    FORMATS,
    LORA_CONFIG,
    LORA_WEIGHTS,
    MAX_FILES,
    PEFT_FORMATS,
    SAFETENSORS_SUFFIX,
    check_file_allowed,
    check_file_name,
    check_format,
    expected_files,
    refuse_pickle_name,
)

if TYPE_CHECKING:
    from registry.deltas import BaseSpec, Delta

class Staging:
    """A private directory under the registry's tmp/ holding one upload (or one compression's output).

    path:      the directory (exists until `discard` or until a commit moves its content away).
    format:    the upload format if known (then `add_file` checks names against it), else None.
    max_bytes: cap on the total bytes of all files added with `add_file`.

    Use it as a context manager: leaving the block by an exception discards it; leaving normally keeps
    it (a committed staging is already empty; a fine-tune being compressed in the background must stay).
    Not thread-safe: one upload is handled by one thread at a time.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        quota_bytes: int | None = None,
    ):
        """quota_bytes: what is left of the tenant's storage quota; an upload beyond it is refused with
        InsufficientStorage (507) rather than UploadTooLarge (413, the per-upload limit)."""
        self.path = Path(path)
        self.format = check_format(format) if format is not None else None
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes
        self._files: list[str] = []
        self._bytes = 0
        self._discarded = False

    # --- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.discard()

    @property
    def discarded(self) -> bool:
        """True once `discard` ran (the directory and everything in it are gone)."""
        return self._discarded

    def discard(self) -> None:
        """Deletes the directory and everything in it. Idempotent; never raises for a missing directory."""
        self._discarded = True
        shutil.rmtree(self.path, ignore_errors=True)

    def _check_open(self) -> None:
        if self._discarded:
            raise ValueError(f"staging {self.path.name} was discarded")

    # --- receiving files ------------------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        """The names of the files added with `add_file`, in the order they were added."""
        return list(self._files)

    @property
    def size_bytes(self) -> int:
        """Total bytes received by `add_file` so far."""
        return self._bytes

    def _check_new_name(self, filename: str) -> None:
        check_file_name(filename)
        if self.format is not None:
            check_file_allowed(self.format, filename, self._files)
            return
        # Format not known yet (the multipart field may come after the files): refuse what no format takes.
        refuse_pickle_name(filename)
        errors: list[UnsupportedFormat] = []
        for fmt in FORMATS:
            try:
                check_file_allowed(fmt, filename, [f for f in self._files if not f.endswith(SAFETENSORS_SUFFIX)])
            except UnsupportedFormat as e:
                errors.append(e)
        if filename in self._files:
            raise UnsupportedFormat(f"file {filename} is given twice", param=filename)
        if len(self._files) >= MAX_FILES:
            raise UnsupportedFormat(f"an upload may have at most {MAX_FILES} files", param=filename)
        if len(errors) == len(FORMATS):
            raise UnsupportedFormat(
                f"file {filename} is not part of any upload format ("
                + "; ".join(f"{fmt}: {expected_files(fmt)}" for fmt in FORMATS)
                + ")",
                param=filename,
            )

    def open_file(self, filename: str) -> UploadWriter:
        """Starts receiving one file (push style, for a streaming multipart parser): returns an
        UploadWriter whose `write(data)` appends and whose `close()` finishes the file.

        The name is checked before anything is created: a plain name (check_file_name: InvalidName),
        then the format's rules (check_file_allowed; with no format known yet, refused only if no
        format takes it: pickle files always). A pickle or unknown file is refused with UnsupportedFormat.
        """
        self._check_open()
        self._check_new_name(filename)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path / filename, flags, 0o600)
        return UploadWriter(self, filename, fd)

    def add_file(self, filename: str, chunks: Iterable[bytes]) -> int:
        """Streams one uploaded file to disk, chunk by chunk (pull style); returns its size in bytes.

        Checks as `open_file` (nothing is written for a refused name). Raises UploadTooLarge (param
        "files") as soon as the upload's total passes `max_bytes`: the whole staging is then discarded.
        On any other failure (e.g. the chunk iterator raises because the client went away) the partial
        file is deleted and the error propagates; the staging stays usable.
        """
        writer = self.open_file(filename)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    def import_path(self, path: str | os.PathLike[str], format: str | None = None) -> None:
        """Copies a local file, or the files of a local directory, into the staging (for trusted local
        sources: the demo, the CLI), with the same checks and limit as an upload. A directory contributes
        its regular files (symlinks and subdirectories are not followed) that an upload of `format` (default:
        the staging's; if neither, any format) may hold; other files (a PEFT directory's README.md,
        tokenizer files, pickle files) are skipped."""
        path = Path(path)
        if not path.is_dir():
            with open(path, "rb") as f:
                self.add_file(path.name, iter(lambda: f.read(1 << 20), b""))
            return
        fmt = format if format is not None else self.format
        for entry in sorted(path.iterdir()):
            if entry.is_symlink() or not entry.is_file():
                continue
            allowed = [fmt] if fmt is not None else list(FORMATS)
            ok = False
            for candidate in allowed:
                try:
                    check_file_name(entry.name)
                    check_file_allowed(candidate, entry.name, self._files)
                    ok = True
                    break
                except (InvalidName, UnsupportedFormat):
                    continue
            if ok:
                with open(entry, "rb") as f:
                    self.add_file(entry.name, iter(lambda f=f: f.read(1 << 20), b""))

    def keep_only(self, path: str | os.PathLike[str]) -> None:
        """Deletes every file of the staging but `path` (a file directly inside it), e.g. a fine-tune's
        uploaded files once its compressed 1-bit delta has been written next to them."""
        self._check_open()
        keep = Path(path)
        if keep.parent.resolve() != self.path.resolve() or not keep.is_file():
            raise ValueError(f"{keep} is not a file of staging {self.path}")
        for n in os.listdir(self.path):
            if n != keep.name:
                target = self.path / n
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        self._files = [keep.name]

    def _received(self, filename: str, size: int) -> None:
        self._files.append(filename)
        self._bytes += size

    # --- checking ------------------------------------------------------------------------------------

    def _listing(self) -> list[str]:
        """The names in the directory; anything that is not a regular file is a bug (we write only files)."""
        names = sorted(os.listdir(self.path))
        for n in names:
            assert (self.path / n).is_file() and not (self.path / n).is_symlink(), f"unexpected entry {n}"
        return names

    def validate(self, format: str, spec: BaseSpec, max_lora_rank: int | None = None) -> Delta | None:
        """Checks the complete upload against the served base, reading every safetensors header (with
        registry.safetensors_io.read_header) before any tensor data.

        "lora" / "ia3" / "bitdelta": returns the loaded Delta (registry.loading.load_delta: names, shapes,
        dtypes, finite values, the base fingerprint; LoRA ranks above max_lora_rank refused; a PEFT directory
        whose peft_type is not the format's refused, param "format"); its sha256 is the
        identity `Registry.commit_adapter` stores it under.
        "finetune": returns None after checking that config.json is a JSON object, that the checkpoint
        opens (registry.checkpoint.Checkpoint: index and shards consistent), that every uploaded weight
        file is used, and that its tensors have exactly the base's names and shapes and are floating
        point, so a bad fine-tune is refused now rather than after a background compression.

        Raises UnsupportedFormat (param "format" or the file) for a format other than the staging's, a
        missing or unexpected file, a malformed or pickle file; AdapterMismatch for what does not fit the
        base; ValueError if the staging was discarded.
        """
        self._check_open()
        check_format(format)
        if self.format is not None and format != self.format:
            raise UnsupportedFormat(f"this upload was staged as {self.format}, not {format}", param="format")
        names = self._listing()
        present: list[str] = []
        for n in names:
            check_file_name(n)
            check_file_allowed(format, n, present)
            present.append(n)
        weights = [n for n in names if n.endswith(SAFETENSORS_SUFFIX)]
        required = [LORA_CONFIG, LORA_WEIGHTS] if format in PEFT_FORMATS else [FINETUNE_CONFIG] if format == "finetune" else []
        for need in required:
            if need not in names:
                raise UnsupportedFormat(f"a {format} upload needs {expected_files(format)}: {need} is missing", param=need)
        if not weights:
            raise UnsupportedFormat(
                f"a {format} upload needs {expected_files(format)}: no {SAFETENSORS_SUFFIX} file was uploaded",
                param="files",
            )

        from registry.loading import load_delta
        from registry.safetensors_io import read_header

        for n in weights:
            read_header(self.path / n)
        if format in PEFT_FORMATS:
            delta = load_delta(self.path, spec, max_lora_rank)
            if delta.kind != format:
                raise AdapterMismatch(
                    f"adapter_config.json says this is {'an (IA)^3' if delta.kind == 'ia3' else 'a LoRA'} adapter: "
                    f"upload it with format {delta.kind}, not {format}",
                    param="format",
                )
            return delta
        if format == "bitdelta":
            return load_delta(self.path / weights[0], spec)
        self._check_finetune(spec, names, weights)
        return None

    def _check_finetune(self, spec: BaseSpec, names: list[str], weights: list[str]) -> None:
        from registry.checkpoint import Checkpoint
        from registry.fingerprint import check_matches_base

        try:
            config = json.loads((self.path / FINETUNE_CONFIG).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UnsupportedFormat(f"{FINETUNE_CONFIG} is not valid JSON: {e}", param=FINETUNE_CONFIG) from e
        if not isinstance(config, dict):
            raise UnsupportedFormat(f"{FINETUNE_CONFIG} must hold a JSON object", param=FINETUNE_CONFIG)
        if FINETUNE_INDEX in names and FINETUNE_SINGLE in names:
            raise UnsupportedFormat(
                f"upload either {FINETUNE_SINGLE} or {FINETUNE_INDEX} with its shards, not both", param=FINETUNE_INDEX
            )
        ckpt = Checkpoint(self.path)
        unused = sorted(set(weights) - set(ckpt.shards()))
        if unused:
            raise UnsupportedFormat(
                f"{unused[0]} is not part of the checkpoint ({FINETUNE_SINGLE}, or the shards {FINETUNE_INDEX} lists)",
                param=unused[0],
            )
        check_matches_base(spec, ckpt, AdapterMismatch)

    # --- committing (used by Registry) ---------------------------------------------------------------

    def payload(self, kind: str) -> Path:
        """What a commit moves into the blob store for a delta of `kind`: for "lora" and "ia3" the directory itself
        (it must hold exactly adapter_config.json and adapter_model.safetensors), for "bitdelta" its one
        file (any name: an upload's or a compression's output). ValueError for any other layout (a bug of
        the caller: validate first)."""
        self._check_open()
        names = self._listing()
        if kind in PEFT_FORMATS:
            if names != sorted([LORA_CONFIG, LORA_WEIGHTS]):
                raise ValueError(f"a PEFT adapter staging must hold exactly {LORA_CONFIG} and {LORA_WEIGHTS}, it holds {names}")
            return self.path
        if kind == "bitdelta":
            if len(names) != 1:
                raise ValueError(f"a 1-bit delta staging must hold exactly one file, it holds {names}")
            return self.path / names[0]
        raise ValueError(f"unknown delta kind {kind!r}")

    def fsync(self) -> None:
        """Flushes every file and the directory itself to disk (before a commit renames them)."""
        for n in self._listing():
            fd = os.open(self.path / n, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.path)


class UploadWriter:
    """One file being received into a Staging (from `Staging.open_file`). Not thread-safe.

    write(data): appends bytes; raises UploadTooLarge (param "files") as soon as the upload's total
    would pass the staging's max_bytes, after discarding the whole staging.
    close(): finishes the file and returns its size. abort(): deletes the partial file.
    As a context manager it closes on success and aborts on error.
    """

    def __init__(self, staging: Staging, filename: str, fd: int):
        self._staging = staging
        self.filename = filename
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self.written = 0

    def __enter__(self) -> UploadWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise ValueError(f"{self.filename} is closed")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"upload chunks must be bytes, got {type(data).__name__}")
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        staging = self._staging
        total = staging.size_bytes + self.written + n
        if total > staging.max_bytes:
            self.abort()
            staging.discard()
            raise UploadTooLarge(f"upload is larger than the limit of {staging.max_bytes} bytes", "files")
        if staging.quota_bytes is not None and total > staging.quota_bytes:
            self.abort()
            staging.discard()
            raise InsufficientStorage(
                f"the upload does not fit the tenant's storage quota ({staging.quota_bytes} bytes left)", "files"
            )
        try:
            self._file.write(data)
        except OSError as e:
            self.abort()
            staging.discard()
            if is_disk_full(e):
                raise InsufficientStorage("the registry's disk is full; the upload was not stored", "files") from None
            raise
        self.written += n

    def close(self) -> int:
        if self._file is None:
            raise ValueError(f"{self.filename} is closed")
        try:
            self._file.close()  # the last buffered bytes are written here: a full disk can show up now
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and is_disk_full(e):
                self._staging.discard()
                raise InsufficientStorage("the registry's disk is full; the upload was not stored", "files") from None
            raise
        self._file = None
        self._staging._received(self.filename, self.written)
        return self.written

    def abort(self) -> None:
        """Deletes the partial file (idempotent; a closed file is kept)."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = None
        with contextlib.suppress(OSError):
            (self._staging.path / self.filename).unlink()
