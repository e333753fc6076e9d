"""Spending caps: what a payer may spend on a payee's channels (or on every payee's) per window, and what it spent.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from settlement.store.types import TextAmount as Amount  # the form of its time: 0014 converts it
from settlement.store.types import text_amount_checks as amount_checks

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _money(column: str) -> sa.CheckConstraint:
    lite = op.get_bind().dialect.name == "sqlite"
    return sa.CheckConstraint(
        amount_checks(column)[1 if lite else 0], name=f"{column}_amount_{'lite' if lite else 'pg'}"
    )


def upgrade() -> None:
    op.create_table(
        "spending_caps",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("payee", sa.String(42), nullable=False),
        sa.Column("payer", sa.String(42), nullable=False),
        sa.Column("token", sa.String(42), nullable=False),
        sa.Column("amount", Amount(), nullable=False),
        sa.Column("window_seconds", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint(
            "payee", "payer", "token", "window_seconds", name="uq_spending_caps_payee_payer_token_window_seconds"
        ),
        sa.CheckConstraint("window_seconds > 0", name="window_positive"),
        _money("amount"),
    )
    op.create_table(
        "spend_windows",
        sa.Column("cap_id", sa.BigInteger(), primary_key=True),
        sa.Column("payer", sa.String(42), primary_key=True),
        sa.Column("window_start", sa.BigInteger(), primary_key=True),
        sa.Column("window_end", sa.BigInteger(), nullable=False),
        sa.Column("spent", Amount(), nullable=False),
        _money("spent"),
    )
    op.create_index("ix_spend_windows_window_end", "spend_windows", ["window_end"])


def downgrade() -> None:
    op.drop_table("spend_windows")
    op.drop_table("spending_caps")
