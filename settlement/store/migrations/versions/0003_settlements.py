"""Settlement intents: batches, their entries, and every transaction sent for them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from settlement.store.types import TextAmount as Amount  # the form of its time: 0014 converts it

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "settlement_batches",
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sender", sa.String(42), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("gas_used", sa.BigInteger(), nullable=True),
        sa.Column("gas_price", Amount(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name="pk_settlement_batches"),
        sa.CheckConstraint("status IN ('pending', 'sent', 'confirmed', 'failed')", name="status"),
    )
    op.create_index("ix_settlement_batches_status", "settlement_batches", ["status"])
    op.create_table(
        "settlement_entries",
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("channel_id", sa.String(66), nullable=False),
        sa.Column("cumulative", Amount(), nullable=False),
        sa.Column("signature", sa.LargeBinary(65), nullable=False),
        sa.Column("outcome", sa.SmallInteger(), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", "channel_id", name="pk_settlement_entries"),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["settlement_batches.batch_id"], name="fk_settlement_entries_batch_id_settlement_batches"
        ),
        sa.ForeignKeyConstraint(
            ["channel_id"], ["channels.channel_id"], name="fk_settlement_entries_channel_id_channels"
        ),
    )
    op.create_index("ix_settlement_entries_channel_id", "settlement_entries", ["channel_id"])
    op.create_table(
        "settlement_txs",
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("max_fee", Amount(), nullable=False),
        sa.Column("priority_fee", Amount(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("sent_at_us", sa.BigInteger(), nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tx_hash", name="pk_settlement_txs"),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["settlement_batches.batch_id"], name="fk_settlement_txs_batch_id_settlement_batches"
        ),
    )
    op.create_index("ix_settlement_txs_batch_id", "settlement_txs", ["batch_id"])


def downgrade() -> None:
    for table in ("settlement_txs", "settlement_entries", "settlement_batches"):
        op.drop_table(table)
