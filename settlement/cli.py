"""The operator CLI: `settlement devnet | deploy | serve | resume | demo`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from hexbytes import HexBytes
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from settlement.chain import connect, operator_account
from settlement.config import Settings, get_settings
from settlement.deployment import Deployment, deploy_hub
from settlement.devnet import Devnet
from settlement.errors import SettlementError

app = typer.Typer(help="ChannelHub micropayment settlement: devnet, deploy, serve.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _fail(ex: SettlementError) -> typer.Exit:
    err_console.print(f"[bold red]error[/] {escape(f'[{ex.code}] {ex.message}')}")
    return typer.Exit(code=1)


def _print_devnet(devnet: Devnet) -> None:
    table = Table(title=f"anvil devnet at {devnet.url} (chain id {devnet.chain_id})")
    table.add_column("#", justify="right")
    table.add_column("address")
    table.add_column("private key (devnet only)")
    for i, account in enumerate(devnet.accounts):
        table.add_row(str(i), account.address, HexBytes(account.key).to_0x_hex())
    console.print(table)
    console.print(f"export SETTLEMENT_RPC_URL={devnet.url}")


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    try:
        while not stop["now"]:
            signal.pause()
    except KeyboardInterrupt:
        pass


@app.command()
def devnet(
    port: Annotated[int | None, typer.Option(help="port (default: SETTLEMENT_DEVNET_PORT or 8545)")] = None,
    chain_id: Annotated[int | None, typer.Option(help="chain id (default: SETTLEMENT_DEVNET_CHAIN_ID)")] = None,
    block_time: Annotated[float | None, typer.Option(help="seconds per block (default: mine per transaction)")] = None,
) -> None:
    """Run a local anvil devnet in the foreground until Ctrl-C; prints its URL and funded accounts."""
    settings = get_settings()
    overrides: dict[str, object] = {"devnet_port": port if port is not None else (settings.devnet_port or 8545)}
    if chain_id is not None:
        overrides["devnet_chain_id"] = chain_id
    if block_time is not None:
        overrides["devnet_block_time"] = block_time
    try:
        with Devnet(settings.model_copy(update=overrides)) as net:
            _print_devnet(net)
            console.print("[green]devnet running; Ctrl-C stops it[/]")
            _wait_for_signal()
    except SettlementError as ex:
        raise _fail(ex) from ex


@app.command()
def deploy(
    challenge_period: Annotated[int | None, typer.Option(help="seconds (default: SETTLEMENT_CHALLENGE_PERIOD)")] = None,
    out: Annotated[Path | None, typer.Option(help="deployment file (default: SETTLEMENT_DEPLOYMENT_FILE)")] = None,
) -> None:
    """Deploy ChannelHub to SETTLEMENT_RPC_URL and write the deployment file other commands read."""
    settings = get_settings()
    try:
        deployment = _deploy(settings, challenge_period or settings.challenge_period, out or settings.deployment_file)
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print(
        f"ChannelHub deployed at [bold]{deployment.address}[/] on chain {deployment.chain_id} "
        f"(block {deployment.block_number}, tx {deployment.tx_hash})"
    )
    console.print(f"deployment written to {out or settings.deployment_file}")


def _deploy(settings: Settings, challenge_period: int, out: Path) -> Deployment:
    w3 = connect(settings.rpc_url, settings.rpc_timeout)
    deployment = deploy_hub(w3, operator_account(settings, w3), challenge_period, timeout=settings.tx_timeout)
    deployment.save(out)
    return deployment


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: SETTLEMENT_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: SETTLEMENT_API_PORT)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (warning hides access lines)")] = "info",
) -> None:
    """Run the HTTP API and the chain indexer for the deployment in SETTLEMENT_DEPLOYMENT_FILE."""
    settings = get_settings()
    _serve(settings, host or settings.api_host, port if port is not None else settings.api_port, log_level)


def _serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    from settlement.api.app import create_app

    try:
        api = create_app(settings)
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print(f"API on http://{host}:{port} (docs at /docs); store: {settings.database_url}")
    uvicorn.run(api, host=host, port=port, log_level=log_level)


@app.command()
def resume(
    channel_id: Annotated[str, typer.Argument(help="0x-prefixed channel id")],
) -> None:
    """Accept vouchers again for a channel a deep reorg suspended, after checking it; its chain state is re-read."""
    from settlement.service import Service

    settings = get_settings()
    try:
        service = Service.build(settings)
        try:
            channel = service.indexer.resume(channel_id.lower())
        finally:
            service.stop()
    except SettlementError as ex:
        raise _fail(ex) from ex
    console.print(
        f"channel {channel.channel_id} resumed: deposit {channel.deposit}, settled {channel.settled}, "
        f"accepted {channel.accepted} (as of block {channel.as_of_block})"
    )


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="API port (default: SETTLEMENT_API_PORT)")] = None,
    rate: Annotated[float, typer.Option(help="demo payments per second (0: no demo traffic)")] = 20.0,
) -> None:
    """Start a devnet, deploy ChannelHub, serve the API and stream demo payments to it; Ctrl-C stops everything.

    The demo keeps its own SQLite store (.settlement/demo.db next to the deployment file), recreated on each run,
    because every run starts a new chain.
    """
    from settlement.demo import DemoTraffic

    settings = get_settings()
    block_time = settings.devnet_block_time or 1.0
    try:
        with Devnet(settings.model_copy(update={"devnet_block_time": block_time})) as net:
            _print_devnet(net)
            workdir = settings.deployment_file.parent
            demo_db = workdir / "demo.db"
            for leftover in (demo_db, workdir / "demo.db-wal", workdir / "demo.db-shm"):
                leftover.unlink(missing_ok=True)
            local = settings.model_copy(
                update={
                    "rpc_url": net.url,
                    "deployment_file": workdir / "demo-deployment.json",
                    "database_url": f"sqlite:///{demo_db}",
                }
            )
            deployment = _deploy(local, settings.challenge_period, local.deployment_file)
            console.print(
                f"ChannelHub deployed at [bold]{deployment.address}[/] (challenge period "
                f"{deployment.challenge_period}s, {local.confirmations} confirmations, {block_time:g}s blocks)"
            )
            api_port = port if port is not None else settings.api_port
            traffic = None
            if rate > 0:
                traffic = DemoTraffic(
                    f"http://127.0.0.1:{api_port}",
                    net.url,
                    net.accounts[1:4],
                    [a.address for a in net.accounts[4:6]],
                    rate=rate,
                    console=console,
                )
                traffic.start()
            try:
                _serve(local, settings.api_host, api_port, "warning")
            finally:
                if traffic is not None:
                    traffic.stop.set()
    except SettlementError as ex:
        raise _fail(ex) from ex


if __name__ == "__main__":
    app()
