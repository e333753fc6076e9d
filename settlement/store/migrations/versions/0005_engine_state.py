"""What the settlement engine must remember across a failover: when each alert last fired, since when a batch's
nonce has looked used by another transaction, and which settlement of a close an entry was (a close is settled at
most twice: when it is seen, and when ingest stops taking its vouchers).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_alerts",
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(66), nullable=False),
        sa.Column("last_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "subject", name="pk_engine_alerts"),
    )
    with op.batch_alter_table("settlement_batches") as batch:
        batch.add_column(sa.Column("nonce_used_since_us", sa.BigInteger(), nullable=True))
    # The engine reads the newest batch every tick, and the last hour's spend at every regular check.
    op.create_index("ix_settlement_batches_created_at_us", "settlement_batches", ["created_at_us"])
    op.create_index("ix_settlement_batches_updated_at_us", "settlement_batches", ["updated_at_us"])
    with op.batch_alter_table("settlement_entries") as batch:
        batch.add_column(sa.Column("close_phase", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("settlement_entries") as batch:
        batch.drop_column("close_phase")
    op.drop_index("ix_settlement_batches_updated_at_us", table_name="settlement_batches")
    op.drop_index("ix_settlement_batches_created_at_us", table_name="settlement_batches")
    with op.batch_alter_table("settlement_batches") as batch:
        batch.drop_column("nonce_used_since_us")
    op.drop_table("engine_alerts")
