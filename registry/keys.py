"""API keys: how they are made, stored (only as sha256 hashes) and compared, and the admin key's file.

A key is 256 random bits, so a plain sha256 is enough to store it; it is shown once, when created, and never
logged. Comparisons are constant-time (hmac.compare_digest) on the hashes. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

from registry.fsync import fsync_dir

MIN_ADMIN_KEY_LENGTH = 16
ADMIN_KEY_FILE = "admin_key.sha256"
MAX_KEY_LENGTH = 512  # longer "keys" are refused before hashing: no key we make is near it
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ADMIN_KEY_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: a valid HTTP header token


def hash_key(key: str) -> str:
    """What is stored of a key: its sha256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def plausible_key(key: object) -> bool:
    """Whether `key` could be one of ours at all (a non-empty string of sane length): checked before hashing."""
    return isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH


def new_tenant_key() -> str:
    """A tenant's API key: "ds-" + 32 random bytes, urlsafe base64."""
    return "ds-" + secrets.token_urlsafe(32)


def is_sha256_hex(text: object) -> bool:
    return isinstance(text, str) and _HEX64.fullmatch(text) is not None


def write_private(path: Path, data: bytes) -> None:
    """Writes a small file atomically with mode 0600 (temp file, fsync, rename, fsync directory)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class AdminKey:
    """The admin key of one registry directory: its hash lives in `root`/admin_key.sha256 (mode 0600)."""

    def __init__(self, root: Path):
        self.path = root / ADMIN_KEY_FILE
        self._hash = self._read_hash()

    def ensure(self, given: str | None) -> str | None:
        """Sets up the admin key; returns the plaintext key only when it was generated now (print it once).

        given (from --admin-key or DELTASERVE_ADMIN_KEY): becomes the admin key; its sha256 (never the key) is
        stored in admin_key.sha256, replacing any earlier one, so every Registry opened on this directory later
        recognises it, also without `given`. It must be at least 16 printable ASCII characters without spaces
        (ValueError otherwise).
        Else, if admin_key.sha256 exists, the key it hashes is the admin key (ValueError if the file is not a
        sha256 hex digest). Else a key is generated ("ds-admin-" + 32 random bytes, urlsafe base64), its hash
        stored the same way, and the key returned.
        """
        if given is not None:
            if len(given) < MIN_ADMIN_KEY_LENGTH or not _ADMIN_KEY_RE.fullmatch(given):
                raise ValueError(
                    f"the admin key must be at least {MIN_ADMIN_KEY_LENGTH} printable ASCII characters without spaces"
                )
            digest = hash_key(given)
            if self._read_hash() != digest:
                write_private(self.path, (digest + "\n").encode("ascii"))
            self._hash = digest
            return None
        if self.path.exists():
            stored = self._read_hash()
            if stored is None:
                raise ValueError(f"{self.path} does not hold a sha256 hex digest; delete it to generate a new admin key")
            os.chmod(self.path, 0o600)
            self._hash = stored
            return None
        return self.reset()

    def adopt(self, digest: str) -> None:
        """Keeps `digest` (another machine's stored hash of the admin key, e.g. a cluster head's) as this folder's."""
        if not is_sha256_hex(digest):
            raise ValueError("an admin key's hash is 64 lowercase hex digits")
        if self._read_hash() != digest:
            write_private(self.path, (digest + "\n").encode("ascii"))
        self._hash = digest

    def reset(self) -> str:
        """A new generated admin key replaces the stored one (a lost key); returns it (print it once)."""
        key = "ds-admin-" + secrets.token_urlsafe(32)
        write_private(self.path, (hash_key(key) + "\n").encode("ascii"))
        self._hash = hash_key(key)
        return key

    def matches(self, key: str | None) -> bool:
        """Whether `key` is the admin key: the one stored when the registry was opened, or set by `ensure`.
        False if there is none."""
        if self._hash is None or not plausible_key(key):
            return False
        assert key is not None
        return hmac.compare_digest(hash_key(key), self._hash)

    def _read_hash(self) -> str | None:
        """The stored hash, or None if there is no file or it is not a sha256 hex digest."""
        try:
            stored = self.path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        return stored if is_sha256_hex(stored) else None
