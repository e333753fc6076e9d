"""Payments carry the client's idempotency key, unique per channel: a retried payment is recognised as the same one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(64), nullable=True))
    # Partial: payments without a key (most of the hot path's) cost the index nothing.
    op.create_index(
        "uq_payments_channel_id_idempotency_key",
        "payments",
        ["channel_id", "idempotency_key"],
        unique=True,
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_payments_channel_id_idempotency_key", table_name="payments")
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("idempotency_key")
