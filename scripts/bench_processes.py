"""`bench.py processes`: several `settlement serve` processes on one PostgreSQL, batches of vouchers.

Issue 20 measured, on 16 cores, batches that stopped at ~16,000 vouchers/s from 2 processes on and a batch p99 of
5.6 s at 8 processes. A process's group waits for the row locks another process's group holds only where the two
share channels, so each count of processes runs twice: "own" (one load process; each of its connections sends whole
channels, to one server), and "shared" (two load processes replaying the same vouchers at once, each through the
servers in the other order, as two load processes reading one file would: every channel reaches two processes, and
half the vouchers are re-sends answered 200 from the store). On two cores the processes share the CPU, so the
figure to read is the tail against the median, not the rate: with BATCH_CONCURRENCY batches in flight, Little's law
puts the median near (batches in flight x 100) / rate, and a queue behind another process's row locks would show as a
p99 far above it.

Per run: vouchers/s (every answered voucher, re-sends included), p50 / p99 of a batch request, PostgreSQL's CPU a
voucher. The same machinery as `bench.py ingest` (scripts/bench_ingest.py: its devnet, signed vouchers, servers and
load generator).
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from scripts.bench_ingest import BATCH_SIZE, CHANNELS, Servers, load, voucher_files
from settlement.devtools.devnet import Devnet
from settlement.server.config import Settings

# Counts of processes to run, e.g. BENCH_PROCESSES=1,2,4,8 on a many-core machine
PROCESSES = tuple(int(n) for n in os.environ.get("BENCH_PROCESSES", "1,8").split(","))
ROUNDS = 2
BATCH_CONCURRENCY = 16  # batches in flight in all: two a server at 8 processes
MODES = ("own", "shared")


def run_processes(console: Console) -> dict[str, Any]:
    settings = Settings(_env_file=None, devnet_accounts=CHANNELS + 2)  # type: ignore[call-arg]
    runs: list[dict[str, Any]] = []
    with Devnet(settings) as net, tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
        work = Path(tmp)
        warm_file, voucher_file = voucher_files(net, work, console)
        for round_ in range(ROUNDS):
            for count in PROCESSES:
                for mode in MODES:
                    with console.status(f"round {round_ + 1}: {count} processes, {mode} channels…"):
                        runs.append(_run(net.url, work, count, mode, warm_file, voucher_file) | {"round": round_ + 1})
                    console.print(_line(runs[-1]))
    table = Table(title=f"batches of {BATCH_SIZE}, {BATCH_CONCURRENCY} in flight, servers on one PostgreSQL")
    for column in ("round", "processes", "channels", "vouchers/s", "p50 ms", "p99 ms", "p99 / p50", "PostgreSQL µs"):
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(str(run["round"]), str(run["processes"]), run["channels"], f"{run['vouchers_per_s']:,}",
                      f"{run['p50_ms']:.1f}", f"{run['p99_ms']:.1f}", f"{run['p99_ms'] / run['p50_ms']:.2f}",
                      f"{run['postgres_us_per_voucher']:.1f}")  # fmt: skip
    console.print(table)
    return {"batch_size": BATCH_SIZE, "batches_in_flight": BATCH_CONCURRENCY, "runs": runs}


def _run(rpc_url: str, work: Path, count: int, mode: str, warm: Path, vouchers: Path) -> dict[str, Any]:
    servers = Servers(rpc_url, work, "postgres", count=count)
    with servers as urls:
        for url in urls:  # each server learns each channel's payer (a re-send answers 200)
            load([url], warm, ["--concurrency", "8"])
        before = servers.cpu()
        if mode == "own":
            results = [load(urls, vouchers, ["--concurrency", str(BATCH_CONCURRENCY), "--batch", str(BATCH_SIZE)])]
        else:
            half = ["--concurrency", str(BATCH_CONCURRENCY // 2), "--batch", str(BATCH_SIZE)]
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda order: load(order, vouchers, half), (urls, urls[::-1])))
        after = servers.cpu()
    answered = sum(result["vouchers"] for result in results)
    seconds = max(result["seconds"] for result in results)
    statuses = [result["statuses"] for result in results]
    if any(set(status) != {"200"} for status in statuses):
        raise SystemExit(f"{count} processes, {mode} channels: a batch was not answered 200: {statuses}")
    return {
        "processes": count,
        "channels": mode,
        "vouchers_per_s": round(answered / seconds),
        "p50_ms": max(result["p50_ms"] for result in results),
        "p99_ms": max(result["p99_ms"] for result in results),
        "postgres_us_per_voucher": round((after["postgres"] - before["postgres"]) * 1e6 / max(answered, 1), 1),
    }


def _line(run: dict[str, Any]) -> str:
    return (
        f"round {run['round']}: {run['processes']} processes, {run['channels']} channels: "
        f"{run['vouchers_per_s']:,} vouchers/s, p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms"
    )
