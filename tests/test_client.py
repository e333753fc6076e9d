"""The payer SDK end to end against `settlement serve` child processes on the real devnet: payments, restarts of
the client and of the service (kill -9), two service processes on one PostgreSQL, and an RPC outage."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract

from settlement.client import ChannelRef, PayerClient
from settlement.devnet import Devnet
from settlement.errors import PaymentUncertainError, ServiceRejectedError
from settlement.model import Receipt
from settlement.store import Database
from settlement.store import channels as channel_q
from tests.hub_helpers import Channel, send
from tests.proxy import TcpProxy
from tests.servers import ServiceProcess
from tests.test_ingest_api import body

pytestmark = pytest.mark.slow


def stream_through(
    client: PayerClient, channel: ChannelRef, disrupt: Callable[[], object], times: int = 2
) -> list[Receipt]:
    """Pay 3 at a time on another thread; after every 30 receipts call `disrupt()`, `times` times, then take 20 more.
    Returns the receipts the payer holds: payments whose outcome stayed uncertain are left out, as a payer would."""
    receipts: list[Receipt] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            try:
                receipts.append(client.pay(channel, 3))
            except PaymentUncertainError:
                pass

    def at_least(count: int) -> None:
        while len(receipts) < count:
            stop.wait(0.05)

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        for _ in range(times):
            at_least(len(receipts) + 30)
            disrupt()
        at_least(len(receipts) + 20)
    finally:
        stop.set()
        worker.join(timeout=60)
    return receipts


@pytest.fixture
def payer_client(devnet: Devnet) -> Iterator[Callable[..., PayerClient]]:
    """Factory: payer_client(account, service_url, **options) -> PayerClient; all are shut down after the test."""
    made: list[PayerClient] = []

    def make(account: LocalAccount, service_url: str, **options: float) -> PayerClient:
        client = PayerClient(key(account), devnet.url, service_url, **options)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown()


def key(account: LocalAccount) -> str:
    return HexBytes(account.key).to_0x_hex()


def stored_payments(url: str, channel_id: str) -> list[Receipt]:
    db = Database(url)
    try:
        with db.read() as conn:
            return channel_q.list_payments(conn, channel_id, limit=1000).items
    finally:
        db.dispose()


def test_sdk_pays_tops_up_and_closes(
    spawn: Callable[..., ServiceProcess],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    token: Contract,
    w3: Web3,
    mining: str,
) -> None:
    service = spawn(store_url)
    payer, payee = accounts[10], accounts[11].address
    client = payer_client(payer, service.url)
    channel = client.open_channel(payee, 1_000)
    assert channel.salt[:24] == bytes(24)  # a short default salt: cheap calldata in every settlement
    client.wait_until_known(channel)
    receipts = [client.pay(channel, n, reference=f"order-{n}") for n in (100, 250, 50)]
    assert [r.cumulative for r in receipts] == [100, 350, 400]
    assert [r.increment for r in receipts] == [100, 250, 50]
    with pytest.raises(ServiceRejectedError) as info:
        client.pay(channel, 700)
    assert info.value.code == "amount_exceeds_deposit"
    client.top_up(channel, 500)
    client.wait_until_known(channel, min_deposit=1_500)
    assert client.pay(channel, 700).remaining == 400

    send(w3, token.functions.mint(payer.address, 10**24), payer.address)
    token_channel = client.open_channel(payee, 10**24, token=token.address)
    client.wait_until_known(token_channel)
    assert client.pay(token_channel, 10**23).cumulative == 10**23

    client.close(channel)
    assert client.wait_until_known(channel)["status"] in ("open", "closing")
    stored = stored_payments(store_url, channel.hex_id)
    assert [p.reference for p in stored[::-1][:3]] == ["order-100", "order-250", "order-50"]
    assert sum(p.increment for p in stored) == 1_100


def test_a_restarted_client_continues_from_the_services_position(
    spawn: Callable[..., ServiceProcess],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    service = spawn(store_url)
    first = payer_client(accounts[10], service.url)
    channel = first.open_channel(accounts[11].address, 10_000)
    first.wait_until_known(channel)
    for _ in range(3):
        first.pay(channel, 10)
    second = payer_client(accounts[10], service.url)  # no memory of the first
    assert second.pay(channel, 5).cumulative == 35
    # the first instance is now behind; its next payment still pays exactly what it asks on top of the real position
    assert first.pay(channel, 1).cumulative == 36


@pytest.mark.faults
def test_service_killed_mid_stream_loses_no_acknowledged_voucher(
    spawn: Callable[..., ServiceProcess],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    mining: str,
) -> None:
    service = spawn(store_url)
    client = payer_client(accounts[12], service.url, retries=10, backoff=0.1, timeout=5)
    channel = client.open_channel(accounts[11].address, 10**9)
    client.wait_until_known(channel)
    receipts = stream_through(client, channel, lambda: (service.kill(), service.start()))
    stored = {(p.cumulative, p.increment) for p in stored_payments(store_url, channel.hex_id)}
    acknowledged = {(r.cumulative, r.increment) for r in receipts}
    assert acknowledged <= stored  # every receipt the client holds is durable
    assert max(c for c, _ in stored) == client.position(channel)


@pytest.mark.postgres
def test_two_service_processes_share_one_postgres(
    spawn: Callable[..., ServiceProcess],
    payer_client: Callable[..., PayerClient],
    fresh_postgres: str,
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    services = [spawn(fresh_postgres, "a"), spawn(fresh_postgres, "b")]
    # one payer per service, each on its own channel, paying through its own process
    clients = [payer_client(accounts[13 + i], s.url) for i, s in enumerate(services)]
    own = [c.open_channel(accounts[11].address, 10**6) for c in clients]
    # and one channel whose pre-signed vouchers 1..60 arrive at both processes at once, in no order
    shared_client = payer_client(accounts[15], services[0].url)
    shared = shared_client.open_channel(accounts[11].address, 10**6)
    for client, channel in zip(clients, own, strict=True):
        client.wait_until_known(channel)
    shared_client.wait_until_known(shared)
    vouchers = [
        body(
            Channel(shared.channel_id, accounts[15], shared.payee, shared.token, shared.salt),
            n,
            sign(accounts[15], shared.channel_id, n),
        )
        for n in range(1, 61)
    ]

    def own_payments(i: int) -> list[int]:
        return [clients[i].pay(own[i], n).increment for n in range(1, 31)]

    def post_shared(n: int) -> int:
        return httpx.post(f"{services[n % 2].url}/v1/vouchers", json=vouchers[n], timeout=30).status_code

    with ThreadPoolExecutor(10) as pool:
        own_futures = [pool.submit(own_payments, i) for i in range(2)]
        statuses = list(pool.map(post_shared, range(60)))
        assert [f.result() for f in own_futures] == [list(range(1, 31))] * 2
    assert set(statuses) <= {201, 409} and statuses.count(201) >= 1
    for channel in own:
        stored = stored_payments(fresh_postgres, channel.hex_id)
        assert sum(p.increment for p in stored) == sum(range(1, 31)) == max(p.cumulative for p in stored)
    stored = stored_payments(fresh_postgres, shared.hex_id)
    assert max(p.cumulative for p in stored) == 60  # the highest voucher wins, wherever it arrived
    assert sum(p.increment for p in stored) == 60  # increments chain up: no lost update, nothing counted twice
    assert len(stored) == statuses.count(201)


@pytest.mark.faults
def test_rpc_outage_known_channels_still_pay_unknown_ones_get_503(
    api: Callable[..., TestClient],
    devnet: Devnet,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    with TcpProxy(devnet.port) as proxy:
        client = api(rpc_url=proxy.url)
        known = open_channel(accounts[5], accounts[6].address, amount=100)
        assert client.post("/v1/vouchers", json=body(known, 1, sign(accounts[5], known.id, 1))).status_code == 201
        proxy.cut()
        unknown = open_channel(accounts[7], accounts[6].address, amount=100)  # the service cannot see it open
        assert client.post("/v1/vouchers", json=body(known, 2, sign(accounts[5], known.id, 2))).status_code == 201
        answer = client.post("/v1/vouchers", json=body(unknown, 1, sign(accounts[7], unknown.id, 1)))
        assert answer.status_code == 503, (answer.text, client.get(f"/v1/channels/0x{unknown.id.hex()}").text)
        assert answer.json()["code"] == "chain_unavailable"
        assert client.get("/ready").status_code == 503
        proxy.mend()
        assert client.post("/v1/vouchers", json=body(unknown, 1, sign(accounts[7], unknown.id, 1))).status_code == 201


def test_demo_traffic_pays_through_the_api(
    spawn: Callable[..., ServiceProcess], tmp_path: Path, devnet: Devnet, accounts: list[LocalAccount]
) -> None:
    from rich.console import Console

    from settlement.demo import DemoTraffic

    service = spawn(f"sqlite:///{tmp_path / 'demo.db'}")
    with (tmp_path / "demo.out").open("w") as sink:
        traffic = DemoTraffic(
            service.url,
            devnet.url,
            accounts[16:18],
            [accounts[18].address],
            rate=200,
            console=Console(file=sink, width=200),
            report_every=0.5,
        )
        thread = traffic.start()
        for _ in range(300):
            if traffic.paid >= 50:
                break
            threading.Event().wait(0.1)
        traffic.stop.set()
        thread.join(timeout=30)
    assert traffic.paid >= 50 and traffic.refused == 0, (tmp_path / "demo.out").read_text()
    summary = httpx.get(f"{service.url}/v1/payees/{accounts[18].address}/summary").json()
    assert int(summary["assets"][0]["accepted"]) == traffic.value
    assert "payments accepted" in (tmp_path / "demo.out").read_text()


@pytest.mark.faults
def test_rpc_failover_to_a_second_url_and_back(
    api: Callable[..., TestClient],
    devnet: Devnet,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    with TcpProxy(devnet.port) as primary:
        client = api(rpc_url=primary.url, rpc_fallback_urls=[devnet.url], rpc_primary_retry=0.2)
        provider = client.app.state.service.w3.provider  # type: ignore[attr-defined]
        assert provider.endpoint_uri == primary.url
        primary.cut()
        fresh = open_channel(accounts[7], accounts[6].address, amount=100)  # only the chain knows it: a lookup
        answer = client.post("/v1/vouchers", json=body(fresh, 1, sign(accounts[7], fresh.id, 1)))
        assert answer.status_code == 201, answer.text
        assert provider.endpoint_uri == devnet.url
        assert client.get("/ready").status_code == 200
        primary.mend()
        deadline = time.monotonic() + 10
        while provider.endpoint_uri != primary.url and time.monotonic() < deadline:
            client.get("/ready")
            time.sleep(0.1)
        assert provider.endpoint_uri == primary.url
