"""The payer's journal alone: spend budgets over rolling periods, counted durably and atomically with the voucher."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from settlement.errors import BudgetExceededError
from settlement.sdk.journal import (
    KEEP_ACCEPTED,
    LONGEST_PERIOD,
    Budget,
    JournalPayment,
    OpensWindow,
    PayerJournal,
    PaymentStatus,
)
from tests.hub_helpers import ETH

A, B = "0x" + "aa" * 20, "0x" + "bb" * 20


def payment(key: str, amount: int, channel: str = "0x01") -> JournalPayment:
    return JournalPayment(key, channel, amount, amount, None, PaymentStatus.PENDING, None)


def test_budgets_count_signed_payments_per_period_overall_and_per_payee(tmp_path: Path) -> None:
    journal = PayerJournal(tmp_path / "j.sqlite3")
    budgets = [Budget(limit=100, period=3600), Budget(limit=60, period=3600, per_payee=True)]
    journal.begin(payment("k1", 50), spend=(A, ETH, 1000.0), budgets=budgets)
    with pytest.raises(BudgetExceededError, match="to 0x" + "aa" * 20):
        journal.begin(payment("k2", 11), spend=(A, ETH, 1001.0), budgets=budgets)  # A's own 60 in an hour
    journal.begin(payment("k3", 10), spend=(A, ETH, 1001.0), budgets=budgets)  # exactly A's 60
    journal.begin(payment("k4", 40, "0x02"), spend=(B, ETH, 1002.0), budgets=budgets)  # exactly 100 overall
    with pytest.raises(BudgetExceededError) as info:
        journal.begin(payment("k5", 1, "0x02"), spend=(B, ETH, 1003.0), budgets=budgets)
    assert info.value.code == "budget_exceeded"
    assert journal.payment("k5") is None and journal.payment("k2") is None  # nothing recorded for a refusal
    assert journal.spent(ETH, 0) == 100
    journal.refused("k4", "0x02", 0)  # a refused payment cost nothing: its budget comes back
    journal.begin(payment("k6", 40, "0x02"), spend=(B, ETH, 1004.0), budgets=budgets)
    # Rolling: an hour after the first payment it no longer counts; another asset never did.
    journal.begin(payment("k7", 50), spend=(A, ETH, 4601.0), budgets=budgets)
    journal.begin(payment("k8", 10**6, "0x03"), spend=(A, "0x" + "cc" * 20, 4601.0), budgets=budgets)
    journal.close()
    reopened = PayerJournal(tmp_path / "j.sqlite3")  # durable: a restarted app keeps its budget
    assert reopened.spent(ETH, 1000.5) == 10 + 40 + 50  # k3, k6, k7: k1 (at 1000) is out of this window
    assert reopened.spent(ETH, 1000.5, payee=A) == 10 + 50
    with pytest.raises(BudgetExceededError, match="would spend 101"):
        reopened.begin(payment("k9", 11), spend=(A, ETH, 4601.5), budgets=budgets)  # 40 + 50 + 11 in the hour
    reopened.begin(payment("k10", 10), spend=(A, ETH, 4601.5), budgets=budgets)  # 100 exactly: allowed
    reopened.close()


def test_concurrent_payments_cannot_squeeze_past_a_budget(tmp_path: Path) -> None:
    """Two apps sharing one journal file, 40 payments racing for a budget of 25: exactly 25 are signed."""
    path = tmp_path / "shared.sqlite3"
    journals = [PayerJournal(path), PayerJournal(path)]
    budget = [Budget(limit=25, period=60)]
    signed: list[str] = []
    start = threading.Barrier(40)

    def pay(n: int) -> None:
        start.wait()
        try:
            journals[n % 2].begin(payment(f"p{n}", 1, f"0x{n:02x}"), spend=(A, ETH, 10.0), budgets=budget)
            signed.append(f"p{n}")
        except BudgetExceededError:
            pass

    threads = [threading.Thread(target=pay, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(signed) == 25
    assert journals[0].spent(ETH, 0) == 25
    for journal in journals:
        journal.close()


def test_opens_are_counted_once_in_a_rolling_window_shared_by_the_apps_of_one_file(tmp_path: Path) -> None:
    """x402's `max_opens`: two apps sharing one journal file, 12 opens racing for a window of 5: exactly 5 counted,
    the others told the window (how many, the oldest); an open the chain never took gives its place back; 366 days
    on, the rows of then are gone."""
    path = tmp_path / "shared.sqlite3"
    journals = [PayerJournal(path), PayerJournal(path)]
    answers: dict[int, OpensWindow | None] = {}
    start = threading.Barrier(12)

    def claim(n: int) -> None:
        start.wait()
        answers[n] = journals[n % 2].claim_open(f"0x{n:064x}", 1000.0 + n / 100, 3600, 5)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counted = sorted(n for n, full in answers.items() if full is None)
    assert len(counted) == 5
    oldest = 1000.0 + counted[0] / 100
    assert sorted(full for full in answers.values() if full is not None) == [OpensWindow(5, oldest)] * 7
    journals[1].unclaim_open(f"0x{counted[-1]:064x}")
    assert journals[0].claim_open("0x" + "ab" * 32, 1100.0, 3600, 5) is None
    assert journals[0].claim_open("0x" + "cd" * 32, 1100.0, 3600, 5) == OpensWindow(5, oldest)
    assert journals[0].claim_open("0x" + "cd" * 32, oldest + 3600, 3600, 5) is None  # the oldest left the window
    assert journals[1].claim_open("0x" + "ef" * 32, 1100.0 + LONGEST_PERIOD, 3600, 1) is None
    with closing(sqlite3.connect(path)) as conn:
        kept = conn.execute("SELECT channel_id FROM opens ORDER BY at").fetchall()
        assert kept == [("0x" + "cd" * 32,), ("0x" + "ef" * 32,)]  # the one at `oldest + 3600` within the year
    for journal in journals:
        journal.close()


def test_budget_sums_over_the_buckets_equal_the_payments_in_every_window_within_a_day(tmp_path: Path) -> None:
    """A budget's window is summed over per-second, per-minute and per-hour totals (a sum over every row took 2.5 s a
    payment with a million of them in the window): the same as adding up the payments after `since`, to the base
    unit, for windows starting anywhere in the last day, overall and per payee, with refused and re-begun payments
    taken out, amounts past 2^64, and a journal reopened."""
    rng = random.Random(20)
    journal = PayerJournal(tmp_path / "j.sqlite3")
    start, kept = 1_700_000_000.0, {}
    for n in range(3_000):
        at = start + rng.uniform(0, 3 * 3600)
        key, payee = f"k{n % 2_900}", rng.choice((A, B))  # 100 keys begun twice: the later one counts
        amount = rng.choice((1, rng.randrange(1, 10**6), rng.randrange(2**64, 2**70)))
        journal.begin(payment(key, amount), spend=(payee, ETH, at))
        kept[key] = (payee, amount, at)
    for key in rng.sample(sorted(kept), 300):
        journal.refused(key, "0x01", 0)
        del kept[key]
    journal.close()
    journal = PayerJournal(tmp_path / "j.sqlite3")
    moments = [
        start - 1,
        start,
        *(start + rng.uniform(0, 3 * 3600) for _ in range(200)),
        *[at for *_, at in kept.values()][:50],
    ]
    checked = 0
    for since in moments:
        for whom in (None, A, B):
            expected = sum(a for p, a, at in kept.values() if at > since and whom in (None, p))
            assert journal.spent(ETH, since, whom) == expected
            checked += expected > 0
    assert checked > 500  # the windows held payments
    journal.close()


def test_windows_reaching_past_a_day_count_early_never_late_and_old_totals_are_pruned(tmp_path: Path) -> None:
    """Seconds (and the rows) are kept a day, minutes 31 days, hours 366: a window whose start lies further back than
    a width is kept starts at the whole minute or hour that holds it. A budget can refuse a payment a minute (an hour)
    early, never let one through late."""
    journal = PayerJournal(tmp_path / "j.sqlite3")
    day, t0 = 86_400, 1_700_000_000  # t0: 800 s into its hour, 20 s into its minute
    now, t1 = t0 + 40 * day, t0 + 30 * day  # t1: 10 days before now, 20 s into its minute too
    paid = [(t0 + 30.5, 7), (t0 + 90.25, 11), (t0 + 3_000.75, 13), (t1 + 5.5, 3), (t1 + 30.25, 5), (now, 1)]
    for n, (at, amount) in enumerate(paid):  # each begin prunes what its clock puts out of reach
        journal.begin(payment(f"k{n}", amount), spend=(A, ETH, at))
    assert journal.spent(ETH, t0 + 90.5) == 7 + 11 + 13 + 3 + 5 + 1  # from t0's whole hour: 18 early
    assert journal.spent(ETH, t0 + 2_800) == 13 + 3 + 5 + 1  # an hour's start: exact
    assert journal.spent(ETH, t1 + 10) == 3 + 5 + 1  # from t1's whole minute: 3 early
    assert [journal.spent(ETH, now - d) for d in (100.5, 0.001, 0)] == [1, 1, 0]  # within a day: exact
    with pytest.raises(ValueError, match="366 days"):
        Budget(limit=1, period=367 * day)
    journal.close()


def test_a_journal_from_before_the_buckets_counts_its_payments_once_opened(tmp_path: Path) -> None:
    """Journals written by the earlier SDK have the spending rows only: opening one adds them up, once."""
    path = tmp_path / "old.sqlite3"
    PayerJournal(path).close()
    with closing(sqlite3.connect(path)) as old, old:
        old.executemany(
            "INSERT INTO spending VALUES (?, ?, ?, ?, ?)",
            [("a", A, ETH, "5", 100.5), ("b", B, ETH, str(2**80), 160.0), ("c", A, ETH, "7", 3_700.0)],
        )
        old.execute("DELETE FROM spend_buckets")
        old.execute("PRAGMA user_version = 0")
    for _ in range(2):  # the second open adds nothing again
        journal = PayerJournal(path)
        assert [journal.spent(ETH, s) for s in (0, 100.5, 3_699)] == [12 + 2**80, 7 + 2**80, 7]
        assert journal.spent(ETH, 0, payee=A) == 12
        journal.close()


def test_accepted_payments_are_forgotten_a_week_after_their_receipt_and_pending_ones_never(tmp_path: Path) -> None:
    """The journal kept every accepted payment with its receipt for good (~1 KB a payment). A retry with a key
    within a week gets its receipt from here; after that from the service's record of the key (30 days by default)."""
    clock = [0.0]
    journal = PayerJournal(tmp_path / "j.sqlite3", clock=lambda: clock[0])
    for key, at in (("old", 0.0), ("recent", 3 * 86_400.0), ("pending", 0.0)):
        clock[0] = at
        journal.begin(payment(key, 1))
        if key != "pending":
            journal.accepted(key, {"cumulativeAmount": "1"})
    clock[0] = KEEP_ACCEPTED + 1.0
    journal.begin(payment("new", 1))
    journal.accepted("new", {"cumulativeAmount": "1"})
    kept = {key: journal.payment(key) for key in ("old", "recent", "pending", "new")}
    assert [key for key, found in kept.items() if found is not None] == ["recent", "pending", "new"]
    assert kept["recent"] is not None and kept["recent"].receipt == {"cumulativeAmount": "1"}
    journal.close()


def test_the_tidy_up_is_due_once_a_minute_of_spending_or_of_receipts(tmp_path: Path) -> None:
    """`tidy_due`: whether the next change also deletes what no budget and no retry can reach, the work a payer on an
    event loop leaves to a worker thread. Due until a change with spending tidied up, then again a minute of either
    clock later (the spending's, or the journal's own for the receipts), or when a clock went back."""
    clock = [1_000.0]
    journal = PayerJournal(tmp_path / "j.sqlite3", clock=lambda: clock[0])
    assert journal.tidy_due(1_000.0) is True  # never tidied
    journal.begin(payment("first", 1), spend=(A, ETH, 1_000.0))
    assert [journal.tidy_due(at) for at in (1_000.0, 1_059.0, 1_060.0, 999.0)] == [False, False, True, True]
    clock[0] = 1_060.0  # a minute of the receipts' clock
    assert journal.tidy_due(1_001.0) is True
    journal.begin(payment("second", 1), spend=(A, ETH, 1_001.0))  # tidies the receipts; the spending's not due
    assert journal.tidy_due(1_001.0) is False
    journal.close()


def test_a_journal_from_before_the_receipts_times_keeps_its_accepted_payments_a_week_from_opening(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    with closing(sqlite3.connect(path)) as old, old:  # the payments table as the SDK wrote it before version 2
        old.execute(
            "CREATE TABLE payments (idempotency_key TEXT PRIMARY KEY, channel_id TEXT NOT NULL, amount TEXT NOT NULL,"
            " cumulative TEXT NOT NULL, reference TEXT, status TEXT NOT NULL, receipt TEXT)"
        )
        old.execute("INSERT INTO payments VALUES ('a', '0x01', '5', '5', NULL, 'accepted', '{}')")
        old.execute("INSERT INTO payments VALUES ('p', '0x01', '2', '7', NULL, 'pending', NULL)")
        old.execute("PRAGMA user_version = 1")
    clock = [1_000.0]
    journal = PayerJournal(path, clock=lambda: clock[0])
    assert [journal.payment(k) is not None for k in ("a", "p")] == [True, True]
    clock[0] += KEEP_ACCEPTED + 1.0
    journal.begin(payment("b", 1, "0x02"))
    journal.accepted("b", {})
    assert [journal.payment(k) is not None for k in ("a", "p", "b")] == [False, True, True]
    assert [p.idempotency_key for p in journal.pending("0x01")] == ["p"]
    journal.close()


def test_a_receipt_is_recorded_without_waiting_for_the_journal_and_read_as_written_until_it_is(tmp_path: Path) -> None:
    """x402's answer hook records a payment's receipt on the payer app's event loop. The journal's file is often held
    by another payment's commit while the disk flushes it, and the loop waited for it (14-38 % of its time at 300 paid
    requests a second). Here another connection holds the file's write lock: the receipt is taken at once, read back
    as written, and written with the journal's next change."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    journal.begin(payment("k1", 5))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a commit of another client of this file, not done yet
    recorded = threading.Thread(target=journal.accepted, args=("k1", {"cumulativeAmount": "5"}))
    recorded.start()
    recorded.join(timeout=5)
    still_waiting = recorded.is_alive()
    found = journal.payment("k1")  # reads do not wait for the writer (WAL)
    pending = journal.pending("0x01")
    holder.execute("ROLLBACK")
    holder.close()
    recorded.join()
    assert not still_waiting
    assert found is not None and (found.status, found.receipt) == (PaymentStatus.ACCEPTED, {"cumulativeAmount": "5"})
    assert pending == []
    restarted = PayerJournal(path)  # lost with the app before the next change: pending again (asked of the service)
    lost = restarted.payment("k1")
    assert lost is not None and lost.status == PaymentStatus.PENDING
    journal.begin(payment("k2", 1, "0x02"))  # the next change writes it
    written = restarted.payment("k1")
    assert written is not None and (written.status, written.receipt) == (
        PaymentStatus.ACCEPTED,
        {"cumulativeAmount": "5"},
    )
    journal.close()
    restarted.close()


def test_a_receipt_not_written_yet_outlives_a_refused_change_and_is_written_by_close(tmp_path: Path) -> None:
    """The receipts wait for the next change; a change that is undone (a budget refused) must not take them with it.
    A payment keeps its first outcome: a second receipt for it changes nothing."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    budget = [Budget(limit=10, period=60)]
    journal.begin(payment("k1", 10), spend=(A, ETH, 1000.0), budgets=budget)
    journal.accepted("k1", {"n": 1})
    journal.accepted("k1", {"n": 2})
    with pytest.raises(BudgetExceededError):
        journal.begin(payment("k2", 1, "0x02"), spend=(A, ETH, 1001.0), budgets=budget)  # rolled back
    journal.close()
    journal.close()  # again: nothing
    reopened = PayerJournal(path)
    found = reopened.payment("k1")
    assert found is not None and (found.status, found.receipt) == (PaymentStatus.ACCEPTED, {"n": 1})
    assert reopened.payment("k2") is None and reopened.spent(ETH, 0) == 10
    reopened.refused("k1", "0x01", 0)  # gone (refused) ...
    reopened.accepted("k1", {"n": 3})  # ... a receipt for it then records nothing
    reopened.close()
    again = PayerJournal(path)
    assert again.payment("k1") is None
    again.close()


def test_a_payment_delivered_by_another_is_dropped_once_accepted_and_its_spending_counts_on(tmp_path: Path) -> None:
    """x402's payments (`PayerClient.authorize`: keys of the SDK's own, never retried) were kept a week with their
    receipts, ~1 KB a payment: accepted without a receipt, the record is dropped with the journal's next change.
    Until then it reads as accepted; its spending counts on after; a second outcome for it changes nothing."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    journal.begin(payment("k1", 5), spend=(A, ETH, 1000.0))
    journal.accepted("k1", None)
    found = journal.payment("k1")
    assert found is not None and (found.status, found.receipt) == (PaymentStatus.ACCEPTED, None)
    assert journal.pending("0x01") == []
    journal.begin(payment("k2", 1, "0x02"), spend=(A, ETH, 1001.0))  # the next change drops it
    journal.accepted("k1", {"cumulativeAmount": "5"})  # a second outcome: nothing
    journal.accepted("k2", None)
    journal.close()  # drops k2
    with closing(sqlite3.connect(path)) as raw, raw:
        assert raw.execute("SELECT COUNT(*) FROM payments").fetchone() == (0,)
    reopened = PayerJournal(path)
    assert (reopened.payment("k1"), reopened.payment("k2")) == (None, None)
    assert (reopened.spent(ETH, 0), reopened.spent(ETH, 0, A), reopened.spent(ETH, 1000.5)) == (6, 6, 1)
    assert (reopened.signed("0x01"), reopened.signed("0x02")) == (5, 1)  # the positions stand
    reopened.close()


def test_a_payment_not_kept_that_was_lost_before_the_next_change_is_pending_again(tmp_path: Path) -> None:
    """Dropped with the next change: an app that dies before it finds the payment pending (and asks the service)."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    journal.begin(payment("k1", 5), spend=(A, ETH, 1000.0))
    journal.accepted("k1", None)
    restarted = PayerJournal(path)  # the app died (the first journal's memory lost)
    assert [p.idempotency_key for p in restarted.pending("0x01")] == ["k1"]
    restarted.close()
    journal.close()


def _queue_behind_the_lock(journal: PayerJournal, calls: list[Callable[[], None]]) -> list[BaseException | None]:
    """Run each call in a thread of its own while this thread holds the journal's lock (as a commit waiting for the
    disk holds it), release it once every call waits for it, and return what each raised (None: nothing)."""
    outcomes: list[BaseException | None] = [None] * len(calls)

    def run(n: int) -> None:
        try:
            calls[n]()
        except BaseException as ex:  # recorded for the test to assert
            outcomes[n] = ex

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(len(calls))]
    with journal._lock:  # white box: the lock is what makes writers come together
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while journal._queued < len(calls) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert journal._queued == len(calls)
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()  # a change left waiting for a commit that never comes
    return outcomes


def _on_disk(path: Path, key: str) -> bool:
    """Whether another connection (another process, a restart) sees the payment: its transaction was committed."""
    with closing(sqlite3.connect(path)) as other:
        return other.execute("SELECT 1 FROM payments WHERE idempotency_key = ?", (key,)).fetchone() is not None


def test_payments_begun_while_the_journal_is_busy_share_one_commit_each_on_disk_when_its_begin_returns(
    tmp_path: Path,
) -> None:
    """A group commit: eight payments that wait for the journal while another change holds it are committed together
    (one flush), and each `begin` returns only once its payment is committed, never while the group is still open."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    journal.begin(payment("first", 1, "0x00"))
    before = journal.commits
    seen: dict[str, bool] = {}

    def pay(n: int) -> Callable[[], None]:
        def call() -> None:
            journal.begin(payment(f"g{n}", 10 + n, f"0x{n + 1:02x}"), spend=(A, ETH, 1000.0))
            seen[f"g{n}"] = _on_disk(path, f"g{n}")  # as soon as begin returned

        return call

    assert _queue_behind_the_lock(journal, [pay(n) for n in range(8)]) == [None] * 8
    assert journal.commits == before + 1
    assert seen == {f"g{n}": True for n in range(8)}
    assert journal.spent(ETH, 0) == sum(10 + n for n in range(8))
    assert [journal.signed(f"0x{n + 1:02x}") for n in range(8)] == [10 + n for n in range(8)]
    journal.close()


def test_a_payment_refused_in_a_group_takes_nothing_of_the_others(tmp_path: Path) -> None:
    """One payment of the group passes its budget alone: it is refused and recorded nowhere; the other five are
    committed in the one transaction, with their spending."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    budget = [Budget(limit=100, period=60)]

    def pay(n: int, amount: int) -> Callable[[], None]:
        def call() -> None:
            journal.begin(payment(f"p{n}", amount, f"0x{n:02x}"), spend=(A, ETH, 1000.0), budgets=budget)

        return call

    calls = [pay(n, 10) for n in range(5)] + [pay(5, 101)]
    before = journal.commits
    outcomes = _queue_behind_the_lock(journal, calls)
    assert outcomes[:5] == [None] * 5
    assert isinstance(outcomes[5], BudgetExceededError)
    assert journal.commits == before + 1
    assert [_on_disk(path, f"p{n}") for n in range(6)] == [True] * 5 + [False]
    assert journal.spent(ETH, 0) == 50 and journal.signed("0x05") is None
    journal.close()


class _BrokenDisk:
    """The journal's connection, on which the statements `breaks` picks fail as a failing disk fails them in SQLite:
    with the whole transaction rolled back first when `whole` (a full disk), else the statement alone (once)."""

    def __init__(self, conn: sqlite3.Connection, breaks: Callable[[str, tuple[Any, ...]], bool], whole: bool) -> None:
        self.conn, self.breaks, self.whole, self.broken = conn, breaks, whole, False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.breaks(sql, args) and (self.whole or not self.broken):
            self.broken = True
            if self.whole:
                self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full" if self.whole else "disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_failed_group_commit_fails_every_payment_of_the_group_and_loses_no_receipt(tmp_path: Path) -> None:
    """Four payments in one transaction whose commit fails: each `begin` raises (none may be sent), none is on disk or
    counted, the receipt the group's transaction wrote waits for the next change, and the journal goes on."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    journal.begin(payment("before", 5, "0x09"))
    journal.accepted("before", {"n": 1})  # written with the next change: the failing group's
    journal._conn = _BrokenDisk(journal._conn, lambda sql, _: sql == "COMMIT", whole=False)  # type: ignore[assignment]

    def pay(n: int) -> Callable[[], None]:
        return lambda: journal.begin(payment(f"f{n}", 10, f"0x{n:02x}"), spend=(A, ETH, 1000.0))

    outcomes = _queue_behind_the_lock(journal, [pay(n) for n in range(4)])
    assert [type(o) for o in outcomes] == [sqlite3.OperationalError] * 4
    assert [_on_disk(path, f"f{n}") for n in range(4)] == [False] * 4
    assert journal.spent(ETH, 0) == 0 and [journal.signed(f"0x{n:02x}") for n in range(4)] == [None] * 4
    found = journal.payment("before")
    assert found is not None and (found.status, found.receipt) == (PaymentStatus.ACCEPTED, {"n": 1})
    journal.begin(payment("after", 7, "0x0a"), spend=(A, ETH, 1001.0))
    assert _on_disk(path, "after") and journal.spent(ETH, 0) == 7
    with closing(sqlite3.connect(path)) as other:
        row = other.execute("SELECT status, receipt FROM payments WHERE idempotency_key = 'before'").fetchone()
    assert row == ("accepted", '{"n": 1}')
    journal.close()


def test_a_change_that_loses_the_whole_transaction_fails_its_group_and_leaves_no_change_waiting(tmp_path: Path) -> None:
    """A change waiting for its group's commit, and one joining the group whose error rolls back the whole transaction:
    both fail (neither on disk; the first may not send its voucher), neither waits for good, and the journal goes on."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)

    def dead(sql: str, args: tuple[Any, ...]) -> bool:  # a change to channel 0xdead
        return sql.startswith("INSERT") and bool(args) and "0xdead" in args[0]

    journal._conn = _BrokenDisk(journal._conn, dead, whole=True)  # type: ignore[assignment]
    inside, go_on = threading.Event(), threading.Event()

    def first() -> None:
        with journal._write():  # white box: a change holding the group open while the other queues behind it
            journal._conn.execute("INSERT INTO positions VALUES ('0x01', '5')")
            inside.set()
            assert go_on.wait(10)

    outcomes: dict[str, BaseException | None] = {}

    def run(name: str, call: Callable[[], None]) -> None:
        try:
            call()
            outcomes[name] = None
        except BaseException as ex:  # recorded for the test to assert
            outcomes[name] = ex

    threads = [threading.Thread(target=run, args=("first", first), daemon=True)]
    threads[0].start()
    assert inside.wait(10)
    full = threading.Thread(target=run, args=("full", lambda: journal.settle_position("0xdead", 7)), daemon=True)
    threads.append(full)
    threads[1].start()
    deadline = time.monotonic() + 10
    while journal._queued < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    go_on.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert str(outcomes["full"]) == "database or disk is full"
    assert str(outcomes["first"]) == "the journal's group commit failed: database or disk is full"
    assert journal.signed("0x01") is None and journal.signed("0xdead") is None
    journal.begin(payment("after", 3, "0x02"))
    assert _on_disk(path, "after") and journal.signed("0x01") is None
    journal.close()


def test_a_payment_from_an_event_loop_is_committed_at_once_whoever_waits_behind_it(tmp_path: Path) -> None:
    """`group=False` (`PayerClient.authorize_now`, on the app's event loop) never leaves its transaction open for a
    writer waiting for the lock: the loop would wait for that thread's change and its flush."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    before = journal.commits
    journal._queued += 1  # white box: a writer on its way to the lock
    try:
        journal.begin(payment("loop", 3), spend=(A, ETH, 1000.0), group=False)
        assert _on_disk(path, "loop") and journal.commits == before + 1
    finally:
        journal._queued -= 1
    journal.close()


def test_reads_do_not_wait_for_a_commit_and_see_the_receipts_it_is_writing(tmp_path: Path) -> None:
    """While a change holds the journal (its commit waiting for the disk), reads go through a connection of their own:
    they see what is committed without waiting, and a receipt that change is writing reads as accepted (the file
    says pending until its commit), so a payment whose answer came is never looked up again as one of unknown fate."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    journal.begin(payment("k1", 10, "0x01"))
    journal.begin(payment("k2", 20, "0x02"))
    journal.accepted("k1", {"n": 1})  # not written yet: with the next change
    read: dict[str, Any] = {}

    def reads() -> None:
        read["signed"] = journal.signed("0x01")
        read["k1"] = journal.payment("k1")
        read["pending 0x01"] = journal.pending("0x01")
        read["pending 0x02"] = [p.idempotency_key for p in journal.pending("0x02")]

    with journal._write() as conn:  # white box: a change in progress, the receipt written in its transaction
        conn.execute("UPDATE positions SET signed = '99' WHERE channel_id = '0x02'")
        reader = threading.Thread(target=reads, daemon=True)
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive()  # it did not wait for the change
    found = read["k1"]
    assert found is not None and (found.status, found.receipt) == (PaymentStatus.ACCEPTED, {"n": 1})
    assert (read["signed"], read["pending 0x01"], read["pending 0x02"]) == (10, [], ["k2"])
    assert journal.signed("0x02") == 99  # committed once the change returned
    found = journal.payment("k1")
    assert found is not None and (found.status, found.receipt) == (PaymentStatus.ACCEPTED, {"n": 1})
    journal.close()


def test_a_group_left_open_for_a_writer_that_never_came_is_committed_by_the_change_waiting_for_it(
    tmp_path: Path,
) -> None:
    """A change leaves its transaction open for a writer waiting for the lock, which is then interrupted on its way (a
    KeyboardInterrupt): the change waiting for the group's commit commits it itself, instead of waiting for the next
    payment (or for good)."""
    path = tmp_path / "j.sqlite3"
    journal = PayerJournal(path)
    before = journal.commits
    journal._queued += 1  # white box: a writer on its way to the lock
    waiting = threading.Thread(target=lambda: journal.begin(payment("left", 4), spend=(A, ETH, 1000.0)), daemon=True)
    waiting.start()
    deadline = time.monotonic() + 10
    while not (journal._open and not journal._lock.locked()) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert journal._open and not _on_disk(path, "left")  # left open for the writer on its way, the lock free
    journal._queued -= 1  # ... which never comes
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert _on_disk(path, "left") and journal.commits == before + 1
    journal.close()
