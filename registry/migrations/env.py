"""Alembic's entry point: runs the revisions on the connection registry.database.migrate hands it (never a URL of
its own: the catalog's engine, with its SQLite pragmas, is the only way in)."""

from alembic import context

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot alter a column or a constraint in place; Alembic's batch mode copies the table
# there (and alters in place on PostgreSQL), so one revision serves both.
context.configure(connection=connection, target_metadata=None, render_as_batch=True,
                  version_table=context.config.attributes["version_table"])
with context.begin_transaction():
    context.run_migrations()
