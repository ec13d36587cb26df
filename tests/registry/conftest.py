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


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "reg") as r:
        yield r
