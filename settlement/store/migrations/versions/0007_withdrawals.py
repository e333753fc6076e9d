"""Withdrawn events name their account in a column of their own, so a payee's withdrawals are one indexed lookup.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chain_events") as batch:
        batch.add_column(sa.Column("account", sa.String(42), nullable=True))
    events = sa.table(
        "chain_events",
        sa.column("block_number", sa.BigInteger()),
        sa.column("log_index", sa.Integer()),
        sa.column("event", sa.String(64)),
        sa.column("args", sa.Text()),
        sa.column("account", sa.String(42)),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(events.c.block_number, events.c.log_index, events.c.args).where(events.c.event == "Withdrawn")
    ).all()
    for block_number, log_index, args in rows:  # withdrawals indexed before this revision
        conn.execute(
            sa.update(events)
            .where(events.c.block_number == block_number, events.c.log_index == log_index)
            .values(account=json.loads(args)["account"])
        )
    # Partial: only withdrawals carry an account; every other event costs the index nothing.
    op.create_index(
        "ix_chain_events_account",
        "chain_events",
        ["account"],
        sqlite_where=sa.text("account IS NOT NULL"),
        postgresql_where=sa.text("account IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_chain_events_account", table_name="chain_events")
    with op.batch_alter_table("chain_events") as batch:
        batch.drop_column("account")
