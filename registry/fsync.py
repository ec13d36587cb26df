"""Durability on a real disk: the last step of atomic writes (fsync of the directory), and a reserve of space
for the day the disk is full. No torch here: the catalog, which must import without torch, uses it too."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from registry.errors import InsufficientStorage

T = TypeVar("T")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes a rename or a new entry in directory `path` durable: the last step of every atomic write."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskReserve:
    """A file of `nbytes` kept on the disk and given up when it is full, so that what frees space (a delete,
    whose SQLite journal needs a few pages) can still be written."""

    def __init__(self, path: Path, nbytes: int):
        self.path = path
        self.nbytes = nbytes

    def ensure(self) -> None:
        """Keeps the reserve (best effort: nothing if there is no room for it)."""
        if self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return
        os.close(fd)

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args); when the disk is full (InsufficientStorage), once more after giving up the reserve, which
        is then taken again if it fits."""
        try:
            return fn(*args)
        except InsufficientStorage:
            if not self.path.exists():
                raise
            self.path.unlink(missing_ok=True)  # another process of the registry may have given it up first
            try:
                return fn(*args)
            finally:
                self.ensure()
