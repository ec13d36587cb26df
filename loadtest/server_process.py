"""`deltaserve serve` in a process of its own, for measurements and tests that need a real one (or a cluster):
started on a free port, ready when /ready says so, stopped with its whole process group (a cluster's driver
takes its local Ray cluster down with it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, registry: Path, *args: str, admin_key: str, timeout: float = 300):
        """registry: its folder (the log goes beside it, <registry>.log). args: more `deltaserve serve` flags
        (without --model: the embedded demo, whose tenant key is read from the log)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(registry.parent / f"{registry.name}.log", "w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--registry", str(registry), "--port", str(self.port), *args],
            env={**os.environ, "DELTASERVE_ADMIN_KEY": admin_key, "RAY_DEDUP_LOGS": "0"}, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                output = self.output()
                self.log.close()
                raise RuntimeError(f"deltaserve serve exited: {output}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"deltaserve serve not ready after {timeout} s: {self.output()}")
            time.sleep(0.5)
        self.demo_key = next((line.rsplit(": ", 1)[1].strip() for line in self.output(whole=True).splitlines()
                              if "demo tenant created" in line), None)  # fmt: skip

    def output(self, whole: bool = False) -> str:
        """The log (its last 20,000 characters unless `whole`: a cluster's start-up writes much)."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return text if whole else text[-20000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()
