"""Payee webhooks, with the position each one's deliveries stand at.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("webhook_id", sa.String(32), primary_key=True),
        sa.Column("payee", sa.String(42), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("secret", sa.String(80), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at_us", sa.BigInteger(), nullable=True),
        sa.Column("after_payment", sa.BigInteger(), nullable=False),
        sa.Column("after_block", sa.BigInteger(), nullable=False),
        sa.Column("after_log", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_us", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.create_index("ix_webhooks_payee", "webhooks", ["payee"])


def downgrade() -> None:
    op.drop_index("ix_webhooks_payee", table_name="webhooks")
    op.drop_table("webhooks")
