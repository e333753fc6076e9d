"""The payer SDK end to end against `settlement serve` child processes on the real devnet: payments, restarts of
the client and of the service (kill -9), two service processes on one PostgreSQL, and an RPC outage."""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint, Wei

from settlement.chain.node import connect
from settlement.chain.provider import FailoverProvider, WrongChainError
from settlement.devtools.devnet import Devnet
from settlement.domain.model import ChannelStatus, ChannelViewField
from settlement.domain.redaction import scrubbed, scrubbed_start, shown_url, text_start
from settlement.eip712.vouchers import VoucherSigner
from settlement.errors import (
    ChainError,
    ChainUnavailableError,
    ConfigError,
    PaymentUncertainError,
    ServiceRejectedError,
    TransactionFailedError,
    UntrustedServiceError,
    WaitTimeoutError,
)
from settlement.sdk import bounded
from settlement.sdk.payee import PayeeClient
from settlement.sdk.payer import PayerClient, Reclaim
from tests.hub_helpers import (
    DEEP_JSON,
    ETH,
    Channel,
    RangeCappedRpc,
    Tampering,
    TamperingProxy,
    body,
    devnet_settings,
    free_test_port,
    held_after,
    provider_of,
    send,
    stored_payments,
    stream_through,
    wait_until,
)
from tests.proxy import TcpProxy
from tests.servers import ServiceProcess, ServiceThread

pytestmark = pytest.mark.slow


@pytest.fixture
def payer_client(devnet: Devnet, tmp_path: Path) -> Iterator[Callable[..., PayerClient]]:
    """Factory: payer_client(account, service_url, rpc_url=None, **options) -> PayerClient on the devnet (or
    `rpc_url`: a proxy's); all are shut down after the test.
    Each client has a journal of its own (a new app on another machine) unless `state_path` is given (a restart)."""
    made: list[PayerClient] = []

    def make(account: LocalAccount, service_url: str, rpc_url: str | None = None, **options: Any) -> PayerClient:
        options.setdefault("state_path", tmp_path / f"journal-{len(made)}.sqlite3")
        client = PayerClient(key(account), rpc_url or devnet.url, service_url, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown()


@pytest.fixture
def token_payer(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    token: Contract,
    w3: Web3,
    tmp_path: Path,
) -> Callable[..., PayerClient]:
    """Factory: token_payer(minted, token=the test's DevToken) -> a client of accounts[10] (on a service of its own)
    whose wallet holds `minted` units of the token."""

    def make(minted: int, minting: Contract = token) -> PayerClient:
        client = payer_client(accounts[10], serve_here(f"sqlite:///{tmp_path / 'token-payer.db'}").url)
        send(w3, minting.functions.mint(client.address, minted), client.address)
        return client

    return make


def key(account: LocalAccount) -> str:
    return HexBytes(account.key).to_0x_hex()


def test_sdk_pays_tops_up_and_closes(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    token: Contract,
    w3: Web3,
    mining: str,
) -> None:
    service = serve_here(store_url)
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
    wait_until(lambda: client.wait_until_known(channel)["status"] == "closing")  # the service follows the chain
    stored = stored_payments(store_url, channel.hex_id)
    assert [p.reference for p in stored[::-1][:3]] == ["order-100", "order-250", "order-50"]
    assert sum(p.increment for p in stored) == 1_100


def test_a_restarted_client_continues_from_the_services_position(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    service = serve_here(store_url)
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
) -> None:
    """On each store; not on each way of mining (the chain only opens the channel here: the subject is the kill)."""
    service = spawn(store_url)
    client = payer_client(accounts[12], service.url, retries=10, backoff=0.1, timeout=5)
    channel = client.open_channel(accounts[11].address, 10**9)
    client.wait_until_known(channel)

    def restart() -> None:
        service.kill()
        service.start()

    receipts = stream_through(client, channel, restart)
    stored = {(p.cumulative, p.increment) for p in stored_payments(store_url, channel.hex_id)}
    acknowledged = {(r.cumulative, r.increment) for r in receipts}
    assert acknowledged <= stored  # every receipt the client holds is durable
    assert sum(i for _, i in stored) == 3 * len(receipts)  # and the payee got what the app paid: not more
    assert max(c for c, _ in stored) == client.position(channel)


@pytest.mark.postgres
def test_two_service_processes_share_one_postgres(
    spawn: Callable[..., ServiceProcess],
    payer_client: Callable[..., PayerClient],
    fresh_postgres: str,
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    services = [spawn(fresh_postgres, name, wait=False) for name in "ab"]  # both start (and migrate) at once
    for service in services:
        service.ready()
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
    serve_here: Callable[..., ServiceThread], tmp_path: Path, devnet: Devnet, accounts: list[LocalAccount]
) -> None:
    from rich.console import Console

    from settlement.devtools.demo import DemoTraffic
    from settlement.domain.amounts import human_of_units

    service = serve_here(f"sqlite:///{tmp_path / 'demo.db'}")
    with (tmp_path / "demo.out").open("w") as sink:
        traffic = DemoTraffic(
            service.url,
            devnet.url,
            accounts[16:18],
            [accounts[18].address],
            rate=200,
            console=Console(file=sink, width=200),
            journal_dir=tmp_path / "journals",
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
    last = (tmp_path / "demo.out").read_text().strip().splitlines()[-1]  # the report after the last payment
    assert f"demo: {traffic.paid} payments accepted (" in last
    assert f"/s), {human_of_units(traffic.value, 18)} ETH in total, 0 refused" in last  # to the last wei


@pytest.mark.faults
def test_rpc_failover_to_a_second_url_and_back(
    api: Callable[..., TestClient],
    devnet: Devnet,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    """The first fallback is down when the service starts and comes up serving another chain: passed over, and both
    the URL in use and the URLs serving another chain are in /metrics, for an operator's alert."""

    def gauges() -> tuple[str, str]:
        lines = client.get("/metrics").text.splitlines()
        active, wrong = (
            next(line.split()[-1] for line in lines if line.startswith(f"{name} "))
            for name in ("settlement_rpc_active_url", "settlement_rpc_wrong_chain_urls")
        )
        return active, wrong

    with TcpProxy(devnet.port) as primary, TcpProxy(free_test_port()) as elsewhere:
        client = api(rpc_url=primary.url, rpc_fallback_urls=[elsewhere.url, devnet.url], rpc_primary_retry=0.2)
        provider = provider_of(client)
        assert provider.endpoint_uri == primary.url
        assert gauges() == ("0.0", "0.0")
        with Devnet(devnet_settings(devnet_chain_id=4242, devnet_accounts=1)) as other:
            elsewhere.target_port = other.port
            primary.cut()
            fresh = open_channel(accounts[7], accounts[6].address, amount=100)  # only the chain knows it: a lookup
            answer = client.post("/v1/vouchers", json=body(fresh, 1, sign(accounts[7], fresh.id, 1)))
            assert answer.status_code == 201, answer.text
            assert provider.endpoint_uri == devnet.url
            assert client.get("/ready").status_code == 200
            assert gauges() == ("2.0", "1.0")
        primary.mend()
        deadline = time.monotonic() + 10
        while provider.endpoint_uri != primary.url and time.monotonic() < deadline:
            client.get("/ready")
            time.sleep(0.1)
        assert provider.endpoint_uri == primary.url
        assert gauges() == ("0.0", "1.0")  # the other URL is not asked again until failover reaches it


def test_the_payer_and_payee_sdks_go_on_through_a_fallback_rpc_when_theirs_fails(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    devnet: Devnet,
    store_url: str,
    hub: Contract,
    accounts: list[LocalAccount],
) -> None:
    """A payer's or a payee's one RPC URL down (its provider's outage) was every transaction of theirs refused
    (`chain_unavailable`): no channel opened, no refund made, nothing withdrawn. Both SDK clients take fallback URLs,
    as the service does (`rpc_fallback_urls`), each held to the chain the first answered."""
    service = serve_here(store_url)
    with TcpProxy(devnet.port) as payers, TcpProxy(devnet.port) as payees:
        payer = payer_client(accounts[10], service.url, rpc_url=payers.url, rpc_fallback_urls=[devnet.url])
        payee = PayeeClient(key(accounts[11]), payees.url, service.url, rpc_fallback_urls=[devnet.url])
        try:
            payers.cut()
            payees.cut()
            channel = payer.open_channel(accounts[11].address, 10_000)  # the code before: no such argument
            payer.wait_until_known(channel)
            earned = hub.functions.balanceOf(accounts[11].address, ETH).call()  # before, in other tests
            payer.pay(channel, 1_000)  # credited once, by the engine's batch or by the refund's close
            assert payee.refund(channel.hex_id) == 9_000
            assert payee.withdraw() == earned + 1_000
        finally:
            payee.shutdown()
    assert hub.functions.channel(channel.channel_id).call()[ChannelViewField.STATUS] == ChannelStatus.CLOSED


def test_a_contract_read_is_one_rpc_call(devnet: Devnet, hub: Contract, accounts: list[LocalAccount]) -> None:
    """web3's validation middleware asked the node its chain id twice before every call, estimate and access list: a
    read of the hub was three RPC calls, each a round trip and each billed by a provider. `connect`'s clients go
    without it (the provider holds every URL to one chain: the test below)."""
    w3 = connect(devnet.url)
    provider = w3.provider
    assert isinstance(provider, FailoverProvider)
    there = w3.eth.contract(address=hub.address, abi=hub.abi)
    before = Counter(provider.calls)
    there.functions.domainSeparator().call()
    w3.eth.estimate_gas({"from": accounts[0].address, "to": accounts[1].address, "value": Wei(1)})
    assert Counter(provider.calls) - before == Counter({"eth_call": 1, "eth_estimateGas": 1})


def test_a_fallback_serving_another_chain_is_passed_over(devnet: Devnet, caplog: pytest.LogCaptureFixture) -> None:
    """Every URL must serve the chain `connect` found. A fallback down at `connect` was never asked its chain: come up
    serving another (a URL mistyped, a node restarted on a testnet), it answered every read when the primary failed,
    and the service read another chain's hub. It is now asked its chain when failover first reaches it, and passed
    over. The same of a primary that comes back serving another chain: the fallback keeps the requests."""
    other_port = free_test_port()  # nothing listens there yet: the fallback is down at `connect`
    with TcpProxy(devnet.port) as primary, TcpProxy(other_port) as fallback, TcpProxy(devnet.port) as second:
        w3 = connect(primary.url, fallbacks=[fallback.url, second.url], timeout=5, primary_retry=0.2)
        provider = w3.provider
        assert isinstance(provider, FailoverProvider)
        with Devnet(devnet_settings(devnet_chain_id=4242, devnet_accounts=1)) as other:
            fallback.target_port = other.port
            assert connect(fallback.url).eth.chain_id == 4242  # it is up, on chain 4242
            primary.cut()
            with caplog.at_level(logging.ERROR, logger="settlement.chain.provider"):
                assert w3.eth.chain_id == 31337  # answered by the second fallback, the first passed over
            assert provider.endpoint_uri == second.url
            assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
                f"RPC {fallback.url} serves chain 4242, not 31337: passed over"
            ]
            second.cut()
            with pytest.raises(WrongChainError, match=f"^RPC {fallback.url} serves chain 4242, not 31337$"):
                w3.eth.block_number  # noqa: B018 (a read: the one URL up serves another chain)
            second.mend()
            assert w3.eth.chain_id == 31337
            primary.target_port = other.port  # the primary comes back, serving another chain
            primary.mend()
            caplog.clear()
            probes, devnet_block = provider.calls["eth_chainId"], w3.eth.block_number
            with caplog.at_level(logging.ERROR, logger="settlement.chain.provider"):
                for _ in range(3):  # three probes of the primary, each past `primary_retry`
                    time.sleep(0.3)
                    assert w3.eth.block_number == devnet_block  # the devnet's: no block mined meanwhile
            assert provider.endpoint_uri == second.url
            assert provider.calls["eth_chainId"] - probes == 3
            # Said once, not at each probe (the code before: three lines, one every `primary_retry` seconds).
            assert [r.getMessage() for r in caplog.records] == [
                f"RPC primary {primary.url} serves chain 4242, not 31337"
            ]
            # Up at the start, a URL of another chain is a configuration error, not a URL to pass over.
            with pytest.raises(ConfigError) as refused:
                connect(second.url, fallbacks=[devnet.url, fallback.url], timeout=5)
            assert refused.value.message == f"RPC {fallback.url} serves chain 4242, {second.url} serves chain 31337"


def test_a_url_is_written_without_the_parts_that_may_hold_its_key() -> None:
    """What `settlement.domain.redaction` writes of an RPC URL in a log line or an error a client gets (the
    end-to-end case: tests/test_faults.py::test_the_rpc_urls_key_is_never_shown_to_a_client_nor_written_to_the_log)."""
    urls = {
        "http://127.0.0.1:8545": "http://127.0.0.1:8545",
        "http://127.0.0.1:8545/": "http://127.0.0.1:8545",
        "https://eth-mainnet.example/v2/k3y": "https://eth-mainnet.example/…",
        "https://rpc.example/?apikey=k3y": "https://rpc.example/…",
        "https://:k3y@mainnet.example": "https://mainnet.example/…",
        "wss://rpc.example/ws#k3y": "wss://rpc.example/…",
        "http://[::1]:8545/k3y": "http://[::1]:8545/…",
        "http://rpc.example:99999/k3y": "(a URL that does not parse)",
        "k3y": "(a URL without a host)",
    }
    assert {url: shown_url(url) for url in urls} == urls
    assert scrubbed(
        "HTTPConnectionPool(host='rpc.example', port=80): Max retries exceeded with url: /v2/k3y (Caused by x); "
        "401 Client Error: Unauthorized for url: https://rpc.example/v2/k3y; (see https://rpc.example/?key=k3y)"
    ) == (
        "HTTPConnectionPool(host='rpc.example', port=80): Max retries exceeded with url: … (Caused by x); "
        "401 Client Error: Unauthorized for url: …; (see https://rpc.example/…)"
    )
    # Only the start scrubbed (a failure quoting a 100-KB page): a URL the cut falls in is dropped, not shown cut
    # short, where its user part would read as a host and a port ("https://user:12" from "https://user:1234@host").
    failure = "failed at https://api.example/v2/k3y, see https://user:1234@api.example/x"
    assert failure[:57].endswith("https://user:12")
    assert {n: scrubbed_start(failure, n) for n in (len(failure), 57, 40, 20)} == {
        len(failure): "failed at https://api.example/…, see https://api.example/…",
        57: "failed at https://api.example/…, see ",
        40: "failed at https://api.example/…, se",
        20: "failed at ",
    }
    assert scrubbed(failure[:57]) == "failed at https://api.example/…, see https://user:12"  # what a plain cut showed


def test_an_answer_body_is_quoted_by_its_start_and_its_length() -> None:
    """A failure quotes an answer's body (a proxy's error page, up to the 8-MB bound) by its start: only that is
    decoded, as UTF-8, a character the cut falls in left out and not shown as a replacement; then its length in
    bytes. The end-to-end case: tests/test_x402_e2e.py::test_a_facilitators_failure_reaches_the_payer_short_and_wi…"""
    accented = "é".encode() * 40  # 80 bytes, two a character
    assert {
        "short": text_start(b"Bad gateway", 11),
        "cut": text_start(b"x" * 100, 30),
        "accented": text_start(accented, 30),
        "not utf-8": text_start(b"\xff\x00<html>", 80),
        "nothing left": text_start(b"x" * 100, 5),
    } == {
        "short": "Bad gateway",
        "cut": "x" * 10 + "… (100 bytes in all)",
        "accented": "é" * 5 + "… (80 bytes in all)",  # 11 bytes of it: 5 characters and half of one
        "not utf-8": "\ufffd\x00<html>",
        "nothing left": "… (100 bytes in all)",
    }
    assert len(text_start(b"x" * 8 * 2**20, 3_000)) == 3_000


def drop_answer() -> None:
    raise httpx.ReadError("the connection dropped before the answer arrived")


@pytest.mark.faults
@pytest.mark.parametrize("failure", ["answer-dropped", "service-killed-after-commit", "app-restarted"])
def test_paying_again_with_the_key_after_an_uncertain_payment_pays_once(
    failure: str,
    spawn: Callable[..., ServiceProcess],
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    tmp_path: Path,
) -> None:
    """The old SDK re-read its position after PaymentUncertainError and signed a second increment: paid twice."""
    killed = failure == "service-killed-after-commit"
    service = spawn(store_url) if killed else serve_here(store_url)  # a process only where one is killed
    tamper = Tampering()
    journal = tmp_path / "app-journal.sqlite3"
    client = payer_client(
        accounts[10],
        service.url,
        http=httpx.Client(base_url=service.url, transport=tamper),
        state_path=journal,
        retries=1,
        backoff=0.05,
    )
    channel = client.open_channel(accounts[11].address, 10_000)
    client.wait_until_known(channel)
    client.pay(channel, 100)
    if killed:

        def kill_then_drop() -> None:
            assert isinstance(service, ServiceProcess)
            service.kill()
            drop_answer()

        tamper.after_post = kill_then_drop
    else:
        tamper.after_post = drop_answer
    with pytest.raises(PaymentUncertainError) as info:
        client.pay(channel, 7, reference="order-7")
    key = str(info.value.details["idempotencyKey"])
    tamper.after_post = None
    if killed:
        service.start()
    if failure == "app-restarted":
        client.shutdown()
        client = payer_client(accounts[10], service.url, state_path=journal)  # the same journal, a new process
    receipt = client.pay(channel, 7, reference="order-7", idempotency_key=key)
    assert (receipt.cumulative, receipt.increment, receipt.idempotency_key) == (107, 7, key)
    assert client.pay(channel, 7, reference="order-7", idempotency_key=key) == receipt  # answered from the journal
    stored = [(p.cumulative, p.increment) for p in stored_payments(store_url, channel.hex_id)]
    assert stored == [(107, 7), (100, 100)]


def test_a_receipt_the_journal_lost_with_the_machine_is_learnt_again_and_nothing_paid_twice(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    tmp_path: Path,
) -> None:
    """The journal records a receipt without waiting for the disk (one fsync a payment, not two). A machine that
    dies right after leaves the journal as it was before the receipt: the payment pending, its voucher the signed
    position. The app's next payment asks the service about it first, and pays its own amount only."""
    service = serve_here(store_url)
    journal = tmp_path / "app-journal.sqlite3"
    client = payer_client(accounts[10], service.url, state_path=journal)
    channel = client.open_channel(accounts[11].address, 10_000)
    client.wait_until_known(channel)
    first = client.pay(channel, 100)
    client.shutdown()
    with closing(sqlite3.connect(journal)) as conn, conn:  # what a lost, unflushed `accepted` leaves
        assert conn.execute("UPDATE payments SET status = 'pending', receipt = NULL").rowcount == 1
    client = payer_client(accounts[10], service.url, state_path=journal)
    second = client.pay(channel, 7)
    assert (first.cumulative, second.cumulative, second.increment) == (100, 107, 7)
    assert client.journal.pending(channel.hex_id) == []
    stored = [(p.cumulative, p.increment) for p in stored_payments(store_url, channel.hex_id)]
    assert stored == [(107, 7), (100, 100)]


def test_a_retry_signed_by_a_client_without_the_journal_pays_nothing_more(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """Another machine retries the payment with the key but without the first one's journal: it signs from the
    position it re-reads (already past the first voucher); the service knows the key and charges nothing more."""
    service = serve_here(store_url)
    first = payer_client(accounts[10], service.url)
    channel = first.open_channel(accounts[11].address, 10_000)
    first.wait_until_known(channel)
    original = first.pay(channel, 25, idempotency_key="invoice-9")
    elsewhere = payer_client(accounts[10], service.url)  # a journal of its own
    again = elsewhere.pay(channel, 25, idempotency_key="invoice-9")
    assert (again.cumulative, again.increment) == (original.cumulative, original.increment) == (25, 25)
    assert [(p.cumulative, p.increment) for p in stored_payments(store_url, channel.hex_id)] == [(25, 25)]
    assert elsewhere.pay(channel, 5).cumulative == 30  # and its next payment pays exactly 5


def test_an_inflated_position_is_refused_not_signed(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """Through a proxy that inflated the channel's position, pay(1000 wei) used to sign a voucher for the whole
    deposit, and the service accepted it."""
    service = serve_here(store_url)
    opener = payer_client(accounts[10], service.url)
    channel = opener.open_channel(accounts[11].address, 10**16)
    opener.wait_until_known(channel)
    opener.pay(channel, 1_000)
    tamper = Tampering()
    tamper.rewrite = lambda path, data: (
        {**data, "acceptedCumulativeAmount": str(10**16 - 1_000)} if path.endswith(channel.hex_id) else data
    )
    victim = payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
    with pytest.raises(UntrustedServiceError, match="without a voucher this payer signed"):
        victim.pay(channel, 1_000)
    assert [p.cumulative for p in stored_payments(store_url, channel.hex_id)] == [1_000]


def test_a_position_in_another_spelling_is_untrusted_not_read_as_a_number(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """The position and the deposit are the service's text: `int()` of it took " 1000" and "+1000", raised
    ValueError on "²" and on 5,000 digits, KeyError on none. The payer takes an amount in its one form or refuses
    the service's word (UntrustedServiceError), and signs nothing."""
    service = serve_here(store_url)
    opener = payer_client(accounts[10], service.url)
    channel = opener.open_channel(accounts[11].address, 10**16)
    opener.wait_until_known(channel)
    opener.pay(channel, 1_000)
    spellings: list[object] = [" 1000", "+1000", "1000\n", "01000", "1e3", "\u00b2", "\u0661", "9" * 5000, 1000, None]
    for spelling in spellings:
        tamper = Tampering()
        tamper.rewrite = lambda path, data, sent=spelling: (
            {**data, "acceptedCumulativeAmount": sent, "deposit": sent} if path.endswith(channel.hex_id) else data
        )
        victim = payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
        with pytest.raises(UntrustedServiceError, match="acceptedCumulativeAmount is not an amount"):
            victim.pay(channel, 1_000)
        with pytest.raises(UntrustedServiceError, match="deposit is not an amount"):
            victim.wait_until_known(channel, timeout=5)
    assert [p.cumulative for p in stored_payments(store_url, channel.hex_id)] == [1_000]
    assert payer_client(accounts[10], service.url).pay(channel, 1_000).cumulative == 2_000  # the true position


def test_a_listing_or_a_state_not_in_the_services_form_is_untrusted(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """The service's listing of a payer's channels and a channel's state came through `response.json()` and
    `c["token"]`: an error page with status 200, a list, items that are not channels raised JSONDecodeError, KeyError,
    TypeError or ValueError out of `open_channels` and `wait_until_known` (and out of x402's client, which finds a
    restarted payer's channels so). Now each is the service's word the SDK cannot take."""
    service = serve_here(store_url)
    opener = payer_client(accounts[10], service.url)
    channel = opener.open_channel(accounts[11].address, 10_000)
    opener.wait_until_known(channel)
    listing = {"channelId": channel.hex_id, "token": "0x" + "00" * 20}
    listings: list[tuple[object, str]] = [
        (b"<html>Bad gateway</html>", "is not a JSON object"),
        (DEEP_JSON, "is not a JSON object"),  # a segfault of the app before
        ([listing], "is not a JSON object"),
        ({"items": "all of them"}, "lists no channels"),
        ({"items": [listing, "0x" + "ab" * 32]}, "lists no channels"),
        ({"items": [{**listing, "channelId": "0x12"}]}, "channelId is not a channel id"),
        ({"items": [{**listing, "channelId": channel.hex_id + "\n"}]}, "channelId is not a channel id"),
        ({"items": [{**listing, "token": "ETH"}]}, "token is not an address"),
        ({"items": [{k: v for k, v in listing.items() if k != "token"}]}, "token is not an address"),
    ]
    for answer, refusal in listings:
        tamper = Tampering()
        tamper.rewrite = lambda path, data, answer=answer: answer if path == "/v1/channels" else data
        victim = payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
        with pytest.raises(UntrustedServiceError, match=refusal):
            victim.open_channels(accounts[11].address)
    tamper.rewrite = lambda path, data: b"\x00\x01" if path.endswith(channel.hex_id) else data
    with pytest.raises(UntrustedServiceError, match="is not a JSON object"):
        victim.wait_until_known(channel, timeout=5)
    (found,) = payer_client(accounts[10], service.url).open_channels(accounts[11].address)
    assert (found["channelId"], found["deposit"]) == (channel.hex_id, "10000")


def test_a_receipt_for_more_than_was_signed_does_not_move_the_position_up(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """A receipt for another amount than the voucher sent means another voucher of the key was stored (a retry
    signed elsewhere), and the journal took the receipt's amount as the channel's position. A proxy answering 1,000
    wei with a receipt for nearly the whole deposit so had the payer's next payment sign for the whole deposit, which
    the service accepted. The position is now what the service proves with a voucher of the payer's, and a receipt
    for more than that is the service's word the payer cannot take (the payment stays pending, and is asked again)."""
    service = serve_here(store_url)
    tamper = Tampering()
    payer = payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
    channel = payer.open_channel(accounts[11].address, 10**16)
    payer.wait_until_known(channel)
    assert payer.pay(channel, 1_000).cumulative == 1_000
    tamper.rewrite_post = lambda path, data: {**data, "cumulativeAmount": str(10**16 - 1_000)}
    with pytest.raises(UntrustedServiceError, match="more than it proves with a voucher this payer signed"):
        payer.pay(channel, 1_000)  # stored at 2,000; the answer says otherwise
    tamper.rewrite_post = None
    assert payer.pay(channel, 1_000).cumulative == 3_000  # the one left pending asked again first: 2,000, stored
    assert sorted(p.cumulative for p in stored_payments(store_url, channel.hex_id)) == [1_000, 2_000, 3_000]


def test_a_stop_at_one_process_holds_for_another_that_keeps_the_channel_in_memory(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    devnet: Devnet,
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """Two services on one store: the payer pays through the second, whose writer keeps the channel in memory (on
    PostgreSQL it writes against its copy with no lock first); the payee stops the channel through the first. The
    second's next voucher is refused (`channel_closed`): the stop raised the row's version, so its copy is stale and
    it reads the row again. The stop answered the last voucher the second accepted."""
    first, second = serve_here(store_url), serve_here(store_url)
    payer = payer_client(accounts[10], second.url)
    channel = payer.open_channel(accounts[11].address, 10**16)
    payer.wait_until_known(channel)
    for _ in range(5):
        payer.pay(channel, 1_000)
    payee = PayeeClient(key(accounts[11]), devnet.url, first.url)
    try:
        state = payee.stop(channel.hex_id)
    finally:
        payee.shutdown()
    assert state["acceptedCumulativeAmount"] == "5000"
    with pytest.raises(ServiceRejectedError) as refused:
        payer.pay(channel, 1_000)
    assert refused.value.code == "channel_closed"
    assert max(p.cumulative for p in stored_payments(store_url, channel.hex_id)) == 5_000


def test_a_refund_on_a_voucher_the_service_cannot_show_is_refused_before_any_transaction(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    devnet: Devnet,
    store_url: str,
    hub: Contract,
    accounts: list[LocalAccount],
) -> None:
    """The payee's refund closes the channel with the latest voucher its stop at the service answers, checked against
    the payer's key first. A voucher that is not one (not hex, short, not a string, none) raised ValueError in the
    hex parse; now it is the service's word the payee cannot take, as another signer's voucher is, and no
    transaction is sent."""
    service = serve_here(store_url)
    payer = payer_client(accounts[10], service.url)
    channel = payer.open_channel(accounts[11].address, 10**16)
    payer.wait_until_known(channel)
    payer.pay(channel, 1_000)
    payee = PayeeClient(key(accounts[11]), devnet.url, service.url)
    try:
        stranger = "0x" + VoucherSigner(accounts[9], payee.domain).sign(channel.channel_id, 1_000).hex()
        for sent in ("0x" + "zz" * 65, "0x12", "12" * 65, 5, None, stranger):
            tamper = Tampering()
            tamper.rewrite_post = lambda path, data, sent=sent: (
                {**data, "latestSignature": sent} if path.endswith("/stop") else data
            )
            payee.http.close()
            payee.http = httpx.Client(base_url=service.url, transport=tamper, auth=payee.http.auth)
            with pytest.raises(UntrustedServiceError, match="is not the payer's"):
                payee.refund(channel.hex_id)
        # Not JSON: KeyError or JSONDecodeError before.
        tamper.rewrite_post = lambda path, data: b"<html>Bad gateway</html>" if path.endswith("/stop") else data
        with pytest.raises(UntrustedServiceError, match="is not a JSON object"):
            payee.refund(channel.hex_id)
        assert hub.functions.channel(channel.channel_id).call()[ChannelViewField.STATUS] == ChannelStatus.OPEN
    finally:
        payee.shutdown()


def test_a_refund_settles_every_payment_the_service_accepted_while_the_payer_pays_on(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    devnet: Devnet,
    store_url: str,
    hub: Contract,
    accounts: list[LocalAccount],
) -> None:
    """A payer asks for the cooperative refund and pays on meanwhile. The refund read the service's latest voucher,
    then closed the channel with it (closeByPayee); the service went on accepting vouchers until its indexer saw the
    close, each one acknowledged (a payee app served what it bought) and never payable: the payer was served for
    nothing. The refund now stops the channel at the service first: every payment the payer got a receipt for is
    settled by the close, and its next payment is refused (channel_closed), however the payments race the refund."""
    service = serve_here(store_url, indexer_interval=60)  # the service does not see the close within the test
    payer = payer_client(accounts[10], service.url)
    channel = payer.open_channel(accounts[11].address, 10**16)
    payer.wait_until_known(channel)
    receipts: list[int] = []
    refused: list[str] = []
    started = threading.Event()

    def pay_on() -> None:
        while True:
            try:
                receipts.append(payer.pay(channel, 1_000).cumulative)
            except ServiceRejectedError as ex:
                refused.append(ex.code)
                return
            if len(receipts) == 3:
                started.set()

    paying = threading.Thread(target=pay_on)
    paying.start()
    assert started.wait(30)
    payee = PayeeClient(key(accounts[11]), devnet.url, service.url)
    try:
        refunded = payee.refund(channel.hex_id)
        paying.join(30)
        assert not paying.is_alive()
        view = hub.functions.channel(channel.channel_id).call()
        assert view[ChannelViewField.STATUS] == ChannelStatus.CLOSED
        assert refused == ["channel_closed"]
        assert receipts == [1_000 * n for n in range(1, len(receipts) + 1)]
        assert view[ChannelViewField.SETTLED] == receipts[-1]  # every receipt is paid: old code left some unpaid
        assert max(p.cumulative for p in stored_payments(store_url, channel.hex_id)) == receipts[-1]
        assert refunded == 10**16 - receipts[-1]
        with pytest.raises(ServiceRejectedError) as after:
            payer.pay(channel, 1_000)
        assert after.value.code == "channel_closed"
    finally:
        payee.shutdown()


@pytest.mark.parametrize("way", ["endless", "dribble", "slow_headers", "gzip"])
def test_an_answer_that_never_ends_is_cut_and_is_the_services_word_the_sdk_cannot_take(
    way: str,
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx reads a whole answer before it returns, with timeouts per read: a service (or a proxy on the way) that
    answers a listing with a body that never ends filled the payer app's memory (256 MB read here, then the proxy
    gave up), and one that sends a byte every 0.2 s held its call for good, of its body or of its headers (each read
    within the timeout; the headers up to h11's 100 KB: here the proxy ends them after 20 s). The SDK's own client
    now cuts an answer at 8 MB, or at six times its timeout (here 3 s), as the service's word it cannot take. The 8 MB
    were counted as the bytes came, before httpx decoded them: 64 KB of gzip were read as 64 MB (2 MB as 2 GB). Every
    answer is now asked plain, and one encoded all the same is refused unread."""
    monkeypatch.setattr(bounded, "ANSWER_DEADLINE_FACTOR", 0.3)  # 10 s x 0.3: cut after 3 s
    service = serve_here(store_url)
    hostile = TamperingProxy(
        service.url, lambda _path, data: data, lambda path: way if path == "/v1/channels" else None
    )
    with hostile:
        payer = payer_client(accounts[10], hostile.url)
        started = time.monotonic()
        cut = {"endless": "is larger than 8388608 bytes", "gzip": r"is encoded \('gzip'\), not plain as asked"}
        with pytest.raises(UntrustedServiceError, match=cut.get(way, "took more than 3s")):
            payer.open_channels(accounts[11].address)
        assert time.monotonic() - started < 10
    assert hostile.asked == ["identity"]
    if way != "gzip":
        assert hostile.written < 64 * 2**20 if way == "endless" else hostile.written < 40


def test_an_answer_that_is_not_a_receipt_is_untrusted_and_the_payment_asked_again(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """A 201 whose body is not a receipt (a proxy's page, fields missing, a list) raised KeyError or TypeError out of
    `pay`; now it is the service's word the payer cannot take, and the payment stays pending: the next payment asks
    for it first (it was stored), and pays exactly its own amount on top once the answer is a receipt."""
    service = serve_here(store_url)
    tamper = Tampering()
    payer = payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
    channel = payer.open_channel(accounts[11].address, 10**16)
    payer.wait_until_known(channel)
    answers: list[tuple[object, str]] = [
        ({"status": "ok"}, "is not a receipt"),
        ([], "is not a receipt"),
        (DEEP_JSON, r"is not a receipt \(ValueError\)"),  # a segfault of the app before
        ({"channelId": channel.hex_id}, "cumulativeAmount is not an amount"),
    ]
    for answer, refusal in answers:  # the first payment's; the next two calls ask for it again first
        tamper.rewrite_post = lambda path, data, answer=answer: answer
        with pytest.raises(UntrustedServiceError, match=refusal):
            payer.pay(channel, 1_000)
    tamper.rewrite_post = None
    assert payer.pay(channel, 1_000).cumulative == 2_000  # the first found stored (1,000), then this one
    assert sorted(p.cumulative for p in stored_payments(store_url, channel.hex_id)) == [1_000, 2_000]


def test_the_hub_is_checked_before_any_value_is_sent(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    token: Contract,
    hub: Contract,
) -> None:
    """The SDK took the hub address from the service's /v1/eip712 and sent deposits there."""
    service = serve_here(store_url)
    for forged in (accounts[3].address, token.address):  # an account, a contract that is not a hub
        tamper = Tampering()
        tamper.rewrite = lambda path, data, forged=forged: (
            {**data, "domain": {**data["domain"], "verifyingContract": forged}} if path == "/v1/eip712" else data
        )
        with pytest.raises(UntrustedServiceError, match="holds no ChannelHub code"):
            payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
    with pytest.raises(UntrustedServiceError, match="not for"):
        payer_client(accounts[10], service.url, hub_address=token.address)
    assert payer_client(accounts[10], service.url, hub_address=hub.address).hub.address == hub.address


def test_a_payee_address_pasted_with_a_typo_is_refused_before_any_deposit(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    w3: Web3,
) -> None:
    """A payee's address in mixed case with one character wrong (its EIP-55 checksum broken) was taken for the address
    it spells: a channel opened to no one's account, its deposit locked until the payer's own close; a withdrawal's
    recipient so typed was paid the balance. Both are refused now, before any transaction; the same address in one
    case is taken as typed."""
    client = payer_client(accounts[10], serve_here(store_url).url)
    payee = accounts[11].address
    typo = payee[:-1] + ("0" if payee[-1] != "0" else "1")
    assert not Web3.is_checksum_address(typo) and typo != typo.lower()
    nonce = w3.eth.get_transaction_count(accounts[10].address)
    with pytest.raises(ValueError) as refused:
        client.open_channel(typo, 10**15)
    assert str(refused.value) == (
        f"payee '{typo}' is not an address (0x + 40 hex digits; mixed case must be a correct EIP-55 checksum)"
    )
    with pytest.raises(ValueError) as withdrawn:  # the payer's hub balance, sent to the typo's address before
        client.withdraw(to=typo)
    assert str(withdrawn.value) == str(refused.value).replace("payee", "to", 1)
    assert w3.eth.get_transaction_count(accounts[10].address) == nonce  # nothing sent
    assert client.open_channel(payee.lower(), 10**15).payee == payee


def test_a_payers_open_the_base_fee_rose_past_is_re_priced_within_its_cap_and_mined(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    tmp_path: Path,
) -> None:
    """The base fee rose past what the payer's open offered before it was mined (a fee spike): the open sat in the
    node's pool, the SDK said "not mined in 120s", and every later transaction of the payer queued behind it until the
    base fee came down. Now it is signed again with its nonce at the fees of the moment, never above the payer's cap
    (`max_fee_per_gas`): capped below the base fee it waits; uncapped, it is replaced and mined."""
    cap = 10**12
    client = payer_client(accounts[10], serve_here(f"sqlite:///{tmp_path / 'fees.db'}").url, max_fee_per_gas=cap)
    sender, payer = client.transactor, accounts[10].address
    sender.reprice_after, sender.timeout = 0.5, 30.0
    nonce = w3.eth.get_transaction_count(payer)

    def pooled() -> dict[str, Any] | None:
        pending = rpc(w3, "txpool_content")["pending"]
        mine = {k.lower(): v for k, v in pending.items()}.get(payer.lower(), {})
        found: dict[str, Any] | None = mine.get(str(nonce))
        return found

    rpc(w3, "evm_setAutomine", [False])
    try:
        with ThreadPoolExecutor(1) as pool:
            opening = pool.submit(client.open_channel, accounts[11].address, 10**15)
            wait_until(lambda: pooled() is not None)
            first = pooled()
            assert first is not None
            spike = 2 * cap  # the next block's base fee: past the open's offer and past the cap
            rpc(w3, "anvil_setNextBlockBaseFeePerGas", [hex(spike)])
            rpc(w3, "evm_mine")
            # Not mined: it offers too little. anvil drops it from its pool (geth keeps it there, as unminable).
            assert (w3.eth.get_transaction_count(payer), pooled()) == (nonce, None)
            time.sleep(4 * sender.reprice_after)  # re-priced to the cap at most: below the base fee, refused
            assert (w3.eth.get_transaction_count(payer), pooled()) == (nonce, None)
            sender.max_fee_per_gas = None
            tip = int(first["maxPriorityFeePerGas"], 16) * 9 // 8 + 1
            wait_until(lambda: pooled() is not None)
            replacement = pooled()
            assert replacement is not None
            assert (int(replacement["maxFeePerGas"], 16), int(replacement["maxPriorityFeePerGas"], 16)) == (
                2 * spike + tip,
                tip,
            )
            rpc(w3, "evm_mine")
            opened = opening.result(timeout=30)  # the code before: "not mined in 30.0s", the open left in the pool
    finally:
        rpc(w3, "evm_setAutomine", [True])
    assert w3.eth.get_transaction_count(payer) == nonce + 1
    view = hub.functions.channel(opened.channel_id).call()
    assert (view[ChannelViewField.STATUS], view[ChannelViewField.DEPOSIT]) == (ChannelStatus.OPEN, 10**15)
    assert w3.eth.get_transaction_receipt(replacement["hash"])["status"] == 1


def test_a_transaction_that_left_the_pool_unmined_does_not_hold_back_the_next(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    tmp_path: Path,
) -> None:
    """An open whose outcome the SDK never learnt (not mined in its time; the node went away) left the node's pool
    unmined (dropped; a node restarted without it). The next transaction was numbered after it, waited behind a nonce
    no transaction would use, and so did every later one: the payer could send nothing more. Now the next one is
    numbered from the node's count again, and is mined."""
    client = payer_client(accounts[10], serve_here(f"sqlite:///{tmp_path / 'dropped.db'}").url)
    client.transactor.timeout = 2.0
    payer = accounts[10].address
    nonce = w3.eth.get_transaction_count(payer)
    rpc(w3, "evm_setAutomine", [False])
    try:
        with pytest.raises(TransactionFailedError) as unmined:
            client.open_channel(accounts[11].address, 10**15)
        assert re.fullmatch(r"transaction 0x[0-9a-f]{64} not mined in 2.0s", str(unmined.value)), unmined.value
        rpc(w3, "anvil_dropAllTransactions")  # it leaves the pool unmined
    finally:
        rpc(w3, "evm_setAutomine", [True])
    opened = client.open_channel(accounts[11].address, 10**15)  # the code before: "not mined in 2.0s", a nonce gap
    assert w3.eth.get_transaction_count(payer) == nonce + 1
    assert hub.functions.channel(opened.channel_id).call()[ChannelViewField.DEPOSIT] == 10**15


@pytest.mark.parametrize("second", ["after", "dearer", "at once"])
def test_two_apps_paying_from_one_key_never_take_each_others_nonce(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    second: str,
) -> None:
    """Two apps (processes, hosts) paying from one key, each with its own client: one opens a channel and waits for
    it to be mined while the other opens another. The other numbered its transaction from its own count, the nonce
    the first had just taken: offering the same fees, the node refused it as a replacement offering too little
    ("after"); offering 10 % more (the first one capped by its `max_fee_per_gas`, or priced before the base fee
    rose), it pushed the first one's open out of the pool, never to be mined ("dearer"). Now each transaction is
    numbered from the node's count of the account's pending transactions (or the client's own where that is higher),
    and one the node refuses for its nonce is numbered again: so is the first one's when the two read the count at
    once ("at once": the first one held between its numbering and its sending)."""
    url = serve_here(f"sqlite:///{tmp_path / 'one-key.db'}").url
    apps = [payer_client(accounts[10], url), payer_client(accounts[10], url)]
    apps[0].transactor.timeout = 15.0
    payer = accounts[10].address
    base = 1_000  # wei a gas: the next block's base fee (a quiet chain's)
    rpc(w3, "anvil_setNextBlockBaseFeePerGas", [hex(base)])
    apps[1].open_channel(accounts[11].address, 10**15)  # mined: the second client numbers its next after it
    if second == "dearer":  # the first offers a little above the next base fee, its tip the same
        apps[0].transactor.max_fee_per_gas = base * 5 // 4
        assert 2 * base * 11 // 10 < int(w3.eth.max_priority_fee)  # the second offers 10 % more in both fees
    numbered, sending = threading.Event(), threading.Event()
    if second == "at once":
        send_raw = apps[0].transactor.w3.eth.send_raw_transaction

        def held(raw: Any) -> Any:
            numbered.set()
            assert sending.wait(30)
            return send_raw(raw)

        monkeypatch.setattr(apps[0].transactor.w3.eth, "send_raw_transaction", held)
    nonce = w3.eth.get_transaction_count(payer)

    def sent(count: int) -> bool:
        return w3.eth.get_transaction_count(payer, "pending") == nonce + count

    rpc(w3, "evm_setAutomine", [False])
    try:
        with ThreadPoolExecutor(2) as pool:
            opening = pool.submit(apps[0].open_channel, accounts[12].address, 10**15)
            if second == "at once":
                assert numbered.wait(30)
            else:
                wait_until(lambda: sent(1))  # the first one's open, in the pool
            pooled = w3.eth.get_block("pending")["transactions"]
            other = pool.submit(apps[1].open_channel, accounts[13].address, 10**15)
            wait_until(lambda: w3.eth.get_block("pending")["transactions"] != pooled or other.done())
            sending.set()
            wait_until(lambda: sent(2) or opening.done() or other.done())
            rpc(w3, "evm_mine")
            # The code before: "... replacement transaction underpriced" (after, at once), "not mined" (dearer)
            opened = [opening.result(timeout=30), other.result(timeout=30)]
    finally:
        rpc(w3, "evm_setAutomine", [True])
    assert w3.eth.get_transaction_count(payer) == nonce + 2
    deposits = [hub.functions.channel(channel.channel_id).call()[ChannelViewField.DEPOSIT] for channel in opened]
    assert deposits == [10**15, 10**15]


def test_a_token_that_changes_allowances_only_through_zero_takes_a_deposit_after_an_allowance_left_over(
    token_payer: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    deploy: Callable[..., Contract],
    hub: Contract,
    w3: Web3,
) -> None:
    """USDT refuses to change an allowance that is not 0 to another that is not 0. A payer whose allowance to the hub
    was left over (an open that failed after its approval: 100 units here) could open no channel of that token for
    more: the SDK's approval reverted, each time. Now it is set to 0 first, then to the deposit."""
    usdt = deploy("NoReturnToken")
    client, payer = token_payer(1_000, usdt), accounts[10].address
    send(w3, usdt.functions.approve(hub.address, 100), payer)  # the allowance an earlier open left over
    nonce = w3.eth.get_transaction_count(payer)
    opened = client.open_channel(accounts[11].address, 300, token=usdt.address)  # the code before: "would revert"
    assert hub.functions.channel(opened.channel_id).call()[ChannelViewField.DEPOSIT] == 300
    assert w3.eth.get_transaction_count(payer) == nonce + 3  # to 0, to 300, the open
    assert usdt.functions.allowance(payer, hub.address).call() == 0
    more = client.open_channel(accounts[11].address, 200, token=usdt.address)  # from 0: one approval
    assert hub.functions.channel(more.channel_id).call()[ChannelViewField.DEPOSIT] == 200
    assert w3.eth.get_transaction_count(payer) == nonce + 5


def test_token_deposits_made_at_once_by_two_threads_each_spend_their_own_approval(
    token_payer: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    token: Contract,
    hub: Contract,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two threads of one app open token channels at once: the first approves its deposit (100), and before its open
    is sent the second reads that allowance, finds it enough for its own (50), opens and spends it. The first's open
    was then refused (the allowance left short of its deposit). Now a token deposit (its approval, then its open or
    top-up) is made one at a time: the second waits for the first, then approves its own."""
    client = token_payer(1_000)
    approved, going = held_after(monkeypatch, client, "_approve", lambda _token, amount: amount == 100)  # the first's
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.open_channel, accounts[11].address, 100, token=token.address)
        assert approved.wait(30)
        second = pool.submit(client.open_channel, accounts[12].address, 50, token=token.address)
        with pytest.raises(FutureTimeout):  # the code before: made, on the first's approval
            second.result(timeout=2)
        going.set()
        opened = [first.result(timeout=30), second.result(timeout=30)]  # the code before: "would revert"
    deposits = [hub.functions.channel(channel.channel_id).call()[ChannelViewField.DEPOSIT] for channel in opened]
    assert deposits == [100, 50]
    assert token.functions.allowance(client.address, hub.address).call() == 0


def test_two_apps_paying_from_one_key_each_make_their_token_deposit(
    token_payer: Callable[..., PayerClient],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    token: Contract,
    hub: Contract,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two apps pay from one key, each with a client of its own (P18): the first approves its deposit (100), and
    before its open is sent the second's deposit (50) reads that allowance, finds it enough, opens and spends it. The
    first's open was refused, "would revert: ERC20InsufficientAllowance", and its payment failed. A deposit refused
    while the allowance is short of it is now approved and sent again."""
    first = token_payer(1_000)
    second = payer_client(accounts[10], str(first.http.base_url))
    approved, going = held_after(monkeypatch, first, "_approve", lambda _token, amount: True)  # its open held after
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(first.open_channel, accounts[11].address, 100, token=token.address)
        assert approved.wait(30)
        spent = second.open_channel(accounts[12].address, 50, token=token.address)  # on the first's approval
        going.set()
        opened = opening.result(timeout=60)  # the code before: TransactionFailedError, "would revert: ..."
    deposits = [hub.functions.channel(c.channel_id).call()[ChannelViewField.DEPOSIT] for c in (opened, spent)]
    assert deposits == [100, 50]
    assert token.functions.balanceOf(first.address).call() == 1_000 - 150
    assert token.functions.allowance(first.address, hub.address).call() == 0


def test_a_token_deposit_the_payer_does_not_hold_is_refused_in_the_tokens_words(
    token_payer: Callable[..., PayerClient], accounts: list[LocalAccount], token: Contract, hub: Contract
) -> None:
    """A payer opening (or topping up) a token channel for more than its wallet holds: the token refuses the hub's
    transfer with OpenZeppelin's ERC-20 error, which the SDK named `unknown()` (it decoded the hub's errors only)."""
    client, payer = token_payer(40), accounts[10].address
    with pytest.raises(TransactionFailedError) as short:
        client.open_channel(accounts[11].address, 100, token=token.address)
    assert (
        str(short.value)
        == f"transaction would revert: ERC20InsufficientBalance(sender={payer}, balance=40, needed=100)"
    )
    channel = client.open_channel(accounts[11].address, 40, token=token.address)
    with pytest.raises(TransactionFailedError) as empty:
        client.top_up(channel, 1)
    assert (
        str(empty.value) == f"transaction would revert: ERC20InsufficientBalance(sender={payer}, balance=0, needed=1)"
    )
    assert hub.functions.channel(channel.channel_id).call()[ChannelViewField.DEPOSIT] == 40


def test_a_payee_client_whose_service_is_out_of_reach_raises_our_error(
    serve_here: Callable[..., ServiceThread], accounts: list[LocalAccount], devnet: Devnet, tmp_path: Path
) -> None:
    """The service out of reach when a payee's client asks it (its start, a stop before a refund): httpx's own
    `ConnectError` came out, outside our errors' root (an app catching `SettlementError` missed it). Now 503
    `service_unavailable`, naming the call (asked again, a stop is final and a read changes nothing)."""
    url = serve_here(f"sqlite:///{tmp_path / 'service-down.db'}").url
    channel = "0x" + "ab" * 32
    with TcpProxy(int(url.rsplit(":", 1)[1])) as service:
        payee = PayeeClient(key(accounts[11]), devnet.url, service.url)
        try:
            service.cut()
            with pytest.raises(ServiceRejectedError) as stopping:
                payee.stop(channel)
        finally:
            payee.shutdown()
    with pytest.raises(ServiceRejectedError) as starting:
        PayeeClient(key(accounts[11]), devnet.url, f"http://127.0.0.1:{free_test_port()}")
    answers = [(e.value.status, e.value.code, str(e.value)) for e in (stopping, starting)]
    assert answers == [  # the code before: httpx.ConnectError, twice
        (
            503,
            "service_unavailable",
            f"POST /v1/channels/{channel}/stop: the service did not answer (ConnectError); ask again",
        ),
        (503, "service_unavailable", "GET /v1/eip712: the service did not answer (ConnectError); ask again"),
    ]


def test_a_payer_client_whose_service_is_out_of_reach_names_the_call(
    devnet: Devnet, accounts: list[LocalAccount]
) -> None:
    """A payer's reads of the service (its start, a channel's state) retried and then raised a 503
    `service_unavailable` of their own making, naming no `request`, as the payee's client and every other refusal do.
    It is the SDK's one "no answer" error now (`settlement.sdk.answers.unanswered`)."""
    with pytest.raises(ServiceRejectedError) as refused:
        PayerClient(key(accounts[10]), devnet.url, f"http://127.0.0.1:{free_test_port()}", retries=1, backoff=0.01)
    assert (refused.value.status, refused.value.code, refused.value.request) == (
        503,
        "service_unavailable",
        "GET /v1/eip712",  # the code before: ""
    )
    assert str(refused.value) == (
        "GET /v1/eip712: no answer but a retryable one in 2 attempts (the last: ConnectError: [Errno 111] Connection "
        "refused)"
    )


def test_an_sdk_whose_rpc_is_down_raises_our_error_without_the_rpcs_key(
    serve_here: Callable[..., ServiceThread],
    accounts: list[LocalAccount],
    token: Contract,
    devnet: Devnet,
    tmp_path: Path,
) -> None:
    """The payer's (or payee's) RPC out of reach: every call of the SDK that reads the chain or sends a transaction
    raised requests' `ConnectionError`, out of our errors' root (an app catching `SettlementError` missed it), its
    message naming the RPC's URL path and query, where a provider's key is. Now it is `ChainUnavailableError`, saying
    what was being done, the URL's path and query cut."""
    url = serve_here(f"sqlite:///{tmp_path / 'rpc-down.db'}").url
    payee = accounts[11]
    with TcpProxy(devnet.port) as node:
        rpc_url = f"{node.url}/?key=SECRET-KEY"
        payer = PayerClient(key(accounts[10]), rpc_url, url, state_path=tmp_path / "journal.sqlite3")
        earner = PayeeClient(key(payee), rpc_url, url)
        try:
            channel = payer.open_channel(payee.address, 10)
            node.cut()
            sending = f"sending a transaction from {accounts[10].address}"
            calls: list[tuple[str, Callable[[], object]]] = [
                (sending, lambda: payer.open_channel(payee.address, 10)),
                ("opening a channel", lambda: payer.open_channel(payee.address, 10, token=token.address)),
                (sending, lambda: payer.top_up(channel, 1)),
                (sending, lambda: payer.close(channel)),
                ("reclaiming a channel's deposit", lambda: payer.reclaim(channel)),
                ("reading the payer's hub balance", payer.hub_balance),
                ("withdrawing the payer's hub balance", payer.withdraw),
                ("reading a channel's status from the hub", lambda: payer.is_open(channel)),
                ("reading a channel from the hub", lambda: payer.channel(channel.hex_id)),
                ("refunding a channel", lambda: earner.refund(channel.hex_id)),
                ("withdrawing the payee's hub balance", earner.withdraw),
            ]
            for what, call in calls:
                with pytest.raises(ChainUnavailableError) as down:  # the code before: requests' ConnectionError
                    call()
                assert re.fullmatch(
                    rf"{re.escape(what)}: the chain's RPC does not answer \(HTTPConnectionPool\(host='127\.0\.0\.1', "
                    rf"port={node.port}\): Max retries exceeded with url: … \(Caused by NewConnectionError\("
                    rf"\"HTTPConnection\(host='127\.0\.0\.1', port={node.port}\): Failed to establish a new "
                    r"connection: \[Errno 111\] Connection refused\"\)\)\)",
                    str(down.value),
                ), str(down.value)
        finally:
            payer.shutdown()
            earner.shutdown()


def test_a_fee_ceiling_is_a_positive_number_of_wei(
    serve_here: Callable[..., ServiceThread], accounts: list[LocalAccount], devnet: Devnet, tmp_path: Path
) -> None:
    """`max_fee_per_gas` of either SDK client is the ceiling of its transactions: 0 or less would make every one of
    them unminable, so it is refused when the client is made."""
    url = serve_here(f"sqlite:///{tmp_path / 'ceiling.db'}").url
    for make in (
        lambda fee: PayerClient(key(accounts[10]), devnet.url, url, state_path=tmp_path / "j.sqlite3", **fee),
        lambda fee: PayeeClient(key(accounts[11]), devnet.url, url, **fee),
    ):
        for wrong in (0, -1):
            with pytest.raises(ValueError) as refused:
                make({"max_fee_per_gas": wrong})
            assert str(refused.value) == f"max_fee_per_gas must be a positive number of wei, not {wrong}"
        client = make({"max_fee_per_gas": 7 * 10**9})
        assert client.transactor.max_fee_per_gas == 7 * 10**9
        client.shutdown()


def rpc(w3: Web3, method: str, params: list[Any] | None = None) -> Any:
    return w3.provider.make_request(RPCEndpoint(method), params or [])["result"]


def test_a_refusal_with_fields_of_any_name_is_still_the_refusal(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """A refusal's extra fields become the error's details; one named "request" or "status" (a proxy's, another
    service version's) raised TypeError out of `pay`, the refusal lost. Now the refusal is raised, with its code."""
    service = serve_here(store_url)
    tamper = Tampering()
    payer = payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
    channel = payer.open_channel(accounts[11].address, 1_000)
    payer.wait_until_known(channel)
    tamper.rewrite_post = lambda path, data: {**data, "request": "GET /", "status": 200, "note": "kept"}
    with pytest.raises(ServiceRejectedError) as refused:
        payer.pay(channel, 5_000)  # more than the deposit
    assert (refused.value.status, refused.value.code) == (409, "amount_exceeds_deposit")
    assert (refused.value.request, refused.value.details["note"]) == ("POST /v1/vouchers", "kept")
    assert "status" not in refused.value.details
    tamper.rewrite_post = lambda path, data: DEEP_JSON  # a segfault of the app before: now its status as code
    with pytest.raises(ServiceRejectedError) as refused:
        payer.pay(channel, 5_000)
    assert (refused.value.status, refused.value.code) == (409, "http_409")


def test_a_domain_not_in_the_services_form_is_untrusted(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    devnet: Devnet,
) -> None:
    """The SDK read /v1/eip712 with `["domain"]`, `int()` and `str()`: an answer without a domain, a chain id
    "31337" or "abc", an address that is not one raised KeyError or ValueError out of the client's constructor (or
    took "31337" as the number). Each is now the service's word the SDK cannot take, for the payer and the payee."""
    service = serve_here(store_url)
    forms: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda data: b"<html>", "is not a JSON object"),
        (lambda data: {}, "names no domain"),
        (lambda data: {"domain": [data["domain"]]}, "names no domain"),
        (lambda data: {"domain": {**data["domain"], "chainId": "31337"}}, "chainId is not a number"),
        (lambda data: {"domain": {**data["domain"], "chainId": True}}, "chainId is not a number"),
        (lambda data: {"domain": {**data["domain"], "verifyingContract": "the hub"}}, "is not an address"),
        (lambda data: {"domain": {k: v for k, v in data["domain"].items() if k != "name"}}, "name is not a string"),
    ]
    for forge, refusal in forms:
        tamper = Tampering()
        tamper.rewrite = lambda path, data, forge=forge: forge(data) if path == "/v1/eip712" else data
        with pytest.raises(UntrustedServiceError, match=refusal):
            payer_client(accounts[10], service.url, http=httpx.Client(base_url=service.url, transport=tamper))
        with pytest.raises(UntrustedServiceError, match=refusal):
            PayeeClient(
                key(accounts[11]), devnet.url, service.url, http=httpx.Client(base_url=service.url, transport=tamper)
            )
    assert payer_client(accounts[10], service.url).domain.chain_id == devnet.chain_id  # the service's own answer


def test_a_channel_reference_reads_well_and_is_rebuilt_from_its_id(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
) -> None:
    """print(channel) showed raw bytes, nothing documented rebuilt a reference after a restart, and a revert printed
    bytes and unix seconds."""
    service = serve_here(store_url)
    client = payer_client(accounts[10], service.url)
    channel = client.open_channel(accounts[11].address, 1_000)
    assert str(channel) == f"channel {channel.hex_id} to {accounts[11].address} in ETH"
    assert repr(channel).startswith(f"ChannelRef(channel_id={channel.hex_id}, ") and "b'" not in repr(channel)
    restarted = payer_client(accounts[10], service.url)
    assert restarted.channel(channel.hex_id) == channel  # salt found in the ChannelOpened log
    with pytest.raises(ValueError, match="is not a channel of payer"):
        payer_client(accounts[12], service.url).channel(channel.hex_id)
    with pytest.raises(TransactionFailedError) as info:
        client.finalize_close(channel)
    assert str(info.value) == f"transaction would revert: ChannelHubChannelNotClosing(channelId={channel.hex_id})"
    client.close(channel)
    with pytest.raises(TransactionFailedError) as info:
        client.finalize_close(channel)
    deadline = datetime.fromtimestamp(
        client.hub.functions.channel(channel.channel_id).call()[ChannelViewField.CLOSE_DEADLINE], UTC
    )
    assert str(info.value) == (
        f"transaction would revert: ChannelHubChallengeNotOver(channelId={channel.hex_id}, "
        f"deadline={deadline.isoformat().replace('+00:00', 'Z')})"
    )


def test_a_channel_is_rebuilt_from_its_id_through_an_rpc_that_caps_log_ranges(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    devnet: Devnet,
    w3: Web3,
    tmp_path: Path,
) -> None:
    """`client.channel(id)` (what an app calls after a restart) read the channel's salt from its ChannelOpened log,
    searched from block 0: a provider that caps `eth_getLogs` ranges (most do) refused it, and web3's own error came
    out of the SDK. The service's salt is taken now, checked (with the hub's parties it must hash to the id); a salt
    that names another channel is `service_untrusted`; with the service away the logs are searched, and a refusal
    there is the SDK's `ChainError`."""
    service = serve_here(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    opened = payer_client(accounts[10], service.url).open_channel(accounts[11].address, 10**15)
    w3.provider.make_request(RPCEndpoint("anvil_mine"), [hex(100)])  # its opening 100 blocks back
    with RangeCappedRpc(devnet.url, max_blocks=16) as capped:
        restarted = payer_client(accounts[10], service.url, rpc_url=capped.url, retries=0)
        assert restarted.channel(opened.hex_id) == opened  # the code before: web3's Web3RPCError
        assert capped.ranges == []
        tamper = Tampering()
        lie = "0x" + "00" * 31 + "07"
        tamper.rewrite = lambda path, data: {**data, "salt": lie} if path.startswith("/v1/channels/") else data
        told = payer_client(
            accounts[10], service.url, rpc_url=capped.url, http=httpx.Client(base_url=service.url, transport=tamper)
        )
        with pytest.raises(UntrustedServiceError) as untrusted:
            told.channel(opened.hex_id)
        assert str(untrusted.value) == f"the service's salt {lie} does not name channel {opened.hex_id}"
        service.stop()  # the service away: the hub's logs, which this provider refuses to search from block 0
        with pytest.raises(ChainError) as refused:
            restarted.channel(opened.hex_id)
        assert str(refused.value) == (
            f"searching the ChannelOpened log of {opened.hex_id} from block 0: the chain's RPC refused ({{'code': "
            "-32005, 'message': 'query exceeds max block range 16'})"
        )
        assert capped.ranges == [(0, w3.eth.block_number)]


def test_reclaim_takes_the_step_that_is_due_until_the_deposit_is_back(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    store_url: str,
    accounts: list[LocalAccount],
    w3: Web3,
) -> None:
    """`reclaim` reads the hub and takes the step that is due: nothing for an open channel unless asked, the close
    request, nothing while the challenge period runs, the finalize after it; then the unspent deposit is in the
    payer's hub balance."""
    service = serve_here(store_url)
    client = payer_client(accounts[10], service.url)
    channel = client.open_channel(accounts[11].address, 1_000)
    client.wait_until_known(channel)
    client.pay(channel, 300)
    before = client.hub_balance()

    def status() -> ChannelStatus:
        return ChannelStatus(client.hub.functions.channel(channel.channel_id).call()[ChannelViewField.STATUS])

    assert (client.reclaim(channel, request_close=False), status()) == (Reclaim.OPEN, ChannelStatus.OPEN)
    assert (client.reclaim(channel), status()) == (Reclaim.CLOSING, ChannelStatus.CLOSING)
    assert (client.reclaim(channel), status()) == (Reclaim.CLOSING, ChannelStatus.CLOSING)  # the period runs
    # the session hub's challenge period, and a second
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [3601])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    assert (client.reclaim(channel), status()) == (Reclaim.BACK, ChannelStatus.CLOSED)
    assert client.hub_balance() == before + 1_000  # no engine here: the voucher of 300 was never settled
    assert client.reclaim(channel) == Reclaim.BACK
    never_opened = replace(channel, channel_id=bytes(32))
    with pytest.raises(ValueError, match="the hub has no channel 0x0000"):
        client.reclaim(never_opened)


def test_a_wait_that_cannot_end_says_why_and_serve_warned_about_it(
    spawn: Callable[..., ServiceProcess],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    tmp_path: Path,
) -> None:
    """A service waiting for 2 confirmations on a chain that mines only on transactions: found as a 60 s timeout
    saying "does not count ... with 0", while the service knew the reason (`channel_unconfirmed`)."""
    service = spawn(f"sqlite:///{tmp_path / 'wait.db'}", confirmations="2")
    assert (
        " ".join(service.log.read_text().split()).count(
            "warning this chain mines a block only when a transaction arrives: with SETTLEMENT_CONFIRMATIONS=2"
        )
        == 1
    )
    client = payer_client(accounts[10], service.url)
    channel = client.open_channel(accounts[11].address, 1_000)
    with pytest.raises(WaitTimeoutError) as info:
        client.wait_until_known(channel, timeout=1.0)
    assert isinstance(info.value, TimeoutError)  # what code written for the old error catches
    assert info.value.details["lastCode"] == "channel_unconfirmed"
    assert info.value.message == (
        f"the service does not count {channel.hex_id} with a deposit of at least 0 after 1s; its last answer: "
        f"[channel_unconfirmed] {info.value.details['lastMessage']}"
    )
    assert "not yet 2 blocks deep" in str(info.value.details["lastMessage"])


def test_a_payer_waits_for_its_new_channel_through_a_read_budget_that_admits_none(
    serve_here: Callable[..., ServiceThread],
    payer_client: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    w3: Web3,
    tmp_path: Path,
) -> None:
    """During a flood the service admits no read of a channel id it does not hold (503 `unknown_channels_busy`) until
    its indexer confirms the channel. A payer waiting for its new channel must wait for that, not give up when its
    HTTP retries (~3 s) end: here the confirmations come 6 s after the open."""
    service = serve_here(f"sqlite:///{tmp_path / 'budget.db'}", confirmations=3, unknown_channel_reads_per_second=0.001)
    client = payer_client(accounts[14], service.url)
    channel = client.open_channel(accounts[15].address, 1_000)
    refused = httpx.get(f"{service.url}/v1/channels/{channel.hex_id}")
    assert (refused.status_code, refused.json()["code"]) == (503, "unknown_channels_busy")

    def confirm_later() -> None:
        time.sleep(6)
        for _ in range(3):
            w3.provider.make_request(RPCEndpoint("evm_mine"), [])

    miner = threading.Thread(target=confirm_later)
    miner.start()
    try:
        state = client.wait_until_known(channel, timeout=60)
    finally:
        miner.join()
    assert (state["channelId"], state["deposit"]) == (channel.hex_id, "1000")
