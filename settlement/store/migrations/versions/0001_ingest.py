"""Ingest: channels, payments, and the indexer's events, blocks and cursor.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

CHECK constraint names are bare: the naming convention of settlement.store.tables adds the ck_<table>_ prefix.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from settlement.store.types import TextAmount as Amount  # the form of its time: 0014 converts it
from settlement.store.types import text_amount_checks as amount_checks

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ZERO = f"'{0:078d}'"


def _money(*columns: str) -> list[sa.CheckConstraint]:
    lite = op.get_bind().dialect.name == "sqlite"
    suffix = "lite" if lite else "pg"
    return [sa.CheckConstraint(amount_checks(c)[1 if lite else 0], name=f"{c}_amount_{suffix}") for c in columns]


def upgrade() -> None:
    lite = op.get_bind().dialect.name == "sqlite"
    zero = ZERO if lite else "0"
    suffix = "lite" if lite else "pg"
    op.create_table(
        "channels",
        sa.Column("channel_id", sa.String(66), nullable=False),
        sa.Column("payer", sa.String(42), nullable=False),
        sa.Column("payee", sa.String(42), nullable=False),
        sa.Column("token", sa.String(42), nullable=False),
        sa.Column("salt", sa.String(66), nullable=False),
        sa.Column("deposit", Amount(), nullable=False),
        sa.Column("settled", Amount(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("close_deadline", sa.BigInteger(), nullable=True),
        sa.Column("as_of_block", sa.BigInteger(), nullable=False),
        sa.Column("accepted", Amount(), nullable=False),
        sa.Column("signature", sa.LargeBinary(65), nullable=True),
        sa.Column("suspended_reason", sa.Text(), nullable=True),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("channel_id", name="pk_channels"),
        sa.CheckConstraint("status IN (1, 2, 3)", name="status"),
        sa.CheckConstraint("settled <= deposit", name="settled_le_deposit"),
        sa.CheckConstraint(f"(accepted = {zero}) = (signature IS NULL)", name=f"accepted_signed_{suffix}"),
        *_money("deposit", "settled", "accepted"),
    )
    op.create_index("ix_channels_payer", "channels", ["payer"])
    op.create_index("ix_channels_payee_token", "channels", ["payee", "token"])
    op.create_table(
        "payments",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("channel_id", sa.String(66), nullable=False),
        sa.Column("cumulative", Amount(), nullable=False),
        sa.Column("increment", Amount(), nullable=False),
        sa.Column("remaining", Amount(), nullable=False),
        sa.Column("signature", sa.LargeBinary(65), nullable=False),
        sa.Column("reference", sa.String(256), nullable=True),
        sa.Column("accepted_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_payments"),
        sa.ForeignKeyConstraint(["channel_id"], ["channels.channel_id"], name="fk_payments_channel_id_channels"),
        sa.UniqueConstraint("channel_id", "cumulative", name="uq_payments_channel_id_cumulative"),
        sa.CheckConstraint(
            f"increment > {zero} AND increment <= cumulative",
            name="increment_positive" + ("_lite" if lite else ""),
        ),
        *_money("cumulative", "increment", "remaining"),
    )
    op.create_index("ix_payments_channel_id_id", "payments", ["channel_id", "id"])
    op.create_table(
        "chain_events",
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("log_index", sa.Integer(), nullable=False),
        sa.Column("block_hash", sa.String(66), nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("channel_id", sa.String(66), nullable=True),
        sa.Column("args", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("block_number", "log_index", name="pk_chain_events"),
    )
    op.create_index("ix_chain_events_channel_id", "chain_events", ["channel_id"])
    op.create_table(
        "indexed_blocks",
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(66), nullable=False),
        sa.PrimaryKeyConstraint("number", name="pk_indexed_blocks"),
    )
    op.create_table(
        "indexer_cursor",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.String(66), nullable=True),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_indexer_cursor"),
    )


def downgrade() -> None:
    for table in ("indexer_cursor", "indexed_blocks", "chain_events", "payments", "channels"):
        op.drop_table(table)
