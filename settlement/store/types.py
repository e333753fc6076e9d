"""Column types: amounts are NUMERIC(78,0) on PostgreSQL and fixed-width decimal text on SQLite.

SQLite gives a NUMERIC column numeric affinity and turns any integer above 2^63 into a REAL, losing digits; so there
the amount is stored as its 78-digit zero-padded decimal text. Padding keeps text order equal to numeric order, so
comparisons and CHECK constraints written against the column work on both databases.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import NUMERIC, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

AMOUNT_DIGITS = 78  # len(str(2**256 - 1))
MAX_AMOUNT = 2**256 - 1


class Amount(TypeDecorator[int]):
    """A non-negative integer below 2^256, exact on every backend."""

    impl = NUMERIC(AMOUNT_DIGITS, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(AMOUNT_DIGITS))
        return dialect.type_descriptor(NUMERIC(AMOUNT_DIGITS, 0))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return sqlite_amount(value)
        _check(value)
        return Decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


def sqlite_amount(value: int) -> str:
    """An amount as SQLite stores it: 78-digit zero-padded decimal text."""
    _check(value)
    return f"{value:0{AMOUNT_DIGITS}d}"


def _check(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"amount must be an int in [0, 2^256): {value!r}")


def amount_checks(column: str) -> tuple[str, str]:
    """CHECK expressions (postgresql, sqlite) that keep `column` a valid amount."""
    return (
        f"{column} >= 0",
        f"length({column}) = {AMOUNT_DIGITS} AND {column} NOT GLOB '*[^0-9]*'",
    )
