"""`bench.py ingest`: durable HTTP ingest against real `settlement serve` processes, load from another process.

One devnet, one hub, CHANNELS channels (one payer each); every voucher is pre-signed (libsecp256k1 through coincurve,
checked against eth-account). Each measurement gets a fresh store and SERVERS fresh server processes on it (one by
default; `BENCH_INGEST_SERVERS=2` runs two on one store, as an operator scales out behind a balancer; engine off:
ingest only), then `scripts/bench_load.py` drives them, spreading requests over the processes. Every run starts with
one voucher per channel (not measured): a server reads a channel's payer from the store the first time it sees the
channel, and the figures are about the steady state (for the same reason a run waits until the servers' recovery
workers have started). Then:
closed loop with single vouchers at several concurrency levels, closed loop with the batch endpoint, and an open loop
at 2,000 requests/s offered for the latency percentiles. Each run also says where its CPU went, per voucher answered:
the server processes, their signature recovery workers, PostgreSQL and the load generator (scripts/proc_cpu.py), and
how busy the machine was: a figure below the goal with the machine idle is a serial limit, not the cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from coincurve import PrivateKey
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from scripts.proc_cpu import children, cpu_seconds, postgres_cpu_seconds
from settlement.chain.deployment import deploy_hub, hub_contract
from settlement.chain.node import Transactor, connect
from settlement.devtools.devnet import Devnet, free_port
from settlement.eip712.vouchers import VoucherVerifier, channel_id, read_domain, sign_voucher
from settlement.server.config import Settings

CHANNELS = 128
VOUCHERS_PER_CHANNEL = 700
SINGLE_CONCURRENCY = (8, 32, 64)
BATCH_SIZE = 100
BATCH_CONCURRENCY = 4
OFFERED_RATE = 2_000.0
SECONDS = 4.0
SERVERS = int(os.environ.get("BENCH_INGEST_SERVERS", "1"))  # `settlement serve` processes sharing one store
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("SETTLEMENT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def run_ingest(console: Console) -> dict[str, Any]:
    settings = Settings(_env_file=None, devnet_accounts=CHANNELS + 2)  # type: ignore[call-arg]
    with Devnet(settings) as net, tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        warm_file, voucher_file = voucher_files(net, work, console)
        stores = {"sqlite": None, "postgres": _postgres_available()}
        results: dict[str, dict[str, Any]] = {}
        for store, available in stores.items():
            if store == "postgres" and not available:
                console.print(f"[yellow]PostgreSQL not reachable at {POSTGRES_URL}: skipped[/]")
                continue
            runs: list[tuple[str, list[str]]] = [
                *((f"single c={c}", ["--concurrency", str(c)]) for c in SINGLE_CONCURRENCY),
                (
                    f"batch {BATCH_SIZE} c={BATCH_CONCURRENCY}",
                    ["--concurrency", str(BATCH_CONCURRENCY), "--batch", str(BATCH_SIZE)],
                ),
                (f"open loop {OFFERED_RATE:,.0f}/s", ["--rate", str(OFFERED_RATE)]),
            ]
            for name, load_args in runs:
                servers = Servers(net.url, work, store)
                with console.status(f"{store}: {name}…"), servers as urls:
                    for url in urls:  # each server learns each channel's payer (a re-send answers 200)
                        load([url], warm_file, ["--concurrency", "8"])
                    before = servers.cpu()
                    result = load(urls, voucher_file, load_args)
                    result["cpu_us_per_voucher"], result["machine_busy_percent"] = servers.cpu_since(before, result)
                results[f"{store}: {name}"] = result
                cpu = result["cpu_us_per_voucher"]
                console.print(
                    f"{store}: {name}: {result['vouchers_per_s']:,.0f} vouchers/s, p50 {result['p50_ms']} ms, "
                    f"p99 {result['p99_ms']} ms, {result['statuses']}; CPU per voucher: server {cpu['server']} µs, "
                    f"its recovery workers {cpu['workers']}, PostgreSQL {cpu['postgres']}, load generator "
                    f"{cpu['load']}; machine {result['machine_busy_percent']} % busy"
                )
    return _report(console, results)


def voucher_files(net: Devnet, work: Path, console: Console) -> tuple[Path, Path]:
    """CHANNELS channels' signed vouchers in two files of `work`: each channel's first voucher (sent to every server
    before a run, unmeasured) and the rest (the run's)."""
    vouchers = signed_channels(net, work, console, CHANNELS, VOUCHERS_PER_CHANNEL)
    warm_file, voucher_file = work / "warm.json", work / "vouchers.json"
    warm_file.write_text(json.dumps([chain[:1] for chain in vouchers]))
    voucher_file.write_text(json.dumps([chain[1:] for chain in vouchers]))
    return warm_file, voucher_file


def signed_channels(
    net: Devnet, work: Path, console: Console, count: int, per_channel: int
) -> list[list[dict[str, str]]]:
    """Deploy a hub (its record in `work`), open `count` ETH channels to one payee (one payer each) and pre-sign
    `per_channel` vouchers on each (cumulative 1, 2, …), checked against eth-account's signatures."""
    w3 = connect(net.url)
    deployment = deploy_hub(w3, net.accounts[0], 3600)
    deployment.save(work / "deployment.json")
    hub = hub_contract(w3, deployment)
    payee = net.accounts[-1].address
    vouchers = []
    with console.status(f"opening {count} channels and signing {count * per_channel:,} vouchers…"):
        verifier = VoucherVerifier(read_domain(hub))
        for payer in net.accounts[1 : 1 + count]:
            salt = uuid.uuid4().bytes * 2
            Transactor(w3, payer, list(hub.abi)).send(  # type: ignore[arg-type]
                hub.functions.open(payee, "0x" + "00" * 20, salt, 10**18), value=10**18
            )
            cid = channel_id(payer.address, payee, "0x" + "00" * 20, salt)
            key = PrivateKey(bytes(payer.key))
            chain = []
            for amount in range(1, per_channel + 1):
                raw = key.sign_recoverable(verifier.digest(cid, amount), hasher=None)
                signature = raw[:64] + bytes((raw[64] + 27,))
                chain.append(
                    {
                        "channelId": "0x" + cid.hex(),
                        "cumulativeAmount": str(amount),
                        "signature": "0x" + signature.hex(),
                    }
                )
            vouchers.append(chain)
        first = vouchers[0][0]
        reference = sign_voucher(net.accounts[1], verifier.domain, bytes.fromhex(first["channelId"][2:]), 1)
        if "0x" + reference.hex() != first["signature"]:
            raise SystemExit("pre-signed vouchers differ from eth-account's signatures")
    return vouchers


def _postgres_available() -> bool:
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


@contextmanager
def scratch_postgres(name: str) -> Iterator[str]:
    """A new database on the benchmark's PostgreSQL server, dropped on exit; yields its URL."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Servers:
    """A fresh store and `count` (SERVERS) `settlement serve` processes on it (engine off), stopped and dropped on
    exit."""

    def __init__(
        self, rpc_url: str, work: Path, store: str, env: dict[str, str] | None = None, *, count: int = SERVERS
    ) -> None:
        self.extra_env = env or {}
        self.count = count
        self.rpc_url = rpc_url
        self.work = work
        self.store = store
        self.db_name = f"bench_{uuid.uuid4().hex[:10]}"
        self._scratch = scratch_postgres(self.db_name)
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> list[str]:
        if self.store == "sqlite":
            database_url = f"sqlite:///{self.work / (self.db_name + '.db')}"
        else:
            database_url = self._scratch.__enter__()
        urls = []
        for n in range(self.count):
            port = free_port("127.0.0.1")
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("SETTLEMENT_")},
                "SETTLEMENT_RPC_URL": self.rpc_url,
                "SETTLEMENT_DEPLOYMENT_FILE": str(self.work / "deployment.json"),
                "SETTLEMENT_DATABASE_URL": database_url,
                "SETTLEMENT_CONFIRMATIONS": "0",
                "SETTLEMENT_ENGINE_ENABLED": "false",
                "SETTLEMENT_API_PORT": str(port),
                "SETTLEMENT_CLIENT_REQUESTS_PER_SECOND": "0",  # the load comes from one address: measure, not limit
                **self.extra_env,
            }
            log = (self.work / f"server-{self.db_name}-{n}.log").open("wb")
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "settlement.cli.main", "serve", "--log-level", "warning"],
                    env=env,
                    cwd=self.work,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            urls.append(self._ready(f"http://127.0.0.1:{port}", n))
        self._workers_started()
        return urls

    def _workers_started(self) -> None:
        """Wait until the servers' children (the recovery workers) stop using CPU: a worker imports its modules
        after the server answers /ready (~0.5 s of CPU), and that start is not the measured run's work."""
        deadline = time.monotonic() + 20
        last = -1.0
        while time.monotonic() < deadline:
            spent = sum(cpu_seconds(child) for p in self.processes for child in children(p.pid))
            if abs(spent - last) < 0.005:
                return
            last = spent
            time.sleep(0.25)

    def _ready(self, url: str, n: int) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        log = self.work / f"server-{self.db_name}-{n}.log"
        raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: the servers', their children's (signature recovery workers) and PostgreSQL's."""
        return {
            "server": sum(cpu_seconds(p.pid) for p in self.processes),
            "workers": sum(cpu_seconds(child) for p in self.processes for child in children(p.pid)),
            "postgres": postgres_cpu_seconds() or 0.0,
        }

    def cpu_since(self, before: dict[str, float], result: dict[str, Any]) -> tuple[dict[str, float], float]:
        """Where the CPU of a run went, in µs per voucher answered, and how busy the machine was meanwhile (%): the
        load generator's CPU and the machine's within its timed window (its own figures), the others' since `before`
        (the servers idle while the load generator starts)."""
        after = self.cpu()
        vouchers = max(result["vouchers"], 1)
        spent = {
            part: round((after[part] - before[part]) * 1e6 / vouchers, 1) for part in ("server", "workers", "postgres")
        }
        spent["load"] = round(result["load_cpu_seconds"] * 1e6 / vouchers, 1)
        if self.store == "sqlite":
            spent["postgres"] = 0.0  # another database's work on the same server, if any, is not this run's
        busy = 100 * result["machine_busy_seconds"] / max(result["machine_seconds"], 1e-9)
        return spent, round(busy)

    def __exit__(self, *_exc: object) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=60)
        if self.store == "postgres":
            self._scratch.__exit__(None, None, None)


def load(urls: list[str], vouchers: Path, extra: list[str]) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "scripts.bench_load",
        *(arg for url in urls for arg in ("--url", url)),
        "--vouchers",
        str(vouchers),
        "--seconds",
        str(SECONDS),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _report(console: Console, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    table = Table(title=f"durable HTTP ingest ({SERVERS} server processes on one store, load from another)")
    for column in ("run", "vouchers/s", "requests/s", "p50 ms", "p99 ms", "CPU µs/voucher*", "statuses"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['vouchers_per_s']:,.0f}",
            f"{r['requests_per_s']:,.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            " / ".join(f"{r['cpu_us_per_voucher'][part]:.0f}" for part in ("server", "workers", "postgres", "load")),
            json.dumps(r["statuses"]),
        )
    console.print(table)
    console.print("* server / its signature recovery workers / PostgreSQL / load generator")

    def best(store: str, kind: str) -> float | None:
        rates = [r["vouchers_per_s"] for n, r in results.items() if n.startswith(f"{store}: {kind}")]
        return max(rates) if rates else None

    open_sqlite = results.get(f"sqlite: open loop {OFFERED_RATE:,.0f}/s", {})
    open_pg = results.get(f"postgres: open loop {OFFERED_RATE:,.0f}/s", {})
    return {
        "single_per_s_sqlite": best("sqlite", "single"),
        "single_per_s_postgres": best("postgres", "single"),
        "batch_per_s_sqlite": best("sqlite", "batch"),
        "batch_per_s_postgres": best("postgres", "batch"),
        "p50_ms": open_sqlite.get("p50_ms"),
        "p99_ms": open_sqlite.get("p99_ms"),
        "achieved_per_s_at_2000_offered_sqlite": open_sqlite.get("requests_per_s"),
        "p50_ms_postgres": open_pg.get("p50_ms"),
        "p99_ms_postgres": open_pg.get("p99_ms"),
        "server_workers": SERVERS,
        "targets": {"single_per_s": 5_000, "batch_per_s": 15_000, "p99_ms_at_2000": 25},
        "runs": results,
    }
