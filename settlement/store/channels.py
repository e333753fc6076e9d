"""Queries on channels and payments: what ingest writes and the API reads. Each takes an open Connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, NamedTuple, TypeVar, cast

import psycopg
from sqlalchemy import ColumnElement, Connection, LargeBinary, Row, Select, and_, any_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from settlement.domain.model import Channel, ChannelId, ChannelStatus, Receipt
from settlement.errors import ChannelMovedError
from settlement.store.tables import channels, payments
from settlement.store.types import Amount, sqlite_amount, stored_amount

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_ID_ARRAY = ARRAY(channels.c.channel_id.type)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way, so a stored receipt reads back identical)."""
    return (moment - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# A channel's latest accepted voucher. On PostgreSQL, the row's own `accepted` and `signature`, which the writer's
# group statement moves with its insert (a heap-only update: revision 0015). On SQLite, its highest payment, found
# on the payments' unique (channel_no, cumulative) index: there the writer does not rewrite the channel's row, a
# page of the channels table written to the WAL and the database per group (half of what a voucher wrote, and a
# sixth of the writer's time; docs/scaling.md). The row's own columns stand for a channel without a payment row
# (written so by older versions, or by hand) and are never above its highest payment.
_head = payments.alias("head")


def _head_of(column: ColumnElement[Any]) -> ColumnElement[Any]:
    query = select(column).where(_head.c.channel_no == channels.c.channel_no).order_by(_head.c.cumulative.desc())
    return query.limit(1).scalar_subquery()


_HEAD_ACCEPTED = func.coalesce(_head_of(_head.c.cumulative), channels.c.accepted, type_=Amount())
_HEAD_SIGNATURE = func.coalesce(_head_of(_head.c.signature), channels.c.signature, type_=LargeBinary())
_ROW = [c for c in channels.c if c.name not in ("accepted", "signature")]


def latest_accepted(conn: Connection) -> ColumnElement[int]:
    """The channel's latest accepted amount, as an expression over `channels` (see above)."""
    return _HEAD_ACCEPTED if conn.dialect.name == "sqlite" else channels.c.accepted


def channel_rows(conn: Connection, *extra: ColumnElement[Any]) -> Select[Any]:
    """`select(channels)`, each channel's latest accepted voucher as its `accepted` and `signature`."""
    if conn.dialect.name != "sqlite":
        return select(channels, *extra)
    return select(*_ROW, _HEAD_ACCEPTED.label("accepted"), _HEAD_SIGNATURE.label("signature"), *extra)


def channel_from_row(row: Row[Any]) -> Channel:
    return Channel(
        channel_id=row.channel_id,
        payer=row.payer,
        payee=row.payee,
        token=row.token,
        salt=row.salt,
        deposit=row.deposit,
        settled=row.settled,
        status=ChannelStatus(row.status),
        close_deadline=row.close_deadline,
        as_of_block=row.as_of_block,
        as_of_log=row.as_of_log,
        accepted=row.accepted,
        signature=row.signature,
        suspended_reason=row.suspended_reason,
        stopped_at_us=row.stopped_at_us,
    )


def open_payers(conn: Connection, limit: int) -> list[tuple[ChannelId, str]]:
    """(channel id, payer) of up to `limit` channels not closed: what ingest holds in memory from the start."""
    query = select(channels.c.channel_id, channels.c.payer).where(channels.c.status != int(ChannelStatus.CLOSED))
    return [(ChannelId(cid), str(payer)) for cid, payer in conn.execute(query.limit(limit))]


def get_channel(conn: Connection, channel_id: str) -> Channel | None:
    row = conn.execute(channel_rows(conn).where(channels.c.channel_id == channel_id)).first()
    return None if row is None else channel_from_row(row)


def lock_channels(conn: Connection, channel_ids: Iterable[ChannelId]) -> dict[ChannelId, Channel]:
    """Read and row-lock channels in id order (one order for every writer, so writers never deadlock).

    On SQLite the write transaction already holds the database's single write lock, so FOR UPDATE is left out.
    PostgreSQL gets the ids as one array parameter: an IN list of a thousand parameters costs more to render and
    bind than the lookup itself.
    """
    query = _with_ids(conn, channel_ids)
    if conn.dialect.name != "sqlite":
        query = query.with_for_update()
    return {row.channel_id: channel_from_row(row) for row in conn.execute(query.order_by(channels.c.channel_id))}


def _with_ids(conn: Connection, channel_ids: Iterable[ChannelId]) -> Select[Any]:
    ids = sorted(set(channel_ids))
    if conn.dialect.name == "sqlite":
        return channel_rows(conn).where(channels.c.channel_id.in_(ids))
    return channel_rows(conn).where(channels.c.channel_id == any_(bindparam("ids", ids, type_=_ID_ARRAY)))


class VersionedChannel(NamedTuple):
    """A channel as stored, with the row's version: every write of the row raises it, so a copy held in memory is
    the stored channel as long as the stored version is the copy's. (A named tuple: the writer makes one per channel
    of each group, at a third of a frozen dataclass's cost.)"""

    channel: Channel
    version: int
    number: int  # the channel's number in the store (RowStamp.number)
    shared: bool = False  # the ingest writer found its copy moved by another writer at its last write (its own use)


class RowStamp(NamedTuple):
    """What the writer reads of a channel it locks: the row's version, the channel's number in the store (which its
    payments carry; it never changes), and its latest accepted amount (on SQLite another process's writer that
    accepted a voucher on it moved that, not the row)."""

    version: int
    number: int
    accepted: int


class Locked(NamedTuple):
    """What `lock_versions` locked, and the rows it left to another transaction that holds them."""

    stamps: dict[ChannelId, RowStamp]
    busy: set[ChannelId]


def lock_versions(conn: Connection, channel_ids: Iterable[ChannelId], *, skip_busy: bool = False) -> Locked:
    """Row-lock channels in id order, as `lock_channels` does, reading only each row's version and number: the
    ingest writer's read when it holds the channels in memory (a whole row costs ten times as much to fetch and to
    build).

    With `skip_busy` (PostgreSQL), a row another transaction holds is not waited for but reported in `busy`: the
    writer of another server process that shares a channel holds it until its commit, and a group that waited for
    it would hold its own rows meanwhile, so the processes' groups queued behind each other (4 writers sharing every
    channel: 4,500 vouchers/s against 52,000 apart, docs/scaling.md). SQLite's writer holds the whole database,
    so nothing is ever busy there.
    """
    ids = sorted(set(channel_ids))
    if not ids:
        return Locked({}, set())
    if conn.dialect.name == "sqlite":
        marks = ",".join("?" * len(ids))
        # The write transaction holds the whole database: what this statement reads is what every commit left.
        _, found = _execute_raw(conn, f"{_STAMPS_SQLITE} WHERE channel_id IN ({marks})", ids)
    else:
        _, found = _execute_raw(conn, _LOCK_AVAILABLE if skip_busy else _LOCK_VERSIONS, {"ids": ids})
    stamps = {
        ChannelId(cid): RowStamp(int(version), int(number), stored_amount(accepted))
        for cid, version, number, accepted in found
    }
    busy: set[ChannelId] = set()
    if skip_busy and len(stamps) < len(ids) and conn.dialect.name != "sqlite":
        _, rows = _execute_raw(conn, _EXISTING, {"ids": [cid for cid in ids if cid not in stamps]})
        busy = {ChannelId(cid) for (cid,) in rows}  # the rest do not exist: judged as unknown channels
    return Locked(stamps, busy)


# The SQLite stamps' statement, with `latest_accepted`'s own expression, as text for the driver (see _execute_raw).
_STAMPS_SQLITE = str(
    select(channels.c.channel_id, channels.c.version, channels.c.channel_no, _HEAD_ACCEPTED).compile(
        dialect=sqlite_dialect(), compile_kwargs={"literal_binds": True}
    )
)
_LOCK_VERSIONS = (
    "SELECT channel_id, version, channel_no, accepted FROM channels WHERE channel_id = ANY(%(ids)b::varchar[])"
    " ORDER BY channel_id FOR UPDATE"
)
_LOCK_AVAILABLE = _LOCK_VERSIONS + " SKIP LOCKED"
_EXISTING = "SELECT channel_id FROM channels WHERE channel_id = ANY(%(ids)b::varchar[])"


def channel_numbers(conn: Connection, channel_ids: Iterable[ChannelId]) -> dict[ChannelId, int]:
    """The store's numbers of these channels (absent ids are left out)."""
    query = select(channels.c.channel_id, channels.c.channel_no).where(channels.c.channel_id.in_(set(channel_ids)))
    return {ChannelId(cid): int(number) for cid, number in conn.execute(query)}


def read_versioned(conn: Connection, channel_ids: Iterable[ChannelId]) -> dict[ChannelId, VersionedChannel]:
    """Whole rows with their versions (no lock of its own: the writer calls it under `lock_versions`' locks)."""
    query = _with_ids(conn, channel_ids)
    return {
        row.channel_id: VersionedChannel(channel_from_row(row), row.version, row.channel_no)
        for row in conn.execute(query)
    }


def insert_channel(conn: Connection, channel: Channel, now: datetime) -> None:
    """Insert a channel learnt from the chain; a row that already exists (another process was first) is kept."""
    values = {
        "channel_id": channel.channel_id,
        "payer": channel.payer,
        "payee": channel.payee,
        "token": channel.token,
        "salt": channel.salt,
        "deposit": channel.deposit,
        "settled": channel.settled,
        "status": int(channel.status),
        "close_deadline": channel.close_deadline,
        "as_of_block": channel.as_of_block,
        "as_of_log": channel.as_of_log,
        "accepted": 0,
        "signature": None,
        "suspended_reason": channel.suspended_reason,
        "updated_at_us": to_us(now),
    }
    if conn.dialect.name == "sqlite":  # PostgreSQL numbers the row itself; SQLite holds the write lock: next number
        values["channel_no"] = select(func.coalesce(func.max(channels.c.channel_no), 0) + 1).scalar_subquery()
        conn.execute(sqlite_insert(channels).values(**values).on_conflict_do_nothing(index_elements=["channel_id"]))
    else:
        conn.execute(pg_insert(channels).values(**values).on_conflict_do_nothing(index_elements=["channel_id"]))


def save_chain_state(conn: Connection, channel: Channel, now: datetime) -> None:
    """Overwrite a stored channel's chain facts (never its accepted voucher) with what the indexer confirmed."""
    conn.execute(
        update(channels)
        .where(channels.c.channel_id == channel.channel_id)
        .values(
            deposit=channel.deposit,
            settled=channel.settled,
            status=int(channel.status),
            close_deadline=channel.close_deadline,
            as_of_block=channel.as_of_block,
            as_of_log=channel.as_of_log,
            suspended_reason=channel.suspended_reason,
            updated_at_us=to_us(now),
            version=channels.c.version + 1,
        )
    )


def stop_channel(conn: Connection, channel_id: ChannelId, now: datetime) -> Channel | None:
    """Stop a stored channel for its payee (a second stop keeps the first's time) and read it back in the same write
    transaction. The row's version is raised, so every writer judges its next voucher against the stopped row (on
    PostgreSQL the update waits for a group that holds the row, whose voucher the read then sees): the latest voucher
    read is the last one accepted."""
    conn.execute(
        update(channels)
        .where(channels.c.channel_id == channel_id, channels.c.stopped_at_us.is_(None))
        .values(stopped_at_us=to_us(now), updated_at_us=to_us(now), version=channels.c.version + 1)
    )
    return get_channel(conn, channel_id)


def receipts_for(conn: Connection, keys: Sequence[tuple[ChannelId, int]]) -> dict[tuple[ChannelId, int], Receipt]:
    """Stored receipts for (channel, cumulative) pairs: the idempotency lookup."""
    values = ("string_to_array(%(values)b::text, ',')::numeric[]", _decimals(c for _, c in keys))
    found = _paired(conn, _BY_AMOUNT, keys, sqlite_amount, values)
    return {(receipt.channel_id, receipt.cumulative): receipt for receipt in found}


def receipts_by_key(conn: Connection, keys: Sequence[tuple[ChannelId, str]]) -> dict[tuple[ChannelId, str], Receipt]:
    """Stored receipts for (channel, idempotency key) pairs: a retried payment signed from a re-read position."""
    found = _paired(conn, _BY_KEY, keys, str, ("%(values)b::varchar[]", [key for _, key in keys]))
    return {(receipt.channel_id, receipt.idempotency_key or ""): receipt for receipt in found}


# Both look-ups join the pairs to the payments' unique indexes on BOTH columns, (channel_no, cumulative) and
# (channel_no, idempotency_key): a row-value IN over the join (`(channels.channel_id, payments.x) IN (...)`) was
# planned as a walk of the channel's every payment, filtered: a keyed payment on a channel with 200,000 payments
# behind it took 35 ms of the SQLite writer, a re-sent old voucher 21 ms, and the writer serves every payer.
_RECEIPT_COLUMNS = (
    "c.channel_id, p.cumulative, p.increment, p.remaining, p.accepted_at_us, p.reference, p.idempotency_key, p.attempt"
)
_PAIRED = " JOIN channels AS c ON c.channel_id = k.id JOIN payments AS p ON p.channel_no = c.channel_no AND "
_BY_AMOUNT = "p.cumulative = k.value"
_BY_KEY = "p.idempotency_key = k.value AND p.idempotency_key IS NOT NULL"  # the index is partial: it holds them all
_SQLITE_PAIRS_PER_STATEMENT = 400  # 800 parameters: under SQLite's oldest default limit (999)


def _paired(
    conn: Connection,
    match: str,
    pairs: Sequence[tuple[ChannelId, Any]],
    stored: Callable[[Any], Any],
    postgres_values: tuple[str, Any],
) -> list[Receipt]:
    """The receipts of (channel id, value) pairs, `match` saying which payment a value names. The pairs come as a
    VALUES list on SQLite (`stored`: a value as SQLite holds it), as arrays on PostgreSQL (`postgres_values`: the
    array's expression and its parameter)."""
    head, join = f"SELECT {_RECEIPT_COLUMNS}", _PAIRED + match
    rows: list[tuple[Any, ...]] = []
    if conn.dialect.name == "sqlite":
        for at in range(0, len(pairs), _SQLITE_PAIRS_PER_STATEMENT):
            part = pairs[at : at + _SQLITE_PAIRS_PER_STATEMENT]
            sql = f"WITH k(id, value) AS (VALUES {', '.join(['(?, ?)'] * len(part))}) {head} FROM k{join}"
            rows += _execute_raw(conn, sql, [v for channel_id, value in part for v in (channel_id, stored(value))]).rows
    elif pairs:
        array, values = postgres_values
        sql = f"{head} FROM unnest(%(ids)b::varchar[], {array}) AS k(id, value){join}"
        rows = _execute_raw(conn, sql, {"ids": [channel_id for channel_id, _ in pairs], "values": values}).rows
    return [_receipt_of(row) for row in rows]


def _receipt_of(row: tuple[Any, ...]) -> Receipt:
    """A receipt from a row of `_RECEIPT_COLUMNS`: the driver's values (SQLite's compact amounts, PostgreSQL's
    decimals) or SQLAlchemy's (ints)."""
    channel_id, cumulative, increment, remaining, accepted_at_us, reference, idempotency_key, attempt = row
    return Receipt(
        channel_id=ChannelId(channel_id),
        cumulative=stored_amount(cumulative),
        increment=stored_amount(increment),
        remaining=stored_amount(remaining),
        accepted_at=from_us(accepted_at_us),
        reference=reference,
        idempotency_key=idempotency_key,
        attempt=attempt,
    )


def _receipt(row: Row[Any], channel_id: ChannelId) -> Receipt:
    values = (row.cumulative, row.increment, row.remaining, row.accepted_at_us, row.reference, row.idempotency_key)
    return _receipt_of((channel_id, *values, row.attempt))


def record_payments(
    conn: Connection,
    accepted: Sequence[tuple[Receipt, bytes]],
    numbers: Mapping[ChannelId, int] | None = None,
) -> set[ChannelId]:
    """Insert the accepted payments and move each channel's latest voucher to its highest one; returns the channels
    whose row it rewrote, each row's version raised by one (PostgreSQL; on SQLite the latest voucher is the highest
    payment, and no row is rewritten).

    This is the group commit of the hot path. `numbers` are the channels' numbers in the store, as the writer read
    them under its row locks (`lock_versions`); left out, they are read here. A payment addresses its channel by that
    number. On PostgreSQL the insert and the channels' update are one statement over arrays (`unnest`): about half
    the time of SQLAlchemy's multi-row INSERT plus a pipelined UPDATE per channel; a payment is inserted only with its
    channel's UPDATE. SQLite's `executemany` is already a loop in C inside the process, so it keeps the plain form.
    Against the writer's copies, with no row locked first: `record_payments_in_steps`.
    """
    if not accepted:
        return set()
    if numbers is None:
        numbers = channel_numbers(conn, {receipt.channel_id for receipt, _ in accepted})
    if conn.dialect.name == "sqlite":
        _record_payments_sqlite(conn, accepted, numbers)
        return set()
    statement, params = _payments_statement(accepted, numbers, None)
    _check_inserted(statement, _execute_raw(conn, statement, params).touched, len(accepted), held=False)
    return {receipt.channel_id for receipt, _ in accepted}


def record_payments_in_steps(
    conn: Connection,
    accepted: Sequence[tuple[Receipt, bytes]],
    numbers: Mapping[ChannelId, int],
    held: Mapping[ChannelId, int],
) -> Generator[None, None, set[ChannelId]]:
    """`record_payments` against the writer's copies, which it judged against without locking the rows first (`held`:
    their row versions; PostgreSQL), in two steps: the statements are sent at the first (psycopg's pipeline mode) and
    their outcome is read at the second, so what the caller does in between overlaps the database's work (or nothing:
    `run_steps`). The payments' statement locks each row only at its version, skipping rows another transaction
    holds; the group's other channels (their vouchers refused or answered again) are counted at their versions, so
    that every answer rests on what is stored. ChannelMovedError if a row had moved or was busy: the caller rolls the
    transaction back. Returns the channels whose row was rewritten."""
    paid = {receipt.channel_id for receipt, _ in accepted}
    kept = {channel_id: held[channel_id] for channel_id in held.keys() - paid}
    statements: list[Statement] = []
    if accepted:
        statements.append(_payments_statement(accepted, numbers, _at_versions(numbers, held, paid)))
    if kept:
        statements.append(Statement(_VERSIONS_KEPT, _at_versions(numbers, kept, kept)))
    results = yield from _pipelined(conn, statements)
    if accepted:
        _check_inserted(statements[0].sql, results[0].touched, len(accepted), held=True)
    if kept:
        ((at_versions,),) = results[-1].rows  # count(*): the group's other channels still at their versions
        if at_versions != len(kept):
            raise ChannelMovedError("a channel moved since the writer's copy of it")
    return paid


def run_steps(steps: Generator[None, None, T]) -> T:
    """A function in steps (`record_payments_in_steps`) run to its end with nothing between the steps."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)


class Executed(NamedTuple):
    """What a statement run on the driver's connection did: the rows it touched and those it returned (the driver's
    plain tuples)."""

    touched: int
    rows: list[tuple[Any, ...]]


class Statement(NamedTuple):
    """A statement for the driver's connection, with its parameters."""

    sql: str
    params: dict[str, Any]


def _pipelined(conn: Connection, statements: list[Statement]) -> Generator[None, None, list[Executed]]:
    """`_execute_raw` of several statements, sent before the yield and read after it: each one's rows touched and
    rows returned. The transaction's generic plans (`_GENERIC_PLANS`) go first, in the same round trip."""
    driver: Any = conn.connection.driver_connection
    cursors = []
    statement = _GENERIC_PLANS
    try:
        with driver.pipeline():
            driver.execute(_GENERIC_PLANS)
            for statement, params in statements:
                cursors.append(cursor := driver.cursor())
                cursor.execute(statement, params)
            yield
        return [Executed(int(c.rowcount), c.fetchall() if c.description is not None else []) for c in cursors]
    except psycopg.Error as ex:  # as SQLAlchemy would have raised it: the store's error handling sees no difference
        raise DBAPIError.instance(statement, None, ex, psycopg.Error) from ex
    finally:
        for cursor in cursors:
            cursor.close()


# Payment ids are drawn in the order of the group (ORDER BY the array position): within a channel, ids and amounts
# rise together, which the per-channel listings rely on. Each channel's latest voucher is found here, from the
# payments' own arrays (its highest cumulative), rather than sent as more arrays. Numbers travel as one text of
# comma-separated decimals each, which the server splits and parses: psycopg builds a binary array element by element
# in Python, which was the largest part of the writer's time per voucher. References, idempotency keys and x402
# settle attempts are sent as NULL when the group has none (the hot path): `unnest` pads a NULL array with NULLs.
_PAYMENTS_IN = (
    "WITH p AS MATERIALIZED ("
    " SELECT * FROM unnest(string_to_array(%(nos)b::text, ',')::bigint[],"
    " string_to_array(%(cumulative)b::text, ',')::numeric[], string_to_array(%(increment)b::text, ',')::numeric[],"
    " string_to_array(%(remaining)b::text, ',')::numeric[], %(signature)b::bytea[], %(reference)b::varchar[],"
    " string_to_array(%(at)b::text, ',')::bigint[], %(keys)b::varchar[], %(attempts)b::varchar[]) WITH ORDINALITY"
    " AS p(channel_no, cumulative, increment, remaining, signature, reference, at, key, attempt, n)),"
    " v AS (SELECT DISTINCT ON (channel_no) channel_no, cumulative, signature, at FROM p"
    " ORDER BY channel_no, cumulative DESC),"
)
_MOVE_LATEST = (
    " latest AS ("
    " UPDATE channels AS c SET accepted = v.cumulative, signature = v.signature, updated_at_us = v.at,"
    " version = c.version + 1"
    " FROM v{held} WHERE c.channel_no = v.channel_no RETURNING c.channel_no)"
    " INSERT INTO payments"
    " (channel_no, cumulative, increment, remaining, signature, reference, accepted_at_us, idempotency_key, attempt)"
    " SELECT p.channel_no, p.cumulative, p.increment, p.remaining, p.signature, p.reference, p.at, p.key, p.attempt"
    " FROM p JOIN latest ON latest.channel_no = p.channel_no ORDER BY p.n"
)
# Under the rows' locks (`lock_versions`).
_RECORD_PAYMENTS = _PAYMENTS_IN + _MOVE_LATEST.format(held="")
# The channel rows still at the versions given (`_at_versions`: the channels' numbers and versions, as pairs).
_ROWS_AT_VERSIONS = (
    "channels AS c JOIN"
    " unnest(string_to_array(%(held_nos)b::text, ',')::bigint[], string_to_array(%(versions)b::text, ',')::bigint[])"
    " AS h(channel_no, version) ON c.channel_no = h.channel_no AND c.version = h.version"
)
# Against the writer's own copies, with no lock taken before: each channel's row is locked here, and only at the
# version the writer holds; a row another transaction holds is skipped, not waited for, so a payment whose channel
# moved or is busy is not inserted.
_RECORD_PAYMENTS_HELD = (
    _PAYMENTS_IN
    + f" held AS MATERIALIZED (SELECT c.channel_no FROM {_ROWS_AT_VERSIONS} FOR UPDATE OF c SKIP LOCKED),"
    + _MOVE_LATEST.format(held=" JOIN held ON held.channel_no = v.channel_no")
)
_VERSIONS_KEPT = f"SELECT count(*) FROM {_ROWS_AT_VERSIONS}"
# Sent first in the writer's pipelined transaction (`_pipelined`). PostgreSQL plans a prepared statement anew at
# every execution for as long as it judges its generic plan dearer than the custom plans of its first executions,
# which it does for good when those had one or two vouchers (the plan of arrays of unknown length looks costly):
# ~250 µs of its CPU a group, a third of a one-voucher group's (docs/benchmarks.md). From ~10 vouchers a group it
# picks the generic plan itself.
_GENERIC_PLANS = "SET LOCAL plan_cache_mode = force_generic_plan"


def _at_versions(
    numbers: Mapping[ChannelId, int], versions: Mapping[ChannelId, int], channel_ids: Iterable[ChannelId]
) -> dict[str, str]:
    """The parameters of `_ROWS_AT_VERSIONS` for these channels: their numbers and versions, pair by pair."""
    ids = list(channel_ids)
    return {"held_nos": _decimals(numbers[c] for c in ids), "versions": _decimals(versions[c] for c in ids)}


def _execute_raw(conn: Connection, statement: str, params: Any) -> Executed:
    """Run `statement` on the transaction's own driver connection: the rows it touched and those it returned, as the
    driver's plain tuples (SQLAlchemy's row processing was a tenth of the SQLite writer's time). On PostgreSQL the
    parameters go in binary (`%(name)b`: the text format quotes every array element, a regular expression each)."""
    driver: Any = conn.connection.driver_connection
    error: type[Exception] = sqlite3.Error if conn.dialect.name == "sqlite" else psycopg.Error
    try:
        cursor = driver.cursor()
        try:
            cursor.execute(statement, params)
            return Executed(int(cursor.rowcount), cursor.fetchall() if cursor.description is not None else [])
        finally:
            cursor.close()
    except error as ex:  # as SQLAlchemy would have raised it: the store's error handling sees no difference
        raise DBAPIError.instance(statement, None, ex, error) from ex


def _payments_statement(
    accepted: Sequence[tuple[Receipt, bytes]], numbers: Mapping[ChannelId, int], held: dict[str, str] | None
) -> Statement:
    receipts = [r for r, _ in accepted]
    at = _times_us(receipts)
    params = {
        "nos": _decimals(numbers[r.channel_id] for r in receipts),
        "cumulative": _decimals(r.cumulative for r in receipts),
        "increment": _decimals(r.increment for r in receipts),
        "remaining": _decimals(r.remaining for r in receipts),
        "signature": [signature for _, signature in accepted],
        "reference": _texts_or_null([r.reference for r in receipts]),
        "at": _decimals(at[r.accepted_at] for r in receipts),
        "keys": _texts_or_null([r.idempotency_key for r in receipts]),
        "attempts": _texts_or_null([r.attempt for r in receipts]),
    }
    if held is None:
        return Statement(_RECORD_PAYMENTS, params)
    return Statement(_RECORD_PAYMENTS_HELD, params | held)


def _check_inserted(statement: str, inserted: int, count: int, *, held: bool) -> None:
    if inserted == count:
        return
    if held:  # a channel moved since the writer's copy, or another transaction holds it
        raise ChannelMovedError("a channel moved since the writer's copy of it, or another transaction holds it")
    # A channel whose row was not updated: fail the group rather than drop a payment.
    missing = psycopg.errors.ForeignKeyViolation("payments without a channel")  # as SQLite's foreign key says it
    raise DBAPIError.instance(statement, None, missing, psycopg.Error)


def _texts_or_null(texts: list[str | None]) -> list[str | None] | None:
    """A text array parameter, or NULL when every element is (the hot path's vouchers carry no metadata)."""
    return texts if any(text is not None for text in texts) else None


def _decimals(numbers: Iterable[int]) -> str:
    """Integers as one comma-separated text for `string_to_array(...)::numeric[]`: joined in C, parsed by the server."""
    return ",".join(map(str, numbers))


def _times_us(receipts: Iterable[Receipt]) -> dict[datetime, int]:
    """Each distinct acceptance time in microseconds: a group's receipts share one, converted once, not per voucher."""
    return {moment: to_us(moment) for moment in {r.accepted_at for r in receipts}}


def _record_payments_sqlite(
    conn: Connection, accepted: Sequence[tuple[Receipt, bytes]], numbers: Mapping[ChannelId, int]
) -> None:
    """Straight to the driver's executemany (a loop in C): SQLAlchemy's per-row bind processing was most of the
    writer's time on the batch endpoint."""
    at = _times_us(r for r, _ in accepted)
    conn.exec_driver_sql(
        "INSERT INTO payments (channel_no, cumulative, increment, remaining, signature, reference, accepted_at_us,"
        " idempotency_key, attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                numbers[r.channel_id],
                sqlite_amount(r.cumulative),
                sqlite_amount(r.increment),
                sqlite_amount(r.remaining),
                signature,
                r.reference,
                at[r.accepted_at],
                r.idempotency_key,
                r.attempt,
            )
            for r, signature in accepted
        ],
    )


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def list_channels(
    conn: Connection,
    *,
    payer: str | None = None,
    payee: str | None = None,
    status: ChannelStatus | None = None,
    after: str | None = None,
    limit: int = 100,
) -> Page[Channel]:
    """Channels in id order, filtered; `after` is the previous page's cursor (the last channel id it held)."""
    conditions = []
    if payer is not None:
        conditions.append(channels.c.payer == payer)
    if payee is not None:
        conditions.append(channels.c.payee == payee)
    if status is not None:
        conditions.append(channels.c.status == int(status))
    if after is not None:
        conditions.append(channels.c.channel_id > after)
    query = channel_rows(conn).where(and_(True, *conditions)).order_by(channels.c.channel_id).limit(limit + 1)
    rows = [channel_from_row(row) for row in conn.execute(query)]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].channel_id if more else None)


def list_payments(conn: Connection, channel_id: str, *, before: int | None = None, limit: int = 100) -> Page[Receipt]:
    """A channel's accepted payments, newest first; `before` is the previous page's cursor (a payment id)."""
    number = conn.execute(select(channels.c.channel_no).where(channels.c.channel_id == channel_id)).scalar()
    query = select(payments).where(payments.c.channel_no == number)
    if before is not None:
        # Ordered by amount, which within a channel is the order of ids, on the (channel_no, cumulative) index: a
        # cursor that names a stored payment becomes an amount bound; any other id is a filter on the same walk.
        bound = conn.execute(
            select(payments.c.cumulative).where(payments.c.id == before, payments.c.channel_no == number)
        ).scalar()
        query = query.where(payments.c.id < before if bound is None else payments.c.cumulative < bound)
    rows = list(conn.execute(query.order_by(payments.c.cumulative.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([_receipt(r, ChannelId(channel_id)) for r in rows], str(rows[-1].id) if more else None)


@dataclass(frozen=True)
class AssetSummary:
    """One payee's position in one asset: what it was paid, what the chain credited, and the difference."""

    token: str
    channels: int
    accepted: int
    settled: int
    unsettled: int


@dataclass(slots=True)
class _Totals:
    """An AssetSummary's sums while `payee_summary` adds a payee's channels up."""

    channels: int = 0
    accepted: int = 0
    settled: int = 0
    unsettled: int = 0


def payee_summary(conn: Connection, payee: str) -> list[AssetSummary]:
    """Per asset; summed in Python because SQLite keeps large amounts as blobs (exact, but not summable in SQL)."""
    query = select(channels.c.token, latest_accepted(conn), channels.c.settled).where(channels.c.payee == payee)
    totals: dict[str, _Totals] = {}  # running, one per asset: a payee's channels are not held in memory
    for token, accepted, settled in conn.execute(query):
        asset = totals.setdefault(token, _Totals())
        asset.channels += 1
        asset.accepted += accepted
        asset.settled += settled
        asset.unsettled += max(accepted - settled, 0)
    return [AssetSummary(token, t.channels, t.accepted, t.settled, t.unsettled) for token, t in sorted(totals.items())]


def count_channels(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(channels)).scalar_one())


def unsettled_by_token(conn: Connection) -> dict[str, int]:
    """Accepted minus settled, summed per asset over every channel (in Python: SQLite keeps large amounts as blobs)."""
    accepted = latest_accepted(conn)
    query = select(channels.c.token, accepted, channels.c.settled).where(accepted > channels.c.settled)
    totals: dict[str, int] = {}
    for token, accepted, settled in conn.execute(query):
        totals[token] = totals.get(token, 0) + accepted - settled
    return totals
