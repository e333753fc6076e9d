"""SQLite keeps amounts as integers below 2^63 and 32-byte blobs above, not 78-digit text (issue 20: ~230 bytes less
per payment); PostgreSQL is unchanged.

Each table with amounts is rebuilt twice (SQLite changes a column or a CHECK only by copying the table): once to
drop the text form's CHECKs and retype the columns, then, with the values converted in place, once to add the new
CHECKs. settlement.store.types says why the two forms keep numeric order.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from settlement.store.types import AMOUNT_DIGITS, Amount, TextAmount, amount_checks, sqlite_amount, text_amount_checks

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# table -> (its amount columns, those with a CHECK of their own, its other CHECKs written against the text form)
_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]] = {
    "channels": (
        ("deposit", "settled", "accepted"),
        ("deposit", "settled", "accepted"),
        {"accepted_signed_lite": "(accepted = 0) = (signature IS NULL)"},
    ),
    "payments": (
        ("cumulative", "increment", "remaining"),
        ("cumulative", "increment", "remaining"),
        {"increment_positive_lite": "increment > 0 AND increment <= cumulative"},
    ),
    "settlement_batches": (("gas_price",), (), {}),
    "settlement_entries": (("cumulative",), (), {}),
    "settlement_txs": (("max_fee", "priority_fee"), (), {}),
    "spending_caps": (("amount",), ("amount",), {}),
    "spend_windows": (("spent",), ("spent",), {}),
}


def _compact(stored: str | None) -> int | bytes | None:
    return None if stored is None else sqlite_amount(int(stored))


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    driver = bind.connection.driver_connection
    assert driver is not None
    driver.create_function("compact_amount", 1, _compact, deterministic=True)
    for table, (columns, checked, others) in _TABLES.items():
        with op.batch_alter_table(table, recreate="always") as batch:
            for column in checked:
                batch.drop_constraint(f"{column}_amount_lite", type_="check")  # the convention adds ck_<table>_
            for name in others:
                batch.drop_constraint(name, type_="check")
            for column in columns:
                batch.alter_column(column, type_=Amount(), existing_type=sa.String(78))
        assignments = ", ".join(f"{column} = compact_amount({column})" for column in columns)
        op.execute(f"UPDATE {table} SET {assignments}")
        with op.batch_alter_table(table, recreate="always") as batch:
            for column in checked:
                batch.create_check_constraint(f"{column}_amount_lite", sa.text(amount_checks(column)[1]))
            for name, condition in others.items():
                batch.create_check_constraint(name, sa.text(condition))


def _text(stored: int | bytes | str | None) -> str | None:
    if stored is None:
        return None
    value = int.from_bytes(stored, "big") if isinstance(stored, bytes) else int(stored)
    return f"{value:0{AMOUNT_DIGITS}d}"


def downgrade() -> None:
    """Back to 78-digit text, by two rebuilds as well."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    driver = bind.connection.driver_connection
    assert driver is not None
    driver.create_function("text_amount", 1, _text, deterministic=True)
    zero = f"'{0:0{AMOUNT_DIGITS}d}'"
    text_forms = {
        "accepted_signed_lite": f"(accepted = {zero}) = (signature IS NULL)",
        "increment_positive_lite": f"increment > {zero} AND increment <= cumulative",
    }
    for table, (columns, checked, others) in _TABLES.items():
        with op.batch_alter_table(table, recreate="always") as batch:
            for column in checked:
                batch.drop_constraint(f"{column}_amount_lite", type_="check")
            for name in others:
                batch.drop_constraint(name, type_="check")
        # Converted before the column is retyped: the rebuild copies a retyped column through a CAST, and a blob cast
        # to text is not its number.
        assignments = ", ".join(f"{column} = text_amount({column})" for column in columns)
        op.execute(f"UPDATE {table} SET {assignments}")
        with op.batch_alter_table(table, recreate="always") as batch:
            for column in columns:
                batch.alter_column(column, type_=TextAmount(), existing_type=Amount())
            for column in checked:
                batch.create_check_constraint(f"{column}_amount_lite", sa.text(text_amount_checks(column)[1]))
            for name in others:
                batch.create_check_constraint(name, sa.text(text_forms[name]))
