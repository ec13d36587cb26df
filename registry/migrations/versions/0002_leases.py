"""Several processes share one registry: a lease per open registry, the lease compressing each version, and the
catalog's identity, whose row also serialises placing and removing blobs (registry.schema says what each is for).

Revision ID: 0002
Revises: 0001
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("lease", sa.Text))
    op.create_table(
        "leases",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("pids", sa.Text, nullable=False),
        sa.Column("pid_started", sa.BigInteger),
        sa.Column("started", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger, nullable=False),
    )
    info = op.create_table(
        "catalog_info",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("catalog_id", sa.Text, nullable=False),
        sa.Column("store_writes", sa.BigInteger, nullable=False),
        sa.Column("blob_store", sa.Text),
    )
    op.bulk_insert(info, [{"id": 1, "catalog_id": "cat-" + secrets.token_hex(12), "store_writes": 0}])
