"""`bench.py store`: the store's write path alone, the ceiling of ingest (issue 20).

No chain, no HTTP, no signature recovery: channels are inserted straight into a fresh store, and each writer process
runs the service's own ingest writer (`Ingestor`: the ledger rules, the channels' row locks, the group commit) on
vouchers whose signers are given. A writer keeps IN_FLIGHT requests of REQUEST vouchers queued, as a busy server's
callers do, so its writer thread commits groups of up to 1,024. Writers own disjoint channels (a payer pays through
one server at a time); with several, they are separate processes on one database. The last rows share every
channel between SHARED_WRITERS writers: writer w signs k * writers + w + 1 on each channel, as a payer's pipelined
vouchers spread over processes by a round-robin balancer would arrive, so vouchers below a channel's position are
refused as stale; these rows count every answered voucher, and the vouchers a group deferred because another
writer's transaction held their channel.

Figures per backend and number of writers: vouchers committed per second (all writers together, and per writer), the
p99 of one request's wait for its commit, the bytes each stored payment adds to the payments table with its indexes
(the database's own size functions: PostgreSQL's pg_total_relation_size, SQLite's dbstat), and the bytes written per
voucher: PostgreSQL's WAL (pg_current_wal_lsn) or, on SQLite, what the writer processes wrote (/proc/self/io: the
WAL and its checkpoints), and on PostgreSQL the CPU its server processes spent per voucher (/proc).

Payments are the hot path's kind: no reference, no idempotency key, a 65-byte signature, an increment of 1 base unit.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, cast

from eth_utils.address import to_checksum_address
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from scripts.bench_ingest import POSTGRES_URL, _postgres_available, scratch_postgres
from scripts.proc_cpu import postgres_cpu_seconds
from settlement.domain.ledger import Verdict
from settlement.domain.model import Address, Channel, ChannelId, ChannelStatus, Voucher, utcnow
from settlement.errors import StaleVoucherError
from settlement.ingest.pipeline import Ingestor, Outcome
from settlement.server.metrics import Metrics
from settlement.store import Database
from settlement.store import channels as channel_q

CHANNELS_PER_WRITER = 1_000
ROUNDS = 30  # vouchers per channel: 30,000 per writer
REQUEST = 100  # vouchers per submitted request (a batch call)
IN_FLIGHT = 8  # requests a writer keeps queued
WRITERS = (1, 2, 4)
SHARED_WRITERS = 4
ETH = Address("0x" + "00" * 20)
PAYEE = Address(to_checksum_address("0x" + "ee" * 20))
DEPOSIT = 10**30


def _ids(writer: int) -> list[tuple[ChannelId, Address]]:
    """The (channel id, payer) pairs of one writer: made up, distinct, the same in the parent and the child."""
    pairs = []
    for n in range(CHANNELS_PER_WRITER):
        seed = (writer * CHANNELS_PER_WRITER + n + 1).to_bytes(32, "big")
        pairs.append((ChannelId("0x" + seed.hex()), Address(to_checksum_address(seed[-20:]))))
    return pairs


def _insert_channels(url: str, owners: int) -> None:
    db = Database(url)
    db.migrate()
    now = utcnow()
    with db.write() as conn:
        for owner in range(owners):
            for channel_id, payer in _ids(owner):
                channel = Channel(
                    channel_id=channel_id,
                    payer=payer,
                    payee=PAYEE,
                    token=ETH,
                    salt="0x" + "00" * 32,
                    deposit=DEPOSIT,
                    settled=0,
                    status=ChannelStatus.OPEN,
                    close_deadline=None,
                    as_of_block=1,
                )
                channel_q.insert_channel(conn, channel, now)
    db.dispose()


def _written_bytes() -> int:
    """What this process has passed to write(2) so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _writer(url: str, writer: int, shared: int, start: Barrier, results: Any) -> None:
    """One server's ingest writer on its own channels, or on channels it shares with `shared` writers (0: none);
    puts (vouchers, seconds, request waits, bytes written, vouchers accepted, vouchers deferred)."""
    db = Database(url)
    # Neither the verifier nor the indexer is used: signers are given and every channel is stored already.
    ingestor = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)
    ingestor.start()
    pairs = _ids(0 if shared else writer)
    signers = {channel_id: bytes.fromhex(payer[2:]) for channel_id, payer in pairs}
    requests = []
    for k in range(ROUNDS):
        cumulative = k * shared + writer + 1 if shared else k + 1
        round_ = [Voucher(channel_id, cumulative, os.urandom(65)) for channel_id, _ in pairs]
        requests += [round_[i : i + REQUEST] for i in range(0, len(round_), REQUEST)]
    gc.freeze()  # as the service does once started (create_app's lifespan): start-up objects stay out of each scan
    start.wait()
    wrote, began = _written_bytes(), time.perf_counter()
    waits: list[float] = []
    refused = stale = 0
    pending: list[tuple[float, Future[list[Outcome]]]] = []

    def settle_oldest() -> None:
        nonlocal refused, stale
        sent, future = pending.pop(0)
        outcomes = future.result()
        waits.append(time.perf_counter() - sent)
        refused += sum(1 for o in outcomes if not (isinstance(o, Verdict) and o.new))
        stale += sum(1 for o in outcomes if isinstance(o, StaleVoucherError))

    for request in requests:
        if len(pending) >= IN_FLIGHT:
            settle_oldest()
        pending.append((time.perf_counter(), ingestor.submit(request, [signers[v.channel_id] for v in request])))
    while pending:
        settle_oldest()
    seconds = time.perf_counter() - began
    written = _written_bytes() - wrote
    ingestor.stop()
    db.dispose()
    if refused > (stale if shared else 0):
        raise SystemExit(f"writer {writer}: {refused} vouchers were not accepted as new payments")
    deferred = ingestor.metrics.registry.get_sample_value("settlement_ingest_deferred_vouchers_total") or 0
    sent = sum(len(r) for r in requests)
    results.put((sent, seconds, waits, written, sent - refused, deferred))


def _payments_bytes(url: str) -> tuple[int, int]:
    """The payments table and its indexes, as the database counts them: (table bytes, index bytes)."""
    db = Database(url)
    with db.read() as conn:
        if db.is_sqlite:
            rows = conn.execute(
                text(
                    "SELECT m.type, SUM(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name = d.name"
                    " WHERE m.tbl_name = 'payments' GROUP BY m.type"
                )
            ).all()
            sizes = {kind: int(size) for kind, size in rows}
            table, indexes = sizes.get("table", 0), sizes.get("index", 0)
        else:
            query = "SELECT pg_table_size('payments'), pg_indexes_size('payments')"
            table, indexes = (int(n) for n in conn.execute(text(query)).one())
    db.dispose()
    return table, indexes


def _database_cpu_seconds(backend: str) -> float | None:
    """The PostgreSQL server's CPU time: the database's own cost per voucher, steadier than a throughput on a shared
    machine. None for SQLite (it runs inside the writers)."""
    return postgres_cpu_seconds() if backend == "postgres" else None


def _wal_position(url: str) -> int | None:
    db = Database(url)
    try:
        if db.is_sqlite:
            return None
        with db.read() as conn:
            return int(conn.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")).scalar_one())
    finally:
        db.dispose()


@contextmanager
def _store(backend: str) -> Iterator[str]:
    if backend == "postgres":
        with scratch_postgres(f"bench_store_{uuid.uuid4().hex[:10]}") as url:
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'store.db'}"


def measure(backend: str, writers: int, *, shared: bool = False) -> dict[str, Any]:
    """One run on a fresh store: `writers` processes, ROUNDS vouchers on each of their channels (with `shared`, one
    set of channels for all of them)."""
    with _store(backend) as url:
        _insert_channels(url, 1 if shared else writers)
        size_before, wal_before = _payments_bytes(url), _wal_position(url)
        context = multiprocessing.get_context("spawn")
        start, results = context.Barrier(writers + 1), context.Queue()
        processes = [
            context.Process(target=_writer, args=(url, w, writers if shared else 0, start, results))
            for w in range(writers)
        ]
        for process in processes:
            process.start()
        start.wait()
        began, cpu_before = time.perf_counter(), _database_cpu_seconds(backend)
        outcomes = [results.get(timeout=600) for _ in processes]
        wall, cpu_after = time.perf_counter() - began, _database_cpu_seconds(backend)
        for process in processes:
            process.join()
            if process.exitcode != 0:
                raise SystemExit(f"a store writer failed (exit {process.exitcode})")
        vouchers = sum(o[0] for o in outcomes)
        waits = sorted(w for o in outcomes for w in o[2])
        wal_after = _wal_position(url)
        written = (wal_after - wal_before) if wal_after is not None and wal_before is not None else None
        if written is None:
            written = sum(o[3] for o in outcomes)
        table, indexes = (after - before for after, before in zip(_payments_bytes(url), size_before, strict=True))
        accepted = sum(o[4] for o in outcomes)
        return {
            "store": backend,
            "writers": writers,
            "channels": "shared" if shared else "own",
            "vouchers": vouchers,
            "accepted": accepted,
            "deferred": round(sum(o[5] for o in outcomes)),
            "per_second": round(vouchers / wall),
            "per_writer": round(statistics.mean(o[0] / o[1] for o in outcomes)),
            "wait_p99_ms": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))] * 1000, 1),
            "bytes_per_payment": round((table + indexes) / accepted),
            "table_bytes": round(table / accepted),
            "index_bytes": round(indexes / accepted),
            "written_per_voucher": round(written / vouchers),
            "written_is": "wal" if backend == "postgres" else "process writes",
            "database_cpu_us_per_voucher": (
                None if cpu_before is None or cpu_after is None else round((cpu_after - cpu_before) / vouchers * 1e6, 1)
            ),
        }


def run_store(console: Console, writers: tuple[int, ...] = WRITERS) -> dict[str, Any]:
    backends = ["sqlite"] + (["postgres"] if _postgres_available() else [])
    if "postgres" not in backends:
        console.print(f"[yellow]PostgreSQL not reachable at {POSTGRES_URL}: skipped[/]")
    rows = [measure(backend, count) for backend in backends for count in writers]
    rows += [measure(backend, SHARED_WRITERS, shared=True) for backend in backends]
    table = Table(title=f"store alone: {CHANNELS_PER_WRITER:,} channels x {ROUNDS} vouchers per writer")
    for column in (
        "store",
        "writers",
        "channels",
        "vouchers/s",
        "accepted",
        "deferred",
        "per writer",
        "p99 ms",
        "bytes/payment (table + indexes)",
        "written/voucher",
        "database CPU/voucher",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["store"],
            str(row["writers"]),
            row["channels"],
            f"{row['per_second']:,}",
            f"{row['accepted']:,}",
            f"{row['deferred']:,}",
            f"{row['per_writer']:,}",
            str(row["wait_p99_ms"]),
            f"{row['bytes_per_payment']} = {row['table_bytes']} + {row['index_bytes']}",
            f"{row['written_per_voucher']:,} ({'WAL' if row['store'] == 'postgres' else 'process'})",
            "-" if row["database_cpu_us_per_voucher"] is None else f"{row['database_cpu_us_per_voucher']} µs",
        )
    console.print(table)
    return {"runs": rows}
