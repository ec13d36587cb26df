"""Durability of atomic writes (temporary file, fsync, rename, then the directory). No torch here: the
catalog, which must import without torch, uses it too."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes a rename or a new entry in directory `path` durable: the last step of every atomic write."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
