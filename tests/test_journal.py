"""The payer's journal alone: spend budgets over rolling periods, counted durably and atomically with the voucher."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from settlement.errors import BudgetExceededError
from settlement.sdk.journal import Budget, JournalPayment, PayerJournal, PaymentStatus

ETH = "0x" + "00" * 20
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
