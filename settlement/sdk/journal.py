"""The payer's durable memory: the highest cumulative amount it signed per channel, and each payment until its
outcome is known. The payer SDK writes here BEFORE it sends a voucher, so neither a lost answer nor a restart of the
app can make it sign more than the app asked for (TigerBeetle's reliable submission: the client makes the id,
persists it, retries with it).

One SQLite file per payer key, hub and chain (stdlib `sqlite3`: the SDK needs nothing of the server), in WAL mode
with `synchronous=FULL`, one transaction per change (a receipt's record alone is not flushed: `accepted`). Several
clients of one payer may share the file; a channel is paid by one client at a time (payments on a channel race each
other's cumulative totals otherwise).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from settlement.errors import BudgetExceededError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS positions (
    channel_id TEXT PRIMARY KEY,
    signed TEXT NOT NULL            -- the highest cumulative amount this payer signed on the channel (decimal)
);
CREATE TABLE IF NOT EXISTS payments (
    idempotency_key TEXT PRIMARY KEY,
    channel_id TEXT NOT NULL,
    amount TEXT NOT NULL,           -- what the app asked to pay (decimal base units)
    cumulative TEXT NOT NULL,       -- the voucher signed for it
    reference TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'accepted')),
    receipt TEXT                    -- the service's receipt (JSON), once accepted
);
CREATE INDEX IF NOT EXISTS payments_pending ON payments (channel_id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS spending (  -- what budgets count: every payment signed, until it is refused
    idempotency_key TEXT PRIMARY KEY,
    payee TEXT NOT NULL,
    asset TEXT NOT NULL,
    amount TEXT NOT NULL,
    at REAL NOT NULL                -- unix time it was signed
);
CREATE INDEX IF NOT EXISTS spending_by_time ON spending (asset, at);
"""


@dataclass(frozen=True)
class Budget:
    """At most `limit` base units of `asset` in any `period` seconds (rolling), over every payee together or, with
    `per_payee`, for each payee on its own."""

    limit: int
    period: float
    asset: str = "0x0000000000000000000000000000000000000000"
    per_payee: bool = False


class PaymentStatus(Enum):
    PENDING = "pending"  # signed and (maybe) sent; no answer known yet
    ACCEPTED = "accepted"  # the service answered with a receipt


@dataclass(frozen=True)
class JournalPayment:
    """One payment the app asked for, as the journal holds it."""

    idempotency_key: str
    channel_id: str
    amount: int
    cumulative: int
    reference: str | None
    status: PaymentStatus
    receipt: dict[str, Any] | None


class PayerJournal:
    """A payer's signed positions and payments in one SQLite file. Thread-safe."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self, *, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the journal's lock. `flush=False` commits without waiting for the disk (SQLite's
        `synchronous=NORMAL` in WAL mode: durable if the app dies, not if the machine does; the next flushed commit
        makes it durable too): only for what the journal can learn again from the service."""
        with self._lock:
            if not flush:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    yield self._conn
            finally:
                if not flush:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def signed(self, channel_id: str) -> int | None:
        """The highest cumulative amount this payer signed on the channel, or None if it never paid on it here."""
        with self._lock:
            row = self._conn.execute("SELECT signed FROM positions WHERE channel_id = ?", (channel_id,)).fetchone()
        return None if row is None else int(row[0])

    def payment(self, key: str) -> JournalPayment | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM payments WHERE idempotency_key = ?", (key,)).fetchone()
        return None if row is None else _payment(row)

    def pending(self, channel_id: str) -> list[JournalPayment]:
        """Payments on the channel whose outcome is not known, oldest voucher first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM payments WHERE channel_id = ? AND status = 'pending'", (channel_id,)
            ).fetchall()
        return sorted((_payment(r) for r in rows), key=lambda p: p.cumulative)

    def begin(
        self, payment: JournalPayment, *, spend: tuple[str, str, float] | None = None, budgets: Sequence[Budget] = ()
    ) -> None:
        """Record a payment about to be sent, and raise the channel's signed position to its voucher (one commit).
        `spend`: (payee, asset, now) to count it against `budgets`, checked in the same transaction (concurrent
        payers sharing this file cannot both squeeze under a limit); raises BudgetExceededError and records
        nothing when one would be exceeded."""
        with self._write():
            if spend is not None:
                payee, asset, now = spend
                for budget in budgets:
                    if budget.asset != asset:
                        continue
                    spent = self._spent(asset, now - budget.period, payee if budget.per_payee else None)
                    if spent + payment.amount > budget.limit:
                        raise BudgetExceededError(
                            f"paying {payment.amount} would spend {spent + payment.amount} of {asset} in "
                            f"{budget.period:g}s{' to ' + payee if budget.per_payee else ''}; the budget is "
                            f"{budget.limit}"
                        )
                self._conn.execute(
                    "INSERT OR REPLACE INTO spending VALUES (?, ?, ?, ?, ?)",
                    (payment.idempotency_key, payee, asset, str(payment.amount), now),
                )
            self._conn.execute(
                "INSERT INTO payments VALUES (?, ?, ?, ?, ?, 'pending', NULL) ON CONFLICT (idempotency_key) DO UPDATE"
                " SET cumulative = excluded.cumulative",
                (
                    payment.idempotency_key,
                    payment.channel_id,
                    str(payment.amount),
                    str(payment.cumulative),
                    payment.reference,
                ),
            )
            self._raise(payment.channel_id, payment.cumulative)

    def settle_position(self, channel_id: str, cumulative: int) -> None:
        """A position proven from outside (a voucher this payer signed, or the chain): never lowers it."""
        with self._write():
            self._raise(channel_id, cumulative)

    def reset(self, channel_id: str) -> None:
        """A channel just opened: nothing is signed on it yet. (A journal can outlive a devnet whose channel ids come
        back after a restart; what it held for this id belongs to that other chain.)"""
        with self._write():
            self._conn.execute("DELETE FROM payments WHERE channel_id = ?", (channel_id,))
            self._conn.execute(
                "INSERT INTO positions VALUES (?, '0') ON CONFLICT (channel_id) DO UPDATE SET signed = '0'",
                (channel_id,),
            )

    def accepted(self, key: str, receipt: dict[str, Any], *, lower_to: int | None = None) -> None:
        """The service stored the payment. `lower_to`: it answered with an earlier voucher of the same key (a retry
        signed by another client), so the voucher signed here was not stored and the position is that voucher's.

        Not flushed to disk (half of a payment's journal fsyncs): lost with the machine, the payment is pending again,
        and the next payment on the channel asks the service what became of it before it signs anything."""
        with self._write(flush=False):
            self._conn.execute(
                "UPDATE payments SET status = 'accepted', receipt = ? WHERE idempotency_key = ?",
                (json.dumps(receipt, sort_keys=True), key),
            )
            if lower_to is not None:
                self._conn.execute(
                    "UPDATE positions SET signed = ? WHERE channel_id = (SELECT channel_id FROM payments"
                    " WHERE idempotency_key = ?)",
                    (str(lower_to), key),
                )

    def set_position(self, channel_id: str, cumulative: int) -> None:
        """Put the channel's signed position at `cumulative`, lower or higher: where the service proves it stands."""
        with self._write():
            self._set(channel_id, cumulative)

    def refused(self, key: str, channel_id: str, restore: int) -> None:
        """The service refused the payment's voucher for good: forget the payment and put the signed position back
        to `restore` (what was accepted before it), so the next payment does not pay this one's amount too."""
        with self._write():
            self._conn.execute("DELETE FROM payments WHERE idempotency_key = ?", (key,))
            self._conn.execute("DELETE FROM spending WHERE idempotency_key = ?", (key,))  # refused: it cost nothing
            self._set(channel_id, restore)

    def _set(self, channel_id: str, cumulative: int) -> None:
        self._conn.execute(
            "INSERT INTO positions VALUES (?, ?) ON CONFLICT (channel_id) DO UPDATE SET signed = excluded.signed",
            (channel_id, str(cumulative)),
        )

    def spent(self, asset: str, since: float, payee: str | None = None) -> int:
        """Base units of `asset` signed since `since` (unix time) and not refused, to one payee or to all."""
        with self._lock:
            return self._spent(asset, since, payee)

    def _spent(self, asset: str, since: float, payee: str | None) -> int:
        query = "SELECT amount FROM spending WHERE asset = ? AND at > ?"
        args: tuple[Any, ...] = (asset, since)
        if payee is not None:
            query, args = query + " AND payee = ?", (*args, payee)
        return sum(int(row[0]) for row in self._conn.execute(query, args))

    def _raise(self, channel_id: str, cumulative: int) -> None:
        row = self._conn.execute("SELECT signed FROM positions WHERE channel_id = ?", (channel_id,)).fetchone()
        if row is None or int(row[0]) < cumulative:
            self._set(channel_id, cumulative)


def _payment(row: tuple[Any, ...]) -> JournalPayment:
    key, channel_id, amount, cumulative, reference, status, receipt = row
    return JournalPayment(
        idempotency_key=key,
        channel_id=channel_id,
        amount=int(amount),
        cumulative=int(cumulative),
        reference=reference,
        status=PaymentStatus(status),
        receipt=None if receipt is None else json.loads(receipt),
    )
