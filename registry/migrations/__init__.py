"""The catalog's migrations (Alembic): revisions under versions/, run by registry.database.migrate."""
