"""A payee's book, read in one transaction: what it was paid per asset, what it withdrew, the running engine's batch
interval, and the block those facts are current to (so that a balance read from the chain can be taken there too)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from settlement.store.chainlog import get_cursor, withdrawn_by
from settlement.store.channels import AssetSummary, payee_summary
from settlement.store.meta import engine_interval


@dataclass(frozen=True)
class PayeeBook:
    assets: list[AssetSummary]  # every asset the payee has channels in or withdrew, by token
    withdrawn: dict[str, int]  # token -> base units withdrawn (confirmed Withdrawn events)
    settle_interval: float | None  # seconds between the running engine's regular batches; None: no engine yet
    as_of_block: int | None  # the indexer's cursor: every figure above is current to this block
    as_of_hash: str | None  # and that block's hash (a reorganisation gives the number another block)


def payee_book(conn: Connection, payee: str) -> PayeeBook:
    summaries = {a.token: a for a in payee_summary(conn, payee)}
    withdrawn = withdrawn_by(conn, payee)
    cursor = get_cursor(conn)
    assets = [summaries.get(t) or AssetSummary(t, 0, 0, 0, 0) for t in sorted(summaries.keys() | withdrawn.keys())]
    return PayeeBook(
        assets=assets,
        withdrawn=withdrawn,
        settle_interval=engine_interval(conn),
        as_of_block=cursor.block_number if cursor else None,
        as_of_hash=cursor.block_hash if cursor else None,
    )
