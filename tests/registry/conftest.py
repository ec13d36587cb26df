"""Fixtures of the registry tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.catalog import Registry
from tests.registry.assets import Assets, build_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return build_assets(tmp_path_factory)


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+s3"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """A registry with its catalog in SQLite (the default) and, the same tests again, in a real PostgreSQL, and
    in PostgreSQL with the blobs in an S3-compatible store (tests/s3.py)."""
    catalog = request.getfixturevalue("postgres").new_database() if "postgresql" in request.param else None
    blob_store = request.getfixturevalue("s3").new_bucket() if "s3" in request.param else None
    with Registry(tmp_path / "reg", catalog=catalog, blob_store=blob_store) as r:
        yield r
