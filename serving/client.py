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
        return self.check(r)

    @staticmethod
    def check(r: httpx.Response) -> httpx.Response:
        """`r`, or ClientError with the server's error message (CONTRACT §3's `error.message`)."""
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


def push(client: Client, path: Path, name: str, fmt: str, fields: dict | None = None,
         calibration_text: str | None = None) -> dict:  # fmt: skip
    """Uploads `path`; fields: a fine-tune's scale / distill_steps, calibration_text sent as the `calibration` part."""
    from tqdm import tqdm

    files = upload_files(path)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {name}", disable=not sys.stderr.isatty()) as bar:
        handles = [_Progress(p, bar) for p in files]
        try:
            parts = [("files", (p.name, h, "application/octet-stream")) for p, h in zip(files, handles)]
            if calibration_text is not None:
                parts.append(("calibration", ("calibration.txt", calibration_text.encode("utf-8"), "text/plain")))
            data = {"name": name, "format": fmt, **{k: str(v) for k, v in (fields or {}).items()}}
            return client.call("POST", "/v1/adapters", data=data, files=parts).json()
        finally:
            for h in handles:
                h.close()


class _StreamReader:
    """A read()-able view of a streamed response's chunks, for tarfile's stream mode (never the whole body)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = bytearray()
        self._pos = 0  # what was read of _buf (dropped when the next chunk comes: no copy per read)

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) - self._pos < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            del self._buf[: self._pos]
            self._pos = 0
            self._buf += chunk
        end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
        data = bytes(self._buf[self._pos : end])
        self._pos = end
        return data


def pull(client: Client, name: str, out: Path) -> list[dict]:
    """`adapters pull`: writes the files of adapter `name`'s current version into `out` (made if missing), as
    they were uploaded. Each file is written beside its final name, checked against the sha256 the server sent
    with it, and only then renamed into place; a download that fails or ends early leaves no partial file.
    Returns [{"name", "size", "sha256"}] of the files written."""
    import hashlib
    import tarfile

    from registry.downloads import SHA256_PAX_KEY
    from registry.errors import InvalidName
    from registry.upload_formats import check_file_name

    out.mkdir(parents=True, exist_ok=True)
    written: list[dict] = []
    part: Path | None = None
    try:
        with client.http.stream("GET", f"/v1/adapters/{name}/download") as r:
            if r.status_code >= 400:
                r.read()
                client.check(r)
            with tarfile.open(fileobj=_StreamReader(r.iter_bytes()), mode="r|") as tar:
                for member in tar:
                    try:
                        check_file_name(member.name)
                    except InvalidName:
                        raise ClientError(f"the server sent a file named {member.name!r}; nothing more was written") from None
                    expected = member.pax_headers.get(SHA256_PAX_KEY)
                    if not member.isreg() or expected is None:
                        raise ClientError(f"the server sent {member.name!r} without its sha256, or not as a file")
                    part = out / f".{member.name}.part"
                    digest = hashlib.sha256()
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(part, "wb") as f:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
                    if digest.hexdigest() != expected:
                        raise ClientError(f"{member.name} arrived with sha256 {digest.hexdigest()}, not {expected}")
                    os.replace(part, out / member.name)
                    part = None
                    written.append({"name": member.name, "size": member.size, "sha256": expected})
    except httpx.HTTPError as e:
        raise ClientError(f"the download from {client.url} failed: {e}") from None
    except tarfile.TarError as e:
        raise ClientError(f"the download ended early or is malformed ({e}); {len(written)} files were complete") from None
    finally:
        if part is not None:
            part.unlink(missing_ok=True)
    return written
