"""Risk controls: channels the operator holds, and the risk events the monitor records.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "channel_holds",
        sa.Column("channel_id", sa.String(66), primary_key=True),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("held_at_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "risk_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at_us", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payer", sa.String(42), nullable=True),
        sa.Column("channel_id", sa.String(66), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("risk_events")
    op.drop_table("channel_holds")
