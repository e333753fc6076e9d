"""How much of the service's bounded things (webhooks, spending caps) a payee may add: its own limit, the limit of
every payee's together, and a share of that limit for payees of no channel in the store.

Signing in costs nothing: a fresh key is an account, and without the last share a few thousand of them filled the
service's limits for good, and no payee with channels could make a webhook or a cap any more. A channel costs a
transaction on chain and a deposit, so an address that is the payee of one is no longer free to make, and those are
never held back by the fresh ones, which share what is left of their own part.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sqlalchemy import Column, ColumnElement, Connection, exists, func, select

from settlement.store.tables import channels


@dataclass(frozen=True)
class Limits:
    per_payee: int
    total: int  # every payee's together
    without_channels: int  # every payee's together that is the payee of no channel in the store


class Admission(Enum):
    ADMITTED = "admitted"
    PAYEE_FULL = "payee_full"
    ALL_FULL = "all_full"
    NO_CHANNEL_FULL = "no_channel_full"  # the payee has no channel, and those without hold their share already


def payee_of_a_channel(conn: Connection, address: str) -> bool:
    """Whether `address` is the payee of a channel in the store (open, closing or closed: its cost was paid)."""
    return conn.execute(select(channels.c.channel_id).where(channels.c.payee == address).limit(1)).first() is not None


def admit(
    conn: Connection,
    payee_column: Column[str],
    live: ColumnElement[bool],
    payee: str,
    limits: Limits,
    *,
    vouched: bool = False,
) -> Admission:
    """Whether `payee` may add one more live row (`live`) to `payee_column`'s table. The caller serialises adds (one
    lock for the table on PostgreSQL, the single writer on SQLite), or two could pass a count together. A row of no
    address (the operator's "*" of every payee) is never a payee's without channels; nor is a `vouched` one's (the
    operator asks, or a key the operator made for the payee), which is held to the first two limits only."""
    table = payee_column.table

    def count(*where: ColumnElement[bool]) -> int:
        return int(conn.execute(select(func.count()).select_from(table).where(live, *where)).scalar_one())

    if count(payee_column == payee) >= limits.per_payee:
        return Admission.PAYEE_FULL
    if count() >= limits.total:
        return Admission.ALL_FULL
    if not vouched and payee.startswith("0x") and not payee_of_a_channel(conn, payee):
        strangers = count(payee_column.startswith("0x"), ~exists().where(channels.c.payee == payee_column))
        if strangers >= limits.without_channels:
            return Admission.NO_CHANNEL_FULL
    return Admission.ADMITTED
