"""`bench.py journal`: the payer's journal alone (settlement.sdk.journal), a payment's durable write before its voucher
leaves, as `PayerClient.authorize` makes it: read the channel's pending payments and position, begin the payment (its
budgets' counts with it, one flushed commit), then its acceptance (written with the next payment's commit).

Two kinds of payment, interleaved in one run (this machine is noisy): one `pay()` makes (kept a week with its receipt,
to answer a retry with its key) and one x402 delivers (accepted without a receipt: dropped). Each run starts a fresh
journal and fills it with FILL payments before TIMED are timed, so the tables are not empty. Figures: the process's
CPU a payment, the begin's wall time (p50 / p99: it waits for the disk), and the journal's bytes a payment (the file
after a checkpoint, over every payment made).

Then THREADS threads paying at once for SECONDS each, one channel each, as x402's client pays in its worker threads
(a payer on a slow disk: `LoopCommits`): payments a second, the begin's wall time, and payments a commit (the group
commit gathers the changes of threads that come while another's commit waits for the disk).
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from settlement.sdk.journal import JournalPayment, PayerJournal, PaymentStatus

FILL = 20_000
TIMED = 5_000
ROUNDS = 3
CHANNELS = 64  # lanes to one payee, as x402's client opens for concurrent requests
ETH = "0x" + "00" * 20
PAYEE = "0x" + "22" * 20
# A facilitator's settle receipt as x402's answer carries it (settlement.api.facilitator: fields and signature).
RECEIPT = {
    "channelId": "0x" + "ab" * 32,
    "cumulativeAmount": "123456789000000",
    "increment": "1000000000",
    "remaining": "99876543211000000",
    "acceptedAt": "2026-12-03T15:00:00.000000Z",
    "reference": None,
    "idempotencyKey": "pay_" + "c" * 32,
    "acceptedAtSeconds": "1796310000",
    "signature": "0x" + "ef" * 65,
    "signer": "0x" + "11" * 20,
}
KINDS = {"pay() (kept a week)": True, "x402 (dropped once accepted)": False}
THREADS = 16
SECONDS = 3.0


def run_journal(console: Console) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float, float, float]]] = {kind: [] for kind in KINDS}
    with console.status("journal: payments through PayerJournal…"):
        for _ in range(ROUNDS):
            for kind, keep in KINDS.items():
                runs[kind].append(_run(keep))
    table = Table(title=f"the payer's journal: {TIMED:,} payments timed after {FILL:,}, {ROUNDS} runs of each kind")
    for column in ("payment", "CPU µs a payment", "begin p50 µs", "begin p99 µs", "bytes a payment"):
        table.add_column(column, justify="right" if column != "payment" else "left")
    figures: dict[str, Any] = {"fill": FILL, "timed": TIMED}
    for kind, results in runs.items():
        table.add_row(kind, *(" / ".join(f"{r[i]:,.0f}" for r in results) for i in range(4)))
        key = "kept" if KINDS[kind] else "dropped"
        for i, name in enumerate(("cpu_us", "begin_p50_us", "begin_p99_us", "bytes_per_payment")):
            figures[f"{key}_{name}"] = [round(r[i], 1) for r in results]
    console.print(table)
    figures |= _threads(console)
    return figures


def _threads(console: Console) -> dict[str, Any]:
    with console.status(f"journal: {THREADS} threads paying at once…"):
        results = [_run_threads() for _ in range(ROUNDS)]
    table = Table(title=f"the payer's journal: {THREADS} threads paying at once, one channel each, {SECONDS:g} s a run")
    for column in ("payments/s", "begin p50 µs", "begin p99 µs", "payments a commit"):
        table.add_column(column, justify="right")
    table.add_row(*(" / ".join(f"{r[i]:,.{1 if i == 3 else 0}f}" for r in results) for i in range(4)))
    console.print(table)
    names = ("per_s", "begin_p50_us", "begin_p99_us", "payments_per_commit")
    return {f"threads_{name}": [round(r[i], 1) for r in results] for i, name in enumerate(names)}


def _run_threads() -> tuple[float, float, float, float]:
    """(payments a second, begin p50 µs, begin p99 µs, payments a commit) of THREADS threads paying for SECONDS."""
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        journal = PayerJournal(Path(tmp) / "journal.sqlite3")
        walls: list[list[float]] = [[] for _ in range(THREADS)]
        commits = journal.commits
        stop = time.monotonic() + SECONDS

        def pay(n: int) -> None:
            channel = f"0x{n:064x}"
            while time.monotonic() < stop:
                walls[n].append(_pay(journal, channel, None))

        started = time.monotonic()
        threads = [threading.Thread(target=pay, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.monotonic() - started
        commits = journal.commits - commits
        journal.close()
    every = sorted(w for mine in walls for w in mine)
    return len(every) / took, every[len(every) // 2] * 1e6, every[int(len(every) * 0.99)] * 1e6, len(every) / commits


def _run(keep: bool) -> tuple[float, float, float, float]:
    """One fresh journal: (CPU µs a timed payment, begin p50 µs, begin p99 µs, file bytes a payment)."""
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        path = Path(tmp) / "journal.sqlite3"
        journal = PayerJournal(path)
        channels = [f"0x{n:064x}" for n in range(CHANNELS)]
        walls: list[float] = []
        cpu = 0.0
        for count, timed in ((FILL, False), (TIMED, True)):
            walls, started = [], time.process_time()
            for n in range(count):
                walls.append(_pay(journal, channels[n % CHANNELS], RECEIPT if keep else None))
            if timed:
                cpu = (time.process_time() - started) / count
        journal.close()
        with closing(sqlite3.connect(path)) as raw, raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size / (FILL + TIMED)
    walls.sort()
    return cpu * 1e6, walls[len(walls) // 2] * 1e6, walls[int(len(walls) * 0.99)] * 1e6, size


def _pay(journal: PayerJournal, channel: str, receipt: dict[str, Any] | None) -> float:
    """One payment as `PayerClient.authorize` makes it, then its acceptance; the begin's wall time (s)."""
    journal.pending(channel)
    cumulative = (journal.signed(channel) or 0) + 1_000
    key = uuid.uuid4().hex
    began = time.perf_counter()
    journal.begin(
        JournalPayment(key, channel, 1_000, cumulative, None, PaymentStatus.PENDING, None),
        spend=(PAYEE, ETH, time.time()),
    )
    took = time.perf_counter() - began
    journal.accepted(key, receipt)
    return took
