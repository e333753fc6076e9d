"""Demo traffic for `make run`: a few payers open channels on the devnet and stream micro-payments to the API."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from hexbytes import HexBytes
from rich.console import Console
from rich.markup import escape

from settlement.domain.amounts import human_of_units
from settlement.errors import SettlementError
from settlement.sdk.payer import ChannelRef, PayerClient

logger = logging.getLogger(__name__)

DEPOSIT = 10**18  # 1 ETH per channel
MAX_PAYMENT = 10**12  # up to 0.000001 ETH per payment


def wait_for_api(service_url: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if httpx.get(f"{service_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


class DemoTraffic:
    """Opens one channel per (payer, payee) pair, then pays at about `rate` payments per second until stopped."""

    def __init__(
        self,
        service_url: str,
        rpc_url: str,
        payers: list[LocalAccount],
        payees: list[str],
        *,
        rate: float,
        console: Console,
        journal_dir: Path,
        report_every: float = 5.0,
    ) -> None:
        self.journal_dir = journal_dir  # the payers' journals: this devnet's, new with it
        self.service_url = service_url
        self.rpc_url = rpc_url
        self.payers = payers
        self.payees = payees
        self.rate = rate
        self.console = console
        self.report_every = report_every
        self.stop = threading.Event()
        self.paid = 0
        self.value = 0
        self.refused = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            wait_for_api(self.service_url, self.stop)
            work = self._open_channels()
            self.console.print(f"[green]demo:[/] {len(work)} channels open; paying ~{self.rate:g} payments/s")
            self._pay(work)
        except SettlementError as ex:
            self.console.print(f"[red]demo traffic stopped:[/] {escape(f'[{ex.code}] {ex.message}')}")

    def _open_channels(self) -> list[tuple[PayerClient, ChannelRef]]:
        work = []
        for payer in self.payers:
            client = PayerClient(
                HexBytes(payer.key).to_0x_hex(),
                self.rpc_url,
                self.service_url,
                state_path=self.journal_dir / f"payer-{payer.address}.sqlite3",
            )
            for payee in self.payees:
                channel = client.open_channel(payee, DEPOSIT)
                work.append((client, channel))
        for client, channel in work:
            client.wait_until_known(channel)
        return work

    def _pay(self, work: list[tuple[PayerClient, ChannelRef]]) -> None:
        rng = random.Random(1)
        interval = 1.0 / self.rate
        started = last_report = time.monotonic()
        next_at = started
        while not self.stop.is_set():
            client, channel = rng.choice(work)
            amount = rng.randint(1, MAX_PAYMENT)
            try:
                client.pay(channel, amount, reference=f"demo-{self.paid + self.refused}")
                self.paid += 1
                self.value += amount
            except SettlementError as ex:
                self.refused += 1
                logger.warning("demo payment refused: [%s] %s", ex.code, ex.message)
            now = time.monotonic()
            if now - last_report >= self.report_every:
                self._report(now - started)
                last_report = now
            next_at += interval
            self.stop.wait(max(next_at - time.monotonic(), 0))
        self._report(time.monotonic() - started)
        for client in {id(c): c for c, _ in work}.values():
            client.shutdown()

    def _report(self, elapsed: float) -> None:
        self.console.print(
            f"demo: {self.paid} payments accepted ({self.paid / max(elapsed, 1e-9):.0f}/s), "
            f"{human_of_units(self.value, 18)} ETH in total, {self.refused} refused"
        )


class PaidApiDemo:
    """The other half of the demo: a paid API (x402's FastAPI middleware with the `channelhub` scheme, this service
    as the facilitator) and a payer calling it with x402's own httpx client; reports what the payee earned."""

    def __init__(
        self,
        service_url: str,
        rpc_url: str,
        payer: LocalAccount,
        payee: str,
        *,
        console: Console,
        journal_dir: Path,
        price: int = 10**9,
        rate: float = 2.0,
        report_every: float = 5.0,
    ) -> None:
        self.service_url = service_url
        self.rpc_url = rpc_url
        self.payer = payer
        self.payee = payee
        self.console = console
        self.journal_dir = journal_dir
        self.price = price
        self.rate = rate
        self.report_every = report_every
        self.stop = threading.Event()
        self.paid = 0
        self.url = ""

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="demo-x402", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            wait_for_api(self.service_url, self.stop)
            client = PayerClient(
                HexBytes(self.payer.key).to_0x_hex(),
                self.rpc_url,
                self.service_url,
                state_path=self.journal_dir / f"x402-{self.payer.address}.sqlite3",
            )
            server = self._serve(client.domain.chain_id)
            try:
                asyncio.run(self._pay(client))
            finally:
                server.should_exit = True
                client.shutdown()
                self._server_thread.join(timeout=10)  # its graceful shutdown, before the caller lets the process exit
        except SettlementError as ex:
            self.console.print(f"[red]x402 demo stopped:[/] {escape(f'[{ex.code}] {ex.message}')}")

    def _serve(self, chain_id: int) -> uvicorn.Server:
        from x402 import x402ResourceServer
        from x402.http import FacilitatorConfig
        from x402.http.types import PaymentOption, RouteConfig

        from settlement.devtools.devnet import free_port
        from settlement.x402.fastapi import ChannelHubFacilitatorClient, PaymentMiddleware
        from settlement.x402.server import ChannelHubServerScheme
        from settlement.x402.serving import bounded_protocol

        network = f"eip155:{chain_id}"
        # httpx's own pool, not the default aiohttp one: this app runs in a daemon thread that the interpreter's exit
        # stops mid-request, and aiohttp's C parser caught there crashed the process once on Ctrl-C.
        http = httpx.AsyncClient(timeout=30)
        facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url=f"{self.service_url}/x402", http_client=http))
        resource = x402ResourceServer(facilitator)
        resource.register(network, ChannelHubServerScheme())
        paid = RouteConfig(
            accepts=PaymentOption(scheme="channelhub", pay_to=self.payee, price=str(self.price), network=network)
        )
        app = FastAPI(title="demo paid API", max_body_size=64 * 1024)  # as examples/paid_api.py: it reads no body
        app.add_middleware(PaymentMiddleware, routes={"GET /weather": paid}, server=resource)

        @app.get("/weather")
        def weather() -> dict[str, str]:
            return {"forecast": "sunny"}

        port = free_port("127.0.0.1")
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, http=bounded_protocol(), limit_concurrency=1_000, log_level="warning"
        )  # served as examples/paid_api.py is, with settlement.x402.serving's bounds on what a connection holds
        server = uvicorn.Server(config)
        self._server_thread = threading.Thread(target=server.run, name="demo-paid-api", daemon=True)
        self._server_thread.start()
        while not server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}/weather"
        self.console.print(
            f"[green]x402 demo:[/] a paid API at {self.url} ({self.price:,} wei a request to {self.payee}); "
            f"a payer calls it ~{self.rate:g} times a second with x402's client"
        )
        return server

    async def _pay(self, client: PayerClient) -> None:
        from x402 import x402Client
        from x402.http.clients import x402HttpxClient

        from settlement.domain.model import ETH
        from settlement.x402.client import ChannelHubClientScheme

        network = f"eip155:{client.domain.chain_id}"
        x402 = x402Client()
        x402.register(network, ChannelHubClientScheme(client))
        x402.set_spend_controls(
            {"allowed_assets": [{"network": network, "asset": ETH, "max_amount_per_payment": str(self.price)}]}
        )
        last_report = time.monotonic()
        async with x402HttpxClient(x402, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    answer = await http.get(self.url)
                    if answer.status_code == 200:
                        self.paid += 1
                except Exception as ex:  # a demo keeps going; the reason is logged
                    logger.warning("x402 demo request failed: %s", ex)
                if time.monotonic() - last_report >= self.report_every:
                    self.console.print(
                        f"x402 demo: {self.paid} paid requests, the payee earned {self.paid * self.price:,} wei"
                    )
                    last_report = time.monotonic()
                await asyncio.sleep(1 / self.rate)
