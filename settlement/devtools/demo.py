"""Demo traffic for `make run`: a few payers open channels on the devnet and stream micro-payments to the API."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import httpx
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from rich.console import Console

from settlement.errors import SettlementError
from settlement.sdk.payer import ChannelRef, PayerClient

logger = logging.getLogger(__name__)

DEPOSIT = 10**18  # 1 ETH per channel
MAX_PAYMENT = 10**12  # up to 0.000001 ETH per payment


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

    def _wait_for_api(self) -> None:
        while not self.stop.is_set():
            try:
                if httpx.get(f"{self.service_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def _run(self) -> None:
        try:
            self._wait_for_api()
            work = self._open_channels()
            self.console.print(f"[green]demo:[/] {len(work)} channels open; paying ~{self.rate:g} payments/s")
            self._pay(work)
        except SettlementError as ex:
            self.console.print(f"[red]demo traffic stopped:[/] [{ex.code}] {ex.message}")

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
            f"{self.value / 10**18:.9f} ETH in total, {self.refused} refused"
        )
