"""The payer's durable memory: the highest cumulative amount it signed per channel, each payment until its outcome
is known, and when its x402 clients opened channels (their `max_opens`). The payer SDK writes here BEFORE it sends a
voucher, so neither a lost answer nor a restart of the app can make it sign more than the app asked for
(TigerBeetle's reliable submission: the client makes the id, persists it, retries with it).

One SQLite file per payer key, hub and chain (stdlib `sqlite3`: the SDK needs nothing of the server), in WAL mode
with `synchronous=FULL` (a receipt's record alone is not flushed, and is written with the next change: `accepted`).
Changes made by threads that come while another's is in the journal share one transaction and one flush (a group
commit: on a disk whose flush takes 3 ms, one flush a payment held a payer to ~250 payments a second however many
threads paid); each returns once its change is on disk, and one refused (a budget) takes nothing of the others'.
Several clients of one payer may share the file; a channel is paid by one client at a time (payments on a channel
race each other's cumulative totals otherwise).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

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
    receipt TEXT,                   -- the service's receipt (JSON), once accepted
    accepted_at REAL                -- unix time the receipt came (version 2); forgotten KEEP_ACCEPTED later
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
CREATE INDEX IF NOT EXISTS spending_at ON spending (at);
CREATE TABLE IF NOT EXISTS spend_buckets (  -- what budgets sum: the spending rows added up per second, minute, hour
    width INTEGER NOT NULL,         -- 1, 60 or 3600 seconds
    asset TEXT NOT NULL,
    payee TEXT NOT NULL,            -- '' for every payee together
    start INTEGER NOT NULL,         -- unix seconds, a multiple of width
    amount TEXT NOT NULL,           -- decimal base units
    PRIMARY KEY (width, asset, payee, start)
);
CREATE TABLE IF NOT EXISTS opens (  -- channels opened (or being opened) by this payer's x402 clients: their max_opens
    channel_id TEXT PRIMARY KEY,
    at REAL NOT NULL                -- unix time the open was counted, before it was sent
);
CREATE TABLE IF NOT EXISTS spend_pruned (  -- below which start a width's buckets (and, for seconds, the rows) are gone
    width INTEGER PRIMARY KEY,
    below INTEGER NOT NULL
);
"""
SCHEMA_VERSION = 2  # 1: spend_buckets, filled from a journal's spending rows; 2: payments' accepted_at
_PAYMENT_COLUMNS = "idempotency_key, channel_id, amount, cumulative, reference, status, receipt"
# An accepted payment is kept a week to answer a retry with its key; after that the service's own record of the key
# answers it (`SETTLEMENT_PAYMENT_RETENTION_DAYS`, 30 by default), and the journal does not grow ~1 KB a payment for
# good. A payment not accepted yet is never forgotten.
KEEP_ACCEPTED = 7 * 86_400.0
WIDTHS = (1, 60, 3600)
# How long each width is kept, in seconds of the clock payments are counted with: a budget's window is summed exactly
# while its start is within a day, and a minute (an hour) early at most beyond (a payment counts that much longer).
KEPT = {1: 86_400 + 3_600, 60: 31 * 86_400 + 3_600, 3600: 366 * 86_400 + 3_600}
LONGEST_PERIOD = 366 * 86_400
PRUNE_EVERY = 60.0
RESCUE_AFTER = 0.1  # a change waiting this long for its group's commit looks whether the group was left behind


@dataclass(frozen=True)
class Budget:
    """At most `limit` base units of `asset` in any `period` seconds (rolling), over every payee together or, with
    `per_payee`, for each payee on its own."""

    limit: int
    period: float
    asset: str = "0x0000000000000000000000000000000000000000"
    per_payee: bool = False

    def __post_init__(self) -> None:
        if self.limit < 0 or not 0 < self.period <= LONGEST_PERIOD:
            raise ValueError(f"a budget is a limit >= 0 over a period in (0, {LONGEST_PERIOD}] seconds (366 days)")


class OpensWindow(NamedTuple):
    """The channels opened within a window that is full: how many, and when the oldest was (unix time)."""

    opened: int
    oldest: float


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

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock  # when receipts come (accepted payments are forgotten KEEP_ACCEPTED later)
        self._lock = threading.Lock()
        # The group commit: the writers waiting for the lock (`_queued`), for whom the transaction is left open, its
        # number (`_group`), the last group whose outcome is known, and the groups whose commit failed (with why).
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._group = 0
        self._ended = threading.Condition()
        self._ended_group = 0
        self._failed: dict[int, BaseException] = {}
        self._commits = 0
        self._normal = False  # the connection at synchronous=NORMAL for the transaction open (`flush=False`)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.create_function("add_decimal", 2, _add_decimal, deterministic=True)
        self._conn.executescript(_SCHEMA)
        # Reads the writers' connection cannot serve at once (a change holds it) go through a connection of their own
        # (WAL: they see what is committed, and never wait for a commit waiting for the disk: `_read`).
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._read_lock = threading.Lock()
        self._pruned_at: float | None = None
        self._forgot_at: float | None = None
        self._closed = False
        # Receipts not written yet (`accepted`), by payment key: (receipt JSON, or None for a payment not kept, unix
        # time it came); and those written in the transaction open, not committed yet. Guarded by their own lock,
        # which is never held while waiting for another. Reads look here first, then at the file.
        self._receipts: dict[str, tuple[str | None, float]] = {}
        self._writing: dict[str, tuple[str | None, float]] = {}
        self._receipts_lock = threading.Lock()
        with self._write(with_receipts=False):
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                rows = self._conn.execute("SELECT payee, asset, amount, at FROM spending")
                self._count(rows, 1)  # a journal from before the buckets: its rows added up once
            if version < 2 and "accepted_at" not in {c[1] for c in self._conn.execute("PRAGMA table_info(payments)")}:
                self._conn.execute("ALTER TABLE payments ADD COLUMN accepted_at REAL")
                self._conn.execute(  # accepted before: kept KEEP_ACCEPTED from now
                    "UPDATE payments SET accepted_at = ? WHERE status = 'accepted'", (self.clock(),)
                )
            self._conn.execute(
                "CREATE INDEX IF NOT EXISTS payments_accepted ON payments (accepted_at) WHERE status = 'accepted'"
            )
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Write the receipts not written yet, and close the file (again: nothing)."""
        with self._receipts_lock:
            unwritten = bool(self._receipts)
        if unwritten and not self._closed:
            with self._write(flush=False):
                pass
        with self._lock:
            if not self._closed and self._open:  # left open for a writer that never came (interrupted on its way)
                self._commit()
            self._closed = True
            self._conn.close()
        with self._read_lock:
            self._reader.close()

    @property
    def _open(self) -> bool:
        """Whether a group's transaction is open: SQLite's own word, not a copy of it to keep in step (a change's
        error can end the transaction in SQLite before the journal knows: `_undo`)."""
        return self._conn.in_transaction

    @property
    def commits(self) -> int:
        """Transactions committed so far: with the changes made, how many each flush carried."""
        return self._commits

    @contextmanager
    def _write(
        self, *, flush: bool = True, with_receipts: bool = True, group: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One change under the journal's lock, which first writes the receipts not written yet (`with_receipts`; not
        while the schema is brought up to date); returns once it is committed. When other writers wait for the lock
        and `group`, the transaction is left open for them and committed by the last (one flush for all): this change
        waits for that commit, outside the lock; a change added to an open transaction is made in a savepoint (one
        refused takes nothing of the others'). Not `group`: committed now, with whatever the transaction holds (a
        caller on an event loop must not wait for other threads' changes). `flush=False` commits at once without
        waiting for the disk when the transaction holds nothing else (SQLite's `synchronous=NORMAL` in WAL mode:
        durable if the app dies, not if the machine does; the next flushed commit makes it durable too): only for
        what the journal can learn again from the service."""
        with self._queued_lock:
            self._queued += 1
        try:
            self._lock.acquire()
        finally:
            with self._queued_lock:
                self._queued -= 1
        try:
            joined = self._open
            if not joined:
                self._begin(flush)
            mine = self._group
            written: dict[str, tuple[str | None, float]] = {}
            try:
                if joined:
                    self._conn.execute("SAVEPOINT change")
                written = self._write_receipts() if with_receipts else {}
                yield self._conn
                if joined:
                    self._conn.execute("RELEASE change")
            except BaseException as ex:  # undone (a budget refused): the receipts wait for the next change
                self._restore(written)
                self._undo(joined, ex, group=group and flush)
                raise
            ended = self._end_group(group=group and flush)
        finally:
            self._lock.release()
        if not ended:
            self._await(mine)

    def _undo(self, joined: bool, ex: BaseException, *, group: bool) -> None:
        """Undo a change that failed: its savepoint rolled back and the others' changes committed as if it had not
        come; or, when it was alone in the transaction or the transaction cannot go on (SQLite rolls back a whole
        transaction on some errors: a full disk, an I/O error), the transaction rolled back and its group failed."""
        if not joined or not self._conn.in_transaction:
            self._abandon(ex)
            return
        try:
            self._conn.execute("ROLLBACK TO change")
            self._conn.execute("RELEASE change")
        except sqlite3.Error as failed:
            self._abandon(failed)
            return
        self._end_group(group=group)

    def _begin(self, flush: bool) -> None:
        """Open a transaction (a group), not waiting for the disk at its commit unless `flush` (or a change joins)."""
        if not flush:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._normal = True
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._full()
            raise
        self._group += 1

    def _full(self) -> None:
        if self._normal:
            self._conn.execute("PRAGMA synchronous=FULL")
            self._normal = False

    def _abandon(self, ex: BaseException) -> None:
        """Roll back the open transaction, its receipts waiting for the next change, and fail its group's changes
        (`ex`: why)."""
        group = self._group
        self._failed[group] = ex
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            with self._receipts_lock:
                writing, self._writing = self._writing, {}
            self._restore(writing)
            self._ended_now(group)
            self._full()

    def _end_group(self, *, group: bool) -> bool:
        """Commit the open transaction (True), unless `group` and a writer waits for the lock to add to it."""
        if group:
            with self._queued_lock:
                if self._queued:
                    return False
        self._commit()
        return True

    def _commit(self) -> None:
        """Commit the open transaction and tell the writers waiting for it (under the lock); a failed commit fails
        every change of the group, which is rolled back."""
        try:
            self._conn.execute("COMMIT")
        except BaseException as ex:
            self._abandon(ex)
            raise
        self._commits += 1
        with self._receipts_lock:
            self._writing = {}
        self._ended_now(self._group)
        self._full()

    def _ended_now(self, group: int) -> None:
        """Wake the changes waiting for `group`'s commit (or failure)."""
        with self._ended:
            self._ended_group = group
            if self._failed:
                for old in [g for g in self._failed if g < group - 1_000]:
                    del self._failed[old]
            self._ended.notify_all()

    def _await(self, group: int) -> None:
        """Wait for the commit of the group this change was made in; raise if it failed."""
        while True:
            with self._ended:
                if self._ended.wait_for(lambda: self._ended_group >= group, timeout=RESCUE_AFTER):
                    failed = self._failed.get(group)
                    break
            self._rescue(group)
        if failed is not None:
            raise sqlite3.OperationalError(f"the journal's group commit failed: {failed}") from failed

    def _rescue(self, group: int) -> None:
        """Commit `group` if it is still open with the journal free and no writer on its way: the writer it was left
        open for never came (interrupted while it waited for the lock, a KeyboardInterrupt), and its changes would
        wait for the next payment, or for good."""
        if not self._lock.acquire(blocking=False):
            return  # a writer has it: it commits the group, or leaves it to the next
        try:
            with self._queued_lock:
                orphaned = self._open and self._group == group and not self._queued
            if orphaned:
                with suppress(sqlite3.Error):  # its failure is recorded for each of its changes (`_await`)
                    self._commit()
        finally:
            self._lock.release()

    def _restore(self, written: dict[str, tuple[str | None, float]]) -> None:
        """Receipts whose write was rolled back wait for the next change (the first outcome of a payment wins)."""
        if written:
            with self._receipts_lock:
                for key in written:
                    self._writing.pop(key, None)
                self._receipts = self._receipts | written

    def busy(self) -> bool:
        """Whether another thread is writing to the journal now (a commit waits for the disk while it holds it): a
        caller that must not wait for it goes elsewhere (`PayerClient.authorize_now`)."""
        return self._lock.locked()

    def tidy_due(self, now: float) -> bool:
        """Whether the next change would also tidy up (every PRUNE_EVERY seconds: the spending no budget's window
        reaches, the accepted payments past KEEP_ACCEPTED): a DELETE of up to a minute of payments, tens of ms at
        hundreds of payments a second, which a caller on an event loop leaves to a worker thread
        (`PayerClient.authorize_now`). `now`: the unix time of the next payment's spending."""
        return _due(self._pruned_at, now) or _due(self._forgot_at, self.clock())

    def signed(self, channel_id: str) -> int | None:
        """The highest cumulative amount this payer signed on the channel, or None if it never paid on it here."""
        rows = self._read("SELECT signed FROM positions WHERE channel_id = ?", (channel_id,))
        return None if not rows else int(rows[0][0])

    def payment(self, key: str) -> JournalPayment | None:
        with self._receipts_lock:  # before the file: a receipt committed meanwhile is in the file then
            unwritten = self._writing.get(key) or self._receipts.get(key)
        rows = self._read(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE idempotency_key = ?", (key,))
        if not rows:
            return None
        found = _payment(rows[0])
        if unwritten is not None and found.status == PaymentStatus.PENDING:
            receipt = None if unwritten[0] is None else json.loads(unwritten[0])
            return replace(found, status=PaymentStatus.ACCEPTED, receipt=receipt)
        return found

    def pending(self, channel_id: str) -> list[JournalPayment]:
        """Payments on the channel whose outcome is not known, oldest voucher first."""
        with self._receipts_lock:  # before the file, as `payment`
            concluded = self._writing.keys() | self._receipts.keys()
        query = f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE channel_id = ? AND status = 'pending'"
        rows = [r for r in self._read(query, (channel_id,)) if r[0] not in concluded]
        return sorted((_payment(r) for r in rows), key=lambda p: p.cumulative)

    def _read(self, query: str, args: tuple[Any, ...]) -> list[Any]:
        """Read without waiting for a writer: through the writers' connection when it is free (its pages cached),
        else through the readers' (what is committed: every change whose call returned is)."""
        if self._lock.acquire(blocking=False):
            try:
                return self._conn.execute(query, args).fetchall()
            finally:
                self._lock.release()
        with self._read_lock:
            return self._reader.execute(query, args).fetchall()

    def begin(
        self,
        payment: JournalPayment,
        *,
        spend: tuple[str, str, float] | None = None,
        budgets: Sequence[Budget] = (),
        group: bool = True,
    ) -> None:
        """Record a payment about to be sent, and raise the channel's signed position to its voucher (one commit).
        `spend`: (payee, asset, now) to count it against `budgets`, checked in the same transaction (concurrent
        payers sharing this file cannot both squeeze under a limit); raises BudgetExceededError and records
        nothing when one would be exceeded. `group=False`: committed at once, never left open for other threads'
        changes (a caller on an event loop)."""
        with self._write(group=group):
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
                self._uncount(payment.idempotency_key)  # the same payment begun again replaces its row
                self._conn.execute(
                    "INSERT INTO spending VALUES (?, ?, ?, ?, ?)",
                    (payment.idempotency_key, payee, asset, str(payment.amount), now),
                )
                self._count([(payee, asset, str(payment.amount), now)], 1)
                self._prune(now)
            self._conn.execute(
                f"INSERT INTO payments ({_PAYMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, 'pending', NULL)"
                " ON CONFLICT (idempotency_key) DO UPDATE SET cumulative = excluded.cumulative",
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

    def claim_open(self, channel_id: str, at: float, period: float, limit: int) -> OpensWindow | None:
        """Count a channel about to be opened at `at` against at most `limit` opens in any `period` seconds (one
        transaction: two apps sharing this file cannot both take the last one); None once counted, else the full
        window, nothing counted. In the file, not in memory: a payer restarted (a crash loop, a command run per job)
        started a fresh window, and a payee naming a new `payTo` in each 402 had it open a channel a request again."""
        with self._write():
            self._conn.execute("DELETE FROM opens WHERE at <= ?", (at - LONGEST_PERIOD,))
            count, oldest = self._conn.execute(
                "SELECT count(*), min(at) FROM opens WHERE at > ?", (at - period,)
            ).fetchone()
            if count >= limit:
                return OpensWindow(count, oldest)
            self._conn.execute("INSERT OR REPLACE INTO opens VALUES (?, ?)", (channel_id, at))
        return None

    def unclaim_open(self, channel_id: str) -> None:
        """An open counted by `claim_open` that the chain never took: it does not count."""
        with self._write():
            self._conn.execute("DELETE FROM opens WHERE channel_id = ?", (channel_id,))

    def accepted(self, key: str, receipt: dict[str, Any] | None, *, lower_to: int | None = None) -> None:
        """The service stored the payment (if it is pending here: a payment concluded already keeps its outcome).
        `lower_to`: it answered with an earlier voucher of the same key (a retry signed by another client), so the
        voucher signed here was not stored and the position is that voucher's. No `receipt`: the payment's record is
        dropped, not kept KEEP_ACCEPTED with its receipt: for a voucher someone else delivered under a key of the
        SDK's own (`PayerClient.authorize`: x402), which no retry asks for. Its spending counts on (budgets).

        Not flushed to disk (half of a payment's journal fsyncs): lost with the machine, the payment is pending again,
        and the next payment on the channel asks the service what became of it before it signs anything. Without
        `lower_to` not even written now, but with the journal's next change (or `close`), and read as written
        meanwhile: the caller (x402's hook: the payer app's event loop) never waits for the journal, which another
        payment's commit holds while the disk flushes it (14-38 % of the loop's time at 300 paid requests a second,
        docs/benchmarks.md). Lost with the app then, it is as lost with the machine."""
        written = None if receipt is None else json.dumps(receipt, sort_keys=True)
        with self._receipts_lock:
            if key not in self._writing:  # its first outcome
                self._receipts.setdefault(key, (written, self.clock()))
        if lower_to is None:
            return
        with self._write(flush=False):  # the receipt written first, then the position, in one transaction
            self._conn.execute(
                "UPDATE positions SET signed = ? WHERE channel_id = (SELECT channel_id FROM payments"
                " WHERE idempotency_key = ?)",
                (str(lower_to), key),
            )

    def _write_receipts(self) -> dict[str, tuple[str | None, float]]:
        """The receipts not written yet, in the transaction the journal's lock holds open (returned), the payments
        not kept dropped; and, every PRUNE_EVERY seconds of the journal's clock, accepted payments older than
        KEEP_ACCEPTED forgotten."""
        with self._receipts_lock:
            receipts, self._receipts = self._receipts, {}
            self._writing |= receipts  # read as written until committed (their keys were not here: `accepted`)
        kept = [(receipt, at, key) for key, (receipt, at) in receipts.items() if receipt is not None]
        if kept:
            self._conn.executemany(
                "UPDATE payments SET status = 'accepted', receipt = ?, accepted_at = ?"
                " WHERE idempotency_key = ? AND status = 'pending'",
                kept,
            )
        if len(kept) < len(receipts):
            self._conn.executemany(
                "DELETE FROM payments WHERE idempotency_key = ? AND status = 'pending'",
                ((key,) for key, (receipt, _) in receipts.items() if receipt is None),
            )
        now = self.clock()
        if _due(self._forgot_at, now):
            self._forgot_at = now
            self._conn.execute(
                "DELETE FROM payments WHERE status = 'accepted' AND accepted_at < ?", (now - KEEP_ACCEPTED,)
            )
        return receipts

    def set_position(self, channel_id: str, cumulative: int) -> None:
        """Put the channel's signed position at `cumulative`, lower or higher: where the service proves it stands."""
        with self._write():
            self._set(channel_id, cumulative)

    def refused(self, key: str, channel_id: str, restore: int) -> None:
        """The service refused the payment's voucher for good: forget the payment and put the signed position back
        to `restore` (what was accepted before it), so the next payment does not pay this one's amount too."""
        with self._write():
            self._conn.execute("DELETE FROM payments WHERE idempotency_key = ?", (key,))
            self._uncount(key)  # refused: it cost nothing
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
        """Spent after `since`: the rows of its first, partial second, then whole seconds up to a minute, minutes up
        to an hour, and hours (at most ~60 + 60 + hours-in-the-window bucket rows, whatever the number of payments:
        summing every row of the window took 2.5 s a payment with a million of them). Where a width is pruned at
        `since`, the window starts at the whole minute, then hour, that holds it: counted early, never late."""
        who = payee or ""
        pruned = dict(self._conn.execute("SELECT width, below FROM spend_pruned").fetchall())
        second = math.floor(since)
        total = 0
        if second >= pruned.get(1, second):
            query = "SELECT amount FROM spending WHERE asset = ? AND at > ? AND at < ?"
            args: tuple[Any, ...] = (asset, since, second + 1)
            if payee is not None:
                query, args = query + " AND payee = ?", (*args, payee)
            total += sum(int(row[0]) for row in self._conn.execute(query, args))
            start = second + 1
        elif second >= pruned.get(60, second):
            start = second // 60 * 60
        else:
            start = second // 3600 * 3600
        minute = -(-start // 60) * 60
        hour = -(-minute // 3600) * 3600
        for width, low, high in ((1, start, minute), (60, minute, hour), (3600, hour, None)):
            query = "SELECT amount FROM spend_buckets WHERE width = ? AND asset = ? AND payee = ? AND start >= ?"
            args = (width, asset, who, low)
            if high is not None:
                query, args = query + " AND start < ?", (*args, high)
            total += sum(int(row[0]) for row in self._conn.execute(query, args))
        return total

    def _count(self, rows: Iterable[tuple[str, str, str, float]], sign: int) -> None:
        """Add (sign 1) or take away (-1) spending rows (payee, asset, amount, at) in the buckets that hold them."""
        changes: defaultdict[tuple[int, str, str, int], int] = defaultdict(int)
        for payee, asset, amount, at in rows:
            second, value = math.floor(at), sign * int(amount)
            for width in WIDTHS:
                start = second // width * width
                changes[(width, asset, payee, start)] += value
                changes[(width, asset, "", start)] += value
        self._conn.executemany(
            "INSERT INTO spend_buckets VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (width, asset, payee, start) DO UPDATE SET amount = add_decimal(amount, excluded.amount)",
            ((*key, str(value)) for key, value in changes.items()),
        )

    def _uncount(self, key: str) -> None:
        """Take a payment's spending row out of the counts, if it has one (a row pruned already counts on, early)."""
        row = self._conn.execute("SELECT payee, asset, amount, at FROM spending WHERE idempotency_key = ?", (key,))
        found = row.fetchone()
        if found is not None:
            self._count([found], -1)
            self._conn.execute("DELETE FROM spending WHERE idempotency_key = ?", (key,))

    def _prune(self, now: float) -> None:
        """Every PRUNE_EVERY seconds of the payments' clock: drop what no budget's window can reach (KEPT)."""
        if not _due(self._pruned_at, now):
            return
        self._pruned_at = now
        for width in WIDTHS:
            below = (math.floor(now) - KEPT[width]) // width * width
            self._conn.execute("DELETE FROM spend_buckets WHERE width = ? AND start < ?", (width, below))
            self._conn.execute(
                "INSERT INTO spend_pruned VALUES (?, ?)"
                " ON CONFLICT (width) DO UPDATE SET below = max(below, excluded.below)",
                (width, below),
            )
            if width == 1:
                self._conn.execute("DELETE FROM spending WHERE at < ?", (below,))

    def _raise(self, channel_id: str, cumulative: int) -> None:
        row = self._conn.execute("SELECT signed FROM positions WHERE channel_id = ?", (channel_id,)).fetchone()
        if row is None or int(row[0]) < cumulative:
            self._set(channel_id, cumulative)


def _due(last: float | None, now: float) -> bool:
    """Whether a tidy-up last done at `last` is due again at `now`: every PRUNE_EVERY seconds, or when the clock went
    back."""
    return last is None or not 0 <= now - last < PRUNE_EVERY


def _add_decimal(a: str, b: str) -> str:
    """SQLite's `+` turns an integer overflow into a float: amounts are added as Python ints, in decimal text."""
    return str(int(a) + int(b))


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
