"""Helpers of the API tests: uploads over HTTP, SSE reading, reference tokens."""

from __future__ import annotations

import json
from pathlib import Path

import httpx


def upload(client: httpx.Client, name: str, fmt: str, path: Path) -> httpx.Response:
    """POST /v1/adapters with the weights and configs of `path` (a directory) or the file itself."""
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".json", ".safetensors")] if path.is_dir() else [path]
    parts = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in files]
    return client.post("/v1/adapters", data={"name": name, "format": fmt}, files=parts)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response ("[DONE]" kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
