"""A small client of the deltaserve HTTP API, for `deltaserve tenants ...` and `deltaserve adapters ...`.

No torch: these commands run on any machine that can reach the server.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_SUFFIXES = (".json", ".safetensors")


class ClientError(Exception):
    """The server answered with an error (its message), or could not be reached."""


class Client:
    def __init__(self, url: str | None, key: str | None, key_env: str):
        self.url = (url or os.environ.get("DELTASERVE_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get(key_env)
        if not key:
            raise ClientError(f"no API key: pass --key or set {key_env}")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=600)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise ClientError(f"{r.status_code}: {message}")
        return r


def upload_files(path: Path) -> list[Path]:
    """The files of an adapter directory (or the one file) that an upload carries: weights and configs."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ClientError(f"no such file or directory: {path}")
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in UPLOAD_SUFFIXES]
    if not files:
        raise ClientError(f"{path} holds no .json or .safetensors files")
    return files


class _Progress:
    """A file object that reports what httpx has read of it to a tqdm bar (uploads stream, never whole)."""

    def __init__(self, path: Path, bar):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by push()
        self._bar = bar

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.update(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1 << 20):
            yield chunk

    def close(self) -> None:
        self._f.close()


def push(client: Client, path: Path, name: str, fmt: str) -> dict:
    from tqdm import tqdm

    files = upload_files(path)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {name}", disable=not sys.stderr.isatty()) as bar:
        handles = [_Progress(p, bar) for p in files]
        try:
            parts = [("files", (p.name, h, "application/octet-stream")) for p, h in zip(files, handles)]
            return client.call("POST", "/v1/adapters", data={"name": name, "format": fmt}, files=parts).json()
        finally:
            for h in handles:
                h.close()
