"""Queries for the settlement engine: intents (batches and their entries), the transactions sent for them."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Row, and_, bindparam, case, exists, func, select, text, update

from settlement.domain.model import Channel, ChannelId, ChannelStatus
from settlement.store.channels import channel_from_row, channel_rows, from_us, latest_accepted, read_versioned, to_us
from settlement.store.tables import channels, engine_alerts, settlement_batches, settlement_entries, settlement_txs

OPEN_STATUSES = ("pending", "sent")


@dataclass(frozen=True)
class Entry:
    channel_id: ChannelId
    cumulative: int
    signature: bytes
    outcome: int | None = None
    close_phase: int | None = None  # which settlement of the channel's close this entry is, if one


@dataclass(frozen=True)
class Batch:
    batch_id: str
    status: str
    sender: str
    nonce: int
    tx_hash: str | None
    block_number: int | None
    gas_used: int | None
    gas_price: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    nonce_used_since: datetime | None = None


@dataclass(frozen=True)
class SentTx:
    tx_hash: str
    nonce: int
    max_fee: int
    priority_fee: int
    raw: bytes
    sent_at: datetime | None
    created_at: datetime


def _batch(row: Row[Any]) -> Batch:
    return Batch(
        batch_id=row.batch_id,
        status=row.status,
        sender=row.sender,
        nonce=row.nonce,
        tx_hash=row.tx_hash,
        block_number=row.block_number,
        gas_used=row.gas_used,
        gas_price=row.gas_price,
        error=row.error,
        created_at=from_us(row.created_at_us),
        updated_at=from_us(row.updated_at_us),
        nonce_used_since=None if row.nonce_used_since_us is None else from_us(row.nonce_used_since_us),
    )


def _covered(channel_id: Any, accepted: Any) -> Any:
    """The channel's latest accepted voucher is already in a batch in flight or confirmed."""
    return exists().where(
        and_(
            settlement_entries.c.channel_id == channel_id,
            settlement_entries.c.cumulative >= accepted,
            settlement_batches.c.batch_id == settlement_entries.c.batch_id,
            settlement_batches.c.status.in_(("pending", "sent", "confirmed")),
        )
    )


def settleable(
    conn: Connection, limit: int | None = None, *, open_only: bool = False, first: Collection[str] = ()
) -> list[Channel]:
    """Channels with accepted vouchers above what the chain settled, not closed, not suspended, and whose latest
    voucher is not already in a batch that is in flight or confirmed (the indexer may not have caught up yet);
    `open_only`: not closing either.

    With `limit`: the first `limit` in the order a batch takes them, closing channels first (nearest deadline first),
    then channels in the assets `first` names, then the largest unsettled amounts, sorted by the database rather than
    read whole (the store can hold hundreds of thousands). SQLite keeps large amounts as blobs, so there the order uses
    their float value (`amount_value`, a function the store registers on each connection): exact enough to rank.
    Amounts of different assets do not compare: a token a payer made can hold 10^30 units, and ranked by amount
    alone its channels took every place of a regular batch, so `first` names the assets the operator prices.

    PostgreSQL plans this query for its parameters every time: psycopg prepares a statement after five runs, and the
    generic plan PostgreSQL then preferred (tables not analysed yet, a batch table that grows by the minute) compared
    every candidate with every batched entry, 4 s per batch at 100,000 channels instead of ~150 ms.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    candidates = select(
        channels.c.channel_id,
        channels.c.settled,
        channels.c.status,
        channels.c.close_deadline,
        channels.c.token,
        latest_accepted(conn).label("accepted"),
    ).where(
        channels.c.status == int(ChannelStatus.OPEN) if open_only else channels.c.status != int(ChannelStatus.CLOSED),
        channels.c.suspended_reason.is_(None),
    )
    # On SQLite the latest accepted amount is a probe of the payments' index each time a clause names it (the filter,
    # the batched check, the ranking): materialised, each channel's is probed once. PostgreSQL reads the column.
    c = (
        candidates.cte("candidates").prefix_with("MATERIALIZED")
        if conn.dialect.name == "sqlite"
        else candidates.subquery("candidates")
    ).c
    query = select(c.channel_id).where(c.accepted > c.settled, ~_covered(c.channel_id, c.accepted))
    if limit is None:
        query = query.order_by(c.channel_id)
    else:
        if conn.dialect.name == "sqlite":
            unsettled = func.amount_value(c.accepted) - func.amount_value(c.settled)
        else:
            unsettled = c.accepted - c.settled
        closing = case((c.status == int(ChannelStatus.CLOSING), 0), else_=1)
        deadline = func.coalesce(c.close_deadline, 0)
        named = [case((c.token.in_(list(first)), 0), else_=1)] if first else []
        query = query.order_by(closing, deadline, *named, unsettled.desc(), c.channel_id).limit(limit)
    ids = [ChannelId(channel_id) for channel_id in conn.execute(query).scalars()]
    # The chosen channels' whole rows after: a sort keeps every column of every candidate it sorts.
    found = read_versioned(conn, ids)
    return [found[channel_id].channel for channel_id in ids]


def open_batches(conn: Connection) -> list[Batch]:
    """Batches whose outcome is not known yet, oldest nonce first."""
    query = select(settlement_batches).where(settlement_batches.c.status.in_(OPEN_STATUSES))
    return [_batch(row) for row in conn.execute(query.order_by(settlement_batches.c.nonce))]


def create_batch(
    conn: Connection, batch_id: str, sender: str, nonce: int, entries: Sequence[Entry], now: datetime
) -> None:
    """The intent: written and committed before any transaction for it exists."""
    conn.execute(
        settlement_batches.insert().values(
            batch_id=batch_id,
            status="pending",
            sender=sender,
            nonce=nonce,
            created_at_us=to_us(now),
            updated_at_us=to_us(now),
        )
    )
    conn.execute(
        settlement_entries.insert(),
        [
            {
                "batch_id": batch_id,
                "channel_id": e.channel_id,
                "cumulative": e.cumulative,
                "signature": e.signature,
                "close_phase": e.close_phase,
            }
            for e in entries
        ],
    )


def entries_of(conn: Connection, batch_id: str) -> list[Entry]:
    query = (
        select(settlement_entries)
        .where(settlement_entries.c.batch_id == batch_id)
        .order_by(settlement_entries.c.channel_id)
    )
    return [Entry(r.channel_id, r.cumulative, r.signature, r.outcome, r.close_phase) for r in conn.execute(query)]


def add_tx(conn: Connection, batch_id: str, tx: SentTx) -> None:
    conn.execute(
        settlement_txs.insert().values(
            tx_hash=tx.tx_hash,
            batch_id=batch_id,
            nonce=tx.nonce,
            max_fee=tx.max_fee,
            priority_fee=tx.priority_fee,
            raw=tx.raw,
            sent_at_us=None,
            created_at_us=to_us(tx.created_at),
        )
    )
    conn.execute(
        update(settlement_batches)
        .where(settlement_batches.c.batch_id == batch_id)
        .values(tx_hash=tx.tx_hash, updated_at_us=to_us(tx.created_at))
    )


def mark_sent(conn: Connection, batch_id: str, tx_hash: str, now: datetime) -> None:
    """Record the first broadcast of a transaction: the fee-bump timer counts from it, so a re-broadcast of the same
    bytes (every tick while it waits) must not move it."""
    conn.execute(
        update(settlement_txs)
        .where(settlement_txs.c.tx_hash == tx_hash, settlement_txs.c.sent_at_us.is_(None))
        .values(sent_at_us=to_us(now))
    )
    conn.execute(
        update(settlement_batches)
        .where(settlement_batches.c.batch_id == batch_id, settlement_batches.c.status == "pending")
        .values(status="sent", updated_at_us=to_us(now))
    )


def txs_of(conn: Connection, batch_id: str) -> list[SentTx]:
    query = select(settlement_txs).where(settlement_txs.c.batch_id == batch_id).order_by(settlement_txs.c.created_at_us)
    return [
        SentTx(
            r.tx_hash,
            r.nonce,
            r.max_fee,
            r.priority_fee,
            r.raw,
            None if r.sent_at_us is None else from_us(r.sent_at_us),
            from_us(r.created_at_us),
        )
        for r in conn.execute(query)
    ]


def finish_batch(
    conn: Connection,
    batch_id: str,
    *,
    status: str,
    now: datetime,
    outcomes: Mapping[ChannelId, int] | None = None,
    tx_hash: str | None = None,
    block_number: int | None = None,
    gas_used: int | None = None,
    gas_price: int | None = None,
    error: str | None = None,
) -> None:
    """Record the outcome read from the chain: 'confirmed' with each entry's outcome, or 'failed'."""
    values: dict[str, Any] = {"status": status, "updated_at_us": to_us(now), "error": error}
    if tx_hash is not None:
        values.update(tx_hash=tx_hash, block_number=block_number, gas_used=gas_used, gas_price=gas_price)
    conn.execute(update(settlement_batches).where(settlement_batches.c.batch_id == batch_id).values(**values))
    if outcomes:  # one executemany, not a statement per entry: a batch holds hundreds
        entry = settlement_entries.c
        conn.execute(
            update(settlement_entries)
            .where(entry.batch_id == bindparam("b_batch"), entry.channel_id == bindparam("b_channel"))
            .values(outcome=bindparam("b_outcome")),
            [{"b_batch": batch_id, "b_channel": cid, "b_outcome": outcome} for cid, outcome in outcomes.items()],
        )


class CountedBatch(NamedTuple):
    """A batch and how many channel entries it carries."""

    batch: Batch
    entries: int


def recent_batches(conn: Connection, limit: int = 10) -> list[CountedBatch]:
    """The latest batches with their entry counts, newest first (each batch's entries counted on the primary key's
    prefix: counting every batch's entries before picking the latest grew with the whole history)."""
    count = (
        select(func.count())
        .where(settlement_entries.c.batch_id == settlement_batches.c.batch_id)
        .scalar_subquery()
        .label("n")
    )
    query = select(settlement_batches, count).order_by(settlement_batches.c.created_at_us.desc()).limit(limit)
    return [CountedBatch(_batch(row), int(row.n or 0)) for row in conn.execute(query)]


@dataclass(frozen=True)
class CloseWork:
    """A closing channel with accepted value the chain has not settled: the watchtower's unit of work."""

    channel: Channel
    close_phase: int  # the latest settlement of this close a batch (not a failed one) carried; 0: none yet
    covered: bool  # its latest voucher is in a batch in flight or confirmed already


def closing_with_work(conn: Connection) -> list[CloseWork]:
    """Closing channels whose accepted vouchers are not all settled on chain, nearest deadline first."""
    phase = (
        select(func.coalesce(func.max(settlement_entries.c.close_phase), 0))
        .where(
            settlement_entries.c.channel_id == channels.c.channel_id,
            settlement_batches.c.batch_id == settlement_entries.c.batch_id,
            settlement_batches.c.status != "failed",
        )
        .scalar_subquery()
    )
    query = (
        channel_rows(
            conn, phase.label("close_phase"), _covered(channels.c.channel_id, latest_accepted(conn)).label("covered")
        )
        .where(channels.c.status == int(ChannelStatus.CLOSING), latest_accepted(conn) > channels.c.settled)
        .order_by(channels.c.close_deadline, channels.c.channel_id)
    )
    return [CloseWork(channel_from_row(row), int(row.close_phase), bool(row.covered)) for row in conn.execute(query)]


def closing_channels(conn: Connection) -> list[Channel]:
    """Every closing channel, nearest deadline first, whether or not anything is left to settle on it."""
    query = (
        channel_rows(conn)
        .where(channels.c.status == int(ChannelStatus.CLOSING))
        .order_by(channels.c.close_deadline, channels.c.channel_id)
    )
    return [channel_from_row(row) for row in conn.execute(query)]


def last_batch_at(conn: Connection) -> datetime | None:
    """When the newest batch was created: the regular interval counts from it, in whichever process it ran."""
    newest = conn.execute(select(func.max(settlement_batches.c.created_at_us))).scalar_one()
    return None if newest is None else from_us(int(newest))


def spent_since(conn: Connection, since: datetime) -> int:
    """Wei the settler paid for batches mined since `since` (gas used x effective price; summed in Python since
    SQLite keeps amounts as text)."""
    return sum(_spent_by_batch(conn, since).values())


def spent_on_others_since(conn: Connection, since: datetime, priced: Collection[str]) -> int:
    """The part of `spent_since` that settled channels in assets `priced` does not name: each batch's wei shared
    evenly by its entries (one costs ~11,000 gas whatever its asset), the entries of other assets' channels summed."""
    spent = _spent_by_batch(conn, since)
    if not spent:
        return 0
    other = case((channels.c.token.in_(list(priced)), 0), else_=1)
    shares = (
        select(settlement_entries.c.batch_id, func.count(), func.sum(other))
        .join(channels, channels.c.channel_id == settlement_entries.c.channel_id)
        .where(settlement_entries.c.batch_id.in_(list(spent)))
        .group_by(settlement_entries.c.batch_id)
    )
    return sum(spent[batch_id] * int(others) // int(count) for batch_id, count, others in conn.execute(shares))


def _spent_by_batch(conn: Connection, since: datetime) -> dict[str, int]:
    """Wei paid for each batch mined since `since`."""
    query = select(settlement_batches.c.batch_id, settlement_batches.c.gas_used, settlement_batches.c.gas_price).where(
        settlement_batches.c.updated_at_us >= to_us(since),
        settlement_batches.c.gas_used.is_not(None),
        settlement_batches.c.gas_price.is_not(None),
    )
    return {batch_id: int(gas) * int(price) for batch_id, gas, price in conn.execute(query)}


def claim_alert(conn: Connection, kind: str, subject: str, now: datetime, repeat_after_us: int) -> bool:
    """True (and the time recorded) if the alert (kind, subject) did not fire in the last `repeat_after_us`."""
    key = and_(engine_alerts.c.kind == kind, engine_alerts.c.subject == subject)
    last = conn.execute(select(engine_alerts.c.last_at_us).where(key)).scalar_one_or_none()
    if last is not None and to_us(now) - int(last) < repeat_after_us:
        return False
    if last is None:
        conn.execute(engine_alerts.insert().values(kind=kind, subject=subject, last_at_us=to_us(now)))
    else:
        conn.execute(update(engine_alerts).where(key).values(last_at_us=to_us(now)))
    return True


def nonce_used_since(conn: Connection, batch_id: str, now: datetime) -> datetime:
    """Since when the batch's nonce has looked used by another transaction (recorded at the first sighting)."""
    batch = settlement_batches.c
    conn.execute(
        update(settlement_batches)
        .where(batch.batch_id == batch_id, batch.nonce_used_since_us.is_(None))
        .values(nonce_used_since_us=to_us(now))
    )
    since = conn.execute(select(batch.nonce_used_since_us).where(batch.batch_id == batch_id)).scalar_one()
    return from_us(int(since))


def clear_nonce_used(conn: Connection, batch_id: str) -> None:
    conn.execute(
        update(settlement_batches).where(settlement_batches.c.batch_id == batch_id).values(nonce_used_since_us=None)
    )
