"""Test-wide set-up: Triton's interpreter on machines without a GPU, deterministic CPU math."""

import os
import shutil
import subprocess

# Must be set before triton is first imported: without a GPU, Triton kernels run in its interpreter on CPU tensors.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Property tests (hypothesis): 300 random cases each by default; scripts/mutation.sh runs them with fewer, per mutant.
from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=300)
settings.register_profile("mutation", max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "/gpu/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (tests/postgres.py); the test skips, saying why, where it cannot run."""
    from tests.postgres import PostgresServer

    try:
        server = PostgresServer()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no PostgreSQL server for this test: {e}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (tests/s3.py: moto), its endpoint and test credentials in the environment for boto3;
    the test skips, saying why, where moto is not installed."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra has it)")
    from tests.s3 import S3Server

    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
