"""The operator CLI: `settlement devnet | deploy | serve | settle | status | channels | reconcile | withdraw |
resume | simulate | demo`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from hexbytes import HexBytes
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from settlement.domain.model import ETH, ChannelId
from settlement.errors import (
    ChainError,
    ConfigError,
    EngineBusyError,
    PortInUseError,
    SettlementError,
    SettlerUnfundedError,
)
from settlement.server.config import Settings, get_settings

# Each command imports the parts it runs (web3 and eth-account alone take seconds to import on a slow machine): `--help`
# and the store-only commands (`status`, `channels`), which an operator reaches for when something is wrong, answer in
# about a second, without loading the chain, the API or the engine.
if TYPE_CHECKING:
    from sqlalchemy import Connection
    from web3 import Web3

    from settlement.chain.deployment import Deployment
    from settlement.devtools.devnet import Devnet
    from settlement.server.service import Service
    from settlement.store.settlements import CountedBatch

app = typer.Typer(help="ChannelHub micropayment settlement: run, settle and check it.", no_args_is_help=True)
# Piped or logged output is not cut at 80 columns: keys, addresses and amounts are printed whole.
console = Console(width=None if sys.stdout.isatty() else 1_000)
err_console = Console(stderr=True, soft_wrap=True)  # an error line is never wrapped: paths and keys stay whole


def _fail(ex: SettlementError) -> typer.Exit:
    err_console.print(f"[bold red]error[/] {escape(f'[{ex.code}] {ex.message}')}")
    return typer.Exit(code=1)


def _settings() -> Settings:
    """The settings, or a one-line `config_invalid` naming each bad variable (not a pydantic traceback)."""
    try:
        return get_settings()
    except ConfigError as ex:
        raise _fail(ex) from None
    except ValidationError as ex:
        problems = "; ".join(
            _setting_problem(e["loc"], str(e["msg"]).removeprefix("Value error, ")) for e in ex.errors()
        )
        raise _fail(ConfigError(f"configuration refused: {problems}")) from None


def _setting_problem(loc: tuple[int | str, ...], message: str) -> str:
    name = f"SETTLEMENT_{str(loc[0]).upper()}" if loc else "settings"
    return message if message.startswith(name) else f"{name}: {message}"


def _print_devnet(devnet: Devnet) -> None:
    table = Table(title=f"anvil devnet at {devnet.url} (chain id {devnet.chain_id})")
    table.add_column("#", justify="right")
    table.add_column("address")
    table.add_column("private key (devnet only)")
    for i, account in enumerate(devnet.accounts):
        table.add_row(str(i), account.address, HexBytes(account.key).to_0x_hex())
    console.print(table)


def _wait_for_signal() -> None:
    """Until SIGINT or SIGTERM. SIGINT gets its own handler: a shell starts `cmd &` with SIGINT ignored, and Python
    then never raises KeyboardInterrupt, so `kill -INT` (and Ctrl-C after `fg`) would do nothing."""
    stop = {"now": False}

    def handler(_signum: int, _frame: object) -> None:
        stop["now"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop["now"]:
            signal.pause()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@app.command()
def devnet(
    port: Annotated[int | None, typer.Option(help="port (default: SETTLEMENT_DEVNET_PORT or 8545)")] = None,
    chain_id: Annotated[int | None, typer.Option(help="chain id (default: SETTLEMENT_DEVNET_CHAIN_ID)")] = None,
    block_time: Annotated[
        float | None,
        typer.Option(
            min=0, help="seconds per block (default: SETTLEMENT_DEVNET_BLOCK_TIME or 1; 0 mines per transaction)"
        ),
    ] = None,
    token: Annotated[bool, typer.Option(help="deploy a test ERC-20 and mint it to every account")] = True,
) -> None:
    """Run a local anvil devnet in the foreground until Ctrl-C (or SIGTERM/SIGINT); prints its URL, its funded
    accounts and a test ERC-20.

    Blocks come every second by default, so deposits reach SETTLEMENT_CONFIRMATIONS without other traffic.
    """
    from settlement.devtools.devnet import Devnet, deploy_test_token

    settings = _settings()
    overrides: dict[str, object] = {"devnet_port": port if port is not None else (settings.devnet_port or 8545)}
    if chain_id is not None:
        overrides["devnet_chain_id"] = chain_id
    seconds = block_time if block_time is not None else (settings.devnet_block_time or 1.0)
    overrides["devnet_block_time"] = seconds or None
    try:
        with Devnet(settings.model_copy(update=overrides)) as net:
            _print_devnet(net)
            if token:
                test_token = deploy_test_token(net)
                console.print(
                    f"test ERC-20 [bold]{test_token.address}[/] ({test_token.symbol}, {test_token.decimals} decimals): "
                    f"{test_token.minted // 10**test_token.decimals:,} {test_token.symbol} minted to each account"
                )
            mining = f"a block every {seconds:g}s" if seconds else "a block per transaction"
            console.print(f"{mining}; {settings.confirmations} confirmations make a deposit count")
            if not seconds and settings.confirmations:
                err_console.print(f"[yellow]warning[/] {escape(_AUTOMINE_WARNING.format(n=settings.confirmations))}")
            console.print(escape(_export_line("SETTLEMENT_RPC_URL", net.url)), soft_wrap=True)
            console.print(f"[green]devnet running (pid {os.getpid()}); Ctrl-C or `kill {os.getpid()}` stops it[/]")
            _wait_for_signal()
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print("devnet stopped")


GIL_SWITCH_SECONDS = 0.001
_AUTOMINE_WARNING = (
    "this chain mines a block only when a transaction arrives: with SETTLEMENT_CONFIRMATIONS={n} a deposit counts "
    "only after {n} later transactions. Use `settlement devnet` (a block a second) or SETTLEMENT_CONFIRMATIONS=0."
)


@app.command()
def deploy(
    challenge_period: Annotated[int | None, typer.Option(help="seconds (default: SETTLEMENT_CHALLENGE_PERIOD)")] = None,
    out: Annotated[Path | None, typer.Option(help="deployment file (default: SETTLEMENT_DEPLOYMENT_FILE)")] = None,
) -> None:
    """Deploy ChannelHub to SETTLEMENT_RPC_URL and write the deployment file other commands read."""
    settings = _settings()
    try:
        deployment = _deploy(settings, challenge_period or settings.challenge_period, out or settings.deployment_file)
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print(
        f"ChannelHub deployed at [bold]{deployment.address}[/] on chain {deployment.chain_id} "
        f"(block {deployment.block_number}, tx {deployment.tx_hash})"
    )
    console.print(f"deployment written to {escape(str(out or settings.deployment_file))}")


def _deploy(settings: Settings, challenge_period: int, out: Path) -> Deployment:
    from settlement.chain.deployment import deploy_hub
    from settlement.chain.node import connect
    from settlement.server.operator import operator_account

    w3 = connect(settings.rpc_url, settings.rpc_timeout, fallbacks=settings.rpc_fallback_urls)
    deployment = deploy_hub(
        w3,
        operator_account(settings, w3),
        challenge_period,
        timeout=settings.tx_timeout,
        reprice_after=settings.bump_after,
        max_fee_per_gas=settings.max_fee_per_gas,
    )
    deployment.save(out)
    return deployment


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: SETTLEMENT_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: SETTLEMENT_API_PORT)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    access_log: Annotated[
        bool, typer.Option("--access-log", help="a log line per request (off: thousands a second are noise)")
    ] = False,
) -> None:
    """Run the HTTP API and the chain indexer for the deployment in SETTLEMENT_DEPLOYMENT_FILE."""
    settings = _settings()
    _serve(settings, host or settings.api_host, port if port is not None else settings.api_port, log_level, access_log)
    console.print("stopped")


def _serve(
    settings: Settings,
    host: str,
    port: int,
    log_level: str = "info",
    access_log: bool = False,
    on_stop: Callable[[], object] | None = None,
) -> None:
    """Serve the API until Ctrl-C or SIGTERM. `on_stop` is called when the signal arrives, on a thread of its own,
    and uvicorn closes its socket once it returns, the API answering meanwhile: the demo's payers finish the payment
    they are making and stop (called in the signal handler, it held the event loop, and a payment begun just before
    Ctrl-C was sent after the close and found no one to answer it: `payment_uncertain`). A second signal stops at
    once."""
    import uvicorn

    class Server(uvicorn.Server):
        stopping = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if on_stop is None or self.stopping:
                super().handle_exit(sig, frame)
                return
            self.stopping = True

            def stop_then_exit() -> None:
                try:
                    on_stop()
                finally:
                    uvicorn.Server.handle_exit(self, sig, frame)

            threading.Thread(target=stop_then_exit, name="on-stop", daemon=True).start()

    from settlement.api.app import create_app
    from settlement.api.transport import server_config
    from settlement.cli.keys import devnet_operator_key
    from settlement.server.service import Service

    try:
        _check_port_free(host, port)
        service = Service.build(settings)
        api = create_app(settings, service)
        if service.devnet:
            devnet_operator_key(settings, service.db, console)
        _warn_if_never_confirmed(settings, service.w3)
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print(escape(f"API on http://{host}:{port} (docs at /docs); store: {service.db.shown_url}"))
    # The event loop answers every request; a worker thread (a store read, a chain look-up) that holds the GIL makes
    # it wait up to the switch interval each time it wakes: 5 ms by default, a millisecond here.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    server = Server(server_config(api, settings, host, port, log_level, access_log))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; that is how we stop
        pass


def _check_port_free(host: str, port: int) -> None:
    """Fail before anything starts (and before a line claims the API is up) when the port is taken."""
    from settlement.devtools.devnet import port_free

    if port and not port_free(host, port):
        raise PortInUseError(
            f"port {port} on {host} is in use (another `settlement serve` or `make run`?): "
            f"choose another with --port {port + 1} (make run PORT={port + 1})",
            port=port,
        )


def _warn_if_never_confirmed(settings: Settings, w3: Web3) -> None:
    """Through the service's own connection: a second one to SETTLEMENT_RPC_URL alone failed the start while it was
    down, its fallbacks up."""
    from settlement.chain.node import mines_only_on_transactions

    if settings.confirmations and mines_only_on_transactions(w3):
        err_console.print(f"[yellow]warning[/] {escape(_AUTOMINE_WARNING.format(n=settings.confirmations))}")


@app.command()
def resume(
    channel_id: Annotated[str, typer.Argument(help="0x-prefixed channel id")],
) -> None:
    """Accept vouchers again for a channel a deep reorg suspended, after checking it; its chain state is re-read."""
    settings = _settings()
    try:
        service = _service(settings)
        try:
            channel = service.indexer.resume(ChannelId(channel_id.lower()))
        finally:
            service.stop()
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print(
        f"channel {channel.channel_id} resumed: deposit {channel.deposit}, settled {channel.settled}, "
        f"accepted {channel.accepted} (as of block {channel.as_of_block})"
    )


def _service(settings: Settings, *, engine: bool = False) -> Service:
    """The service's parts without their threads, for one-shot commands."""
    from settlement.server.service import Service

    return Service.build(settings.model_copy(update={"engine_enabled": engine}))


@app.command()
def settle(
    timeout: Annotated[float, typer.Option(help="seconds to wait for the batch to confirm")] = 300.0,
) -> None:
    """Settle now: catch the indexer up, send one batch of every settleable channel, wait until it is confirmed."""
    settings = _settings()
    try:
        service = _service(settings, engine=True)
        assert service.settler is not None and service.lease is not None
        try:
            if not service.lease.acquire():
                raise EngineBusyError(
                    "another process runs the settlement engine on this store (a `settlement serve`): it settles "
                    "every SETTLEMENT_SETTLE_INTERVAL already; stop it first to settle by hand"
                )
            with console.status("catching up with the chain…"):
                service.indexer.catch_up()
            result = service.settler.tick(force=True)
            deadline = time.monotonic() + timeout
            with console.status("waiting for confirmations…"):
                while (
                    service.settler.short_of_funds is None  # no wait ends that: the operator's top-up does
                    and service.settler.reconcile() == []
                    and _open(service)
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.5)
            _print_batches(service, 1 if result.started else 0)
            if result.started is None and not result.finished:
                console.print("nothing to settle")
            if _open(service) and service.settler.short_of_funds is not None:
                raise SettlerUnfundedError(
                    f"{service.settler.short_of_funds} (sent once the settler can pay: by a running engine, or "
                    "`settlement settle` again)"
                )
            if _open(service):
                raise ChainError(f"the batch is not confirmed after {timeout:.0f}s; the engine will carry on with it")
        finally:
            if service.lease is not None:
                service.lease.release()
            service.stop()
    except SettlementError as ex:
        raise _fail(ex) from ex


def _open(service: Service) -> bool:
    from settlement.store import settlements as batch_q

    with service.db.read() as conn:
        return bool(batch_q.open_batches(conn))


def _print_batches(service: Service, limit: int) -> None:
    from settlement.store import settlements as batch_q

    if limit <= 0:
        return
    with service.db.read() as conn:
        console.print(_batch_table("settlement batches", batch_q.recent_batches(conn, limit)))


def _batch_table(title: str, batches: list[CountedBatch]) -> Table:
    table = Table(title=title)
    for column in ("batch", "status", "channels", "gas", "block", "tx", "created"):
        table.add_column(column)
    for batch, entries in batches:
        table.add_row(
            batch.batch_id[:12],
            batch.status,
            str(entries),
            f"{batch.gas_used:,}" if batch.gas_used else "-",
            str(batch.block_number or "-"),
            batch.tx_hash or "-",
            batch.created_at.isoformat(timespec="seconds"),
        )
    return table


@contextmanager
def _store_only(settings: Settings) -> Iterator[Connection]:
    """A read transaction on the service's store as it is, for the read-only commands: an operator needs them most
    when the chain is down, so they touch no chain and migrate nothing (a missing store is refused, not created)."""
    from settlement.store import Database

    try:
        db = Database.existing(settings.database_url)
    except SettlementError as ex:
        raise _fail(ex) from ex
    try:
        with db.read() as conn:
            yield conn
    except SettlementError as ex:
        raise _fail(ex) from ex
    finally:
        db.dispose()


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object instead of tables")] = False,
) -> None:
    """Unsettled value per asset, the next regular settlement, pending closes with deadlines, the last batches."""
    from settlement.store import channels as channel_q
    from settlement.store import settlements as batch_q
    from settlement.store.meta import engine_interval

    settings = _settings()
    with _store_only(settings) as conn:
        unsettled = channel_q.unsettled_by_token(conn)
        closes = batch_q.closing_channels(conn)
        batches = batch_q.recent_batches(conn, 10)
        interval = engine_interval(conn)  # the running engine's, not this CLI's
    last = batches[0].batch.created_at if batches else None
    next_at = (last.timestamp() + interval) if last and interval else None
    if as_json:
        print(
            json.dumps(
                {
                    "unsettled": {token: str(value) for token, value in unsettled.items()},
                    "nextSettlementAt": next_at,
                    "settleInterval": interval,
                    "pendingCloses": [
                        {"channelId": c.channel_id, "deadline": c.close_deadline, "unsettled": str(c.unsettled)}
                        for c in closes
                    ],
                    "batches": [
                        {
                            "batchId": b.batch_id,
                            "status": b.status,
                            "channels": n,
                            "gasUsed": b.gas_used,
                            "txHash": b.tx_hash,
                            "createdAt": b.created_at.isoformat(),
                        }
                        for b, n in batches
                    ],
                }
            )
        )
        return
    table = Table(title="unsettled value")
    table.add_column("asset")
    table.add_column("base units", justify="right")
    for token, value in sorted(unsettled.items()):
        table.add_row("ETH" if token == ETH else token, f"{value:,}")
    console.print(table)
    if interval is None:
        console.print("no settlement engine has run on this store yet (`settlement serve` runs one)")
    else:
        when = datetime.fromtimestamp(next_at, UTC).isoformat(timespec="seconds") if next_at else "at its next tick"
        console.print(f"next regular settlement: {when} (the engine settles every {interval:g}s)")
    if closes:
        closing = Table(title="closing channels (the engine settles them before their deadline)")
        for column in ("channel", "deadline", "unsettled"):
            closing.add_column(column)
        for c in closes:
            deadline = datetime.fromtimestamp(c.close_deadline or 0, UTC).isoformat(timespec="seconds")
            closing.add_row(c.channel_id, deadline, f"{c.unsettled:,}")
        console.print(closing)
    else:
        console.print("no channel is closing")
    console.print(_batch_table("last batches", batches))


@app.command()
def channels(
    payee: Annotated[str | None, typer.Option(help="only this payee")] = None,
    payer: Annotated[str | None, typer.Option(help="only this payer")] = None,
    limit: Annotated[int, typer.Option(help="rows at most")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The channels the service knows, with accepted, settled and deposit."""
    from settlement.api.schemas import ChannelOut
    from settlement.chain.addresses import checksummed
    from settlement.store import channels as channel_q

    try:  # the store holds addresses checksummed: one typed in lower case found nothing, an empty table
        payee, payer = (
            None if a is None else checksummed(a, option, ConfigError)
            for a, option in ((payee, "--payee"), (payer, "--payer"))
        )
    except ConfigError as ex:
        raise _fail(ex) from ex
    with _store_only(_settings()) as conn:
        page = channel_q.list_channels(conn, payer=payer, payee=payee, limit=limit)
    if as_json:
        print(json.dumps([ChannelOut.of(c).model_dump() for c in page.items]))
        return
    table = Table(title="channels")
    for column in ("channel", "payer", "payee", "asset", "deposit", "accepted", "settled", "status"):
        table.add_column(column)
    for c in page.items:
        table.add_row(
            c.channel_id,
            c.payer,
            c.payee,
            "ETH" if c.token == ETH else c.token,
            f"{c.deposit:,}",
            f"{c.accepted:,}",
            f"{c.settled:,}",
            c.status.name.lower() + (" (suspended)" if c.suspended_reason else ""),
        )
    console.print(table)


@app.command()
def compact(
    days: Annotated[
        float | None, typer.Option(help="retention in days (default: SETTLEMENT_PAYMENT_RETENTION_DAYS)", min=0)
    ] = None,
) -> None:
    """Remove payment rows whose value is settled on chain and older than the retention (each channel's latest and
    every unsettled one stay). The engine's leader does this hourly; this does it now."""
    from settlement.store import Database
    from settlement.store.retention import compact as compact_store

    settings = _settings()
    retention = settings.payment_retention_days if days is None else days
    if retention <= 0:
        raise _fail(ConfigError("a retention of 0 days keeps every payment: nothing to compact"))
    try:
        db = Database.existing(settings.database_url)
    except SettlementError as ex:
        raise _fail(ex) from ex
    try:
        removed = compact_store(db, retention, time.time_ns() // 1000)
    except SettlementError as ex:
        raise _fail(ex) from ex
    finally:
        db.dispose()
    console.print(f"removed {removed:,} settled payment rows accepted more than {retention:g} days ago")


@app.command("reconcile")
def reconcile_command(
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Store versus chain per channel; exits 1 when a difference is not explained by pending work."""
    from settlement.settle.reconcile import reconcile

    settings = _settings()
    try:
        service = _service(settings)
        try:
            block, rows = reconcile(service.db, service.indexer)
        finally:
            service.stop()
    except SettlementError as ex:
        raise _fail(ex) from ex
    bad = [r for r in rows if r.problem and not r.explained]
    if as_json:
        print(json.dumps({"block": block, "mismatches": len(bad), "channels": [r.as_json() for r in rows]}))
    else:
        table = Table(title=f"store vs chain at block {block}")
        for column in ("channel", "status", "accepted", "settled (store/chain)", "deposit (store/chain)", "problem"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                r.channel_id,
                r.status,
                f"{r.accepted:,}",
                f"{r.settled_store:,} / {r.settled_chain if r.settled_chain is not None else '-'}",
                f"{r.deposit_store:,} / {r.deposit_chain if r.deposit_chain is not None else '-'}",
                escape(r.problem or ("in flight" if r.in_flight else "ok")),
            )
        console.print(table)
        console.print(f"{len(rows)} channels, {len(bad)} unexplained mismatch(es)")
    if bad:
        raise typer.Exit(code=1)


@app.command()
def withdraw(
    token: Annotated[str | None, typer.Option(help="ERC-20 address (default: ETH)")] = None,
    amount: Annotated[int | None, typer.Option(help="base units, wei for ETH (default: the whole balance)")] = None,
    to: Annotated[str | None, typer.Option(help="recipient (default: the payee itself)")] = None,
    hub: Annotated[
        str | None, typer.Option(help="the hub's address (default: SETTLEMENT_HUB_ADDRESS, else the deployment file)")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="a file holding the payee's key (default: SETTLEMENT_WITHDRAW_KEY)")
    ] = None,
) -> None:
    """A payee (or a refunded payer) takes its credited balance out of the hub. Its key comes from
    SETTLEMENT_WITHDRAW_KEY or --key-file, never from the command line (where `ps` would show it)."""
    from settlement.cli.payee import withdraw as run_withdraw

    try:
        run_withdraw(_settings(), console, token=token, amount=amount, to=to, hub=hub, key_file=key_file)
    except SettlementError as ex:
        raise _fail(ex) from ex


@app.command()
def payee(
    address: Annotated[str, typer.Argument(help="the payee's address")],
    service_url: Annotated[str | None, typer.Option(help="the service (default: SETTLEMENT_SERVICE_URL)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the service's JSON summary as it is")] = False,
    key_file: Annotated[
        Path | None, typer.Option(help="sign in with the payee's key in this file (else SETTLEMENT_WITHDRAW_KEY)")
    ] = None,
) -> None:
    """What a payee was paid, per asset: accepted, settled on chain, unsettled, withdrawable now, withdrawn. The
    service is asked with SETTLEMENT_API_KEY, or signed in with the payee's own key."""
    from settlement.cli.payee import payee_report

    try:
        payee_report(_settings(), console, address, service_url=service_url, as_json=as_json, key_file=key_file)
    except SettlementError as ex:
        raise _fail(ex) from ex


@app.command()
def simulate(
    payers: Annotated[int, typer.Option(min=1, help="paying accounts")] = 3,
    payees: Annotated[int, typer.Option(min=1, help="paid accounts (each payer pays each in ETH and a token)")] = 2,
    rate: Annotated[float, typer.Option(min=0.1, help="target payments per second, all payers together")] = 50.0,
    count: Annotated[int | None, typer.Option(min=1, help="payments in total (default 500 unless --duration)")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="seconds of payments instead of a count")] = None,
    settle_interval: Annotated[float, typer.Option(min=0.1, help="engine batch interval, seconds")] = 5.0,
    settle_timeout: Annotated[float, typer.Option(help="seconds to wait for settlement to catch up")] = 120.0,
    rpc_url: Annotated[str | None, typer.Option(help="use this anvil instead of starting one")] = None,
    seed: Annotated[int, typer.Option(help="random seed of the payment stream")] = 1,
) -> None:
    """Pay at random between devnet accounts through the real service, settle, and prove the books to the wei."""
    from settlement.devtools.simulate import Plan, Simulation

    plan = Plan(
        payers=payers,
        payees=payees,
        rate=rate,
        count=count if count is not None or duration is not None else 500,
        duration=duration,
        settle_interval=settle_interval,
        settle_timeout=settle_timeout,
        seed=seed,
    )
    try:
        outcome = Simulation(plan, _settings(), console, rpc_url).run()
    except SettlementError as ex:
        raise _fail(ex) from ex
    table = Table(title="simulation")
    table.add_column("payee")
    table.add_column("asset")
    table.add_column("accepted (sum of increments)", justify="right")
    table.add_column("credited on chain", justify="right")
    table.add_column("")
    for (payee, asset), expected in sorted(outcome.expected.items()):
        credited = outcome.credited.get((payee, asset))
        table.add_row(
            payee,
            "ETH" if asset == ETH else asset,
            f"{expected:,}",
            f"{credited:,}" if credited is not None else "-",
            "[green]ok[/]" if credited == expected else "[red]MISMATCH[/]",
        )
    console.print(table)
    rate_done = outcome.payments / outcome.seconds if outcome.seconds else 0.0
    console.print(
        f"{outcome.payments} payments ({rate_done:.0f}/s over {outcome.seconds:.1f}s), {outcome.refused} refused; "
        f"{outcome.batches} settlement batches, {outcome.gas:,} gas "
        f"({outcome.gas / max(outcome.payments, 1):,.1f} gas per payment)"
    )
    if outcome.e2e_seconds:
        console.print(
            f"accepted -> credited on chain: p50 {outcome.e2e_ms(0.5):,.0f} ms, p99 {outcome.e2e_ms(0.99):,.0f} ms "
            f"(settle interval {plan.settle_interval:g}s)"
        )
    if outcome.mismatches or outcome.refused:
        err_console.print(
            f"[bold red]{len(outcome.mismatches)} payee balance(s) differ from the accepted payments; "
            f"{outcome.refused} payment(s) refused[/]"
        )
        raise typer.Exit(code=1)
    console.print("[green]every payee's credited balance equals its accepted payments, to the wei[/]")


def _export_line(name: str, value: str) -> str:
    """A line to paste into a shell, the value quoted for it: a checkout under "My Projects" pasted as two words."""
    return f"export {name}={shlex.quote(value)}"


def _print_second_terminal(settings: Settings, api_port: int) -> None:
    """What another terminal needs to look at the demo with the CLI (it keeps its own deployment file and store)."""
    from settlement.cli.keys import operator_key_file

    console.print("In a second terminal, these make `settlement status`, `channels`, `payee` and the API read it:")
    exports = {
        "SETTLEMENT_RPC_URL": settings.rpc_url,
        "SETTLEMENT_DEPLOYMENT_FILE": str(settings.deployment_file.resolve()),
        "SETTLEMENT_DATABASE_URL": _absolute_sqlite(settings.database_url),
    }
    key_file = operator_key_file(settings)
    if key_file.exists():
        exports["SETTLEMENT_API_KEY"] = key_file.read_text().strip()
    for name, value in exports.items():
        console.print(escape(f"  {_export_line(name, value)}"), soft_wrap=True)
    console.print(
        f'  curl -H "Authorization: Bearer $SETTLEMENT_API_KEY" http://127.0.0.1:{api_port}/v1/channels', soft_wrap=True
    )


keys_app = typer.Typer(help="The operator's API keys: made once and shown once, listed, revoked.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="operator (reads everything), payee or payer (reads its own)")],
    account: Annotated[str | None, typer.Option(help="the payee's or payer's address")] = None,
    name: Annotated[str, typer.Option(help="what the key is for, shown in `keys list`")] = "",
) -> None:
    """Make an API key: printed once, on its own line (the store keeps its hash only)."""
    from settlement.cli import keys

    try:
        keys.create(_settings(), err_console, role, account, name or role)
    except SettlementError as ex:
        raise _fail(ex) from ex


@keys_app.command("list")
def keys_list() -> None:
    """Every key's id, role, account, name and dates (never the key)."""
    from settlement.cli import keys

    try:
        keys.show(_settings(), console)
    except SettlementError as ex:
        raise _fail(ex) from ex


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id, from `keys list`")]) -> None:
    """Revoke a key: refused from the next request on, by every process on the store."""
    from settlement.cli import keys

    try:
        keys.revoke(_settings(), console, key_id)
    except SettlementError as ex:
        raise _fail(ex) from ex


def _absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    return prefix + str(Path(url[len(prefix) :]).resolve()) if url.startswith(prefix) else url


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="API port (default: SETTLEMENT_API_PORT)")] = None,
    rate: Annotated[float, typer.Option(help="demo payments per second (0: no demo traffic)")] = 20.0,
) -> None:
    """Start a devnet, deploy ChannelHub, serve the API and stream demo payments to it; Ctrl-C stops everything.

    The demo keeps its own SQLite store (.settlement/demo.db next to the deployment file), recreated on each run,
    because every run starts a new chain.
    """
    from settlement.cli.keys import devnet_operator_key
    from settlement.devtools.demo import DemoTraffic, PaidApiDemo
    from settlement.devtools.devnet import Devnet
    from settlement.store import Database

    settings = _settings()
    block_time = settings.devnet_block_time or 1.0
    api_port = port if port is not None else settings.api_port
    try:
        _check_port_free(settings.api_host, api_port)
        with Devnet(settings.model_copy(update={"devnet_block_time": block_time})) as net:
            _print_devnet(net)
            workdir = settings.deployment_file.parent
            demo_db = workdir / "demo.db"
            for leftover in (demo_db, workdir / "demo.db-wal", workdir / "demo.db-shm"):
                leftover.unlink(missing_ok=True)
            shutil.rmtree(workdir / "demo-journals", ignore_errors=True)  # the last devnet's payers
            local = settings.model_copy(
                update={
                    "rpc_url": net.url,
                    "deployment_file": workdir / "demo-deployment.json",
                    "database_url": f"sqlite:///{demo_db}",
                    "settle_interval": min(settings.settle_interval, 10.0),
                    # Demo payments (up to 10^12 wei) would wait a minute or more to be worth a devnet batch's gas:
                    # the demo shows settlement every interval instead.
                    "settle_fee_share_percent": 0,
                }
            )
            deployment = _deploy(local, settings.challenge_period, local.deployment_file)
            console.print(
                f"ChannelHub deployed at [bold]{deployment.address}[/] (challenge period "
                f"{deployment.challenge_period}s, {local.confirmations} confirmations, {block_time:g}s blocks)"
            )
            store = Database(local.database_url)
            try:
                store.migrate()
                devnet_operator_key(local, store, console)  # before the export lines, which name it
            finally:
                store.dispose()
            _print_second_terminal(local, api_port)
            stops: list[threading.Event] = []  # the demo's payers, told to stop when Ctrl-C arrives
            threads: list[threading.Thread] = []
            if rate > 0:
                traffic = DemoTraffic(
                    f"http://127.0.0.1:{api_port}",
                    net.url,
                    net.accounts[1:4],
                    [a.address for a in net.accounts[4:6]],
                    rate=rate,
                    console=console,
                    journal_dir=workdir / "demo-journals",
                )
                threads.append(traffic.start())
                paid_api = PaidApiDemo(
                    f"http://127.0.0.1:{api_port}",
                    net.url,
                    net.accounts[6],
                    net.accounts[7].address,
                    console=console,
                    journal_dir=workdir / "demo-journals",
                )
                threads.append(paid_api.start())
                stops += [traffic.stop, paid_api.stop]

            def stop_paying() -> None:
                """The payers told to stop and waited for: their payments in flight answered before the API closes
                its socket, and done before the devnet stops and the interpreter exits (a thread still in a client's
                C code when the interpreter is torn down crashed the process)."""
                for stop in stops:
                    stop.set()
                for thread in threads:
                    thread.join(timeout=30)

            try:
                _serve(local, settings.api_host, api_port, "warning", on_stop=stop_paying)
            finally:
                stop_paying()
            console.print("stopped")
    except SettlementError as ex:
        raise _fail(ex) from ex


if __name__ == "__main__":
    app()
