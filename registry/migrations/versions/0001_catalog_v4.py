"""The catalog as deltaserve kept it before Alembic (SQLite schema 4): tenants, adapter versions, token usage.

A SQLite catalog written before Alembic is brought to this point by registry.migrations.legacy_sqlite and stamped
with this revision; every later change is a revision after it.

Revision ID: 0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, sa.ForeignKey("tenants.name", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("format", sa.Text, sa.CheckConstraint("format IN ('lora', 'ia3', 'bitdelta', 'finetune')"),
                  nullable=False),
        sa.Column("version", sa.Integer, sa.CheckConstraint("version >= 1"), nullable=False),
        sa.Column("sha256", sa.Text),
        sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('ready', 'compressing', 'failed')"),
                  nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("rank", sa.Integer),
        sa.Column("blob", sa.Text),
        sa.Column("source_blob", sa.Text),
        sa.Column("source_bytes", sa.BigInteger),
        sa.Column("fidelity", sa.Text),
        sa.UniqueConstraint("tenant", "name", "version"),
        sa.CheckConstraint("(status = 'ready') = (blob IS NOT NULL)"),
    )
    op.create_index("adapters_blob", "adapters", ["blob"])
    op.create_index("adapters_source_blob", "adapters", ["source_blob"])
    op.create_table(
        "usage",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("adapter", sa.Text, primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    )
    op.create_index("usage_hour", "usage", ["hour"])
