"""Column types: amounts are NUMERIC(78,0) on PostgreSQL; on SQLite an integer below 2^63, a 32-byte blob above.

SQLite keeps integers in at most 8 bytes and turns any integer at or above 2^63 into a REAL, losing digits. So an
amount below 2^63 (nearly every payment) is stored as the integer it is, and one at or above as its 32-byte big-endian
form. SQLite orders every integer before every blob and blobs of one length by their bytes, which is numeric order
for this encoding: comparisons and CHECK constraints written against the column (`settled <= deposit`, `accepted =
0`) mean the same on both databases, as long as each amount has exactly one form (a CHECK keeps blobs >= 2^63).

Before revision 0014 SQLite amounts were 78-digit zero-padded text (79 bytes each); `TextAmount` and
`text_amount_checks` are that form, for the migrations written before it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import NUMERIC, LargeBinary, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

AMOUNT_DIGITS = 78  # len(str(2**256 - 1))
MAX_AMOUNT = 2**256 - 1
_WIDE = 2**63  # from here on SQLite would make a REAL of an integer
_WIDE_BLOB = "x'" + _WIDE.to_bytes(32, "big").hex() + "'"


class _Blob(LargeBinary):
    """A BLOB column whose values reach the driver as they are (ints stay ints; LargeBinary would wrap them)."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


class Amount(TypeDecorator[int]):
    """A non-negative integer below 2^256, exact on every backend."""

    impl = NUMERIC(AMOUNT_DIGITS, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_Blob())
        return dialect.type_descriptor(NUMERIC(AMOUNT_DIGITS, 0))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return sqlite_amount(value)
        _check(value)
        return Decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else stored_amount(value)


def stored_amount(value: int | bytes | Decimal) -> int:
    """An amount as the driver returns it (SQLite's compact form, PostgreSQL's decimal) as an int."""
    return int.from_bytes(value, "big") if isinstance(value, bytes) else int(value)


def sqlite_amount(value: int) -> int | bytes:
    """An amount as SQLite stores it: the integer below 2^63, its 32 big-endian bytes above."""
    _check(value)
    return value if value < _WIDE else value.to_bytes(32, "big")


def sqlite_amount_value(stored: int | bytes) -> float:
    """An amount as SQLite stores it, roughly: what ranking needs."""
    return float(int.from_bytes(stored, "big") if isinstance(stored, bytes) else stored)


def _check(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"amount must be an int in [0, 2^256): {value!r}")


def amount_checks(column: str) -> tuple[str, str]:
    """CHECK expressions (postgresql, sqlite) that keep `column` a valid amount, in one form only."""
    return (
        f"{column} >= 0",
        f"(typeof({column}) = 'integer' AND {column} >= 0)"
        f" OR (typeof({column}) = 'blob' AND length({column}) = 32 AND {column} >= {_WIDE_BLOB})",
    )


class TextAmount(TypeDecorator[int]):
    """SQLite's amount column before revision 0014 (78-digit text); PostgreSQL's is unchanged."""

    impl = NUMERIC(AMOUNT_DIGITS, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(AMOUNT_DIGITS))
        return dialect.type_descriptor(NUMERIC(AMOUNT_DIGITS, 0))


def text_amount_checks(column: str) -> tuple[str, str]:
    """The CHECK expressions of revisions before 0014."""
    return (
        f"{column} >= 0",
        f"length({column}) = {AMOUNT_DIGITS} AND {column} NOT GLOB '*[^0-9]*'",
    )
