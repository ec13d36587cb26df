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


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """A registry with its catalog in SQLite (the default) and, the same tests again, in a real PostgreSQL."""
    catalog = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    with Registry(tmp_path / "reg", catalog=catalog) as r:
        yield r
