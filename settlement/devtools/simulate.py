"""The devnet simulator: N payers x M payees pay each other in ETH and an ERC-20 through the real service, then the
simulator waits for settlement and proves every payee's credited balance in the hub equals, to the wei, the sum of
the increments the service accepted for it.

Everything is real: an anvil devnet (started here unless an RPC URL is given), the hub and a DevToken deployed on it,
the API with its indexer and settlement engine on a local port, and one PayerClient per payer sending over HTTP.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from web3 import Web3
from web3.contract import Contract

from settlement.api.app import create_app
from settlement.chain.batch_codec import decode_settlements
from settlement.chain.contracts import DEV_TOKEN, load_artifact
from settlement.chain.deployment import Deployment, deploy_contract, deploy_hub, hub_contract
from settlement.chain.node import Transactor, connect
from settlement.devtools.devnet import Devnet, free_port
from settlement.domain.model import ETH
from settlement.errors import SettlementError
from settlement.sdk.payer import ChannelRef, PayerClient
from settlement.server.config import Settings
from settlement.server.operator import devnet_accounts
from settlement.server.service import Service

ETH_DEPOSIT = 10**18
TOKEN_DEPOSIT = 10**24
MAX_ETH_PAYMENT = 10**12
MAX_TOKEN_PAYMENT = 10**18


@dataclass(frozen=True)
class Plan:
    """What to simulate: who pays whom, how fast, for how long (or how many payments)."""

    payers: int = 3
    payees: int = 2
    rate: float = 50.0
    count: int | None = 500
    duration: float | None = None
    settle_interval: float = 5.0
    settle_timeout: float = 120.0
    seed: int = 1


@dataclass
class Outcome:
    """What happened, and the proof: expected (from receipts) versus credited (from the hub), per payee and asset."""

    payments: int = 0
    refused: int = 0
    seconds: float = 0.0
    batches: int = 0
    gas: int = 0
    expected: dict[tuple[str, str], int] = field(default_factory=dict)
    credited: dict[tuple[str, str], int] = field(default_factory=dict)
    e2e_seconds: list[float] = field(default_factory=list)  # per payment: receipt in hand -> seen credited on chain

    @property
    def mismatches(self) -> list[tuple[str, str]]:
        return [key for key, value in self.expected.items() if self.credited.get(key) != value]

    def e2e_ms(self, q: float) -> float | None:
        """The q-quantile (0..1) of the accepted -> credited latency, in milliseconds (nearest rank)."""
        if not self.e2e_seconds:
            return None
        ordered = sorted(self.e2e_seconds)
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class CreditWatcher:
    """Polls the hub's ChannelsSettled logs and notes when each (channel, cumulative) was first seen on chain, so
    each receipt's accepted -> credited latency can be read off afterwards. Polling every `interval` seconds adds at
    most that much to each figure."""

    def __init__(self, w3: Web3, hub: Contract, interval: float = 0.05) -> None:
        self.w3 = w3
        self.hub = hub
        self.interval = interval
        self.seen: dict[str, list[tuple[int, float]]] = {}  # channel id -> [(cumulative, first seen at)]
        self.batch_txs: set[HexBytes] = set()  # the settleBatch transactions seen (one may log several groups)
        self._next_block = int(w3.eth.block_number)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="credit-watcher", daemon=True)

    def start(self) -> CreditWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            head = int(self.w3.eth.block_number)
            if head < self._next_block:
                continue
            now = time.time()
            for log in self.hub.events.ChannelsSettled().get_logs(from_block=self._next_block, to_block=head):
                self.batch_txs.add(HexBytes(log["transactionHash"]))
                for cid, cumulative in decode_settlements(log["args"]["settlements"]):
                    self.seen.setdefault(cid, []).append((cumulative, now))
            self._next_block = head + 1

    def credited_at(self, channel_id: str, cumulative: int) -> float | None:
        """When a settlement covering `cumulative` on the channel was first seen, if it was."""
        return min((t for c, t in self.seen.get(channel_id, []) if c >= cumulative), default=None)


class Simulation:
    """Run with `run()`; `console` shows the progress and the summary."""

    def __init__(self, plan: Plan, settings: Settings, console: Console, rpc_url: str | None = None) -> None:
        self.plan = plan
        self.settings = settings
        self.console = console
        self.rpc_url = rpc_url
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._accepted: list[tuple[str, int, float]] = []  # (channel id, cumulative, receipt received at)
        self._workdir = ""  # the run's temporary directory (the store, the deployment, the payers' journals)

    def run(self) -> Outcome:
        accounts_needed = 1 + self.plan.payers + self.plan.payees
        with self._chain(accounts_needed) as url, tempfile.TemporaryDirectory(prefix="simulate-") as tmp:
            self._workdir = tmp
            accounts = devnet_accounts(self.settings.devnet_mnemonic, accounts_needed)
            operator, payers = accounts[0], accounts[1 : 1 + self.plan.payers]
            payees = [str(a.address) for a in accounts[1 + self.plan.payers :]]
            w3 = connect(url, self.settings.rpc_timeout)
            token = self._deploy(w3, operator, payers, Path(tmp))
            settings = self.settings.model_copy(
                update={
                    "rpc_url": url,
                    "deployment_file": Path(tmp) / "deployment.json",
                    "database_url": f"sqlite:///{Path(tmp) / 'simulate.db'}",
                    "private_key": None,
                    "engine_enabled": True,
                    "settle_interval": self.plan.settle_interval,
                    "settle_fee_share_percent": 0,  # it proves the books to the wei: every payment must settle
                    # its own token is one the operator accepts: priced, so no unpriced-token ceiling holds it back
                    "token_min_settle_amounts": {token: 1},
                    "confirmations": 0 if self.settings.devnet_block_time is None else self.settings.confirmations,
                }
            )
            with self._service(settings) as service_url:
                work = self._open(payers, payees, token, url, service_url)
                hub = hub_contract(w3, Deployment.load(settings.deployment_file))
                watcher = CreditWatcher(w3, hub).start()
                try:
                    self._pay(work)
                    self._await_settlement(hub)
                    time.sleep(2 * watcher.interval)  # the watcher's last poll covers the last settlement
                finally:
                    watcher.stop()
                self._count_batches(w3, watcher)
                self._latencies(watcher)
        return self.outcome

    def _latencies(self, watcher: CreditWatcher) -> None:
        for channel_id, cumulative, accepted_at in self._accepted:
            credited_at = watcher.credited_at(channel_id, cumulative)
            if credited_at is not None:
                self.outcome.e2e_seconds.append(max(credited_at - accepted_at, 0.0))

    @contextmanager
    def _chain(self, accounts: int) -> Iterator[str]:
        if self.rpc_url is not None:
            yield self.rpc_url
            return
        net_settings = self.settings.model_copy(
            update={"devnet_accounts": max(accounts, self.settings.devnet_accounts)}
        )
        with Devnet(net_settings) as net:
            self.console.print(f"devnet at {net.url}")
            yield net.url

    def _deploy(self, w3: Web3, operator: LocalAccount, payers: list[LocalAccount], tmp: Path) -> str:
        deployment = deploy_hub(w3, operator, self.settings.challenge_period)
        deployment.save(tmp / "deployment.json")
        artifact = load_artifact(DEV_TOKEN)
        transactor = Transactor(w3, operator, artifact.abi)
        token, _ = deploy_contract(transactor, artifact, "Simulation Token", "SIM", 18)
        for payer in payers:
            transactor.send(token.functions.mint(payer.address, TOKEN_DEPOSIT * self.plan.payees))
        self.console.print(f"hub {deployment.address}, token {token.address}")
        return str(token.address)

    @contextmanager
    def _service(self, settings: Settings) -> Iterator[str]:
        service = Service.build(settings)
        port = free_port("127.0.0.1")
        server = uvicorn.Server(uvicorn.Config(create_app(settings, service), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="simulate-api", daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    def _open(
        self, payers: list[LocalAccount], payees: list[str], token: str, rpc_url: str, service_url: str
    ) -> list[tuple[PayerClient, list[ChannelRef]]]:
        work = []
        with self.console.status("opening channels…"):
            for payer in payers:
                client = PayerClient(
                    HexBytes(payer.key).to_0x_hex(),
                    rpc_url,
                    service_url,
                    state_path=Path(self._workdir) / f"payer-{payer.address}.sqlite3",
                )
                channels = []
                for payee in payees:
                    channels.append(client.open_channel(payee, ETH_DEPOSIT))
                    channels.append(client.open_channel(payee, TOKEN_DEPOSIT, token=token))
                for channel in channels:
                    client.wait_until_known(channel)
                work.append((client, channels))
        self.console.print(
            f"{sum(len(c) for _, c in work)} channels open ({len(payers)} payers x {len(payees)} payees x 2 assets)"
        )
        return work

    def _pay(self, work: list[tuple[PayerClient, list[ChannelRef]]]) -> None:
        plan = self.plan
        total = plan.count
        stop_at = time.monotonic() + plan.duration if plan.duration else None
        columns = (TextColumn("payments"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        started = time.monotonic()
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task("pay", total=total)
            threads = [
                threading.Thread(
                    target=self._payer_loop, args=(client, channels, i, len(work), stop_at, progress, task)
                )
                for i, (client, channels) in enumerate(work)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.outcome.seconds = time.monotonic() - started
        for client, _ in work:
            client.shutdown()

    def _payer_loop(
        self,
        client: PayerClient,
        channels: list[ChannelRef],
        index: int,
        payers: int,
        stop_at: float | None,
        progress: Progress,
        task: object,
    ) -> None:
        rng = random.Random(self.plan.seed * 1000 + index)
        interval = payers / self.plan.rate
        quota = None if self.plan.count is None else self.plan.count // payers + (index < self.plan.count % payers)
        next_at = time.monotonic()
        done = 0
        while (quota is None or done < quota) and (stop_at is None or time.monotonic() < stop_at):
            channel = rng.choice(channels)
            amount = rng.randint(1, MAX_ETH_PAYMENT if channel.token == ETH else MAX_TOKEN_PAYMENT)
            try:
                receipt = client.pay(channel, amount)
            except SettlementError:
                with self._lock:
                    self.outcome.refused += 1
            else:
                key = (channel.payee, channel.token)
                with self._lock:
                    self._accepted.append((channel.hex_id, receipt.cumulative, time.time()))
                    self.outcome.payments += 1
                    self.outcome.expected[key] = self.outcome.expected.get(key, 0) + receipt.increment
            done += 1
            progress.advance(task)  # type: ignore[arg-type]
            next_at += interval
            time.sleep(max(next_at - time.monotonic(), 0))

    def _await_settlement(self, hub: Contract) -> None:
        deadline = time.monotonic() + self.plan.settle_timeout
        with self.console.status("waiting for settlement…"):
            while True:
                credited = {
                    (payee, asset): int(hub.functions.balanceOf(payee, asset).call())
                    for payee, asset in self.outcome.expected
                }
                self.outcome.credited = credited
                if not self.outcome.mismatches or time.monotonic() > deadline:
                    return
                time.sleep(0.5)

    def _count_batches(self, w3: Web3, watcher: CreditWatcher) -> None:
        """From the chain, not the store: the engine records a batch as confirmed a tick after the credits the
        simulation waited for are visible, so the store could still say 0 here."""
        self.outcome.batches = len(watcher.batch_txs)
        self.outcome.gas = sum(int(w3.eth.get_transaction_receipt(tx)["gasUsed"]) for tx in watcher.batch_txs)
