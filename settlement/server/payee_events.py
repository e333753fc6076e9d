"""A payee's events, in order, from a position: `payment.accepted` (each accepted payment), `payment.settled` (a
channel's new settled amount, with the transaction), `channel.closing` (with the deadline) and `channel.closed`.
Webhooks and the live stream read the same feed (docs/payee-events.md).

The position is (last payment id, last chain event's block and log index). Payment ids come from the store's
sequence: on PostgreSQL with several processes, an id can become visible after a higher one (two transactions
committing out of order), so the feed reads payments only up to the `Horizon`: the highest id below which no id is
missing, or missing for longer than `gap_wait` seconds (a rolled-back insert leaves a hole that never fills). Chain
events are read once the indexer recorded them, i.e. once confirmed.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from settlement.chain.batch_codec import decode_settlements
from settlement.domain.model import ChainPosition, HubEvent
from settlement.store import Database
from settlement.store.payee_events import (
    ChainRow,
    PaymentRow,
    chain_events_after,
    last_chain_position,
    payees_of_chain_events,
    payees_paid,
    payment_ids_after,
    payments_after,
)

MAX_ID = 2**63 - 1  # payment ids and block numbers are 64-bit in the store
MAX_LOG = 2**31 - 1  # log indexes are 32-bit
_PART = re.compile(r"-?[0-9]{1,19}")  # one number of a position: ASCII digits, at most a 64-bit integer's


@dataclass(frozen=True)
class Position:
    payment: int = 0
    block: int = 0
    log: int = -1

    @property
    def chain(self) -> ChainPosition:
        return ChainPosition(self.block, self.log)

    def token(self) -> str:
        return f"{self.payment}.{self.block}.{self.log}"

    @classmethod
    def parse(cls, token: str) -> Position | None:
        parts = token.split(".")
        if len(parts) != 3 or not all(_PART.fullmatch(p) for p in parts):
            return None  # ("²" and "--1" passed str.isdigit's test, and int() raised: a 500)
        payment, block, log = (int(p) for p in parts)
        if not (0 <= payment <= MAX_ID and 0 <= block <= MAX_ID and -1 <= log <= MAX_LOG):
            return None  # beyond what the store's columns hold: the databases refuse to compare with it (a 500)
        return cls(payment, block, log)


@dataclass(frozen=True)
class PayeeEvent:
    event_id: str  # stable: the same event always has the same id, whoever delivers it
    type: str
    position: Position  # where a reader stands after this event
    data: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"id": self.event_id, "type": self.type, "position": self.position.token(), "data": self.data}


@dataclass(frozen=True)
class Front:
    """How far the feed reaches for every payee: payments up to `horizon`, chain events up to (`block`, `log`)."""

    horizon: int
    block: int
    log: int

    @property
    def chain(self) -> ChainPosition:
        return ChainPosition(self.block, self.log)


def read_front(db: Database, horizon: Horizon) -> Front:
    safe = horizon.refresh()  # first: every payment up to it is visible to the chain read below too
    with db.read() as conn:
        return Front(safe, *last_chain_position(conn))


def payees_moved(db: Database, since: Front, now: Front) -> set[str] | None:
    """The payees (lower case) with an event between two fronts, or None when that cannot be told (the chain's
    position went back: a reorganisation replaced events): then every payee may have one."""
    if now.chain < since.chain or now.horizon < since.horizon:
        return None
    with db.read() as conn:
        moved = payees_paid(conn, since.horizon, now.horizon) if now.horizon > since.horizon else set()
        if now.chain > since.chain:
            moved |= payees_of_chain_events(conn, since.block, since.log)
    return moved


class Gap(NamedTuple):
    missing: int  # the first payment id not visible yet
    since: float  # monotonic seconds: when it was first found missing


class Horizon:
    """The highest payment id up to which every id is visible or given up on (see the module's docstring)."""

    def __init__(self, db: Database, gap_wait: float = 5.0, scan: int = 10_000) -> None:
        self.db = db
        self.gap_wait = gap_wait
        self.scan = scan
        self._safe = 0
        self._gap: Gap | None = None
        self._lock = threading.Lock()

    def refresh(self) -> int:
        with self._lock:
            while True:
                with self.db.read() as conn:
                    ids = payment_ids_after(conn, self._safe, self.scan)
                if not ids:
                    return self._safe
                for found in ids:
                    if found != self._safe + 1 and not self._given_up(self._safe + 1):
                        return self._safe
                    self._safe, self._gap = found, None
                if len(ids) < self.scan:
                    return self._safe

    def _given_up(self, missing: int) -> bool:
        now = time.monotonic()
        if self._gap is None or self._gap.missing != missing:
            self._gap = Gap(missing, now)
        return now - self._gap.since >= self.gap_wait


@dataclass(frozen=True)
class Feed:
    """One read of a payee's feed: its events, and where the reader stands after it. The position passes every row
    the read looked at, the payee's or not, so the next read starts there: a quiet payee's reader does not walk
    again the other payees' payments and settlements it has already looked past (nor stop behind a full page of
    them). `more`: the read stopped at its limit; read again at once."""

    events: list[PayeeEvent]
    position: Position
    more: bool


def read_events(db: Database, horizon: int, payee: str, after: Position, limit: int = 100) -> Feed:
    """The payee's next events after `after`: its payments up to `horizon` first, then its chain events."""
    with db.read() as conn:
        found = payments_after(conn, payee, after.payment, limit)
        rows = [r for r in found if r.payment_id <= horizon]
        events = [_accepted(r, Position(r.payment_id, after.block, after.log)) for r in rows]
        if len(rows) < len(found) or len(events) >= limit:  # payments not yet safe to pass: chain events wait
            position = events[-1].position if events else after  # behind them (settled after accepted)
            return Feed(events, position, more=len(events) >= limit)
        # Every payment of the payee after `after` is in `events` and none is above the horizon: the reader passes
        # every payment up to the horizon.
        last = max(after.payment, horizon)
        position = Position(last, after.block, after.log)
        chain = chain_events_after(conn, payee, after.block, after.log, limit)
        for row in chain:
            position = Position(last, row.block_number, row.log_index)
            events.extend(_chain(row, payee, position))
    return Feed(events, position, more=len(chain) >= limit)


def _accepted(row: PaymentRow, position: Position) -> PayeeEvent:
    return PayeeEvent(
        f"pay_{row.payment_id}",
        "payment.accepted",
        position,
        {
            "channelId": row.channel_id,
            "payer": row.payer,
            "token": row.token,
            "cumulativeAmount": str(row.cumulative),
            "increment": str(row.increment),
            "reference": row.reference,
            "idempotencyKey": row.idempotency_key,
            "acceptedAt": datetime.fromtimestamp(row.accepted_at_us / 1e6, UTC).isoformat(),
        },
    )


def _chain(row: ChainRow, payee: str, position: Position) -> list[PayeeEvent]:
    base = {"transaction": row.tx_hash, "block": row.block_number}
    stem = f"evt_{row.block_number}_{row.log_index}"
    if row.event == HubEvent.CHANNELS_SETTLED:
        if str(row.args.get("payee", "")).lower() != payee.lower():
            return []
        records = decode_settlements(bytes.fromhex(str(row.args["settlements"]).removeprefix("0x")))
        return [
            PayeeEvent(
                f"{stem}_{n}",
                "payment.settled",
                position,
                {"channelId": channel_id, "token": row.args["token"], "settledAmount": str(amount)} | base,
            )
            for n, (channel_id, amount) in enumerate(records)
        ]
    if row.event == HubEvent.CLOSE_REQUESTED:
        data = {"channelId": row.channel_id, "closeDeadline": int(row.args["deadline"])}
        return [PayeeEvent(stem, "channel.closing", position, data | base)]
    data = {"channelId": row.channel_id, "settled": str(row.args["settled"]), "refund": str(row.args["refund"])}
    return [PayeeEvent(stem, "channel.closed", position, data | base)]
