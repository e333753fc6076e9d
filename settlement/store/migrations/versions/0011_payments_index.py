"""Payments lose their (channel_id, id) index: the unique (channel_id, cumulative) index orders a channel's payments
the same way (issue 20: ~90 bytes and one index write per stored payment).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_payments_channel_id_id", table_name="payments")


def downgrade() -> None:
    op.create_index("ix_payments_channel_id_id", "payments", ["channel_id", "id"])
