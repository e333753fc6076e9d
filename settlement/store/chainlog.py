"""Queries for the indexer: its cursor, the events it applied and the block hashes it saw (for reorg detection).
The channel rows it writes go through settlement.store.channels, like every other write of a channel row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from settlement.domain.model import ChainPosition, ChannelId
from settlement.store.channels import to_us
from settlement.store.tables import chain_events, indexed_blocks, indexer_cursor

CURSOR = "hub"
WITHDRAWN = "Withdrawn"  # the hub event that takes a credited balance out


@dataclass(frozen=True)
class Cursor:
    """The last block whose events are applied, and its hash as seen then."""

    block_number: int
    block_hash: str | None


@dataclass(frozen=True)
class ChainEvent:
    block_number: int
    log_index: int
    block_hash: str
    tx_hash: str
    event: str
    channel_id: ChannelId | None
    args: dict[str, Any]

    @property
    def position(self) -> ChainPosition:
        """Where the event stands in the chain's order."""
        return ChainPosition(self.block_number, self.log_index)


def _insert(conn: Connection) -> Any:
    return sqlite_insert if conn.dialect.name == "sqlite" else pg_insert


def ensure_cursor(conn: Connection, start_block: int, now: datetime) -> None:
    """Create the cursor just before `start_block` unless it exists."""
    values = {"name": CURSOR, "block_number": start_block - 1, "block_hash": None, "updated_at_us": to_us(now)}
    conn.execute(_insert(conn)(indexer_cursor).values(**values).on_conflict_do_nothing(index_elements=["name"]))


def get_cursor(conn: Connection, *, lock: bool = False) -> Cursor | None:
    query = select(indexer_cursor).where(indexer_cursor.c.name == CURSOR)
    if lock and conn.dialect.name != "sqlite":
        query = query.with_for_update()
    row = conn.execute(query).first()
    return None if row is None else Cursor(row.block_number, row.block_hash)


def set_cursor(conn: Connection, cursor: Cursor, now: datetime) -> None:
    conn.execute(
        update(indexer_cursor)
        .where(indexer_cursor.c.name == CURSOR)
        .values(block_number=cursor.block_number, block_hash=cursor.block_hash, updated_at_us=to_us(now))
    )
    if cursor.block_hash is not None:
        conn.execute(
            _insert(conn)(indexed_blocks)
            .values(number=cursor.block_number, hash=cursor.block_hash)
            .on_conflict_do_nothing(index_elements=["number"])
        )


def prune_blocks(conn: Connection, below: int) -> None:
    conn.execute(delete(indexed_blocks).where(indexed_blocks.c.number < below))


def recent_blocks(conn: Connection, limit: int) -> list[Cursor]:
    """Block hashes the indexer recorded, newest first."""
    query = select(indexed_blocks).order_by(indexed_blocks.c.number.desc()).limit(limit)
    return [Cursor(row.number, row.hash) for row in conn.execute(query)]


def after_position(block: int, log: int) -> ColumnElement[bool]:
    """Chain events after (block, log index), in the order the chain has them: what the payee feed and the risk
    monitor read from a position they keep."""
    # A row-value comparison: both databases walk the primary key from the position (SQLite scanned the whole table
    # for the equivalent OR of two comparisons).
    return tuple_(chain_events.c.block_number, chain_events.c.log_index) > tuple_(block, log)


def record_events(conn: Connection, events: Sequence[ChainEvent]) -> None:
    if events:
        conn.execute(
            chain_events.insert(),
            [
                {
                    "block_number": e.block_number,
                    "log_index": e.log_index,
                    "block_hash": e.block_hash,
                    "tx_hash": e.tx_hash,
                    "event": e.event,
                    "channel_id": e.channel_id,
                    "args": json.dumps(e.args, sort_keys=True),
                    "account": e.args["account"] if e.event == WITHDRAWN else None,
                }
                for e in events
            ],
        )


def channels_touched_after(conn: Connection, block_number: int) -> list[ChannelId]:
    query = (
        select(chain_events.c.channel_id)
        .where(chain_events.c.block_number > block_number, chain_events.c.channel_id.is_not(None))
        .distinct()
    )
    return sorted(ChannelId(str(row[0])) for row in conn.execute(query))


def forget_after(conn: Connection, block_number: int) -> None:
    """Drop what the indexer recorded above `block_number`: those blocks are no longer on the chain."""
    conn.execute(delete(chain_events).where(chain_events.c.block_number > block_number))
    conn.execute(delete(indexed_blocks).where(indexed_blocks.c.number > block_number))


def withdrawn_by(conn: Connection, account: str) -> dict[str, int]:
    """What `account` withdrew from the hub, per asset, as far as the confirmed chain shows."""
    query = select(chain_events.c.args).where(chain_events.c.account == account, chain_events.c.event == WITHDRAWN)
    totals: dict[str, int] = {}
    for (args,) in conn.execute(query):
        event = json.loads(args)
        totals[event["token"]] = totals.get(event["token"], 0) + int(event["amount"])
    return totals
