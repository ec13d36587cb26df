"""The migrations build exactly the schema the code reads and writes (registry.schema), on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry import database
from registry.schema import metadata


@pytest.mark.parametrize("catalog", ["sqlite", "postgresql"])
def test_the_migrated_catalog_is_registry_schema(tmp_path, request, catalog) -> None:
    url = request.getfixturevalue("postgres").new_database() if catalog == "postgresql" else \
        database.sqlite_url(tmp_path / "catalog.sqlite3")  # fmt: skip
    engine = database.connect(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = [d for d in compare_metadata(context, metadata)
                           if not (d[0] == "remove_table" and d[1].name == database.VERSION_TABLE)]  # fmt: skip
        assert differences == []
        database.migrate(engine)  # a second run changes nothing and does not fail
    finally:
        engine.dispose()
