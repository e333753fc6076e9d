"""Payments name their channel by a number, not by its 66-character id (issue 20: ~120 bytes less per payment).

Each channel gets `channel_no`, an integer unique in the store (PostgreSQL: an identity column; SQLite: given on
insert); payments keep it instead of the channel id, in the row and in both unique indexes. Existing payments are
converted in place.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_KEYED = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    lite = op.get_bind().dialect.name == "sqlite"
    if lite:
        # SQLite adds a column NOT NULL only with a default: add it, number the rows, then rebuild the table with the
        # constraint (Database.migrate runs SQLite's migrations with foreign keys off, checked at the end).
        op.add_column("channels", sa.Column("channel_no", sa.Integer(), nullable=True))
        op.execute("UPDATE channels SET channel_no = rowid")
        with op.batch_alter_table("channels", recreate="always") as batch:
            batch.alter_column("channel_no", existing_type=sa.Integer(), nullable=False)
            batch.create_unique_constraint("uq_channels_channel_no", ["channel_no"])
    else:
        op.add_column("channels", sa.Column("channel_no", sa.BigInteger(), sa.Identity(), nullable=False))
        op.create_unique_constraint("uq_channels_channel_no", "channels", ["channel_no"])

    op.drop_index("uq_payments_channel_id_idempotency_key", table_name="payments")
    op.add_column("payments", sa.Column("channel_no", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE payments SET channel_no ="
        " (SELECT c.channel_no FROM channels c WHERE c.channel_id = payments.channel_id)"
    )
    with op.batch_alter_table("payments", recreate="always" if lite else "auto") as batch:
        batch.drop_constraint("uq_payments_channel_id_cumulative", type_="unique")
        batch.drop_constraint("fk_payments_channel_id_channels", type_="foreignkey")
        batch.drop_column("channel_id")
        batch.alter_column("channel_no", existing_type=sa.BigInteger(), nullable=False)
        batch.create_unique_constraint("uq_payments_channel_no_cumulative", ["channel_no", "cumulative"])
        batch.create_foreign_key("fk_payments_channel_no_channels", "channels", ["channel_no"], ["channel_no"])
    op.create_index(
        "uq_payments_channel_no_idempotency_key",
        "payments",
        ["channel_no", "idempotency_key"],
        unique=True,
        sqlite_where=_KEYED,
        postgresql_where=_KEYED,
    )


def downgrade() -> None:
    """Payments name their channel by its id again; the channels lose their numbers."""
    lite = op.get_bind().dialect.name == "sqlite"
    op.drop_index("uq_payments_channel_no_idempotency_key", table_name="payments")
    op.add_column("payments", sa.Column("channel_id", sa.String(66), nullable=True))
    op.execute(
        "UPDATE payments SET channel_id ="
        " (SELECT c.channel_id FROM channels c WHERE c.channel_no = payments.channel_no)"
    )
    with op.batch_alter_table("payments", recreate="always" if lite else "auto") as batch:
        batch.drop_constraint("uq_payments_channel_no_cumulative", type_="unique")
        batch.drop_constraint("fk_payments_channel_no_channels", type_="foreignkey")
        batch.drop_column("channel_no")
        batch.alter_column("channel_id", existing_type=sa.String(66), nullable=False)
        batch.create_unique_constraint("uq_payments_channel_id_cumulative", ["channel_id", "cumulative"])
        batch.create_foreign_key("fk_payments_channel_id_channels", "channels", ["channel_id"], ["channel_id"])
    op.create_index(
        "uq_payments_channel_id_idempotency_key",
        "payments",
        ["channel_id", "idempotency_key"],
        unique=True,
        sqlite_where=_KEYED,
        postgresql_where=_KEYED,
    )
    with op.batch_alter_table("channels", recreate="always" if lite else "auto") as batch:
        batch.drop_constraint("uq_channels_channel_no", type_="unique")
        batch.drop_column("channel_no")
