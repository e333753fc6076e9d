"""x402 end to end with parts no one here wrote: the official x402 httpx client with our scheme registered pays
the example FastAPI app (x402's own middleware, served by uvicorn in its own process) through our service as the
facilitator, on anvil; the engine settles in a batch and the payee withdraws exactly what it earned."""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import os
import random
import re
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import httpx
import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from httpx_aiohttp import AiohttpTransport
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint, TxData
from x402 import x402Client, x402ClientSync
from x402.extensions.payment_identifier import append_payment_identifier_to_extensions
from x402.http import x402HTTPClient
from x402.http.clients import x402_httpx_transport, x402_requests, x402HttpxClient
from x402.http.clients.httpx import PaymentError
from x402.http.clients.requests import PaymentError as RequestsPaymentError
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_signature_header,
)
from x402.schemas import PaymentCreationContext, PaymentPayload, PaymentRequired, PaymentRequirements

from settlement.devtools.devnet import Devnet
from settlement.domain.model import ChannelStatus, ChannelViewField
from settlement.eip712.vouchers import VoucherSigner
from settlement.errors import (
    BudgetExceededError,
    ChannelClosedError,
    ChannelNotFoundError,
    RateLimitedError,
    ServiceRejectedError,
)
from settlement.sdk.journal import PRUNE_EVERY, Budget
from settlement.sdk.loop_commits import LoopCommits
from settlement.sdk.payee import PayeeClient
from settlement.sdk.payer import PayerClient
from settlement.x402.ahead import PayAheadAdapter, PayAheadTransport
from settlement.x402.client import ChannelHubClientScheme, DepositPolicy, PaymentIdentifiers
from settlement.x402.facilitator_client import CONNECT_TIMEOUT, SUPPORTED_RETRY
from settlement.x402.fastapi import REFUNDS_WAITING
from settlement.x402.refunds import REFUND_PATH, RefundDesk, ask_refund
from settlement.x402.unanswered import UnansweredWire
from settlement.x402.wire import VoucherPayload
from tests.hub_helpers import (
    ETH,
    ROOT,
    Answers,
    LaggingRpc,
    RangeCappedRpc,
    Tampering,
    TamperingProxy,
    events,
    fee_paid,
    free_test_port,
    held_after,
    many_clients,
    refund_request,
    scraped,
    send,
    trickled,
    wait_until,
    x402_request,
)
from tests.proxy import TcpProxy
from tests.servers import Forked, ServiceProcess, run_script

EXAMPLE_APP = ROOT / "examples" / "paid_api.py"
PRICE = 1_000_000_000
C = TypeVar("C", x402Client, x402ClientSync)

pytestmark = pytest.mark.slow


class PaidApis:
    """Factory: paid_apis(service, pay_to, asset=ETH, price=PRICE, port=None, payee_key=None, deposit_multiple=None,
    script=EXAMPLE_APP, facilitator=None, rpc_url=None) -> base URL of examples/paid_api.py (or `script`, which runs
    it with more routes) in its own process, `service` its facilitator (reached at `facilitator`, a proxy's URL, when
    given; with payee_key: taking refund requests, reading the chain at `rpc_url`, a proxy's, or the devnet);
    `stop(url)` kills one; `reprice(url, price)` serves the same app at another price on the same URL.

    `service` may be only launched (`spawn(..., wait=False)`): the app starts meanwhile (it asks the facilitator
    nothing before its first paid request), and the service is ready when this returns. An app taking refund requests
    reads the service at start-up, so the service is waited for first."""

    def __init__(self, devnet: Devnet, tmp_path: Path) -> None:
        self.devnet, self.tmp_path = devnet, tmp_path
        self.started: dict[str, Forked] = {}
        self.made_with: dict[str, dict[str, Any]] = {}  # each app's arguments but its price and port

    def __call__(
        self,
        service: ServiceProcess,
        pay_to: str,
        asset: str = ETH,
        price: int = PRICE,
        port: int | None = None,
        payee_key: str | None = None,
        deposit_multiple: int | None = None,
        script: Path = EXAMPLE_APP,
        facilitator: str | None = None,
        rpc_url: str | None = None,
    ) -> str:
        if payee_key is not None:
            service.ready()
        port = port or free_test_port()
        env = os.environ | {
            "FACILITATOR_URL": f"{facilitator or service.url}/x402",
            "PAY_TO": pay_to,
            "NETWORK": f"eip155:{self.devnet.chain_id}",
            "PRICE_WEI": str(price),
            "ASSET": asset,
            "PORT": str(port),
            "RPC_URL": rpc_url or self.devnet.url,
        }
        if payee_key is not None:  # the app takes payers' refund requests
            env["PAYEE_KEY"] = payee_key
        if deposit_multiple is not None:  # the deposit hint, in prices
            env["DEPOSIT_MULTIPLE"] = str(deposit_multiple)
        log_path = self.tmp_path / f"paid-api-{port}-{price}.log"
        process = run_script(script, env, self.tmp_path, log_path)
        url = f"http://127.0.0.1:{port}"
        self.started[url] = process
        self.made_with[url] = {
            "service": service,
            "pay_to": pay_to,
            "asset": asset,
            "payee_key": payee_key,
            "deposit_multiple": deposit_multiple,
            "script": script,
            "facilitator": facilitator,
            "rpc_url": rpc_url,
        }

        def up() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=60)
        service.ready()
        return url

    def stop(self, url: str) -> None:
        process = self.started.pop(url)
        process.kill()
        process.wait()

    def reprice(self, url: str, price: int) -> None:
        made_with = self.made_with[url]
        self.stop(url)
        again = self(**made_with, price=price, port=int(url.rsplit(":", 1)[1]))
        assert again == url


@pytest.fixture
def paid_api(devnet: Devnet, tmp_path: Path) -> Iterator[PaidApis]:
    apis = PaidApis(devnet, tmp_path)
    yield apis
    for url in list(apis.started):
        apis.stop(url)


@pytest.fixture
def payer_for(devnet: Devnet, tmp_path: Path) -> Iterator[Callable[..., PayerClient]]:
    """Factory: payer_for(account, service, journal="payer", rpc_url=None) -> the account's PayerClient on that
    service (or a URL: a proxy's), with its journal in this test's directory, on the devnet (or `rpc_url`); all are
    shut down after the test."""
    made: list[PayerClient] = []

    def make(
        account: LocalAccount,
        service: ServiceProcess | str,
        journal: str = "payer",
        rpc_url: str | None = None,
    ) -> PayerClient:
        client = PayerClient(
            HexBytes(account.key).to_0x_hex(),
            rpc_url or devnet.url,
            service if isinstance(service, str) else service.url,
            state_path=tmp_path / f"{journal}.sqlite3",
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown()


@dataclass(frozen=True)
class LaneRig:
    """A service, paid apps of new payees on it, and a new payer's scheme to pay them (`lane_rig`)."""

    service: ServiceProcess
    payer: PayerClient
    scheme: ChannelHubClientScheme
    payees: list[tuple[str, str]]  # (payee address, its app's base URL)


@pytest.fixture
def lane_rig(
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    w3: Web3,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> Callable[..., LaneRig]:
    """Factory: lane_rig(name, payees=1, max_lanes=2, deposit_multiple=None, script=EXAMPLE_APP, **settings) -> a
    LaneRig whose payer is a new account funded with 1 ETH: no channel anywhere yet (every account of the devnet has
    some, which a scheme would find at its first payment); its payees' apps (`script`) hint at deposits of
    `deposit_multiple` prices (None: the app's default); its service runs with `settings` (`spawn`'s)."""

    def make(
        name: str,
        payees: int = 1,
        max_lanes: int = 2,
        deposit_multiple: int | None = None,
        script: Path = EXAMPLE_APP,
        **settings: str,
    ) -> LaneRig:
        service = spawn(f"sqlite:///{tmp_path / name}.db", wait=False, **settings)  # ready once the paid apps are
        apps = []
        for _ in range(payees):
            payee = Account.create().address
            apps.append((payee, paid_api(service, payee, deposit_multiple=deposit_multiple, script=script)))
        account: LocalAccount = Account.create()
        funded = w3.eth.send_transaction(
            {"from": accounts[0].address, "to": account.address, "value": Web3.to_wei(1, "ether")}
        )
        w3.eth.wait_for_transaction_receipt(funded)  # on a chain that mines every second, too
        payer = payer_for(account, service)
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100), max_lanes=max_lanes)
        return LaneRig(service, payer, scheme, apps)

    return make


@pytest.fixture
def clients() -> Iterator[httpx.Client]:
    """An httpx client each of whose requests comes from an address of its own (`many_clients`): within each
    client's share of a payee's refund route."""
    with many_clients(timeout=120) as client:
        yield client


@dataclass(frozen=True)
class PaidChannel:
    """A payee's paid app on a new service, and a payer that paid it through x402 on one channel (`paid_channel`)."""

    service: ServiceProcess
    api: str
    payee: LocalAccount
    payer: PayerClient
    scheme: ChannelHubClientScheme
    channel_id: str


@pytest.fixture
def settling(
    spawn: Callable[..., ServiceProcess], accounts: list[LocalAccount], tmp_path: Path
) -> Callable[[str], ServiceProcess]:
    """Factory: settling(name) -> a service on its own SQLite store whose engine settles every half second with
    accounts[19]'s key; launched only (ready once its paid app is)."""

    def make(name: str) -> ServiceProcess:
        settler = HexBytes(accounts[19].key).to_0x_hex()
        return spawn(
            f"sqlite:///{tmp_path / name}.db", engine_enabled="true", private_key=settler, settle_interval="0.5",
            engine_tick="0.1", wait=False,
        )  # fmt: skip

    return make


@pytest.fixture
def paid_channel(
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> Callable[..., PaidChannel]:
    """Factory: paid_channel(name, paid, payer=10, payee=13, **app) -> a PaidChannel whose payer (that devnet
    account) paid `paid` GETs of /weather on a channel of 100 prices (the payee's hint not followed); `app`: what
    `paid_api` takes besides (`payee_key`)."""

    def make(name: str, paid: int, payer: int = 10, payee: int = 13, **app: Any) -> PaidChannel:
        service = spawn(f"sqlite:///{tmp_path / name}.db", wait=False)  # ready once the paid app is
        api = paid_api(service, accounts[payee].address, **app)
        client = payer_for(accounts[payer], service)
        scheme = ChannelHubClientScheme(client, DepositPolicy(multiple=100, follow_hint=False))
        assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(paid)] == [200] * paid
        (channel,) = client.open_channels(accounts[payee].address)
        return PaidChannel(service, api, accounts[payee], client, scheme, str(channel["channelId"]))

    return make


def gate_calls(payer: object, method: str, *, after: bool = False) -> tuple[threading.Event, threading.Semaphore]:
    """Hold every call of the payer's (or one of its parts', its `transactor`) `method` at a gate until it is set
    (before the call runs, or `after` it): (the gate, a semaphore released by each call reaching it)."""
    gate, reached = threading.Event(), threading.Semaphore(0)
    real = getattr(payer, method)

    def held(*args: Any, **kwargs: Any) -> Any:
        if not after:
            reached.release()
            assert gate.wait(120), "the gate was never opened"
        result = real(*args, **kwargs)
        if after:
            reached.release()
            assert gate.wait(120), "the gate was never opened"
        return result

    setattr(payer, method, held)
    return gate, reached


def failed_payment_across(
    devnet: Devnet,
    scheme: ChannelHubClientScheme,
    url: str,
    gated: tuple[threading.Event, threading.Semaphore],
    outage: Callable[[], None],
) -> str:
    """One paid GET of `url` held at a gate (`gate_calls`) while `outage` happens, then let on: the text of the
    PaymentError it must end in."""
    gate, reached = gated

    async def pay() -> str:
        async with x402HttpxClient(paying_client(devnet, scheme), timeout=60) as http:
            paying = asyncio.create_task(http.get(url))
            try:
                assert await asyncio.to_thread(reached.acquire, timeout=60)
                outage()
            finally:
                gate.set()
            with pytest.raises(PaymentError) as failed:
                await paying
            return str(failed.value)

    return asyncio.run(pay())


def paying_client(
    devnet: Devnet,
    scheme: ChannelHubClientScheme,
    asset: str = ETH,
    kind: type[C] = x402Client,  # type: ignore[assignment]  # mypy takes no default for a constrained TypeVar
) -> C:
    """x402's client (async, or `kind=x402ClientSync`) with our scheme, and its spend controls allowing the asset on
    this chain up to 10x the price."""
    network = f"eip155:{devnet.chain_id}"
    x402 = kind()
    x402.register(network, scheme)
    x402.set_spend_controls(
        {"allowed_assets": [{"network": network, "asset": asset, "max_amount_per_payment": str(10 * PRICE)}]}
    )
    return x402


def paying_wire(
    wire: str, x402: x402Client, scheme: ChannelHubClientScheme, network: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncBaseTransport:
    """The payer's httpx transport: "pay-ahead" (ours) or x402's own over `UnansweredWire`; either tells the scheme of
    a paid request that got no payment answer. `network`: the transport under it (httpx's by default)."""
    if wire == "pay-ahead":
        return PayAheadTransport(x402, network, unanswered=scheme.unanswered)
    return cast(httpx.AsyncBaseTransport, x402_httpx_transport(x402, UnansweredWire(scheme.unanswered, network)))


Walked = tuple[int, list[int], bool]  # an answer's status, the redirects before it, whether it carries a payment answer


def walk_in_turn(
    devnet: Devnet, scheme: ChannelHubClientScheme, wire: str, urls: list[str], *, identifiers: bool
) -> list[Walked]:
    """GETs of `urls` one after another (one kept connection, redirects followed) through `wire`: "requests" (our
    `PayAheadAdapter` on a session) or one of `paying_wire`'s. `identifiers`: the payer gives each payment one."""

    def seen(answer: httpx.Response | requests.Response) -> Walked:
        return answer.status_code, [r.status_code for r in answer.history], "payment-response" in answer.headers

    if wire == "requests":
        sync = paying_client(devnet, scheme, kind=x402ClientSync)
        if identifiers:
            sync.register_extension(PaymentIdentifiers())
        with requests.Session() as session:
            session.mount("http://", PayAheadAdapter(sync, unanswered=scheme.unanswered))
            return [seen(session.get(url, timeout=60)) for url in urls]
    x402 = paying_client(devnet, scheme)
    if identifiers:
        x402.register_extension(PaymentIdentifiers())

    async def walk() -> list[Walked]:
        transport = paying_wire(wire, x402, scheme)
        async with httpx.AsyncClient(transport=transport, timeout=60, follow_redirects=True) as http:
            return [seen(await http.get(url)) for url in urls]

    return asyncio.run(walk())


def position_on_only_channel(payer: PayerClient, payee: str) -> int:
    """The payer's position on its one open channel to `payee` (there must be exactly one)."""
    (only,) = payer.open_channels(payee)
    return payer.position(payer.channel(only["channelId"]))


@contextmanager
def payer_through_a_proxy(
    devnet: Devnet, rig: LaneRig, journal: Path, rpc: str | None = None
) -> Iterator[tuple[TcpProxy, PayerClient]]:
    """A client of the rig's payer whose RPC goes through a TCP proxy (to cut) in front of `rpc` (the devnet's by
    default), its journal `journal`; shut down after."""
    with TcpProxy(int((rpc or devnet.url).rsplit(":", 1)[1])) as node:
        key = HexBytes(rig.payer.account.key).to_0x_hex()
        payer = PayerClient(key, node.url, rig.service.url, state_path=journal)
        try:
            yield node, payer
        finally:
            payer.shutdown()


# A payment whose transaction the node took and then went out of reach before its receipt was read.
UNREAD_RECEIPT = (
    "Failed to handle payment: transaction 0x[0-9a-f]{64} was sent, and the chain's RPC went away before its "
    r"receipt was read \(ConnectionError\): it may be mined yet"
)


def paid_get(devnet: Devnet, scheme: ChannelHubClientScheme, url: str, asset: str = ETH) -> int:
    """One GET through x402's own httpx client with our scheme (a fresh client each time, as a new app session)."""

    async def get() -> int:
        async with x402HttpxClient(paying_client(devnet, scheme, asset), timeout=60) as http:
            answer: httpx.Response = await http.get(url)
            return answer.status_code

    return asyncio.run(get())


def made_up_payment(required: PaymentRequirements, n: int) -> dict[str, str]:
    """A PAYMENT-SIGNATURE header paying `required` on channel id `n`, which no one opened (ids cost nothing)."""
    voucher = {"channelId": "0x" + n.to_bytes(32, "big").hex(), "cumulativeAmount": required.amount}
    signed = voucher | {"signature": "0x" + "11" * 64 + "1b"}
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(PaymentPayload(payload=signed, accepted=required))}


def requirements_of(x402: x402Client, url: str) -> PaymentRequired:
    """The 402 of a paid route as x402's client reads it: a v2 one (its decoder reads v1's too; none is served here)."""
    required = x402HTTPClient(x402).get_payment_required_response(httpx.get(url).headers.get, None)
    assert isinstance(required, PaymentRequired), required
    return required


def payment_for(api: str, x402: x402Client, path: str = "/weather") -> PaymentPayload:
    """x402's payment for the 402 of `api`'s paid route, made as a payer app makes it, not sent."""
    payment = asyncio.run(x402.create_payment_payload(requirements_of(x402, f"{api}{path}")))
    assert isinstance(payment, PaymentPayload), payment
    return payment


def next_payment(devnet: Devnet, payer: PayerClient, api: str, path: str) -> PaymentPayload:
    """The payer's next payment for `api`'s paid `path`, made by a new scheme over its journal, not sent."""
    return payment_for(api, paying_client(devnet, ChannelHubClientScheme(payer)), path)


def signature_header(payment: PaymentPayload, identifier: str | None = None, required: bool = False) -> dict[str, str]:
    """The PAYMENT-SIGNATURE header of `payment`, under x402's payment `identifier` when one is given (echoing a
    declaration that it is `required` or not)."""
    if identifier is not None:
        named = {"payment-identifier": {"info": {"required": required, "id": identifier}}}
        payment = payment.model_copy(update={"extensions": named})
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(payment)}


def identified_payment(devnet: Devnet, scheme: ChannelHubClientScheme, api: str) -> dict[str, str]:
    """A PAYMENT-SIGNATURE header for `api`'s paid route carrying x402's payment identifier, made as a payer app
    that registers `PaymentIdentifiers` makes it, not sent."""
    x402 = paying_client(devnet, scheme)
    x402.register_extension(PaymentIdentifiers())
    return x402HTTPClient(x402).encode_payment_signature_header(payment_for(api, x402))


def paid_head(x402: x402Client, path: str, payment: PaymentPayload, length: int) -> bytes:
    """A paid GET's head as it goes on the wire, for a test that writes requests on a socket of its own."""
    (name, value), = x402HTTPClient(x402).encode_payment_signature_header(payment).items()  # fmt: skip
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{name}: {value}\r\nContent-Length: {length}\r\n\r\n".encode()


def accepted_for(service: ServiceProcess, payee: str) -> int:
    summary = httpx.get(f"{service.url}/v1/payees/{payee}/summary").json()
    return sum(int(a["accepted"]) for a in summary["assets"])


def test_the_official_client_pays_the_official_middleware_through_our_facilitator(
    settling: Callable[[str], ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    service = settling("x402")
    payee = accounts[13].address
    api = paid_api(service, payee)
    payer = payer_for(accounts[12], service)
    # 17 lanes: the 404 below carries no payment answer, so its channel is held for `lane_timeout`; the sixteen at
    # once then need sixteen more (channels being opened count against the limit).
    scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100), lane_timeout=1.0, max_lanes=17)
    x402 = paying_client(devnet, scheme)

    async def walk() -> None:
        async with x402HttpxClient(x402, timeout=60) as http:
            # Unpaid, a plain client gets the 402 with our requirements, small enough for any header limit (~620
            # bytes, ~400 more for x402's payment-identifier declaration with its JSON schema).
            async with httpx.AsyncClient() as unpaying:
                plain = await unpaying.get(f"{api}/weather")
            assert plain.status_code == 402
            header = plain.headers["payment-required"]
            assert len(header) < 1_100, len(header)
            required = json.loads(base64.b64decode(header))["accepts"][0]
            assert (required["scheme"], required["amount"], required["payTo"], required["extra"]["hub"]) == (
                "channelhub",
                str(PRICE),
                payee,
                hub.address,
            )
            assert required["extra"]["facilitator"] == f"{service.url}/x402"
            # Five paid requests: one channel, five vouchers, each charged the price once.
            for _ in range(5):
                answer = await http.get(f"{api}/weather")
                assert (answer.status_code, answer.json()) == (200, {"forecast": "sunny"})
                settled = json.loads(base64.b64decode(answer.headers["payment-response"]))
                assert (settled["success"], settled["amount"]) == (True, str(PRICE))
            assert accepted_for(service, payee) == 5 * PRICE
            # A handler answer that is not a success is not paid for.
            missing = await http.get(f"{api}/reports/99")
            assert missing.status_code == 404
            assert accepted_for(service, payee) == 5 * PRICE
            # Sixteen paid requests at once: all answered, each charged once, none refused.
            answers = await asyncio.gather(*(http.get(f"{api}/reports/{n % 10}") for n in range(16)))
            assert sorted(a.status_code for a in answers) == [200] * 16
            assert accepted_for(service, payee) == 21 * PRICE

    asyncio.run(walk())
    # The payer's journal keeps no record of a payment x402 delivered once it is accepted (a week of receipts was ~1
    # KB a payment), and counts what each cost against its budgets. (The 404's payment stays pending until its
    # channel pays again and asks the service: asked now.)
    for listed in payer.open_channels(payee):
        payer.resynchronise(payer.channel(listed["channelId"]))
    assert payer.journal.spent(ETH, time.time() - 3600, payee) == 21 * PRICE
    payer.journal.close()  # its last receipts written
    with closing(sqlite3.connect(tmp_path / "payer.sqlite3")) as journal:
        assert journal.execute("SELECT COUNT(*) FROM payments").fetchone() == (0,)

    # The engine settles the payee's vouchers on chain; the payee withdraws exactly what it earned.
    wait_until(lambda: hub.functions.balanceOf(payee, ETH).call() == 21 * PRICE, timeout=60)
    receipt = send(w3, hub.functions.withdraw(ETH, 21 * PRICE, payee), payee)
    assert [e["amount"] for e in events(hub, receipt, "Withdrawn")] == [21 * PRICE]
    assert hub.functions.balanceOf(payee, ETH).call() == 0


def test_a_replayed_payment_header_buys_nothing(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    service = spawn(f"sqlite:///{tmp_path / 'replay.db'}", wait=False)  # ready once the paid app is
    payee = accounts[14].address
    api = paid_api(service, payee)
    x402 = paying_client(devnet, ChannelHubClientScheme(payer_for(accounts[15], service)))
    headers = x402HTTPClient(x402).encode_payment_signature_header(payment_for(api, x402))
    first = httpx.get(f"{api}/weather", headers=headers)
    assert first.status_code == 200
    replay = httpx.get(f"{api}/weather", headers=headers)
    assert replay.status_code == 402
    refused = json.loads(base64.b64decode(replay.headers["payment-required"]))
    assert refused["error"] == "voucher_replayed", refused
    assert accepted_for(service, payee) == PRICE


def test_one_voucher_sent_for_many_requests_at_once_runs_the_handler_once(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """One payment header sent for eight requests at once, or its voucher under eight payment identifiers (a retry's
    answer is kept by its exact header, so these are eight payments to the payee): x402 verifies a payment before
    the handler and settles it after, and each copy verified, so the handler ran eight times; seven were refused at
    settle as replays, their answers withheld, but a handler's side effect (an SMS sent, an order placed, a model
    run) is the payee's cost: one payment bought eight. Now the first copy's verify claims the voucher until its
    request ends, and the others are 402 `voucher_replayed` before the handler: one run, one charge. On a channel
    new to the payee (the facilitator verifies each copy) and on one it knows (the payee verifies alone)."""
    rig = lane_rig("claimed", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees

    async def at_once(url: str, headers: list[dict[str, str]]) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.get(url, headers=copy) for copy in headers))

    for paid, name in enumerate(("new", "known", "renamed"), start=1):
        path = f"/reports/counted/{name}?think=0.5"
        payment = next_payment(devnet, rig.payer, api, path)
        if name == "renamed":
            headers = [signature_header(payment, f"renamed-{n:012d}") for n in range(8)]
        else:
            headers = [signature_header(payment)] * 8
        if name == "known":  # a request that bought nothing lets its voucher go: its handler raised, nothing charged
            assert httpx.get(f"{api}/reports/broken/raise", headers=headers[0]).status_code == 500
        answers = asyncio.run(at_once(f"{api}{path}", headers))
        assert sorted(a.status_code for a in answers) == [200] + [402] * 7, [a.text for a in answers]
        refused = [json.loads(base64.b64decode(a.headers["payment-required"])) for a in answers if a.status_code == 402]
        assert {r["error"] for r in refused} == {"voucher_replayed"}
        assert httpx.get(f"{api}/runs/{name}").json() == {"runs": 1}
        assert accepted_for(rig.service, payee) == paid * PRICE


def test_a_payment_the_payee_cannot_send_its_facilitator_runs_no_handler_on_a_channel_it_knows(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """A payment whose `extensions` carry a lone surrogate escape (x402 reads the header's JSON with Python's reader,
    which takes it; no JSON writer can send it on) on a channel the payee knows: the payee vouched for the voucher
    itself and ran the handler, then could not send the settle and withheld the answer, the voucher unaccepted.
    Each paid request let its payer have one such run free. Now it is refused at verify, as on a channel the payee
    has not learned: a 402 `invalid_payload`, the handler not run; the same voucher sent rightly then pays."""
    rig = lane_rig("unsendable", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path = "/reports/counted/unsendable"
    first = signature_header(next_payment(devnet, rig.payer, api, path))
    assert httpx.get(f"{api}{path}", headers=first).status_code == 200  # the payee knows the channel now
    payment = next_payment(devnet, rig.payer, api, path)
    written = (
        json.dumps(payment.model_dump(by_alias=True, exclude_none=True)).removesuffix("}")
        + ', "extensions": {"note": "\\udc00"}}'
    )
    unsendable = httpx.get(f"{api}{path}", headers={"PAYMENT-SIGNATURE": base64.b64encode(written.encode()).decode()})
    assert unsendable.status_code == 402, unsendable.text
    assert json.loads(base64.b64decode(unsendable.headers["payment-required"]))["error"] == "invalid_payload"
    assert httpx.get(f"{api}/runs/unsendable").json() == {"runs": 1}
    assert accepted_for(rig.service, payee) == PRICE
    rightly = httpx.get(f"{api}{path}", headers=signature_header(payment))
    assert (rightly.status_code, rightly.json()) == (200, {"runs": 2})
    assert accepted_for(rig.service, payee) == 2 * PRICE


def test_a_payer_that_fails_its_own_settles_gets_one_handler_run_free_not_one_after_each_payment(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """A payer sends its next voucher under a payment identifier it used before, with other credentials than the
    request that identifier paid for (no answer is kept for it then: with the same ones it is x402's retry, answered
    again, below). The payee, which knows the channel, vouches for the voucher itself and runs the handler; the
    facilitator refuses the settle (`voucher_replayed`: the identifier's first payment stands) and the answer is
    withheld. The same voucher under a new identifier then pays,
    the payee learns the channel again, and so on: a handler run free after each paid request. Now a channel refused
    at settle is verified by the facilitator for a minute (`Positions.doubt`), which refuses such a payment before
    the handler: one run free in all, three paid."""
    rig = lane_rig("reused", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path = "/reports/counted/reused"

    statuses = []
    for paid in range(4):
        payment = next_payment(devnet, rig.payer, api, path)
        if paid:
            the_firsts = signature_header(payment, "identifier-00000000")
            reused = httpx.get(f"{api}{path}", headers={**the_firsts, "Authorization": "Bearer another-session"})
            statuses.append((reused.status_code, "payment-required" in reused.headers))
        answer = httpx.get(f"{api}{path}", headers=signature_header(payment, f"identifier-{paid:08d}"))
        assert answer.status_code == 200, answer.text
    # The first refused at settle after its handler ran (its 402 carries the settle's answer), the others at verify.
    assert statuses == [(402, False), (402, True), (402, True)]
    assert httpx.get(f"{api}/runs/reused").json() == {"runs": 5}
    assert accepted_for(rig.service, payee) == 4 * PRICE


def test_a_head_of_a_paid_get_route_is_paid_as_the_get_is(devnet: Devnet, lane_rig: Callable[..., LaneRig]) -> None:
    """x402 matches a request's method exactly, and Starlette answers HEAD with the GET handler (its own routes,
    StaticFiles, a FastAPI route that lists both): a HEAD of a paid GET route ran the handler free (its side effect)
    and told the paid answer's headers. Now it is a 402 unpaid; paid, it is served (headers only) and charged as the
    GET. A FastAPI GET route, which answers HEAD 405, is a 402 unpaid too, and its 405 charges nothing."""
    rig = lane_rig("head", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path = "/reports/headed/head"
    unpaid = httpx.head(f"{api}{path}")
    assert unpaid.status_code == 402
    assert httpx.get(f"{api}/runs/head").json() == {"runs": 0}
    paid = httpx.head(f"{api}{path}", headers=signature_header(next_payment(devnet, rig.payer, api, path)))
    assert (paid.status_code, paid.content, "payment-response" in paid.headers) == (200, b"", True)
    assert httpx.get(f"{api}/runs/head").json() == {"runs": 1}
    assert accepted_for(rig.service, payee) == PRICE

    assert httpx.head(f"{api}/weather").status_code == 402
    refused = httpx.head(f"{api}/weather", headers=signature_header(next_payment(devnet, rig.payer, api, "/weather")))
    assert (refused.status_code, "payment-response" in refused.headers) == (405, False)
    assert accepted_for(rig.service, payee) == PRICE
    free = httpx.head(f"{api}/health")  # a free GET route: x402 never sees it
    assert free.status_code == 405


def test_a_payer_that_hangs_up_before_each_answer_has_a_few_runs_free_then_a_429(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """A payer that went away before its answer was ready is not charged, and its voucher is free again: hanging up
    before each answer, one voucher had the handler run for nothing as often as its payer liked (five runs, five
    hang-ups, nothing charged). Now such runs are counted per channel (three at once, then one a minute): the
    fourth is a 429 `rate_limited` with Retry-After, before the handler."""
    rig = lane_rig("hang-ups", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path = "/reports/counted/hang-ups?think=0.5"
    headers = signature_header(next_payment(devnet, rig.payer, api, path))
    for _ in range(3):
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{api}{path}", headers=headers, timeout=httpx.Timeout(5, read=0.25))
        time.sleep(0.5)  # the handler ends; the settle is not sent (no one is there to answer)
    assert httpx.get(f"{api}/runs/hang-ups").json() == {"runs": 3}
    limited = httpx.get(f"{api}{path}", headers=headers, timeout=httpx.Timeout(5, read=0.25))
    assert (limited.status_code, limited.json()["error"]) == (429, "rate_limited")
    assert limited.json()["message"].startswith("this channel's payer left before its answers were ready")
    assert 55 <= int(limited.headers["retry-after"]) <= 60
    assert httpx.get(f"{api}/runs/hang-ups").json() == {"runs": 3}
    assert accepted_for(rig.service, payee) == 0


def test_a_payment_header_nested_deeper_than_the_services_json_reader_goes_pays_and_one_that_cannot_be_sent_is_a_402(
    devnet: Devnet,
    lane_rig: Callable[..., LaneRig],
    accounts: list[LocalAccount],
    payer_for: Callable[..., PayerClient],
) -> None:
    """x402 reads a payment header's JSON as deep as Python's reader goes (~1,000 levels), lone surrogate escapes
    and all, and passes its `extensions` on to the facilitator. On a channel the payee had not learned yet (its
    first payment: verified by the service), a header nested 250 levels deep was answered 503 (the service's
    `/verify` read 200 levels and answered 400), and one with a lone surrogate in a string 503 too (x402's client
    could not encode it), and one of 1.1 MB 503 too (uvicorn's httptools takes it; the service's body limit is
    1 MiB): payments retried that could never pass. The deep one pays now, and the next one too (verified by the
    payee alone); the surrogate one is a 402, `invalid_payload`, the 1.1-MB one a 431 (the example app's bound on a
    request head, before x402 reads it), and neither charges anything."""
    rig = lane_rig("deep")
    ((payee, api),) = rig.payees

    def header_of(payer: PayerClient, extensions: str) -> dict[str, str]:
        payload = payment_for(api, paying_client(devnet, ChannelHubClientScheme(payer)))
        written = (
            json.dumps(payload.model_dump(by_alias=True, exclude_none=True)).removesuffix("}")
            + f', "extensions": {extensions}}}'
        )
        return {"PAYMENT-SIGNATURE": base64.b64encode(written.encode()).decode()}

    other = payer_for(accounts[16], rig.service, journal="other")
    unsendable = httpx.get(f"{api}/weather", headers=header_of(other, '{"note": "\\udc00"}'))
    assert unsendable.status_code == 402, unsendable.text
    assert json.loads(base64.b64decode(unsendable.headers["payment-required"]))["error"] == "invalid_payload"
    oversized = httpx.get(f"{api}/weather", headers=header_of(other, '{"note": "' + "x" * 1_100_000 + '"}'))
    assert (oversized.status_code, oversized.text) == (431, "request head too large")
    for paid in (1, 2):
        deep = header_of(rig.payer, '{"note": ' + "[" * 250 + "]" * 250 + "}")
        answer = httpx.get(f"{api}/weather", headers=deep)
        assert (answer.status_code, answer.json()) == (200, {"forecast": "sunny"}), answer.text
        assert accepted_for(rig.service, payee) == paid * PRICE  # the unsendable one charged nothing


def test_the_example_app_refuses_a_request_head_past_its_bound_and_serves_paid_requests_beside(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """A payment header is the payer's to fill, and uvicorn's httptools buffers a request head of any size: four
    connections each sending a header line of 100 MB that never ended held ~380 MB of a plain uvicorn app. The example
    app is served with settlement.x402.serving's protocol: a head past 16 KiB, whole or still coming, is a 431 and its
    connection closed, long before the client stops sending; a paid request beside them is served and charged once."""
    rig = lane_rig("heads")
    ((payee, api),) = rig.payees
    whole = httpx.get(f"{api}/weather", headers={"PAYMENT-SIGNATURE": "A" * 20_000})
    assert (whole.status_code, whole.text) == (431, "request head too large")
    port = int(api.rsplit(":", 1)[1])
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /weather HTTP/1.1\r\nHost: 127.0.0.1\r\nPAYMENT-SIGNATURE: ")
            # 2 MB of a header line that never ends, over 10 s, unless the app cuts it off
            sent = trickled(sock, b"A" * 2048, 1_000, 0.01)
            # Cut off past 16 KiB (9 chunks here), and what the kernel's buffers took before the app read it: within
            # 600 KB, unless the app stalled for 3 s.
            assert sent < 300, sent
            head = b""
            while b"\r\n\r\n" not in head and (chunk := sock.recv(65536)):
                head += chunk
        assert head.startswith(b"HTTP/1.1 431 "), head

    async def paid() -> int:
        async with x402HttpxClient(paying_client(devnet, rig.scheme), timeout=60) as http:
            answer: httpx.Response = await http.get(f"{api}/weather")
            return answer.status_code

    assert asyncio.run(paid()) == 200
    assert accepted_for(rig.service, payee) == PRICE


def test_a_paid_request_whose_body_trickles_in_is_cut_off_charged_nothing_and_a_slow_steady_one_is_served(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], tmp_path: Path
) -> None:
    """A payment is verified before the handler reads the request's body and settled after it answered, so one
    payment (verified again and again, settled never) held a connection for as long as its body took to come: a
    paid route that reads its body waited on a body sent a byte at a time for good, and enough such connections held
    the app's `limit_concurrency` (every other request a 503). The payee app's protocol bounds a body's time (here 1 s,
    and a second for each 500 bytes that came): the trickle is a 408, charged nothing; the same payment with a body
    that comes slowly but steadily (2 KB a second, 2.5 s) is served and charged once; and neither a pipelined request
    whose body waits while the app answers the one before it (its reading paused) nor a body that waits for a
    `100 Continue` the app sends late is cut off for the app's time (one that never comes after it is). A body cut off
    leaves no traceback in the payee's log."""
    rig = lane_rig("bodies", max_lanes=3, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    port = int(api.rsplit(":", 1)[1])
    x402 = paying_client(devnet, rig.scheme)

    payment = payment_for(api, x402, "/reports/uploaded/size")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(paid_head(x402, "/reports/uploaded/size", payment, 1_000))
        sent = trickled(sock, b"x", 50, 0.2)  # 10 s of a byte every 0.2 s, unless the app cuts it off
        assert sent < 25, sent  # cut off about a second after its head (5-6 bytes), not left to trickle on
        refused = b""
        while chunk := sock.recv(65536):
            refused += chunk
    assert refused.startswith(b"HTTP/1.1 408 ") and refused.endswith(b"\r\n\r\nrequest body too slow"), refused
    time.sleep(0.5)  # a settle would have been sent by now
    assert accepted_for(rig.service, payee) == 0

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(paid_head(x402, "/reports/uploaded/size", payment, 5_000))
        for _ in range(25):  # 200 bytes every 0.1 s: past the second, within the rate
            sock.sendall(b"y" * 200)
            time.sleep(0.1)
        served = Answers(sock).whole()
    assert (served[0].split(b"\r\n")[0], json.loads(served[1])) == (b"HTTP/1.1 200 OK", {"bytes": 5_000})
    assert accepted_for(rig.service, payee) == PRICE

    thinking = payment_for(api, x402, "/reports/uploaded/size?think=2")  # the other lane's channel
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # A paid request the handler thinks over for 2 s, and behind it a request whose body's second half comes
        # 1.5 s later: the app reads neither it nor its rest until the first is answered.
        pipelined = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n12345"
        sock.sendall(paid_head(x402, "/reports/uploaded/size?think=2", thinking, 0) + pipelined)
        time.sleep(1.5)
        sock.sendall(b"67890")
        answers = Answers(sock)
        first, second = answers.whole(), answers.whole()
    assert (first[0].split(b"\r\n")[0], json.loads(first[1])) == (b"HTTP/1.1 200 OK", {"bytes": 0})
    assert (second[0].split(b"\r\n")[0], json.loads(second[1])) == (b"HTTP/1.1 200 OK", {"status": "ok"})
    assert accepted_for(rig.service, payee) == 2 * PRICE

    # A client that waits for `100 Continue` before its body: the app's wait for it (2 s of thinking) is not the
    # client's; one that asks for it and then sends nothing is cut off all the same.
    waiting = payment_for(api, x402, "/reports/uploaded/size?think=2")  # a third channel
    expecting = b"Expect: 100-continue\r\n\r\n"
    for think in ("0", "2"):
        path = f"/reports/uploaded/size?think={think}"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            answers, started = Answers(sock), time.monotonic()
            sock.sendall(paid_head(x402, path, waiting, 5).removesuffix(b"\r\n") + expecting)
            assert answers.head() == b"HTTP/1.1 100 Continue\r\n\r\n"
            if think == "0":  # nothing more
                refused = answers.head()
                assert refused.startswith(b"HTTP/1.1 408 ") and 0.95 < time.monotonic() - started < 5, refused
                assert accepted_for(rig.service, payee) == 2 * PRICE
                continue
            sock.sendall(b"hello")
            served = answers.whole()
        assert (served[0].split(b"\r\n")[0], json.loads(served[1])) == (b"HTTP/1.1 200 OK", {"bytes": 5})
    assert accepted_for(rig.service, payee) == 3 * PRICE
    # A body cut off is the client's doing, not the app's error: no traceback in the payee's log for either (uvicorn
    # logged one of ~80 lines for each).
    log = (tmp_path / f"paid-api-{port}-{PRICE}.log").read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]


def test_a_paid_request_whose_client_went_away_with_a_request_pipelined_behind_it_is_not_charged(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], tmp_path: Path
) -> None:
    """A client sends a paid request and a second one pipelined behind it, and goes away while the first is being
    answered. uvicorn told only its newest request that the client was gone: the paid one was settled (its payer
    charged for an answer it never got) and its answer written to the closed connection ("Exception in ASGI
    application" in the payee's log). Every request of the connection is told now: charged nothing, nothing logged,
    and the same payment then buys its answer, charged once."""
    rig = lane_rig("pipelined-gone", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    port = int(api.rsplit(":", 1)[1])
    x402 = paying_client(devnet, rig.scheme)
    path = "/reports/uploaded/size?think=1"
    payment = payment_for(api, x402, path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(paid_head(x402, path, payment, 0) + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.3)  # the handler thinks for a second: gone before it answers
    time.sleep(1.7)  # answered, and a settle sent, by now
    assert accepted_for(rig.service, payee) == 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(paid_head(x402, path, payment, 0))
        served = Answers(sock).whole()
    assert (served[0].split(b"\r\n")[0], json.loads(served[1])) == (b"HTTP/1.1 200 OK", {"bytes": 0})
    assert accepted_for(rig.service, payee) == PRICE
    log = (tmp_path / f"paid-api-{port}-{PRICE}.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_a_paid_body_past_the_apps_bound_is_a_413_and_charged_nothing(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """FastAPI reads a body of any size unless told, and a payment is verified before the handler reads it: one
    payment, never settled, could send a route that reads its body as much as it liked. The example app (which the
    faulty app is) takes bodies of up to 64 KiB (FastAPI's `max_body_size`): one declared larger is a 413 before the
    payment is looked at, a chunked one a 413 once 64 KiB came; neither is charged, and the same payment then buys a
    small body's answer, charged once."""
    rig = lane_rig("big-bodies", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    x402 = paying_client(devnet, rig.scheme)
    payment = payment_for(api, x402, "/reports/uploaded/size")
    headers = x402HTTPClient(x402).encode_payment_signature_header(payment)
    url = f"{api}/reports/uploaded/size"

    declared = httpx.request("GET", url, headers=headers, content=b"z" * 1_000_000)
    assert (declared.status_code, declared.text) == (413, "Content Too Large")

    def chunks() -> Iterator[bytes]:
        for _ in range(100):  # 1 MB in chunks of 10 KB, no Content-Length
            yield b"z" * 10_000

    chunked = httpx.request("GET", url, headers=headers, content=chunks())
    assert chunked.status_code == 413, chunked.text
    assert "payment-response" not in chunked.headers
    time.sleep(0.5)  # a settle would have been sent by now
    assert accepted_for(rig.service, payee) == 0

    small = httpx.request("GET", url, headers=headers, content=b"z" * 60_000)
    assert (small.status_code, small.json()) == (200, {"bytes": 60_000})
    assert accepted_for(rig.service, payee) == PRICE


def test_a_websocket_upgraded_on_a_kept_alive_connection_outlives_the_body_bound(
    lane_rig: Callable[..., LaneRig],
) -> None:
    """The protocol's timers end where uvicorn hands a connection to its WebSocket protocol: one upgraded on a
    kept-alive connection (its last request answered before it) still echoes after 1.5 s, past the app's body bound
    (1 s) and head bound."""
    rig = lane_rig("upgrade", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((_, api),) = rig.payees
    with socket.create_connection(("127.0.0.1", int(api.rsplit(":", 1)[1])), timeout=10) as sock:
        answers = Answers(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answers.whole()[0].startswith(b"HTTP/1.1 200 ")
        sock.sendall(
            b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert answers.head().startswith(b"HTTP/1.1 101 ")
        time.sleep(1.5)
        mask, text = b"\x01\x02\x03\x04", b"still here"
        sock.sendall(bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
        assert sock.recv(1024) == bytes([0x81, len(text)]) + text


def test_a_retried_payment_with_an_identifier_is_answered_again_and_charged_once(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """Eight copies of one paid request with a payment identifier, all at once, then one more: one charge, nine
    identical answers. The same header on another route, or the same voucher under another identifier, buys
    nothing; nor does it without the credentials the paid request carried (the kept answer is given before the
    app's own sign-in runs: a header seen in a log had the bought answer, the signed-in user's data, given to
    anyone)."""
    service = spawn(f"sqlite:///{tmp_path / 'retry.db'}", wait=False)  # ready once the paid app is
    payee = accounts[14].address
    api = paid_api(service, payee)
    headers = identified_payment(devnet, ChannelHubClientScheme(payer_for(accounts[15], service)), api)

    async def retried() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            signed_in = {**headers, "Authorization": "Bearer the-payers-own", "Cookie": "session=the-payers"}
            answers = await asyncio.gather(*(client.get(f"{api}/weather", headers=signed_in) for _ in range(8)))
            return [*answers, await client.get(f"{api}/weather", headers=signed_in)]

    answers = asyncio.run(retried())
    payment = decode_payment_signature_header(next(iter(headers.values())))
    assert isinstance(payment, PaymentPayload), payment
    assert len((payment.extensions or {})["payment-identifier"]["info"]["id"]) >= 16
    assert [a.status_code for a in answers] == [200] * 9
    assert {(a.content, a.headers["payment-response"]) for a in answers} == {
        (answers[0].content, answers[0].headers["payment-response"])
    }
    assert accepted_for(service, payee) == PRICE

    for credentials in ({}, {"Authorization": "Bearer someone-else", "Cookie": "session=the-payers"}):
        anyone = httpx.get(f"{api}/weather", headers={**headers, **credentials})
        assert anyone.status_code == 402
        assert json.loads(base64.b64decode(anyone.headers["payment-required"]))["error"] == "voucher_replayed"
    elsewhere = httpx.get(f"{api}/reports/1", headers=headers)
    assert elsewhere.status_code == 402
    assert json.loads(base64.b64decode(elsewhere.headers["payment-required"]))["error"] == "voucher_replayed"
    forged = httpx.get(f"{api}/weather", headers=signature_header(payment, "another-id-0123456789"))
    assert forged.status_code == 402
    refused = json.loads(base64.b64decode(forged.headers["payment-required"]))["error"]
    assert refused == "exists_with_different_metadata"
    assert accepted_for(service, payee) == PRICE


def test_a_retried_payment_is_answered_again_by_another_process_of_the_payee_and_charged_once(
    devnet: Devnet,
    lane_rig: Callable[..., LaneRig],
    paid_api: PaidApis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A payee app served by two processes on one host (here two instances of the example app, as `uvicorn
    --workers 2` runs it or a balancer in front of two), sharing their kept answers through one file (PAID_ANSWERS:
    `PaidAnswers(path=)`). Eight copies of one paid request at once, four at each, then one more at the other: one
    charge, nine identical answers. Each process kept its own answers before: a copy at the process that had not
    served the payment was a replayed voucher there, a 402 for an answer paid for and never received. The header
    without the paid request's credentials buys nothing at either."""
    monkeypatch.setenv("PAID_ANSWERS", str(tmp_path / "answers.sqlite3"))
    rig = lane_rig("two-processes")
    ((payee, one),) = rig.payees
    two = paid_api(rig.service, payee)
    headers = identified_payment(devnet, rig.scheme, one)

    async def retried() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            signed_in = {**headers, "Authorization": "Bearer the-payers-own"}
            copies = (client.get(f"{api}/weather", headers=signed_in) for api in (one, two) * 4)
            return [*await asyncio.gather(*copies), await client.get(f"{two}/weather", headers=signed_in)]

    answers = asyncio.run(retried())
    assert [a.status_code for a in answers] == [200] * 9
    assert {(a.content, a.headers["payment-response"]) for a in answers} == {
        (answers[0].content, answers[0].headers["payment-response"])
    }
    for api in (one, two):
        anyone = httpx.get(f"{api}/weather", headers=headers)
        assert anyone.status_code == 402
        assert json.loads(base64.b64decode(anyone.headers["payment-required"]))["error"] == "voucher_replayed"
    assert accepted_for(rig.service, payee) == PRICE


def identified_by(x402: x402Client, identifier: list[str]) -> None:
    """Have `x402` put `identifier[0]` on each payment it makes, as x402's documents show a payer app doing for one
    logical request (a hook before each payment is made), so that sending the request again is the same payment."""

    async def same_identifier(context: PaymentCreationContext) -> None:
        required = context.payment_required
        if isinstance(required, PaymentRequired) and required.extensions is not None:  # the payee declared it
            append_payment_identifier_to_extensions(required.extensions, identifier[0])

    x402.on_before_payment_creation(same_identifier)


def test_the_official_client_retrying_as_x402s_documents_show_gets_the_answer_bought_and_pays_once(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """x402's documents have a payer app keep one payment identifier per logical request and send the request again
    through its x402 client to retry it: each attempt gets a 402 and a payment made afresh under that identifier (for
    this scheme a new voucher, signed from the payer's position after the first). The payee kept answers by the exact
    header, so such a retry ran the handler again (its side effect twice), was refused at settle and its answer
    withheld: a 402 `voucher_replayed` for an answer paid for. Now each retry gets the answer the first payment bought,
    byte for byte, charged nothing, the handler not run; the payer's position goes back to where the service has it
    (the new voucher was not taken: before, the payer counted it spent), and its next request, under a new
    identifier, pays exactly the price at the first try."""
    rig = lane_rig("documented", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path = "/reports/counted/documented"
    x402 = paying_client(devnet, rig.scheme)
    identifier = ["order-0000000000000001"]
    identified_by(x402, identifier)

    async def requests(n: int) -> list[httpx.Response]:
        async with x402HttpxClient(x402, timeout=60) as http:
            return [await http.get(f"{api}{path}") for _ in range(n)]

    answers = asyncio.run(requests(3))
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"runs": 1})] * 3
    assert len({a.headers["payment-response"] for a in answers}) == 1
    assert httpx.get(f"{api}/runs/documented").json() == {"runs": 1}
    assert accepted_for(rig.service, payee) == PRICE
    assert (position_on_only_channel(rig.payer, payee), rig.payer.journal.spent(ETH, 0)) == (PRICE, PRICE)

    identifier[0] = "order-0000000000000002"
    (answer,) = asyncio.run(requests(1))
    assert (answer.status_code, answer.json()) == (200, {"runs": 2})
    assert accepted_for(rig.service, payee) == 2 * PRICE
    assert (position_on_only_channel(rig.payer, payee), rig.payer.journal.spent(ETH, 0)) == (2 * PRICE, 2 * PRICE)
    assert {call for call in x402_calls(rig.service) if not call.endswith(" ok")} == set()


def test_attempts_of_one_request_paid_afresh_at_once_at_two_processes_get_one_answer_and_one_charge(
    devnet: Devnet,
    lane_rig: Callable[..., LaneRig],
    paid_api: PaidApis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Four attempts of one logical request (one identifier) sent at once through x402's client, each paid afresh on
    a channel of the payer's own (four are opened), at two processes of the payee sharing their kept answers: the
    attempts that arrive while the first is answered wait for it, at either process, then get its answer. One
    handler run, one price; each channel's position, at the payer, where the service has it. Before, each attempt
    on another channel was a payment of its own (the service's idempotency key is per channel), charged."""
    monkeypatch.setenv("PAID_ANSWERS", str(tmp_path / "answers.sqlite3"))
    script = ROOT / "tests" / "faulty_paid_api.py"
    rig = lane_rig("afresh", max_lanes=4, script=script)
    ((payee, one),) = rig.payees
    two = paid_api(rig.service, payee, script=script)
    x402 = paying_client(devnet, rig.scheme)
    identified_by(x402, ["order-0000000000000001"])

    async def at_once() -> list[httpx.Response]:
        async with x402HttpxClient(x402, timeout=60) as http:
            attempts: list[httpx.Response] = await asyncio.gather(
                *(http.get(f"{api}/reports/counted/afresh") for api in (one, two) * 2)
            )
            return attempts

    answers = asyncio.run(at_once())
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"runs": 1})] * 4
    assert len({a.headers["payment-response"] for a in answers}) == 1
    assert sum(httpx.get(f"{api}/runs/afresh").json()["runs"] for api in (one, two)) == 1
    assert accepted_for(rig.service, payee) == PRICE
    channels = rig.payer.open_channels(payee)
    service_positions = sorted(int(c["acceptedCumulativeAmount"]) for c in channels)
    assert service_positions == [0, 0, 0, PRICE]
    assert sorted(rig.payer.position(rig.payer.channel(c["channelId"])) for c in channels) == service_positions
    assert rig.payer.journal.spent(ETH, 0) == PRICE


def test_an_apps_own_retry_of_a_request_whose_answer_was_lost_is_one_payment_inside_one_request(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """The payee settles a paid request and its answer is lost on the way (a proxy closes the connection): the payer
    app sees a transport error and sends the request again itself. Each attempt carried an identifier of its own
    (`PaymentIdentifiers`), so the retry was a payment of its own: two prices, two handler runs, for one answer (as
    it still is outside `one_request`, below). Inside `PaymentIdentifiers.one_request()` both attempts carry one
    identifier: the retry gets the answer the first bought, one handler run, one price, and the payer's position and
    spending count it once. Connections are not kept alive here, so the transport does not send the request again
    itself (`Resending` sends only one lost on a kept-alive connection)."""
    rig = lane_rig("lost", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    x402 = paying_client(devnet, rig.scheme)
    x402.register_extension(PaymentIdentifiers())
    network = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))

    async def attempts(url: str) -> tuple[int, httpx.Response]:
        tried = 0
        async with httpx.AsyncClient(transport=paying_wire("x402", x402, rig.scheme, network), timeout=60) as http:
            while True:
                tried += 1
                try:
                    return tried, await http.get(url)
                except PaymentError as lost:  # x402's transport wraps the connection's error
                    assert tried == 1 and isinstance(lost.__cause__, httpx.RemoteProtocolError), lost

    with TcpProxy(int(api.rsplit(":", 1)[1])) as proxy:
        for name, paid in (("alone", 2 * PRICE), ("one-request", 3 * PRICE)):
            proxy.lose_answer(b"PAYMENT-SIGNATURE")
            if name == "alone":
                tried, answer = asyncio.run(attempts(f"{proxy.url}/reports/counted/{name}"))
            else:
                with PaymentIdentifiers.one_request() as identifier:
                    tried, answer = asyncio.run(attempts(f"{proxy.url}/reports/counted/{name}"))
                assert len(identifier) >= 16
            runs = 2 if name == "alone" else 1
            assert (tried, answer.status_code, answer.json()) == (2, 200, {"runs": runs})
            assert httpx.get(f"{api}/runs/{name}").json() == {"runs": runs}
            assert accepted_for(rig.service, payee) == paid
            assert (position_on_only_channel(rig.payer, payee), rig.payer.journal.spent(ETH, 0)) == (paid, paid)
        assert proxy.lost == 2
    with pytest.raises(ValueError, match="16-128"):
        with PaymentIdentifiers.one_request("too-short"):
            pass


def test_another_payment_under_an_identifier_that_bought_an_answer_is_a_409_and_buys_nothing(
    devnet: Devnet,
    lane_rig: Callable[..., LaneRig],
    accounts: list[LocalAccount],
    payer_for: Callable[..., PayerClient],
) -> None:
    """x402's rule for "same id, different payload": 409 Conflict. A payment under an identifier whose answer the
    payee keeps, for the same route and credentials, is given that answer only when the first payment's payer signed
    it for the same requirements. Another payer's payment, the payer's channel and amount signed by someone else,
    and the payer's own voucher for other requirements are each a 409 `idempotency_key_reused`: the kept answer not
    given, the handler not run, nothing settled (each then pays under an identifier of its own); 24 forgeries at
    once beside the payer's own retry change nothing for it."""
    rig = lane_rig("conflict", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path, signed_in = "/reports/counted/conflict", {"Authorization": "Bearer the-payers-own"}

    def get(payment: PaymentPayload, identifier: str) -> httpx.Response:
        return httpx.get(f"{api}{path}", headers={**signature_header(payment, identifier), **signed_in})

    first = get(next_payment(devnet, rig.payer, api, path), "order-0000000000000001")
    assert (first.status_code, first.json()) == (200, {"runs": 1})
    other = next_payment(devnet, payer_for(accounts[15], rig.service, journal="other"), api, path)
    again = next_payment(devnet, rig.payer, api, path)
    forged = again.model_copy(deep=True)
    voucher = VoucherPayload.parse(forged.payload)
    forger = VoucherSigner(Account.create(), rig.payer.domain)
    forged.payload["signature"] = "0x" + forger.sign(bytes.fromhex(voucher.channel_id[2:]), voucher.cumulative).hex()
    repriced = again.model_copy(update={"accepted": again.accepted.model_copy(update={"amount": str(2 * PRICE)})})
    for payment in (other, forged, repriced):
        conflict = get(payment, "order-0000000000000001")
        assert (conflict.status_code, conflict.json()["error"]) == (409, "idempotency_key_reused"), conflict.text
        assert "payment-response" not in conflict.headers
    assert httpx.get(f"{api}/runs/conflict").json() == {"runs": 1}
    assert accepted_for(rig.service, payee) == PRICE

    async def flood() -> list[httpx.Response]:  # the payer's own retry among 24 forgeries, all at once
        headers = {**signature_header(forged, "order-0000000000000001"), **signed_in}
        async with httpx.AsyncClient(timeout=30) as client:
            forgeries = [client.get(f"{api}{path}", headers=headers) for _ in range(24)]
            return await asyncio.gather(asyncio.to_thread(get, again, "order-0000000000000001"), *forgeries)

    retried, *forgeries = asyncio.run(flood())  # the payer's own, made afresh: the answer bought, not settled
    assert (retried.status_code, retried.content) == (200, first.content)
    assert retried.headers["payment-response"] == first.headers["payment-response"]
    assert [f.status_code for f in forgeries] == [409] * 24
    assert httpx.get(f"{api}/runs/conflict").json() == {"runs": 1}
    paid = [get(payment, f"order-{n:016d}").json() for n, payment in enumerate((other, again), start=2)]
    assert paid == [{"runs": 2}, {"runs": 3}]
    assert accepted_for(rig.service, payee) == 3 * PRICE


def test_a_route_that_requires_the_payment_identifier_answers_a_payment_without_one_400_and_runs_nothing(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """x402's rule for a route that declares the payment identifier required: a payment without one is a 400. x402's
    middleware declared it in the 402 and then took such a payment: the handler ran and the payment was charged (an
    order placed that no retry could be matched to). Now a payment with none, or with one that breaks the extension's
    rules, is a 400 `payment_identifier_required`, nothing verified, run or charged; the same voucher under an
    identifier then pays, and an x402 client that registers `PaymentIdentifiers` pays at its first try."""
    rig = lane_rig("required", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    path = "/orders/required"
    unpaid = httpx.get(f"{api}{path}")
    assert unpaid.status_code == 402
    declared = json.loads(base64.b64decode(unpaid.headers["payment-required"]))["extensions"]["payment-identifier"]
    assert declared["info"] == {"required": True}

    payment = next_payment(devnet, rig.payer, api, path)
    assert payment.extensions is not None and "id" not in payment.extensions["payment-identifier"]["info"]
    for headers in (signature_header(payment), signature_header(payment, "too-short", required=True)):
        refused = httpx.get(f"{api}{path}", headers=headers)
        assert (refused.status_code, refused.json()["error"]) == (400, "payment_identifier_required"), refused.text
    assert httpx.get(f"{api}/runs/required").json() == {"runs": 0}
    assert accepted_for(rig.service, payee) == 0

    paid = httpx.get(f"{api}{path}", headers=signature_header(payment, "order-0000000000000001", required=True))
    assert (paid.status_code, paid.json()) == (200, {"runs": 1})
    x402 = paying_client(devnet, rig.scheme)
    x402.register_extension(PaymentIdentifiers())

    async def identified() -> httpx.Response:
        async with x402HttpxClient(x402, timeout=60) as http:
            answer: httpx.Response = await http.get(f"{api}{path}")
            return answer

    answer = asyncio.run(identified())
    assert (answer.status_code, answer.json()) == (200, {"runs": 2})
    assert accepted_for(rig.service, payee) == 2 * PRICE


def test_a_restarted_payer_and_a_second_device_pay_on_without_paying_twice(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """The payer's position survives a restart (its journal, its channels found again through the service), and
    when another device of the same payer moved the channel on, the refusal resynchronises and the retry pays
    exactly the price."""
    service = spawn(f"sqlite:///{tmp_path / 'restart.db'}", wait=False)  # ready once the paid app is
    payee = accounts[16].address
    api = paid_api(service, payee)

    def get(scheme: ChannelHubClientScheme, path: str) -> int:
        async def once() -> int:
            async with x402HttpxClient(paying_client(devnet, scheme), timeout=60) as http:
                answer: httpx.Response = await http.get(f"{api}{path}")
                assert answer.status_code == 200, base64.b64decode(answer.headers["payment-required"])[:400]
                return answer.status_code

        return asyncio.run(once())

    first = payer_for(accounts[17], service)
    assert [get(ChannelHubClientScheme(first), "/weather") for _ in range(2)] == [200, 200]
    first.shutdown()
    again = payer_for(accounts[17], service)  # the same journal: a restarted app
    assert get(ChannelHubClientScheme(again), "/weather") == 200
    (channel,) = again.open_channels(payee)  # the restart found the channel: no second deposit
    assert accepted_for(service, payee) == 3 * PRICE

    other = payer_for(accounts[17], service, "other-device")
    other.pay(other.channel(channel["channelId"]), 7)  # paid through the service directly, from another journal
    assert get(ChannelHubClientScheme(again), "/weather") == 200  # stale: refused, resynchronised, paid once
    assert accepted_for(service, payee) == 4 * PRICE + 7


class CountingWire(httpx.AsyncBaseTransport):
    """The network under a client: counts the requests that reached the payee, paid or not."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append("paid" if "payment-signature" in request.headers else "unpaid")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def where_payments_are_made(payer: PayerClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """For each voucher the payer signs from now on, where: "loop" (`authorize_now` on the main thread, the event
    loop's here), "thread" (`authorize` in a worker thread), "inline" (`authorize` on the main thread: no loop)."""
    made: list[str] = []
    authorize, authorize_now = payer.authorize, payer.authorize_now

    def slow(*args: Any, **kwargs: Any) -> tuple[int, bytes]:
        made.append("inline" if threading.current_thread() is threading.main_thread() else "thread")
        return authorize(*args, **kwargs)

    def now(*args: Any, **kwargs: Any) -> tuple[int, bytes] | None:
        signed = authorize_now(*args, **kwargs)
        if signed is not None:
            made.append("loop" if threading.current_thread() is threading.main_thread() else "now in a thread")
        return signed

    monkeypatch.setattr(payer, "authorize", slow)
    monkeypatch.setattr(payer, "authorize_now", now)
    return made


def x402_calls(service: ServiceProcess) -> dict[str, float]:
    """The facilitator's calls so far, by "call answer" (its `settlement_x402_requests` metric)."""
    found = scraped(service.url, "settlement_x402_requests_total")
    return {f"{dict(labels)['call']} {dict(labels)['answer']}": value for labels, value in found.items()}


def test_paying_ahead_and_verifying_locally_cost_one_request_and_one_facilitator_call_per_payment(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the first payment to a URL, the payer pays on the first request (no unpaid request, no 402) and the
    payee verifies in its own process (settle is the only facilitator call). When the payer's position is stale (its
    other device paid meanwhile) the early payment is refused, the request goes through x402's own flow, and the
    payer is charged once."""
    service = spawn(f"sqlite:///{tmp_path / 'ahead.db'}", wait=False)  # ready once the paid app is
    payee = accounts[16].address
    api = paid_api(service, payee)
    payer = payer_for(accounts[17], service)
    made = where_payments_are_made(payer, monkeypatch)
    wire = CountingWire()
    transport = PayAheadTransport(paying_client(devnet, ChannelHubClientScheme(payer)), wire)

    async def get(times: int) -> list[int]:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            return [(await http.get(f"{api}/weather")).status_code for _ in range(times)]

    assert asyncio.run(get(10)) == [200] * 10
    assert wire.sent == ["unpaid"] + ["paid"] * 10
    assert accepted_for(service, payee) == 10 * PRICE
    assert x402_calls(service) == {"verify ok": 1.0, "settle ok": 10.0}
    # The first opens the channel in a worker thread (the chain's wait is no event loop's); the journal alone signs
    # the next nine, on the loop.
    assert made == ["thread"] + ["loop"] * 9

    async def concurrently(times: int) -> list[int]:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            answers = await asyncio.gather(*(http.get(f"{api}/weather") for _ in range(times)))
            return [a.status_code for a in answers]

    # Sixteen at once, paid ahead, none sent unpaid, each charged once. The first takes the free channel, on the
    # loop; the other fifteen find none and go to worker threads, which open channels, so the first channel is paid
    # again as soon as it is free while others open: every payment on a channel the payee has seen settled is
    # verified by the payee itself, and only each new channel's first asks the facilitator.
    (first,) = payer.open_channels(payee)
    wire.sent.clear()
    made.clear()
    assert asyncio.run(concurrently(16)) == [200] * 16
    assert wire.sent == ["paid"] * 16
    assert accepted_for(service, payee) == 26 * PRICE
    channels = payer.open_channels(payee)
    assert sum(int(c["acceptedCumulativeAmount"]) for c in channels) == 26 * PRICE
    assert x402_calls(service) == {"verify ok": float(len(channels)), "settle ok": 26.0}
    assert Counter(made) == {"loop": 1, "thread": 15}

    other = payer_for(accounts[17], service, "other-device")
    other.pay(other.channel(first["channelId"]), 7)  # the lane a lone request takes; paid from another journal
    wire.sent.clear()
    made.clear()
    assert asyncio.run(get(2)) == [200, 200]
    # The stale early payment, x402's flow, then paid ahead again. The payee's local verify passed the stale
    # voucher too (its position predates the other device's payment): the facilitator refused it at settle, after
    # the handler, so its answer was withheld and the channel forgotten, and doubted for a minute: the next two
    # verifies asked the facilitator (a payer may fail its own settles on purpose, for a handler run each time).
    assert wire.sent == ["paid", "unpaid", "paid", "paid"]
    assert accepted_for(service, payee) == 28 * PRICE + 7
    assert x402_calls(service) == {"verify ok": len(channels) + 2.0, "settle underpayment": 1.0, "settle ok": 28.0}
    assert made == ["loop"] * 3  # the stale one too (no journal knows what another device paid), then 2

    # A forger who read the channel's id off the chain: a signature not the payer's, on a channel the payee knows, is
    # refused by the payee itself (`invalid_signature`, as the facilitator would), which never sees it.
    required = requirements_of(paying_client(devnet, ChannelHubClientScheme(payer)), f"{api}/weather").accepts[0]
    voucher = {"channelId": first["channelId"], "cumulativeAmount": str(10**15), "signature": "0x" + "11" * 64 + "1b"}
    forged = encode_payment_signature_header(PaymentPayload(x402_version=2, payload=voucher, accepted=required))
    refused = httpx.get(f"{api}/weather", headers={"PAYMENT-SIGNATURE": forged})
    assert refused.status_code == 402
    assert json.loads(base64.b64decode(refused.headers["payment-required"]))["error"] == "invalid_signature"
    assert x402_calls(service) == {"verify ok": len(channels) + 2.0, "settle underpayment": 1.0, "settle ok": 28.0}

    # x402's sync client (requests) has no loop: the payment is made inline, as it always was.
    sync_payer = payer_for(accounts[15], service, "sync")
    sync_x402 = paying_client(devnet, ChannelHubClientScheme(sync_payer), kind=x402ClientSync)
    made_inline = where_payments_are_made(sync_payer, monkeypatch)
    with x402_requests(sync_x402) as session:
        assert [session.get(f"{api}/weather", timeout=60).status_code for _ in range(2)] == [200, 200]
    assert made_inline == ["inline", "inline"]
    assert accepted_for(service, payee) == 30 * PRICE + 7


def test_a_voucher_is_signed_from_the_journal_alone_only_where_authorize_would_ask_no_one(
    spawn: Callable[..., ServiceProcess],
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """`PayerClient.authorize_now`, what an x402 payer signs on its event loop, signs the very voucher `authorize`
    would, under the same budgets; and signs nothing, journals nothing, where `authorize` would first ask the service
    or the chain (no position of the channel in this journal, a payment of unknown fate on it), where the voucher
    would pass the deposit (a top-up first), while another thread pays on the channel or is in the journal (the loop
    would wait for its commit), when the journal's once-a-minute tidy-up is due (a DELETE of up to a minute of
    payments: a worker thread's), or when its commits on the loop say the disk is too slow for them (`LoopCommits`)."""
    service = spawn(f"sqlite:///{tmp_path / 'now.db'}")
    payer = payer_for(accounts[12], service)
    other = payer_for(accounts[12], service, "other-device")  # the same payer with a journal of its own
    channel = payer.open_channel(Account.create().address, 3 * PRICE)
    elsewhere = other.open_channel(Account.create().address, 3 * PRICE)  # never seen by `payer`'s journal
    for client, opened in ((payer, channel), (other, elsewhere)):
        client.wait_until_known(opened, min_deposit=3 * PRICE)

    def nothing_signed(key: str, amount: int = PRICE, budgets: list[Budget] | None = None) -> bool:
        found = payer.authorize_now(channel, amount, key, budgets or [], within=3 * PRICE)
        return found is None and payer.journal.payment(key) is None

    # The first through `authorize`, as a worker thread pays it: the tidy-up a new journal owes is done with it.
    assert payer.authorize(channel, PRICE, "first") == (PRICE, payer.signer.sign(channel.channel_id, PRICE))
    assert nothing_signed("second")  # "first"'s fate is unknown
    payer.concluded(channel, "first", {})
    on_elsewhere = payer.authorize_now(payer.channel(elsewhere.hex_id), PRICE, "third", within=3 * PRICE)
    assert (on_elsewhere, payer.journal.signed(elsewhere.hex_id)) == (None, None)  # the service's to say
    with pytest.raises(BudgetExceededError):  # 2 prices spent in the hour would pass a budget of 1
        payer.authorize_now(channel, PRICE, "second", [Budget(limit=PRICE, period=3600)], within=3 * PRICE)
    assert payer.journal.payment("second") is None
    assert nothing_signed("second", 3 * PRICE)  # 4 prices: past the deposit
    with payer._lock(channel):  # another thread paying on the channel (resynchronising, say)
        assert nothing_signed("second")
    with payer.journal._lock:  # another thread in the journal (a commit waiting for the disk)
        assert payer.authorize_now(channel, PRICE, "second", within=3 * PRICE) is None
    assert payer.journal.payment("second") is None
    clock = payer.journal.clock
    payer.journal.clock = lambda: clock() + PRUNE_EVERY  # a minute on: the tidy-up is due
    assert nothing_signed("second")
    payer.journal.clock = clock
    # The disk too slow for a commit on the loop: a commit of any length counts as slow, and none probes this hour.
    payer.loop_commits = LoopCommits(limit=0.0, seen=1, probe_every=3600.0)
    assert payer.authorize_now(channel, PRICE, "second", within=3 * PRICE) == (
        2 * PRICE,
        payer.signer.sign(channel.channel_id, 2 * PRICE),
    )
    payer.concluded(channel, "second", {})
    assert nothing_signed("third")  # the commit just made was timed: slow, a worker thread's from now on
    payer.loop_commits = LoopCommits()
    assert payer.authorize_now(channel, PRICE, "third", within=3 * PRICE) == (
        3 * PRICE,
        payer.signer.sign(channel.channel_id, 3 * PRICE),
    )
    with pytest.raises(ValueError, match="positive int"):
        payer.authorize_now(channel, 0, "fourth", within=3 * PRICE)


def test_a_payment_made_ahead_at_an_old_price_charges_nothing_and_the_new_price_is_paid_once(
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """The payee doubles its price on the same URL: the payment made ahead at the old price is refused (402, not
    charged), x402's flow pays the new price, and the next request is paid ahead at the new price."""
    service = spawn(f"sqlite:///{tmp_path / 'reprice.db'}", wait=False)  # ready once the paid app is
    payee = accounts[14].address
    api = paid_api(service, payee)
    wire = CountingWire()
    transport = PayAheadTransport(paying_client(devnet, ChannelHubClientScheme(payer_for(accounts[15], service))), wire)

    async def get(times: int) -> list[int]:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            return [(await http.get(f"{api}/weather")).status_code for _ in range(times)]

    assert asyncio.run(get(2)) == [200, 200]
    assert accepted_for(service, payee) == 2 * PRICE
    paid_api.reprice(api, 2 * PRICE)
    wire.sent.clear()
    assert asyncio.run(get(2)) == [200, 200]
    assert wire.sent == ["paid", "unpaid", "paid", "paid"]  # the old price refused, x402's flow, then ahead again
    assert accepted_for(service, payee) == 2 * PRICE + 2 * (2 * PRICE)


def test_a_payer_paying_ahead_over_aiohttps_pool_is_charged_once_per_response_sixteen_at_once(
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """The wire docs/x402.md advises for a payer with many requests in flight (aiohttp's pool under httpx's API):
    the same payments as over httpx's own pool, and its session closed with the client (an open one would warn)."""
    service = spawn(f"sqlite:///{tmp_path / 'aiohttp.db'}", wait=False)  # ready once the paid app is
    payee = accounts[16].address
    api = paid_api(service, payee)
    wire = CountingWire(AiohttpTransport())
    transport = PayAheadTransport(paying_client(devnet, ChannelHubClientScheme(payer_for(accounts[17], service))), wire)

    async def first_then_sixteen_at_once() -> list[int]:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            first = await http.get(f"{api}/weather")
            answers = await asyncio.gather(*(http.get(f"{api}/weather") for _ in range(16)))
            return [first.status_code] + [a.status_code for a in answers]

    assert asyncio.run(first_then_sixteen_at_once()) == [200] * 17
    assert wire.sent == ["unpaid"] + ["paid"] * 17  # the first learned the price; the sixteen were paid ahead
    assert accepted_for(service, payee) == 17 * PRICE


def test_a_payment_on_a_free_channel_does_not_wait_behind_channels_being_opened(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """Payments that need a new channel wait for its deposit, one at a time; a payment that has a free channel must
    not wait with them. Here as many payments to a second payee wait for their first channels (the payer's
    `open_channel` gated) as the event loop's default pool has threads (min(32, cores + 4)): in that pool a payment to
    the first payee, whose channel is free, got no thread until the openings ended."""
    openers = min(32, (os.cpu_count() or 1) + 4)
    rig = lane_rig("lanes", payees=2, max_lanes=openers + 2)
    service, payer, scheme = rig.service, rig.payer, rig.scheme
    (first_payee, first), (second_payee, second) = rig.payees

    async def scenario() -> tuple[int, bool, list[int]]:
        async with x402HttpxClient(paying_client(devnet, scheme), timeout=120) as http:
            assert (await http.get(f"{first}/weather")).status_code == 200  # the first payee's channel, now free
            gate, opening = gate_calls(payer, "open_channel")
            waiting = [asyncio.create_task(http.get(f"{second}/weather")) for _ in range(openers)]
            try:
                await asyncio.to_thread(opening.acquire, timeout=60)  # one is opening; the rest wait for it
                probe = await asyncio.wait_for(http.get(f"{first}/weather"), timeout=30)
                gate_was_shut = not gate.is_set()
            finally:
                gate.set()  # a failure must not leave the openings (and asyncio.run's pool) waiting
            return probe.status_code, gate_was_shut, [a.status_code for a in await asyncio.gather(*waiting)]

    probe, gate_was_shut, waited = asyncio.run(scenario())
    assert (probe, gate_was_shut) == (200, True)  # paid on its free channel while every opening still waited
    assert waited == [200] * openers
    assert accepted_for(service, first_payee) == 2 * PRICE
    assert accepted_for(service, second_payee) == openers * PRICE


def test_a_channel_being_opened_is_one_lane_not_two(devnet: Devnet, lane_rig: Callable[..., LaneRig]) -> None:
    """The first payments to a payee find the payer's earlier channels at the service. One payment's new channel is
    held here after the service counts it and before the payment lists it as its lane: a second payment then must
    not find that channel too. Before, it did: two lanes on one channel, paying at once, and the lane released twice
    was never the other, so with `max_lanes=2` two payments at once were refused from then on."""
    rig = lane_rig("discover")
    service, payer, scheme = rig.service, rig.payer, rig.scheme
    ((payee, api),) = rig.payees

    async def scenario() -> tuple[list[int], list[int]]:
        async with x402HttpxClient(paying_client(devnet, scheme), timeout=120) as http:
            gate, known = gate_calls(payer, "wait_until_known", after=True)  # counted by the service, not yet a lane
            opening = asyncio.create_task(http.get(f"{api}/weather"))
            try:
                await asyncio.to_thread(known.acquire, timeout=60)
                second = asyncio.create_task(http.get(f"{api}/weather"))
                await asyncio.sleep(1)  # time for the second to take a lane, had it found one
            finally:
                gate.set()
            first = [a.status_code for a in await asyncio.gather(opening, second)]
            pairs = [await asyncio.gather(*(http.get(f"{api}/weather") for _ in range(2))) for _ in range(3)]
            return first, [a.status_code for pair in pairs for a in pair]

    first, after = asyncio.run(scenario())
    assert (first, after) == ([200, 200], [200] * 6)
    assert len(payer.open_channels(payee)) == 2  # one channel per lane: the second payment opened its own
    assert accepted_for(service, payee) == 8 * PRICE


def test_channels_being_opened_count_against_max_lanes(devnet: Devnet, lane_rig: Callable[..., LaneRig]) -> None:
    """`max_lanes` bounds the channels (and deposits) a payer opens to one payee. Four first payments at once with
    `max_lanes=2`: two open channels (held here at the gate), two are refused at once. Before, all four saw no lane
    yet and each opened one: four deposits locked against a limit of two."""
    rig = lane_rig("max-lanes")
    service, payer, scheme = rig.service, rig.payer, rig.scheme
    ((payee, api),) = rig.payees
    gate, _ = gate_calls(payer, "open_channel")

    async def scenario() -> tuple[list[str], list[int]]:
        async with x402HttpxClient(paying_client(devnet, scheme), timeout=120) as http:
            tasks = [asyncio.create_task(http.get(f"{api}/weather")) for _ in range(4)]
            try:
                refused, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                while len(refused) < 2:
                    more, _ = await asyncio.wait(set(tasks) - refused, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                    assert more, "fewer than two payments were refused while two channels were being opened"
                    refused |= more
            finally:
                gate.set()
            errors = [str(t.exception()) for t in tasks if t in refused]
            paid = [(await t).status_code for t in tasks if t not in refused]
            return errors, paid

    errors, paid = asyncio.run(scenario())
    assert errors == [f"Failed to handle payment: 2 payments to {payee} are in flight already (max_lanes)"] * 2
    assert paid == [200, 200]
    assert len(payer.open_channels(payee)) == 2
    assert accepted_for(service, payee) == 2 * PRICE


def test_an_open_whose_receipt_was_never_read_is_paid_on_once_mined_not_opened_again(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], tmp_path: Path, mining: str
) -> None:
    """The payer's node goes out of reach between taking a channel's open and answering for its receipt: that
    payment fails, the client not knowing whether the channel exists. It was mined: the hub holds it, the payer's
    deposit in it. The client never paid on it (until a restart found it at the service) and the next payment opened
    another beside it, a deposit and an open's gas more. Now the next payment looks for it on the hub first (the
    channel's id is known before its open is sent), and pays on it."""
    rig = lane_rig("unread-open")
    ((payee, api),) = rig.payees
    with payer_through_a_proxy(devnet, rig, tmp_path / "unread.sqlite3") as (node, payer):
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100, follow_hint=False))
        # The open sent and mined (automine), then the node cut before its receipt is read.
        failure = failed_payment_across(
            devnet, scheme, f"{api}/weather", gate_calls(payer.transactor, "wait"), node.cut
        )
        node.mend()
        assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(2)] == [200, 200]
    assert re.fullmatch(UNREAD_RECEIPT, failure), failure
    (channel,) = rig.payer.open_channels(payee)  # the code before: two channels, the first never paid on
    assert int(channel["deposit"]) == 100 * PRICE
    assert accepted_for(rig.service, payee) == 2 * PRICE


def test_an_open_whose_sending_went_unanswered_is_paid_on_once_mined_not_opened_again(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], tmp_path: Path, mining: str
) -> None:
    """The payer's node took a channel's open and its answer to the sending was lost (the connection closed on the
    way): that payment failed with requests' own error, and the client, never told a transaction had left, took the
    open as never made: the next payment opened another channel beside it, a deposit more locked. Now the sending's
    nonce is noted as taken (`ChainUnavailableError`: "it may have reached the node"), the next payment looks for the
    channel on the hub first, and pays on it."""
    rig = lane_rig("unanswered-send")
    ((payee, api),) = rig.payees
    with payer_through_a_proxy(devnet, rig, tmp_path / "unanswered-send.sqlite3") as (node, payer):
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100, follow_hint=False))
        node.lose_answer(b"eth_sendRawTransaction")
        with pytest.raises(PaymentError) as lost:
            paid_get(devnet, scheme, f"{api}/weather")
        assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(2)] == [200, 200]
    (channel,) = rig.payer.open_channels(payee)  # the code before: two channels, the first never paid on
    assert int(channel["deposit"]) == 100 * PRICE
    assert accepted_for(rig.service, payee) == 2 * PRICE
    assert node.lost == 1
    assert re.fullmatch(
        rf"Failed to handle payment: a transaction from {payer.address} \(nonce \d+\) was being sent, and the chain's "
        r"RPC did not answer \(ConnectionError\): it may have reached the node, and be mined yet",
        str(lost.value),
    ), lost.value


def test_a_top_up_whose_receipt_was_never_read_is_counted_once_mined_not_made_again(
    devnet: Devnet, w3: Web3, lane_rig: Callable[..., LaneRig], tmp_path: Path, mining: str
) -> None:
    """The payer's node goes out of reach between taking a top-up and answering for its receipt: that payment fails,
    the client not knowing whether the deposit grew. It did: the top-up was mined. The client kept its old figure of
    the deposit, and the next payment topped the channel up again: more of the payer's money locked than its policy
    asks. Now the next payment reads the deposit from the hub once the top-up's nonce is mined, and pays on it."""
    rig = lane_rig("unread-top-up")
    ((payee, api),) = rig.payees
    with payer_through_a_proxy(devnet, rig, tmp_path / "unread-top-up.sqlite3") as (node, payer):
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=1, follow_hint=False))
        assert paid_get(devnet, scheme, f"{api}/weather") == 200  # a channel of one price, used up
        # The next payment tops it up by a price; the top-up is sent and mined, then the node is cut.
        failure = failed_payment_across(
            devnet, scheme, f"{api}/weather", gate_calls(payer.transactor, "wait"), node.cut
        )
        node.mend()
        assert paid_get(devnet, scheme, f"{api}/weather") == 200
    assert re.fullmatch(UNREAD_RECEIPT, failure), failure
    wallet = rig.payer.account.address
    wait_until(lambda: w3.eth.get_transaction_count(wallet, "pending") == w3.eth.get_transaction_count(wallet))
    (channel,) = rig.payer.open_channels(payee)
    on_chain = w3.eth.contract(address=rig.payer.hub.address, abi=rig.payer.hub.abi).functions.channel
    assert on_chain(bytes.fromhex(channel["channelId"][2:])).call()[ChannelViewField.DEPOSIT] == 2 * PRICE
    # the code before: 3 prices, a second top-up
    assert accepted_for(rig.service, payee) == 2 * PRICE


def test_a_top_up_that_left_the_pool_unmined_is_made_again_on_its_nonce(
    devnet: Devnet, w3: Web3, lane_rig: Callable[..., LaneRig], tmp_path: Path
) -> None:
    """A top-up of unknown outcome (its receipt never read) that then left the node's pool unmined (dropped; a node
    restarted without it): its nonce is never used. The next payment on its channel waited for that nonce for
    `confirm_timeout` and failed, and so did every later one on it; and the next transaction, numbered after the
    lost one, would never be mined. Now a nonce the node no longer holds is given up, the deposit taken as it was,
    and the next top-up is numbered from the node's count: mined, and the payment made."""
    rig = lane_rig("dropped-top-up")
    ((payee, api),) = rig.payees
    with payer_through_a_proxy(devnet, rig, tmp_path / "dropped-top-up.sqlite3") as (node, payer):
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=1, follow_hint=False), confirm_timeout=2)
        assert paid_get(devnet, scheme, f"{api}/weather") == 200  # a channel of one price, used up
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
        try:

            def lost() -> None:  # the top-up sent, then the node cut and the top-up gone from its pool
                node.cut()
                w3.provider.make_request(RPCEndpoint("anvil_dropAllTransactions"), [])

            failure = failed_payment_across(
                devnet, scheme, f"{api}/weather", gate_calls(payer.transactor, "wait"), lost
            )
        finally:
            w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
        node.mend()
        assert paid_get(devnet, scheme, f"{api}/weather") == 200  # the code before: it failed, and each after it
    assert re.fullmatch(UNREAD_RECEIPT, failure), failure
    (channel,) = rig.payer.open_channels(payee)
    on_chain = w3.eth.contract(address=rig.payer.hub.address, abi=rig.payer.hub.abi).functions.channel
    assert on_chain(bytes.fromhex(channel["channelId"][2:])).call()[ChannelViewField.DEPOSIT] == 2 * PRICE
    assert accepted_for(rig.service, payee) == 2 * PRICE


@pytest.mark.parametrize("made", ["open", "top-up"])
def test_what_a_transaction_of_unknown_outcome_did_is_read_at_a_block_that_holds_it(
    devnet: Devnet, w3: Web3, lane_rig: Callable[..., LaneRig], tmp_path: Path, made: str, mining: str
) -> None:
    """An open (a top-up) whose receipt was never read, mined after all: the next payment reads what it did once its
    nonce is used. Behind a provider's balancer the hub's view came from a node behind the one that counted the nonce,
    as of a block before the transaction: the open was taken as never made and another channel opened beside it (the
    top-up as not counted and made again), a deposit more of the payer's money locked. Now the view is read at the
    block by which the nonce was counted: a node without that block refuses, the payment fails (retryable), and the
    next one, the node caught up, pays on what the transaction did."""
    rig = lane_rig(f"lagging-{made}")
    ((payee, api),) = rig.payees
    methods = frozenset({"eth_call"})
    with (
        LaggingRpc(devnet.url, methods) as balancer,
        payer_through_a_proxy(devnet, rig, tmp_path / "lagging.sqlite3", rpc=balancer.url) as (node, payer),
    ):
        multiple = 100 if made == "open" else 1
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=multiple, follow_hint=False), confirm_timeout=10)
        if made == "top-up":
            assert paid_get(devnet, scheme, f"{api}/weather") == 200  # a channel of one price, used up
        balancer.at = w3.eth.block_number  # the hub's reads now reach a node that stays at this block
        failure = failed_payment_across(
            devnet, scheme, f"{api}/weather", gate_calls(payer.transactor, "wait"), node.cut
        )
        node.mend()
        with pytest.raises(PaymentError) as behind:  # the code before: paid, on a second channel (a second top-up)
            paid_get(devnet, scheme, f"{api}/weather")
        balancer.at = None  # the node caught up
        assert paid_get(devnet, scheme, f"{api}/weather") == 200
    assert re.fullmatch(UNREAD_RECEIPT, failure), failure
    (channel,) = rig.payer.open_channels(payee)
    assert str(behind.value) == (
        f"Failed to handle payment: reading what became of the {made} of channel {channel['channelId']}: the chain's "
        "RPC refused ({'code': -32000, 'message': 'header not found'})"
    )
    assert balancer.unknown == 1
    assert int(channel["deposit"]) == (100 if made == "open" else 2) * PRICE
    assert accepted_for(rig.service, payee) == (1 if made == "open" else 2) * PRICE


def test_a_restarted_payer_checks_its_channels_at_the_block_the_service_lists_them_at(
    lane_rig: Callable[..., LaneRig], devnet: Devnet, w3: Web3, payer_for: Callable[..., PayerClient]
) -> None:
    """After a restart x402's client checks each channel the service lists on the hub. Behind a provider's balancer
    the check reached a node behind the channel's opening, at "latest": the hub had no such channel there, and the
    payment failed with `service_untrusted` (the service listed a channel that is not the payer's), a false alarm
    that tells an app to stop trusting its service. The hub is read at the block the listing is current to
    (`asOfBlock`): a node without it refuses (a chain error, retryable), and once it caught up the payer pays on."""
    rig = lane_rig("lagging-discovery")
    ((payee, api),) = rig.payees
    before = w3.eth.block_number
    assert paid_get(devnet, rig.scheme, f"{api}/weather") == 200  # its channel opened
    (listed,) = rig.payer.open_channels(payee)
    rig.payer.shutdown()
    with LaggingRpc(devnet.url, frozenset({"eth_call"})) as balancer:
        again = payer_for(rig.payer.account, rig.service, rpc_url=balancer.url)  # the same journal: restarted
        scheme = ChannelHubClientScheme(again, DepositPolicy(multiple=100))
        balancer.at = before  # the hub's reads reach a node still at the block before the opening
        with pytest.raises(PaymentError) as behind:
            paid_get(devnet, scheme, f"{api}/weather")
        balancer.at = None  # the node caught up
        assert paid_get(devnet, scheme, f"{api}/weather") == 200
    assert str(behind.value) == (
        "Failed to handle payment: reading a channel from the hub: the chain's RPC refused ({'code': -32000, "
        "'message': 'header not found'})"
    )
    assert balancer.unknown == 1
    assert [c["channelId"] for c in again.open_channels(payee)] == [listed["channelId"]]
    assert accepted_for(rig.service, payee) == 2 * PRICE


def test_a_restarted_payer_finds_its_channel_through_an_rpc_that_caps_log_ranges(
    lane_rig: Callable[..., LaneRig], devnet: Devnet, w3: Web3, payer_for: Callable[..., PayerClient]
) -> None:
    """After a restart x402's client learns its channels from the service and checks each against the hub. It read a
    channel's salt from its ChannelOpened log, searched from block 0: a provider that caps `eth_getLogs` ranges (most
    do) refused that, and the restarted payer could pay no more, each payment failing with the RPC's error. The
    listing's salt is taken now, checked (with the parties the hub holds it must hash to the channel's id), and no
    log is searched. A listing whose salt names another channel, or is no salt, is the service's word, not taken; nor
    is one whose `asOfBlock` (the block the hub is read at) is no block, or a block before the channel's opening."""
    rig = lane_rig("capped-logs")
    ((payee, api),) = rig.payees
    assert paid_get(devnet, rig.scheme, f"{api}/weather") == 200  # its channel opened
    (listed,) = rig.payer.open_channels(payee)
    rig.payer.shutdown()
    w3.provider.make_request(RPCEndpoint("anvil_mine"), [hex(100)])  # the chain goes on: its opening 100 blocks back
    with RangeCappedRpc(devnet.url, max_blocks=16) as capped:
        again = payer_for(rig.payer.account, rig.service, rpc_url=capped.url)  # the same journal: restarted
        assert paid_get(devnet, ChannelHubClientScheme(again, DepositPolicy(multiple=100)), f"{api}/weather") == 200
    assert capped.ranges == []  # the code before: blocks 0..head asked, refused, and the payment failed
    assert [c["channelId"] for c in again.open_channels(payee)] == [listed["channelId"]]
    assert accepted_for(rig.service, payee) == 2 * PRICE

    def refused(scheme: ChannelHubClientScheme) -> str:
        async def pay() -> str:
            async with x402HttpxClient(paying_client(devnet, scheme), timeout=60) as http:
                with pytest.raises(PaymentError) as failed:
                    await http.get(f"{api}/weather")
                return str(failed.value)

        return asyncio.run(pay())

    cid = listed["channelId"]
    for field, value, expected in (
        (
            "salt",
            "0x" + "00" * 31 + "01",
            f"the service lists {cid} among this payer's: salt 0x{'00' * 31}01 does not name channel {cid}",
        ),
        ("salt", None, "the service's salt is not a 32-byte salt: 'None'"),
        ("asOfBlock", -1, "the service's asOfBlock is not a block number: '-1'"),
        (
            "asOfBlock",
            str(listed["asOfBlock"]),
            f"the service's asOfBlock is not a block number: '{listed['asOfBlock']}'",
        ),
        (
            "asOfBlock",
            0,
            f"the service lists {cid} among this payer's: hub {rig.payer.hub.address} holds no code at block 0",
        ),
    ):

        def rewrite(path: str, data: Any, field: str = field, value: Any = value) -> Any:
            if path == "/v1/channels":
                return {**data, "items": [{**item, field: value} for item in data["items"]]}
            return data

        with TamperingProxy(rig.service.url, rewrite) as proxy:
            told = payer_for(rig.payer.account, proxy.url, journal=f"told-{field}-{value}")
            failure = refused(ChannelHubClientScheme(told))
        assert failure == f"Failed to handle payment: {expected}"
    assert accepted_for(rig.service, payee) == 2 * PRICE
    assert [c["channelId"] for c in again.open_channels(payee)] == [cid]  # nothing opened beside it


def test_a_top_up_the_chain_refused_frees_its_channel_for_the_next_payment(
    devnet: Devnet, w3: Web3, lane_rig: Callable[..., LaneRig], mining: str
) -> None:
    """A channel that cannot cover the next price is topped up first; here the top-up is refused (the payer's wallet
    emptied: nothing to pay the deposit or the gas with), and that payment fails. It left the channel held as if its
    payment were in flight, for `lane_timeout` (120 s), so once the wallet was funded again the next payment opened a
    second channel beside it: a second deposit and an open's gas, one per such failure. Now the channel is freed, and
    the next payment tops it up and pays on it."""
    rig = lane_rig("top-up-refused")
    ((payee, api),) = rig.payees
    scheme = ChannelHubClientScheme(rig.payer, DepositPolicy(multiple=2, follow_hint=False), max_lanes=2)
    assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(2)] == [200, 200]  # the deposit of 2 prices spent
    wallet = Web3.to_checksum_address(rig.payer.address)
    funds = w3.eth.get_balance(wallet)
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [wallet, "0x0"])
    with pytest.raises(PaymentError) as refused:
        paid_get(devnet, scheme, f"{api}/weather")
    assert str(refused.value) == (
        f"Failed to handle payment: the chain's node refused a transaction from {wallet}: Insufficient funds for gas * "
        "price + value (the account holds 0 wei; a transaction's gas is paid in ETH from the account sending it)"
    )
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [wallet, hex(funds)])

    assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(2)] == [200, 200]
    (channel,) = rig.payer.open_channels(payee)  # the code before: two channels, the first held
    assert int(channel["deposit"]) == 4 * PRICE  # topped up once, by the policy's 2 prices
    assert accepted_for(rig.service, payee) == 4 * PRICE


def test_a_new_channel_the_service_had_not_counted_in_time_is_paid_on_next_not_opened_again(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], tmp_path: Path, mining: str
) -> None:
    """A payment that opened a channel waits for the service to count its deposit (confirmed) before it pays on it.
    Here the payer's link to the service is cut as the channel is opened, and the wait gives up (`confirm_timeout`):
    that payment fails. The channel was then forgotten by the client, its deposit locked in it, and the next payment
    opened another: a deposit and an open's gas for each payment made while the service was out of reach. Now the
    channel is the payer's lane from the moment it is on chain: the next payment waits for the service's count
    again, and pays on it."""
    rig = lane_rig("uncounted")
    ((payee, api),) = rig.payees
    with TcpProxy(rig.service.port) as proxy:
        key = HexBytes(rig.payer.account.key).to_0x_hex()
        payer = PayerClient(key, devnet.url, proxy.url, state_path=tmp_path / "proxied.sqlite3", retries=1)
        try:
            scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100, follow_hint=False), confirm_timeout=1)
            # The channel on chain, then the service out of the payer's reach.
            opened = gate_calls(payer, "open_channel", after=True)
            failure = failed_payment_across(devnet, scheme, f"{api}/weather", opened, proxy.cut)
            proxy.mend()
            assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(2)] == [200, 200]
        finally:
            payer.shutdown()
    (channel,) = rig.payer.open_channels(payee)  # the code before: two channels, the first forgotten
    assert failure.startswith(
        f"Failed to handle payment: the service does not count {channel['channelId']} with a deposit of at least "
        f"{100 * PRICE} after 1s; its last answer: [service_unavailable] "
    ), failure
    assert int(channel["deposit"]) == 100 * PRICE
    assert accepted_for(rig.service, payee) == 2 * PRICE


class CountingAdapter(PayAheadAdapter):
    """PayAheadAdapter that counts the requests that reached the payee, paid or not (every answer off the wire
    passes through build_response, x402's own retries included)."""

    def __init__(self, client: x402ClientSync) -> None:
        super().__init__(client)
        self.sent: list[str] = []

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        self.sent.append("paid" if "payment-signature" in req.headers else "unpaid")
        return super().build_response(req, resp)


def test_the_sync_client_pays_ahead_too_and_falls_back_to_x402s_flow_without_paying_twice(
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """x402's sync client (requests) with PayAheadAdapter: after the first 402 a URL is paid on the first request;
    a stale position (another device paid) and a doubled price each cost one refused early payment (not charged) and
    x402's flow, never a second charge."""
    service = spawn(f"sqlite:///{tmp_path / 'sync-ahead.db'}", wait=False)  # ready once the paid app is
    payee = accounts[14].address
    api = paid_api(service, payee)
    payer = payer_for(accounts[13], service)
    adapter = CountingAdapter(paying_client(devnet, ChannelHubClientScheme(payer), kind=x402ClientSync))
    session = requests.Session()
    session.mount("http://", adapter)

    def get(times: int) -> list[int]:
        return [session.get(f"{api}/weather", timeout=60).status_code for _ in range(times)]

    assert get(4) == [200] * 4
    assert adapter.sent == ["unpaid", "paid"] + ["paid"] * 3  # x402's flow once, then paid ahead
    assert accepted_for(service, payee) == 4 * PRICE
    assert x402_calls(service) == {"verify ok": 1.0, "settle ok": 4.0}

    (channel,) = payer.open_channels(payee)
    other = payer_for(accounts[13], service, "other-device")
    other.pay(other.channel(channel["channelId"]), 7)
    adapter.sent.clear()
    assert get(2) == [200, 200]
    assert adapter.sent == ["paid", "unpaid", "paid", "paid"]  # stale: refused at settle, x402's flow, ahead again
    assert accepted_for(service, payee) == 6 * PRICE + 7

    paid_api.reprice(api, 2 * PRICE)
    adapter.sent.clear()
    assert get(2) == [200, 200]
    assert adapter.sent == ["paid", "unpaid", "paid", "paid"]  # the old price refused, x402's flow, ahead again
    assert accepted_for(service, payee) == 6 * PRICE + 7 + 2 * (2 * PRICE)

    # Eight threads on the one session at once: all paid ahead, each charged once.
    adapter.sent.clear()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: session.get(f"{api}/weather", timeout=60).status_code, range(8)))
    assert answers == [200] * 8
    assert adapter.sent == ["paid"] * 8
    assert accepted_for(service, payee) == 6 * PRICE + 7 + 10 * (2 * PRICE)
    session.close()


@dataclass(frozen=True)
class ProxiedPayee:
    """A service, the example app of `payee` reaching it (its facilitator) through `proxy`, and a payer's scheme."""

    service: ServiceProcess
    proxy: TcpProxy
    payee: str
    api: str
    scheme: ChannelHubClientScheme


@pytest.fixture
def proxied_payee(
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> Iterator[Callable[..., ProxiedPayee]]:
    """Factory: proxied_payee(payee, payer, outage=None, script=EXAMPLE_APP) -> a ProxiedPayee of devnet accounts
    `payee` and `payer` (indexes), its proxy in `outage` ("refused", "held", "host down") before the app starts when
    given; the payer's lanes are freed 0.5 s after a paid request got no payment answer. Its proxies are closed after
    the test."""
    proxies: list[TcpProxy] = []

    def make(payee: int, payer: int, outage: str | None = None, script: Path = EXAMPLE_APP) -> ProxiedPayee:
        service = spawn(f"sqlite:///{tmp_path / f'proxied-{payee}.db'}", wait=False)  # ready once the paid app is
        proxy = TcpProxy(service.port)
        proxies.append(proxy)
        proxy.mend()  # forwarding
        if outage is not None:
            start_outage(proxy, outage)
        api = paid_api(service, accounts[payee].address, facilitator=proxy.url, script=script)
        scheme = ChannelHubClientScheme(payer_for(accounts[payer], service), lane_timeout=0.5)
        return ProxiedPayee(service, proxy, accounts[payee].address, api, scheme)

    yield make
    for proxy in proxies:
        proxy.cut()


BAD_GATEWAY_PAGE = (
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 28\r\nconnection: close\r\n\r\n"
    b"<html>502 Bad Gateway</html>"
)


def start_outage(proxy: TcpProxy, outage: str) -> None:
    {"refused": proxy.cut, "held": proxy.hold, "host down": proxy.drop}[outage]()


@pytest.mark.parametrize("outage", ["service killed", "host down"])
def test_the_facilitator_down_is_a_503_and_charges_nothing(
    devnet: Devnet, proxied_payee: Callable[..., ProxiedPayee], outage: str
) -> None:
    """Never a 402 (which would make the payer pay again) when the facilitator cannot judge: a 503 to retry, and the
    voucher of that request is not charged, also once the facilitator is back. A facilitator host that is down
    (connection attempts get no answer at all: `TcpProxy.drop`) held each paid request for x402's whole timeout (90
    s) before the 503: the payee's client now gives up connecting after CONNECT_TIMEOUT (3 s); the payer's client
    here waits 30 s (before, it timed out)."""
    rig = proxied_payee(16, 18)

    async def get() -> httpx.Response:
        async with x402HttpxClient(paying_client(devnet, rig.scheme), timeout=30) as http:
            return cast(httpx.Response, await http.get(f"{rig.api}/weather"))

    assert asyncio.run(get()).status_code == 200
    if outage == "service killed":
        rig.service.kill()
    else:
        start_outage(rig.proxy, outage)
    down = asyncio.run(get())
    assert (down.status_code, down.headers["retry-after"], down.json()["error"]) == (
        503,
        "1",
        "facilitator_unavailable",
    )
    if outage == "service killed":
        rig.service.start()  # back on the same port, with the same store
    else:
        rig.proxy.mend()
    time.sleep(0.6)  # the unanswered payment's lane times out; its fate is then looked up, not assumed
    assert asyncio.run(get()).status_code == 200
    assert accepted_for(rig.service, rig.payee) == 2 * PRICE  # two responses, two prices: the 503 was not charged


@pytest.mark.parametrize("instead", [b"", BAD_GATEWAY_PAGE], ids=["closed", "bad gateway"])
@pytest.mark.parametrize("one_by_one", [False, True])
def test_a_settle_whose_answer_was_lost_is_sent_again_and_the_payer_gets_what_it_paid_for(
    devnet: Devnet,
    proxied_payee: Callable[..., ProxiedPayee],
    monkeypatch: pytest.MonkeyPatch,
    one_by_one: bool,
    instead: bytes,
) -> None:
    """The facilitator accepts a payment and its answer is lost on the way to the payee (a connection reset, a proxy's
    idle close racing the answer, a proxy's 502 in its place): the payee answered 503 ("retry, nothing charged"), and
    the payer, whose voucher the service holds, was charged for a response it never got. The payee sends that settle
    batch (or, settling one payment a `/settle`, that settle) again, marked `resend`, and the facilitator answers a
    payment the first send got accepted as accepted: the paid request is served, charged once, and the payer's next
    payments build on it."""
    if one_by_one:
        monkeypatch.setenv("SETTLE_ONE_BY_ONE", "1")
    rig = proxied_payee(16, 18, script=ROOT / "tests" / "faulty_paid_api.py")

    async def paid() -> tuple[int, bool]:
        async with x402HttpxClient(paying_client(devnet, rig.scheme), timeout=30) as http:
            answer = await http.get(f"{rig.api}/weather")
            return answer.status_code, "payment-response" in answer.headers

    assert asyncio.run(paid()) == (200, True)
    rig.proxy.lose_answer(b"/settle", instead)
    assert asyncio.run(paid()) == (200, True)
    assert rig.proxy.lost == 1  # the first send's answer was lost
    assert accepted_for(rig.service, rig.payee) == 2 * PRICE
    assert asyncio.run(paid()) == (200, True)
    assert accepted_for(rig.service, rig.payee) == 3 * PRICE


def test_a_replayed_payment_settled_after_the_first_buys_nothing_when_its_refusals_answer_is_lost(
    devnet: Devnet, proxied_payee: Callable[..., ProxiedPayee], paid_api: PaidApis
) -> None:
    """A payer sends one payment header to two processes of one payee (each holds a voucher for its own requests
    only): the first request's handler takes 1.5 s, the second's none. Both are verified (the voucher not settled
    yet); the second is served and its voucher accepted; the first's settle, a second later, is refused by the
    facilitator as a replay, and that refusal's answer is lost on the way. The payee sends the settle again as a
    `resend`, which the facilitator answered accepted (the payment accepted before): the first request was served
    too, two responses for one voucher. Now each settle carries its own `attempt`, and the resend of another attempt
    than the one that got the voucher accepted is the replay it was: a 402, one charge."""
    script = ROOT / "tests" / "faulty_paid_api.py"
    rig = proxied_payee(16, 18, script=script)
    other = paid_api(rig.service, rig.payee, facilitator=rig.proxy.url, script=script)  # its second process
    x402 = paying_client(devnet, rig.scheme)
    path = "/reports/uploaded/size"
    headers = x402HTTPClient(x402).encode_payment_signature_header(payment_for(rig.api, x402, path))

    async def twice() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            slow = asyncio.create_task(http.get(f"{rig.api}{path}", params={"think": 1.5}, headers=headers))
            await asyncio.sleep(0.5)  # verified, and in its handler
            fast = await http.get(f"{other}{path}", headers=headers)
            rig.proxy.lose_answer(b"/settle")  # the next settle's answer, the slow one's refusal: lost
            return fast, await slow

    fast, slow = asyncio.run(twice())
    assert (fast.status_code, fast.json()) == (200, {"bytes": 0})
    refused = json.loads(base64.b64decode(slow.headers["payment-response"]))
    assert (slow.status_code, refused["success"], refused.get("errorReason"), rig.proxy.lost) == (
        402,
        False,
        "voucher_replayed",
        1,
    )
    assert accepted_for(rig.service, rig.payee) == PRICE


def test_a_facilitators_failure_reaches_the_payer_short_and_without_its_urls(
    devnet: Devnet,
    spawn: Callable[..., ServiceProcess],
    paid_api: PaidApis,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """x402's facilitator client quotes the facilitator's whole answer body in its failure (`… failed (502):
    <body>`), and the payee's 503 quoted that failure to the payer: here a front that answers every POST 502 with an
    error page naming a hosted facilitator's URL, its key in the path, and 100 KB more. The payer now gets the start of
    it without the URL; the payee's own log has it (URL shortened), one line however many payments failed meanwhile;
    nothing is charged."""
    service = spawn(f"sqlite:///{tmp_path / 'front.db'}")
    page = b"upstream https://facilitator.example.com/v2/s3cr3t-key/verify failed: " + b"x" * 100_000
    payee = accounts[19].address
    with TamperingProxy(service.url, rewrite=lambda _path, data: data, failing_posts=(502, page)) as front:
        api = paid_api(service, payee, facilitator=front.url)
        scheme = ChannelHubClientScheme(payer_for(accounts[13], service), lane_timeout=0.5)

        async def get() -> httpx.Response:
            async with x402HttpxClient(paying_client(devnet, scheme), timeout=30) as http:
                return cast(httpx.Response, await http.get(f"{api}/weather"))

        answers = [asyncio.run(get()) for _ in range(2)]
    failure = (
        "FacilitatorStatusError: Facilitator verify failed (502): upstream https://facilitator.example.com/… failed: "
    )
    shown = f"the facilitator could not verify the payment ({(failure + 'x' * 240)[:240]}…)"
    assert [(a.status_code, a.json()) for a in answers] == 2 * [
        (503, {"error": "facilitator_unavailable", "message": shown})
    ]
    port = api.rsplit(":", 1)[1]
    log = (tmp_path / f"paid-api-{port}-{PRICE}.log").read_text()
    lines = [line for line in log.splitlines() if "the facilitator could not judge" in line]
    assert [line[: line.index("xxx")] for line in lines] == [
        "the facilitator could not judge 1 payment(s) since the last such line; the last could not verify: " + failure
    ]
    # Of the page only its start is decoded (`FAILURE_BODY_MAX` characters with its length in bytes), not 100 KB.
    after = "… (100,070 bytes in all)"
    quoted = "upstream https://facilitator.example.com/… failed: " + "x" * (3_000 - 70 - len(after)) + after
    assert (len(page), lines[0].endswith(quoted)) == (100_070, True), lines[0][-200:]  # its start, its length
    assert ("s3cr3t" in log, len(lines[0]) < 3_300) == (False, True)
    assert accepted_for(service, payee) == 0


@pytest.mark.parametrize("outage", ["refused", "held"])
def test_a_payee_that_started_without_its_facilitator_answers_503_at_once_then_is_paid(
    devnet: Devnet, proxied_payee: Callable[..., ProxiedPayee], outage: str
) -> None:
    """x402's middleware asks the facilitator's /supported on the event loop, at start and then at each paid route's
    request until it has an answer. A facilitator refusing connections made that a 500 for each paid route (not even
    a 402); one that never answers (`held`) froze the whole app, free routes too, for x402's 90-second timeout.
    Now a paid route answers 503 (Retry-After) within a second, a free route at once, nothing is charged, and once
    the facilitator answers the payer pays once."""
    rig = proxied_payee(15, 17, outage)

    async def walk() -> list[tuple[int, str]]:
        async with x402HttpxClient(paying_client(devnet, rig.scheme), timeout=30) as http, httpx.AsyncClient() as free:
            paid = asyncio.create_task(http.get(f"{rig.api}/weather"))
            await asyncio.sleep(0.1)  # the paid request waits for /supported meanwhile
            health = await free.get(f"{rig.api}/health", timeout=5)
            down = await paid
            rig.proxy.mend()  # a /supported still held ends: the payer retries after Retry-After
            await asyncio.sleep(float(down.headers["retry-after"]))
            up = await http.get(f"{rig.api}/weather")
            return [
                (health.status_code, health.text),
                (down.status_code, f"{down.headers.get('retry-after')} {down.json()['error']}"),
                (up.status_code, up.text),
            ]

    assert asyncio.run(walk()) == [
        (200, '{"status":"ok"}'),
        (503, "1 facilitator_unavailable"),
        (200, '{"forecast":"sunny"}'),
    ]
    assert accepted_for(rig.service, rig.payee) == PRICE


def test_a_flood_of_made_up_channels_through_a_payee_never_holds_a_known_payers_settle(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payment on a channel id no one opened (ids are cheap to make up) is verified by the facilitator, which
    answers 503 `unknown_channels_busy` past its read budget and paces a connection's refusals (here three at once,
    then one every 20 s: with one at once, the payer's own polls of the service while its channel was being indexed
    were paced too, 35 s more in some runs). A flood of them through a payee held every connection of the payee's pool
    to the facilitator (100), and the settle of a payer whose channel the payee knows waited for one of them to be
    answered: 46 s here. The payee's settles go on connections of their own: the known payer is served while the flood's
    payments still wait. (The flood comes from one address here, and the payee's budget of unknown channels per
    client is off: as from many addresses.)"""
    monkeypatch.setenv("UNSEEN_BUDGET", "0 1")
    rig = lane_rig(
        "made-up",
        script=ROOT / "tests" / "faulty_paid_api.py",
        connection_refusals_per_second="0.05",
        connection_refusal_burst="3",
    )
    ((payee, api),) = rig.payees
    service, scheme = rig.service, rig.scheme
    assert paid_get(devnet, scheme, f"{api}/weather") == 200  # the payee knows this payer's channel now
    required = requirements_of(paying_client(devnet, scheme), f"{api}/weather").accepts[0]

    def delayed() -> float:
        return sum(scraped(service.url, "settlement_refusals_delayed_total").values())

    async def flood() -> tuple[list[int], float, int, float]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as http:
            burst = await asyncio.gather(
                *(http.get(f"{api}/weather", headers=made_up_payment(required, n + 1)) for n in range(100))
            )
            held = [
                asyncio.create_task(http.get(f"{api}/weather", headers=made_up_payment(required, n + 101)))
                for n in range(500)
            ]
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(delayed) < 100 and time.monotonic() < deadline:  # each holds a connection
                await asyncio.sleep(0.1)
            holding = await asyncio.to_thread(delayed)
            began = time.monotonic()
            async with x402HttpxClient(paying_client(devnet, scheme), timeout=60) as payer:
                honest = (await payer.get(f"{api}/weather")).status_code
            took = time.monotonic() - began
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            return sorted({answer.status_code for answer in burst}), holding, honest, took

    statuses, holding, honest, took = asyncio.run(flood())
    assert (statuses, holding >= 100, honest) == ([402, 503], True, 200)
    # Before, the settle waited for a connection that a paced refusal let go: 20 s or more after the pace began.
    assert took < 5, took
    assert accepted_for(service, payee) == 2 * PRICE


@pytest.mark.parametrize("facilitator", ["reads each id", "over its read budget"])
def test_a_client_paying_on_made_up_channels_is_refused_by_the_payee_past_its_budget_and_no_one_else_is(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], monkeypatch: pytest.MonkeyPatch, facilitator: str
) -> None:
    """Each payment on a channel id no one opened was a verify at the facilitator: a flood of them held the payee's
    connections to it (the facilitator paces a connection's refusals), and each new payer's first payment waited
    behind the flood. The payee charges the facilitator's `channel_not_found` (or its 503 `unknown_channels_busy`,
    past its own read budget) to the client that sent the payment (its address), and a client in debt is answered
    429 `rate_limited` with Retry-After, unsent (here 3 at once, then one in 1,000 s). A payment holds its token while
    its verify is in flight: of 40 sent at once, 3 reach the facilitator (charged after each answer, all 40 did). A
    payer from another address is served, and so is a payer from the same address whose channel the payee knows
    (verified in the payee's process)."""
    monkeypatch.setenv("UNSEEN_BUDGET", "0.001 3")
    reads = "1000" if facilitator == "reads each id" else "0.001"
    rig = lane_rig("budget", script=ROOT / "tests" / "faulty_paid_api.py", unknown_channel_reads_per_second=reads)
    ((payee, api),) = rig.payees
    service, scheme = rig.service, rig.scheme
    x402 = paying_client(devnet, scheme)
    accepted = requirements_of(x402, f"{api}/weather").accepts[0]

    def refusal(answer: httpx.Response) -> tuple[int, str]:
        if answer.status_code == 402:
            return 402, json.loads(base64.b64decode(answer.headers["payment-required"]))["error"]
        return answer.status_code, answer.json()["error"]

    async def wave() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as http:
            payments = [made_up_payment(accepted, n + 1) for n in range(40)]
            return await asyncio.gather(*(http.get(f"{api}/weather", headers=payment) for payment in payments))

    flood = asyncio.run(wave())
    sent = (402, "channel_not_found") if facilitator == "reads each id" else (503, "facilitator_unavailable")
    assert Counter(refusal(answer) for answer in flood) == {sent: 3, (429, "rate_limited"): 37}
    limited = [answer for answer in flood if answer.status_code == 429]
    assert {990 <= int(answer.headers["retry-after"]) <= 1000 for answer in limited} == {True}
    # The facilitator judged 3 (the others never reached it); past its read budget, it judged none (its 503s).
    judged = {"verify channel_not_found": 3.0} if facilitator == "reads each id" else {}
    assert x402_calls(service) == judged

    async def pay(source: str) -> int:
        wire = x402_httpx_transport(x402, httpx.AsyncHTTPTransport(local_address=source))
        async with httpx.AsyncClient(transport=wire, timeout=60) as http:
            answer: httpx.Response = await http.get(f"{api}/weather")
            return answer.status_code

    assert asyncio.run(pay("127.0.0.2")) == 200  # a new payer from elsewhere: its channel verified by the facilitator
    assert asyncio.run(pay("127.0.0.1")) == 200  # from the flood's address: a channel the payee knows now
    assert x402_calls(service) == judged | {"verify ok": 1.0, "settle ok": 2.0}
    assert accepted_for(service, payee) == 2 * PRICE


def test_a_payee_behind_a_proxy_it_does_not_trust_is_told_so_when_it_refuses_a_client(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Behind a proxy uvicorn does not trust (`--forwarded-allow-ips`), every client is the proxy's address: one
    flood of made-up channel ids spends the budget of all, and each new payer is refused 429. The payee cannot tell
    which proxy to trust; it says so in its log when it refuses a client whose requests carry an X-Forwarded-For
    that uvicorn did not apply (here from 127.0.0.2: uvicorn trusts 127.0.0.1 alone by default), once in 10 minutes.
    Through the proxy uvicorn trusts (127.0.0.1), each forwarded client has a budget of its own."""
    monkeypatch.setenv("UNSEEN_BUDGET", "0.001 3")
    rig = lane_rig("proxied", script=ROOT / "tests" / "faulty_paid_api.py", unknown_channel_reads_per_second="1000")
    ((_payee, api),) = rig.payees
    x402 = paying_client(devnet, rig.scheme)
    accepted = requirements_of(x402, f"{api}/weather")

    async def flood(source: str, forwarded_for: str, ids: range) -> list[int]:
        wire = httpx.AsyncHTTPTransport(local_address=source)
        async with httpx.AsyncClient(transport=wire, timeout=30) as http:
            return [
                (
                    await http.get(
                        f"{api}/weather",
                        headers={**made_up_payment(accepted.accepts[0], n), "X-Forwarded-For": forwarded_for},
                    )
                ).status_code
                for n in ids
            ]

    assert asyncio.run(flood("127.0.0.2", "203.0.113.7", range(1, 7))) == [402, 402, 402, 429, 429, 429]
    assert asyncio.run(flood("127.0.0.1", "203.0.113.8", range(7, 9))) == [402, 402]  # its own budget
    port = api.rsplit(":", 1)[1]
    log = (tmp_path / f"paid-api-{port}-{PRICE}.log").read_text()
    warned = [line for line in log.splitlines() if "X-Forwarded-For that uvicorn did not apply" in line]
    assert len(warned) == 1, log
    assert "client 127.0.0.2 is refused" in warned[0]
    assert "--forwarded-allow-ips" in warned[0]


def test_a_payee_whose_facilitators_host_is_down_answers_at_once_while_it_is_down(
    devnet: Devnet, proxied_payee: Callable[..., ProxiedPayee]
) -> None:
    """A facilitator's host that is down: each /supported fails after CONNECT_TIMEOUT (3 s). Only the payee's start
    waits for the first (a second at most, on its event loop); then, while paid requests keep asking, its thread
    fetches again (three failed fetches), each paid request answers 503 at once, and a free route asked all along is
    never held. Before, each paid request after a failed fetch began the next and waited a second for it on the event
    loop, the free routes with it: here 3 paid requests and 3 free ones of more than half a second."""
    rig = proxied_payee(15, 17, "host down")

    async def walk() -> tuple[int, int, set[int], int]:
        slow_free = 0
        end = time.monotonic() + 3 * CONNECT_TIMEOUT + 0.5

        async def free_route() -> None:
            nonlocal slow_free
            async with httpx.AsyncClient() as free:
                while time.monotonic() < end:
                    began = time.monotonic()
                    assert (await free.get(f"{rig.api}/health", timeout=5)).status_code == 200
                    slow_free += time.monotonic() - began > 0.5
                    await asyncio.sleep(0.02)

        slow_paid = 0
        statuses: set[int] = set()
        async with x402HttpxClient(paying_client(devnet, rig.scheme), timeout=30) as http:
            asked = asyncio.create_task(free_route())
            while time.monotonic() < end:
                began = time.monotonic()
                statuses.add((await http.get(f"{rig.api}/weather")).status_code)
                slow_paid += time.monotonic() - began > 0.5
                await asyncio.sleep(0.05)
            await asked
            rig.proxy.mend()
            # The next fetch that succeeds, apart from the requests: one under way when the host came back ends by
            # its connect timeout at the latest (its SYN went unanswered), and the next follows SUPPORTED_RETRY after.
            # Meanwhile a paid request is still answered 503 at once (charged nothing).
            back = time.monotonic() + CONNECT_TIMEOUT + 2 * SUPPORTED_RETRY + 1
            while (status := (await http.get(f"{rig.api}/weather")).status_code) == 503 and time.monotonic() < back:
                await asyncio.sleep(0.1)
            return slow_paid, slow_free, statuses, status

    assert asyncio.run(walk()) == (0, 0, {503}, 200)
    assert accepted_for(rig.service, rig.payee) == PRICE


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport"])
def test_a_paid_request_answered_without_a_payment_answer_frees_its_channel_at_once(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str
) -> None:
    """A handler's 404 and a payee whose facilitator is down (503) answer a paid request with no payment answer, and
    x402 runs no hook for that: the wire (the pay-ahead transport's, or `UnansweredWire` under x402's own transport)
    hands it to our scheme, which frees the channel at once (one lane here, and a 2-minute `lane_timeout`: before, the
    next payment was refused "in flight already" and a payer with more lanes opened new channels). The next payment
    first asks the service what became of the unanswered one: each 200 paid once, nothing for the 404 or the 503, one
    channel."""
    rig = lane_rig("unanswered", max_lanes=1)
    ((payee, api),) = rig.payees
    service, payer, scheme = rig.service, rig.payer, rig.scheme
    assert scheme.lane_timeout == 120.0
    x402 = paying_client(devnet, scheme)
    transport = paying_wire(wire, x402, scheme)

    async def walk() -> list[int]:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            statuses = [
                (await http.get(f"{api}{path}")).status_code for path in ("/weather", "/reports/99", "/weather")
            ]
            service.kill()
            statuses.append((await http.get(f"{api}/weather")).status_code)
            service.start()  # back on the same port, with the same store
            statuses.append((await http.get(f"{api}/weather")).status_code)
            return statuses

    assert asyncio.run(walk()) == [200, 404, 200, 503, 200]
    assert accepted_for(service, payee) == 3 * PRICE
    assert position_on_only_channel(payer, payee) == 3 * PRICE


class OnTheWay(httpx.AsyncBaseTransport):
    """httpx's own transport, with what passes on it changed (`sending`, `answered`): a proxy, or a hostile payee."""

    def __init__(self) -> None:
        self.real = httpx.AsyncHTTPTransport()

    def sending(self, request: httpx.Request) -> None:
        """Change `request` in place before it is sent."""

    def answered(self, request: httpx.Request, answer: httpx.Response) -> None:
        """Change `answer` (to `request`) in place before the payer reads it."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sending(request)
        answer = await self.real.handle_async_request(request)
        self.answered(request, answer)
        return answer

    async def aclose(self) -> None:
        await self.real.aclose()


class Rewriting(OnTheWay):
    """Each answer's `header` (where it has one) rewritten by `rewrite`."""

    def __init__(self, header: str, rewrite: Callable[[str], str]) -> None:
        super().__init__()
        self.header, self.rewrite = header, rewrite

    def answered(self, request: httpx.Request, answer: httpx.Response) -> None:
        if self.header in answer.headers:
            answer.headers[self.header] = self.rewrite(answer.headers[self.header])


class Refusing(OnTheWay):
    """The signature of the first `count` payments sent spoiled (the payee refuses them: a 402), and the requirements
    in those 402s rewritten into `garbled`."""

    def __init__(self, count: int, garbled: str) -> None:
        super().__init__()
        self.count, self.garbled = count, garbled

    def sending(self, request: httpx.Request) -> None:
        sent = request.headers.get("payment-signature")
        if sent is not None and self.count > 0:
            self.count -= 1
            payment = json.loads(base64.b64decode(sent))
            payment["payload"]["signature"] = "0x" + "11" * 65
            request.headers["payment-signature"] = base64.b64encode(json.dumps(payment).encode()).decode()
            request.extensions["spoiled"] = True

    def answered(self, request: httpx.Request, answer: httpx.Response) -> None:
        if request.extensions.get("spoiled"):
            answer.headers["payment-required"] = self.garbled


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport"])
@pytest.mark.parametrize("garbled", ["payment answer", "refusal"])
def test_an_answer_the_payer_cannot_read_frees_its_channel_at_once(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str, garbled: str
) -> None:
    """A paid request answered with a payment answer x402 cannot read (not base64, not JSON, not a settle answer,
    empty), or refused with a 402 whose requirements x402 cannot read: a proxy rewrote them, a hostile payee. x402 runs
    no hook for such an answer, and the wire took the header's presence (any 402) for one it reads: the channel stayed
    busy for `lane_timeout` (two minutes), and with one lane the next payment was refused "in flight already" (with
    more, a payee that garbles every answer had them all busy after as many requests). The wire frees it now, as it
    frees a channel of a request answered with no payment answer, and the next payment asks the service what became
    of it: each 200 paid once, nothing for a refusal."""
    rig = lane_rig(f"garbled-{garbled.split()[-1]}", max_lanes=1)
    ((payee, api),) = rig.payees
    if garbled == "payment answer":
        mangled = [b"not base64!", base64.b64encode(b"not json"), base64.b64encode(b'{"success": "maybe"}'), b""]
        on_the_way: OnTheWay = Rewriting("payment-response", lambda _: mangled.pop(0).decode())
        # each garbled answer is a 200
        expected = ["200"] * 4
    else:
        on_the_way = Refusing(2, "not base64!")
        # x402's transport answers the app each refusal; the pay-ahead one, refused, pays once more through x402's flow
        expected = ["402", "200", "200", "200"] if wire == "pay-ahead" else ["402", "402", "200", "200"]
    transport = paying_wire(wire, paying_client(devnet, rig.scheme), rig.scheme, on_the_way)

    async def walk() -> list[str]:
        answers = []
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            for _ in range(4):
                try:
                    answers.append(str((await http.get(f"{api}/weather")).status_code))
                except PaymentError as ex:
                    answers.append(str(ex)[:60])
        return answers

    assert asyncio.run(walk()) == expected
    assert accepted_for(rig.service, payee) == expected.count("200") * PRICE
    assert position_on_only_channel(rig.payer, payee) == expected.count("200") * PRICE


class OddAnswers:
    """A payee that answers a payer with odd x402 headers while `on`: each payment answer and 402 requirements header
    (seeded) left, removed, made garbage, replaced by an earlier payment's answer, or with one to three of its fields
    made odd (`_mutated`)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.on = rng, True
        self.answers: list[str] = []  # the payment answers seen, to answer later payments with

    def rewrite(self, headers: Any) -> None:
        """`headers` (httpx's or urllib3's) rewritten in place."""
        for name in ("payment-response", "payment-required"):
            if self.on and name in headers:
                headers[name] = self._odd(name, headers[name])

    def _odd(self, name: str, value: str) -> str:
        if name == "payment-response":
            self.answers.append(value)
        roll = self.rng.random()
        if roll < 0.1:
            return ""
        if roll < 0.2:
            return "not base64!"
        if roll < 0.3:
            return self.rng.choice(self.answers or [value])
        if roll < 0.7:
            made = json.dumps(_mutated(self.rng, json.loads(base64.b64decode(value))))
            return base64.b64encode(made.encode("utf-8", "surrogatepass")).decode()
        return value


class OddTransport(OnTheWay):
    """Its answers rewritten by `odd`."""

    def __init__(self, odd: OddAnswers) -> None:
        super().__init__()
        self.odd = odd

    def answered(self, request: httpx.Request, answer: httpx.Response) -> None:
        self.odd.rewrite(answer.headers)


class OddAdapter(PayAheadAdapter):
    """Our requests adapter, the answers off its wire rewritten by `odd` before it (and x402's flow) reads them."""

    def __init__(self, client: x402ClientSync, odd: OddAnswers, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.odd = odd

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        self.odd.rewrite(resp.headers)
        return super().build_response(req, resp)


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport", "requests"])
def test_a_payee_answering_odd_headers_never_stalls_the_payer_nor_charges_it_for_more_than_its_200s(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str
) -> None:
    """A seeded fuzz of what a payee answers a payer: payment answers and 402 requirements removed, garbage, an earlier
    payment's answer again, or with fields made odd, on a payer of four lanes. Every request ends in a response or
    x402's `PaymentError` (never another exception into the app); afterwards no channel is left busy (a payment answer
    or a refusal x402 could not read kept one busy for `lane_timeout`: the payer stalled once every lane was), honest
    answers are paid at once, and the payer's journal, the service and the 200s agree to the wei."""
    rig = lane_rig("odd-answers", max_lanes=4)
    ((payee, api),) = rig.payees
    odd = OddAnswers(random.Random(43))
    url = f"{api}/weather"

    async def walk(one: Callable[[], Awaitable[int]]) -> tuple[Counter[str], list[int]]:
        """60 requests one at a time to the odd payee, then twice four at once to the payee turned honest."""
        answers: Counter[str] = Counter()
        for _ in range(60):
            try:
                answers[str(await one())] += 1
            except (PaymentError, RequestsPaymentError):
                answers["PaymentError"] += 1
        odd.on = False  # honest answers, four at once: every lane free, or one is refused
        honest = [status for _ in range(2) for status in await asyncio.gather(*(one() for _ in range(4)))]
        return answers, honest

    if wire == "requests":
        adapter = OddAdapter(
            paying_client(devnet, rig.scheme, kind=x402ClientSync), odd, unanswered=rig.scheme.unanswered
        )
        sessions = [requests.Session() for _ in range(4)]
        for session in sessions:
            session.mount("http://", adapter)

        async def sent() -> int:  # on a worker thread, each on a session of its own
            session = sessions.pop()
            try:
                return await asyncio.to_thread(lambda: session.get(url, timeout=60).status_code)
            finally:
                sessions.append(session)

        fuzzed = asyncio.run(walk(sent))
    else:
        transport = paying_wire(wire, paying_client(devnet, rig.scheme), rig.scheme, OddTransport(odd))

        async def run() -> tuple[Counter[str], list[int]]:
            async with httpx.AsyncClient(transport=transport, timeout=60) as http:

                async def get() -> int:
                    answer: httpx.Response = await http.get(url)
                    return answer.status_code

                return await walk(get)

        fuzzed = asyncio.run(run())
    answers, honest = fuzzed
    assert set(answers) <= {"200", "402", "PaymentError"} and answers["200"] >= 10, answers
    assert answers.total() - answers["200"] >= 5, answers
    assert honest == [200] * 8
    paid = (answers["200"] + 8) * PRICE
    assert (accepted_for(rig.service, payee), rig.payer.journal.spent(ETH, 0)) == (paid, paid)


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport"])
@pytest.mark.parametrize("part", ["extra", "resource", "extensions"])
def test_requirements_no_payment_header_can_carry_are_refused_before_anything_is_signed(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str, part: str
) -> None:
    """A payee's 402 with a lone surrogate (Python's JSON reader takes it from the header) in the requirements' `extra`,
    the resource or the extensions, which x402 copies into the payment: x402 cannot write that payment into its
    header. Our scheme signed the voucher first, so its channel stayed busy for `lane_timeout` (the next payment "in
    flight already" with one lane), and the pay-ahead transport raised pydantic-core's error to the app. Refused now
    before anything is signed (x402's `PaymentError`), and the payee's next good 402 is paid at once."""
    rig = lane_rig("unwritable", max_lanes=1)
    ((payee, api),) = rig.payees
    odd = {"on": True}

    def surrogate(header: str) -> str:
        if not odd["on"]:
            return header
        required = json.loads(base64.b64decode(header))
        if part == "extra":
            required["accepts"][0]["extra"]["note"] = "\ud800"
        elif part == "resource":
            required["resource"]["description"] = "\ud800"
        else:
            required["extensions"] = {"note": "\ud800"}
        return base64.b64encode(json.dumps(required).encode("utf-8", "surrogatepass")).decode()

    transport = paying_wire(
        wire, paying_client(devnet, rig.scheme), rig.scheme, Rewriting("payment-required", surrogate)
    )

    async def walk() -> list[str]:
        answers = []
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            for n in range(3):
                odd["on"] = n < 2
                try:
                    answers.append(str((await http.get(f"{api}/weather")).status_code))
                except PaymentError as ex:
                    answers.append("cannot be written" if "cannot be written" in str(ex) else str(ex))
        return answers

    assert asyncio.run(walk()) == ["cannot be written", "cannot be written", "200"]
    assert accepted_for(rig.service, payee) == PRICE
    assert position_on_only_channel(rig.payer, payee) == PRICE


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport", "requests"])
def test_a_handler_that_raises_or_a_body_that_breaks_is_a_500_and_charges_nothing(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str
) -> None:
    """The payer is charged for the responses it gets: a paid route whose handler raises, or whose streamed body
    breaks after its first chunk, answers 500 without a payment answer (x402's middleware reads the whole body before
    it settles), and the payer's next payment on the same channel pays the price once: one voucher a 200. On one kept
    connection: uvicorn ends it after each handler's error, and the request written on it meanwhile is sent again by
    the payer's wire (settlement.x402.resend; the paid ones, with their identifier, charged once)."""
    rig = lane_rig("faulty", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    broken = ("/reports/broken/raise", "/reports/broken/stream")
    urls = [f"{api}{path}" for path in ("/weather", *broken, "/reports/3", broken[0], "/weather")]

    answers = walk_in_turn(devnet, rig.scheme, wire, urls, identifiers=True)
    failed = (500, False)
    assert [(status, paid) for status, _, paid in answers] == [
        (200, True), failed, failed, (200, True), failed, (200, True)
    ]  # fmt: skip
    assert accepted_for(rig.service, payee) == 3 * PRICE
    assert position_on_only_channel(rig.payer, payee) == 3 * PRICE


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport", "requests"])
def test_a_redirect_is_not_what_was_paid_for_and_charges_nothing(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str
) -> None:
    """x402's middleware settles any answer below 400, so a paid route that redirects was charged, and a payer that
    follows redirects paid again at the new address: two prices for one answer. A paid URL with a trailing slash
    is the common case (Starlette's router answers it 307 to the URL without). Now only a 2xx answer is settled: the
    redirect is sent as it is, with no payment answer, and the payer pays once, where it lands; a 304 is not paid."""
    rig = lane_rig("moved", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    paths = ("/weather", "/reports/broken/moved", "/reports/3/", "/reports/broken/unchanged", "/weather")
    urls = [f"{api}{path}" for path in paths]

    answers = walk_in_turn(devnet, rig.scheme, wire, urls, identifiers=False)  # requests follows redirects too
    assert answers == [
        (200, [], True), (200, [307], True), (200, [307], True), (304, [], False), (200, [], True)
    ]  # fmt: skip
    assert accepted_for(rig.service, payee) == 4 * PRICE
    assert position_on_only_channel(rig.payer, payee) == 4 * PRICE


def test_a_payer_that_gave_up_before_its_answer_was_ready_is_not_charged(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """A handler slower than the payer waits (2 s against a 0.5-s client timeout): the payer's client closes the
    connection, and the payee, which settled after the handler whatever became of the payer, charged it for an
    answer it never got. Now the payee asks whether the payer is still there before it settles: not charged, and
    the payer's next payment reuses the voucher's amount."""
    rig = lane_rig("gave-up", max_lanes=1, script=ROOT / "tests" / "faulty_paid_api.py")
    ((payee, api),) = rig.payees
    transport = paying_wire("pay-ahead", paying_client(devnet, rig.scheme), rig.scheme)

    async def walk() -> list[int | str]:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            first = (await http.get(f"{api}/weather")).status_code
            try:  # not priced yet for the pay-ahead wire: x402's flow pays the 402, and its paid retry times out
                late: int | str = (await http.get(f"{api}/reports/broken/slow", timeout=0.5)).status_code
            except PaymentError as ex:
                late = "gave up" if isinstance(ex.__cause__, httpx.ReadTimeout) else repr(ex)
            await asyncio.sleep(2.5)  # the handler ends meanwhile, and the payee would have settled then
            charged = accepted_for(rig.service, payee)
            return [first, late, charged, (await http.get(f"{api}/weather")).status_code]

    assert asyncio.run(walk()) == [200, "gave up", PRICE, 200]
    assert accepted_for(rig.service, payee) == 2 * PRICE
    assert position_on_only_channel(rig.payer, payee) == 2 * PRICE


def test_the_sync_adapter_frees_a_channel_whose_paid_request_got_no_payment_answer(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    rig = lane_rig("sync-unanswered", max_lanes=1)
    ((payee, api),) = rig.payees
    session = requests.Session()
    session.mount(
        "http://",
        PayAheadAdapter(paying_client(devnet, rig.scheme, kind=x402ClientSync), unanswered=rig.scheme.unanswered),
    )
    statuses = [
        session.get(f"{api}{path}", timeout=60).status_code
        for path in ("/weather", "/reports/99", "/weather", "/weather")
    ]
    assert statuses == [200, 404, 200, 200]
    assert accepted_for(rig.service, payee) == 3 * PRICE
    assert len(rig.payer.open_channels(payee)) == 1


class DroppingWire(httpx.AsyncBaseTransport):
    """The network between payer and payee, dropping paid requests as `plan` says, in turn: "lose" delivers one and
    loses its answer (the payee served it and settled its payment), "drop" never delivers it; anything else passes.
    Unpaid requests always pass."""

    def __init__(self, plan: list[str]) -> None:
        self.plan, self.inner = plan, httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        step = self.plan.pop(0) if "payment-signature" in request.headers else "pass"
        if step == "drop":
            raise httpx.ConnectError("connection refused", request=request)
        response = await self.inner.handle_async_request(request)
        if step == "lose":
            await response.aread()
            await response.aclose()
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class DroppingAdapter(requests.adapters.HTTPAdapter):
    """`DroppingWire` for requests: put under `PayAheadAdapter` (`class _(PayAheadAdapter, DroppingAdapter)`), it is the
    wire our adapter and x402's send on."""

    plan: ClassVar[list[str]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        step = self.plan.pop(0) if "payment-signature" in request.headers else "pass"
        if step == "drop":
            raise requests.ConnectionError("connection refused")
        response = super().send(request, **kwargs)
        if step == "lose":
            response.close()
            raise requests.ConnectionError("Server disconnected without sending a response.")
        return response


@pytest.mark.parametrize("wire", ["pay-ahead", "x402's transport"])
def test_a_paid_request_that_gets_no_answer_frees_its_channel_and_is_charged_as_the_service_says(
    devnet: Devnet, lane_rig: Callable[..., LaneRig], wire: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paid request whose connection drops gets no answer at all, and x402 runs no hook for it: without a word from
    the wire its channel stayed busy for `lane_timeout` (2 minutes), so a payer with one lane was refused from then on
    ("in flight already") and one with more opened new channels, a deposit each, for every dropped request (a flaky
    network, or a payee that drops paid connections on purpose). The wire now hands it to our scheme like an answer
    without a payment answer: the channel is freed at once, and the next payment first asks the service what became
    of the dropped one. Here one answer is lost after the payee settled its payment (charged: the service says so),
    one request never arrives (not charged), on one channel. Neither is signed over on the event loop from the
    journal alone: a payment of unknown fate sends the next one to a worker thread, which asks the service."""
    rig = lane_rig("dropped", max_lanes=1)
    ((payee, api),) = rig.payees
    made = where_payments_are_made(rig.payer, monkeypatch)
    x402 = paying_client(devnet, rig.scheme)
    network = DroppingWire(["pass", "lose", "drop", "pass"])
    transport = paying_wire(wire, x402, rig.scheme, network)
    lost = PaymentError if wire == "x402's transport" else httpx.RemoteProtocolError
    dropped = PaymentError if wire == "x402's transport" else httpx.ConnectError

    async def walk() -> None:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            assert (await http.get(f"{api}/weather")).status_code == 200
            with pytest.raises(lost):
                await http.get(f"{api}/weather")
            with pytest.raises(dropped):
                await http.get(f"{api}/weather")
            assert (await http.get(f"{api}/weather")).status_code == 200

    asyncio.run(walk())
    assert network.plan == []
    assert made == ["thread", "loop", "thread", "thread"]  # opened; paid; after the lost answer; after the drop
    assert accepted_for(rig.service, payee) == 3 * PRICE  # the lost answer's payment, not the dropped one's
    assert position_on_only_channel(rig.payer, payee) == 3 * PRICE
    # Each learnt from the service (paid, refused) and the last answered: none is left in the journal, and the
    # budgets count the three paid.
    assert rig.payer.journal.spent(ETH, time.time() - 3600, payee) == 3 * PRICE
    rig.payer.journal.close()  # the last acceptance written
    with closing(sqlite3.connect(rig.payer.journal.path)) as journal:
        assert journal.execute("SELECT COUNT(*) FROM payments").fetchone() == (0,)


def test_the_sync_adapter_frees_a_channel_whose_paid_request_got_no_answer(
    devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    rig = lane_rig("sync-dropped", max_lanes=1)
    ((payee, api),) = rig.payees

    class Dropping(PayAheadAdapter, DroppingAdapter):
        plan: ClassVar[list[str]] = ["pass", "lose", "drop", "pass"]

    session = requests.Session()
    session.mount(
        "http://", Dropping(paying_client(devnet, rig.scheme, kind=x402ClientSync), unanswered=rig.scheme.unanswered)
    )
    assert session.get(f"{api}/weather", timeout=60).status_code == 200
    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            session.get(f"{api}/weather", timeout=60)
    assert session.get(f"{api}/weather", timeout=60).status_code == 200
    assert Dropping.plan == []
    assert accepted_for(rig.service, payee) == 3 * PRICE
    assert position_on_only_channel(rig.payer, payee) == 3 * PRICE


def test_only_the_payment_a_channel_carries_now_frees_it(devnet: Devnet, lane_rig: Callable[..., LaneRig]) -> None:
    """`unanswered` frees a channel only for the payment it carries: an older payment's late news, or another
    scheme's payment, leaves the payment in flight holding it (else two payments would run on one channel)."""
    rig = lane_rig("guard", max_lanes=1)
    ((_, api),) = rig.payees
    x402 = paying_client(devnet, rig.scheme)

    async def pay_once() -> int:
        async with x402HttpxClient(x402, timeout=60) as paying:
            answer: httpx.Response = await paying.get(f"{api}/weather")
            return answer.status_code

    assert asyncio.run(pay_once()) == 200  # the channel opened, one price paid
    required = requirements_of(x402, f"{api}/weather").accepts[0]
    held = rig.scheme.create_payment_payload(required)  # the channel busy with this payment
    assert held["cumulativeAmount"] == str(2 * PRICE)
    older = held | {"cumulativeAmount": str(int(held["cumulativeAmount"]) - PRICE)}
    for payload in (older, {"note": "another scheme's"}):
        rig.scheme.unanswered(PaymentPayload(x402_version=2, payload=payload, accepted=required))
        with pytest.raises(ValueError, match="in flight already"):
            rig.scheme.create_payment_payload(required)
    rig.scheme.unanswered(PaymentPayload(x402_version=2, payload=held, accepted=required))
    again = rig.scheme.create_payment_payload(required)  # the service never saw `held`: the same position again
    assert (again["channelId"], again["cumulativeAmount"]) == (held["channelId"], held["cumulativeAmount"])


def test_a_spend_budget_stops_payments_before_anything_is_signed(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    service = spawn(f"sqlite:///{tmp_path / 'budget.db'}", wait=False)  # ready once the paid app is
    payee = accounts[14].address
    api = paid_api(service, payee)
    payer = payer_for(accounts[11], service)
    scheme = ChannelHubClientScheme(payer, budgets=[Budget(limit=2 * PRICE, period=3600, per_payee=True)])

    assert [paid_get(devnet, scheme, f"{api}/weather") for _ in range(2)] == [200, 200]
    with pytest.raises(PaymentError, match="budget"):
        paid_get(devnet, scheme, f"{api}/weather")
    assert accepted_for(service, payee) == 2 * PRICE


def test_a_payees_deposit_hint_locks_no_more_than_the_payers_limit(
    devnet: Devnet, w3: Web3, lane_rig: Callable[..., LaneRig]
) -> None:
    """A hostile payee hints at a deposit of 10^8 prices (0.1 ETH of the payer's 1 ETH, for a price of 1 gwei): the
    payer's first payment opens a channel of 1,000 prices (DepositPolicy's default hint limit), not what the payee
    asked, and pays on it."""
    rig = lane_rig("hostile-hint", deposit_multiple=10**8)
    ((payee, api),) = rig.payees
    wallet, since = w3.eth.get_balance(Web3.to_checksum_address(rig.payer.address)), w3.eth.block_number

    assert [paid_get(devnet, rig.scheme, f"{api}/weather") for _ in range(2)] == [200, 200]
    (channel,) = rig.payer.open_channels(payee)
    assert int(channel["deposit"]) == 1_000 * PRICE
    blocks = [w3.eth.get_block(n, full_transactions=True) for n in range(since + 1, w3.eth.block_number + 1)]
    mined = [cast(TxData, tx) for block in blocks for tx in block["transactions"]]  # full: TxData, not hashes
    sent = [w3.eth.get_transaction_receipt(tx["hash"]) for tx in mined if tx["from"] == rig.payer.address]
    assert [r["to"] for r in sent] == [rig.payer.hub.address]  # one transaction: the open
    fees = sum(fee_paid(r) for r in sent)
    # the deposit and its gas, no more
    assert wallet - w3.eth.get_balance(Web3.to_checksum_address(rig.payer.address)) == 1_000 * PRICE + fees
    assert accepted_for(rig.service, payee) == 2 * PRICE


class TakesAndRefuses(httpx.AsyncBaseTransport):
    """A hostile payee, as its payer sees it over the network: it answers unpaid requests as the real app does, and
    a paid one by storing the payment at the facilitator (the money is its own once stored) and answering a 402 that
    says the payer's position is `reason` (stale_voucher: "read your position again and pay once more")."""

    def __init__(self, facilitator: str, reason: str) -> None:
        self.facilitator, self.reason = facilitator, reason
        self.inner = httpx.AsyncHTTPTransport()
        self.taken = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("payment-signature")
        if header is None:
            return await self.inner.handle_async_request(request)
        payload = decode_payment_signature_header(header)
        assert isinstance(payload, PaymentPayload), payload
        body = x402_request(payload.accepted.model_dump(by_alias=True, exclude_none=True), payload.payload)
        async with httpx.AsyncClient(timeout=60) as http:
            stored = (await http.post(f"{self.facilitator}/settle", json=body)).json()
        assert stored["success"], stored
        self.taken += 1
        refusal = PaymentRequired(x402_version=2, error=self.reason, accepts=[payload.accepted])
        headers = {"payment-required": encode_payment_required_header(refusal)}
        return httpx.Response(402, headers=headers, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("reason", ["stale_voucher", "invalid_signature", "channel_closed"])
def test_a_payee_that_takes_payments_and_answers_refusals_is_bounded_by_the_budget(
    reason: str, devnet: Devnet, lane_rig: Callable[..., LaneRig]
) -> None:
    """The payee stores every voucher at the service and answers each paid request with a refusal. Refusals
    used to put the payment back on the payee's word (its amount given back to the budget), while the service
    proved the position higher: a payee answering `stale_voucher` took a price at every attempt, uncounted, until
    the deposits (topped up from the wallet) ran out. Now a payment's fate is what the service proves: every
    stored voucher counts, and the budget of 3 prices is all the payee gets. A channel said to be closed while the
    chain has it open is kept (dropped, each payment opened a new channel: a deposit and gas each time)."""
    rig = lane_rig(f"takes-and-refuses-{reason}")
    ((payee, api),) = rig.payees
    rig.scheme.budgets = [Budget(limit=3 * PRICE, period=3600, per_payee=True)]
    wire = TakesAndRefuses(f"{rig.service.url}/x402", reason)

    async def attempts() -> list[str]:
        transport = x402_httpx_transport(paying_client(devnet, rig.scheme), wire)
        outcomes = []
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            for _ in range(6):
                try:
                    outcomes.append(str((await http.get(f"{api}/weather")).status_code))
                except PaymentError as ex:
                    outcomes.append("budget" if "budget" in str(ex) else str(ex))
        await wire.aclose()  # closed by the client's transport too, if it passes aclose on: twice is harmless
        return outcomes

    outcomes = asyncio.run(attempts())
    # Once, on a loaded slow machine, none was taken: what the attempts met (x402's transport turns any failure while
    # paying, this wire's refused /settle included, into a PaymentError, whose text is the outcome), and the service's
    # last words.
    assert wire.taken == 3, (outcomes, rig.service.log.read_text()[-3000:])
    assert accepted_for(rig.service, payee) == 3 * PRICE
    assert rig.payer.journal.spent(ETH, time.time() - 3600, payee) == 3 * PRICE
    expected = {
        "stale_voucher": ["402"] + ["budget"] * 5,  # x402 paid again at each recovery, up to the budget
        "invalid_signature": ["402"] * 3 + ["budget"] * 3,  # each refused payment found paid at the next one
        "channel_closed": ["402"] * 3 + ["budget"] * 3,
    }
    assert outcomes == expected[reason]
    assert len(rig.payer.open_channels(payee)) == 1


def test_a_cooperative_refund_returns_the_unspent_deposit_at_once(
    paid_channel: Callable[..., PaidChannel], devnet: Devnet, accounts: list[LocalAccount], hub: Contract
) -> None:
    """The payee closes the channel with the payer's latest voucher (closeByPayee): paid what it earned, the rest back
    to the payer in the same transaction, no challenge period; the payer's next request pays on a new channel."""
    rig = paid_channel("refund", paid=3)
    service, api, payee_account, payer, scheme = rig.service, rig.api, rig.payee, rig.payer, rig.scheme
    stranger = PayeeClient(HexBytes(accounts[9].key).to_0x_hex(), devnet.url, service.url)
    with pytest.raises(ValueError, match="does not pay"):
        stranger.refund(rig.channel_id)
    payee = PayeeClient(HexBytes(payee_account.key).to_0x_hex(), devnet.url, service.url)
    assert payee.refund(rig.channel_id) == 97 * PRICE
    assert hub.functions.balanceOf(payer.address, ETH).call() == 97 * PRICE  # back at once
    assert hub.functions.balanceOf(payee_account.address, ETH).call() == 3 * PRICE
    wait_until(lambda: payer.open_channels(payee_account.address) == [])  # the service saw the close
    scheme.policy = DepositPolicy(multiple=50, follow_hint=False)
    assert paid_get(devnet, scheme, f"{api}/weather") == 200  # a new channel, its deposit from the refund in the hub
    (fresh,) = payer.open_channels(payee_account.address)
    assert int(fresh["deposit"]) == 50 * PRICE
    assert hub.functions.balanceOf(payer.address, ETH).call() == 47 * PRICE
    assert accepted_for(service, payee_account.address) == 4 * PRICE
    for client in (stranger, payee):
        client.shutdown()


def test_a_channel_its_payee_stopped_and_never_closed_is_left_for_a_new_one(
    paid_channel: Callable[..., PaidChannel], devnet: Devnet, hub: Contract
) -> None:
    """A payee stops a channel at the service to close it, then never closes it (its transaction failed, or it chose
    not to). The payer's client took `channel_closed` for a payee's word while the hub held the channel open, kept it,
    and every later request to that payee was refused; it now takes the service's word that the channel is stopped
    and pays on a new channel at once, the stopped one left out of its listing."""
    rig = paid_channel("stopped", paid=2)
    service, api, payee_account, payer, scheme = rig.service, rig.api, rig.payee, rig.payer, rig.scheme
    payee = PayeeClient(HexBytes(payee_account.key).to_0x_hex(), devnet.url, service.url)
    try:
        assert payee.stop(rig.channel_id)["acceptedCumulativeAmount"] == str(2 * PRICE)
    finally:
        payee.shutdown()
    assert paid_get(devnet, scheme, f"{api}/weather") == 200  # old code: 402 (channel_closed), for good
    assert paid_get(devnet, scheme, f"{api}/weather") == 200
    (fresh,) = payer.open_channels(payee_account.address)
    assert fresh["channelId"] != rig.channel_id
    stopped = bytes.fromhex(rig.channel_id[2:])
    assert hub.functions.channel(stopped).call()[ChannelViewField.STATUS] == ChannelStatus.OPEN
    assert accepted_for(service, payee_account.address) == 4 * PRICE


def test_a_payee_that_stops_every_channel_locks_at_most_two_deposits_and_the_payer_gets_them_back(
    settling: Callable[[str], ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    payer_for: Callable[..., PayerClient],
) -> None:
    """A payee stops each channel the payer opens and never closes it. The payer's client left each for a new one,
    each a deposit locked until the payer's own close: channel after channel. Now it leaves at most two
    (`max_stopped`), requests their closes itself (after `stopped_grace`, here 0), and refuses to open a third; once
    the challenge period is over it finalizes them and pays on a channel funded by what came back. The service's
    engine settled the payee's vouchers on the stopped channels when their closes were requested."""
    service = settling("stops")
    payee_account = accounts[16]
    api = paid_api(service, payee_account.address)
    payer = payer_for(accounts[17], service)
    scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100, follow_hint=False), stopped_grace=0)
    payee = PayeeClient(HexBytes(payee_account.key).to_0x_hex(), devnet.url, service.url)
    stopped: list[bytes] = []
    try:
        for _ in range(2):
            assert paid_get(devnet, scheme, f"{api}/weather") == 200
            (channel,) = payer.open_channels(payee_account.address)
            payee.stop(channel["channelId"])
            stopped.append(bytes.fromhex(channel["channelId"][2:]))
    finally:
        payee.shutdown()
    with pytest.raises(PaymentError, match=f"{payee_account.address} stopped 2 channels of this payer"):
        paid_get(devnet, scheme, f"{api}/weather")

    def listed(status: ChannelStatus) -> list[bytes]:
        return [bytes.fromhex(c["channelId"][2:]) for c in payer.listed_channels(payee_account.address, None, status)]

    wait_until(lambda: sorted(listed(ChannelStatus.CLOSING)) == sorted(stopped))  # no third channel, no third deposit
    assert listed(ChannelStatus.OPEN) == []
    # A restarted app finds them (stopped, closing) in the service's listing and refuses a third as well.
    restarted = ChannelHubClientScheme(payer, DepositPolicy(multiple=100, follow_hint=False))
    with pytest.raises(PaymentError, match=f"{payee_account.address} stopped 2 channels of this payer"):
        paid_get(devnet, restarted, f"{api}/weather")

    def state(raw: bytes, field: ChannelViewField) -> int:
        return int(hub.functions.channel(raw).call()[field])

    assert [state(raw, ChannelViewField.STATUS) for raw in stopped] == [ChannelStatus.CLOSING] * 2
    wait_until(lambda: [state(raw, ChannelViewField.SETTLED) for raw in stopped] == [PRICE] * 2, timeout=60)
    # the session hub's challenge period, and a second
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [3601])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    assert paid_get(devnet, scheme, f"{api}/weather") == 200  # both finalized; a new channel from the refunds
    assert [state(raw, ChannelViewField.STATUS) for raw in stopped] == [ChannelStatus.CLOSED] * 2
    assert payer.hub_balance() == 2 * 99 * PRICE - 100 * PRICE
    (fresh,) = payer.open_channels(payee_account.address)
    assert bytes.fromhex(fresh["channelId"][2:]) not in stopped
    assert accepted_for(service, payee_account.address) == 3 * PRICE


def test_channels_the_payers_own_app_closes_count_for_no_payee(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """The payer's app closes two of the client's channels itself: each is left for a new one, and neither is taken
    for a channel its payee stopped (the client would have refused a third channel to an honest payee for an hour)."""
    service = spawn(f"sqlite:///{tmp_path / 'own-closes.db'}", close_guard_seconds="7200", wait=False)
    payee = accounts[18].address
    api = paid_api(service, payee)
    payer = payer_for(accounts[17], service)
    scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=100, follow_hint=False), stopped_grace=0)
    closed: list[str] = []
    for _ in range(2):
        assert paid_get(devnet, scheme, f"{api}/weather") == 200
        (channel,) = payer.open_channels(payee)
        payer.close(payer.channel(channel["channelId"]))  # closing: refused at once (guard > period)
        closed.append(channel["channelId"])
        wait_until(lambda: payer.open_channels(payee) == [])
    assert paid_get(devnet, scheme, f"{api}/weather") == 200  # old code: "... stopped 2 channels of this payer ..."
    (third,) = payer.open_channels(payee)
    assert third["channelId"] not in closed
    assert accepted_for(service, payee) == 3 * PRICE


def test_a_refund_is_taken_once_the_payers_node_shows_it(
    paid_channel: Callable[..., PaidChannel],
    accounts: list[LocalAccount],
    w3: Web3,
    devnet: Devnet,
    payer_for: Callable[..., PayerClient],
) -> None:
    """The payee closed the channel and said so; the payer's reads reach, through a provider's balancer, a node some
    blocks behind the payee's, where the channel is still open. It was taken at that word at once: the payee called
    a liar (`service_untrusted`) for a refund it made. The payer's node is asked again, for up to `behind` seconds,
    and the refund is what the hub says once it shows the close; a payee that says so of an open channel is still
    refused once `behind` has passed."""
    rig = paid_channel("lagging-refund", paid=2, payer=11, payee=12, payee_key=HexBytes(accounts[12].key).to_0x_hex())
    with LaggingRpc(devnet.url, frozenset({"eth_call"})) as balancer:
        lagging = payer_for(rig.payer.account, rig.service, journal="lagging", rpc_url=balancer.url)
        balancer.at = w3.eth.block_number  # the payer's reads reach a node at the block before the refund
        catching_up = threading.Timer(1.0, lambda: setattr(balancer, "at", None))
        catching_up.start()
        try:
            refunded = ask_refund(f"{rig.api}{REFUND_PATH}", lagging, rig.channel_id)
        finally:
            catching_up.cancel()
    assert refunded == 98 * PRICE  # the code before: UntrustedServiceError, "... the hub holds it open"
    assert rig.payer.hub_balance() == 98 * PRICE


def test_a_refund_is_asked_again_while_the_payees_node_does_not_know_the_channel(
    paid_channel: Callable[..., PaidChannel],
    paid_api: PaidApis,
    accounts: list[LocalAccount],
    w3: Web3,
    devnet: Devnet,
) -> None:
    """A payer asks for its refund soon after opening; the payee's reads reach, through a provider's balancer, a node
    behind the opening, where the hub holds no such channel: the payee answered `channel_not_found`, and the payer
    took it for the end (a refund it could have had). The payer's own node holds the channel, so the request is sent
    again, for up to `behind` seconds, and refunded once the payee's node caught up; an id the payer's node does not
    hold either is refused at the first answer."""
    before_opening = w3.eth.block_number
    rig = paid_channel("refund-payee-behind", paid=2, payer=11, payee=12)
    with LaggingRpc(devnet.url, frozenset({"eth_call"})) as balancer:
        desk = paid_api(
            rig.service, rig.payee.address, payee_key=HexBytes(rig.payee.key).to_0x_hex(), rpc_url=balancer.url
        )
        balancer.at = before_opening  # the payee's reads reach a node at the block before the channel's opening
        asked: list[str] = []
        with httpx.Client(event_hooks={"request": [lambda request: asked.append(request.url.path)]}) as http:
            with pytest.raises(ChannelNotFoundError):  # not the payer's channel on its own node either: at once
                ask_refund(f"{desk}{REFUND_PATH}", rig.payer, "0x" + "42" * 32, http=http)
            assert asked == [REFUND_PATH]
            catching_up = threading.Timer(1.0, lambda: setattr(balancer, "at", None))
            catching_up.start()
            try:
                refunded = ask_refund(f"{desk}{REFUND_PATH}", rig.payer, rig.channel_id, http=http)
            finally:
                catching_up.cancel()
    assert refunded == 98 * PRICE  # the code before: ChannelNotFoundError, "no channel 0x… on chain"
    assert rig.payer.hub_balance() == 98 * PRICE
    assert len(asked) > 2  # asked again while the payee's node was behind, within one client's share of the route


def test_refund_requests_waiting_behind_a_refund_never_hold_the_apps_worker_threads(
    paid_channel: Callable[..., PaidChannel], w3: Web3, accounts: list[LocalAccount], clients: httpx.Client
) -> None:
    """Refunds are made one at a time, and a request waits for the one before it, whose close waits to be mined
    (seconds; minutes in a fee spike). Those waits were on the app's worker threads (40): a flood of well-formed
    requests for made-up channels, within the desk's budget of chain reads, held every one of them while a refund
    was being mined, and every plain `def` route of the payee's app waited with them. They wait on the event loop now
    for the desk's own limiter, REFUNDS_WAITING at most behind the refund being made; past that, 429 at once."""
    rig = paid_channel(
        "refund-queue", paid=2, payer=11, payee=12, payee_key=HexBytes(accounts[12].key).to_0x_hex(),
        script=ROOT / "tests" / "faulty_paid_api.py",
    )  # fmt: skip
    url, payee = f"{rig.api}{REFUND_PATH}", rig.payee.address

    def made_up(n: int) -> tuple[int, str]:  # from addresses of their own: each within its share
        answer = clients.post(url, json=refund_request(rig.payer.account, rig.payer.domain, n.to_bytes(32, "big")))
        return answer.status_code, answer.json()["code"]

    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        with ThreadPoolExecutor(1) as asking, ThreadPoolExecutor(64) as flooding:
            refunding = asking.submit(ask_refund, url, rig.payer, rig.channel_id)
            wait_until(lambda: w3.eth.get_transaction_count(payee, "pending") > w3.eth.get_transaction_count(payee))
            flood = []
            for n in range(60):  # 10 a second: the desk's budget admits 20 at once and 5 a second
                flood.append(flooding.submit(made_up, n))
                time.sleep(0.1)
            plain = httpx.get(f"{rig.api}/plain", timeout=5)  # the code before: ReadTimeout, every thread waiting
            assert (plain.status_code, plain.json()) == (200, {"status": "ok"})
            queued = REFUNDS_WAITING  # behind the refund being made
            wait_until(lambda: sum(f.done() for f in flood) >= 60 - queued)
            at_once = [f.result() for f in flood if f.done()]
            assert at_once == [(429, "rate_limited")] * (60 - queued)  # the rest wait for the refund
            w3.provider.make_request(RPCEndpoint("evm_mine"), [])
            assert refunding.result(timeout=60) == 98 * PRICE
            codes = Counter(f.result(timeout=60) for f in flood)
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
    assert sum(codes.values()) == 60 and set(codes) <= {(404, "channel_not_found"), (429, "rate_limited")}


def test_one_clients_flood_of_refund_requests_leaves_other_payers_their_refunds(
    paid_channel: Callable[..., PaidChannel], accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """The desk's budget of chain reads (5 a second, bursts of 20) was one for every client: one address sending
    refund requests for made-up channels without pause took all of it, and every other payer's refund was refused
    (429) for as long as the flood went on. Each client's address now has a share of its own, asked first (1 a second,
    bursts of 5); past it, 429 at once, and the rest of the budget is the others'."""
    rig = paid_channel("refund-flood", paid=2, payer=11, payee=12, payee_key=HexBytes(accounts[12].key).to_0x_hex())
    url, flooding, answers = f"{rig.api}{REFUND_PATH}", threading.Event(), []

    def flood() -> None:  # from 10.0.0.66 as uvicorn sees it (it takes X-Forwarded-For from a local proxy)
        with httpx.Client(headers={"X-Forwarded-For": "10.0.0.66"}, timeout=60) as http:
            for n in itertools.count():
                if not flooding.is_set():
                    return
                answer = http.post(url, json=refund_request(accounts[9], rig.payer.domain, n.to_bytes(32, "big")))
                answers.append((answer.status_code, answer.json()["code"]))

    flooding.set()
    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        wait_until(lambda: len(answers) >= 30)
        refunded = ask_refund(url, rig.payer, rig.channel_id)  # the code before: RateLimitedError
        assert len(answers) > 30  # the flood went on meanwhile
    finally:
        flooding.clear()
        flooder.join(60)
    assert refunded == 98 * PRICE
    assert answers[:6] == [(404, "channel_not_found")] * 5 + [(429, "rate_limited")]  # the flooder's burst, then 429

    # Through a proxy uvicorn does not trust (127.0.0.2: it trusts 127.0.0.1 alone by default), every client is the
    # proxy's address and shares its share: a client refused there is logged once, naming the setting.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as proxy:
        codes = [proxy.post(url, json=[], headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code for n in range(7)]
    assert codes == [400] * 5 + [429] * 2
    log = (tmp_path / f"paid-api-{rig.api.rsplit(':', 1)[1]}-{PRICE}.log").read_text()
    warned = [line for line in log.splitlines() if "X-Forwarded-For that uvicorn did not apply" in line]
    assert len(warned) == 1, log
    assert "client 127.0.0.2 is refused refund requests" in warned[0] and "--forwarded-allow-ips" in warned[0]


def test_a_refund_refused_for_the_payers_own_pace_is_asked_again_after_its_retry_after(
    paid_channel: Callable[..., PaidChannel], accounts: list[LocalAccount]
) -> None:
    """A payer over its share of the refund route (here its own five requests a moment before: the burst) is refused
    429 with `retryAfter` (1 s); `ask_refund` raised it at once. It now waits that out and asks again while within
    its `timeout`; a `retryAfter` past it is raised at once. Each case from an address of its own."""
    rig = paid_channel("refund-paced", paid=2, payer=11, payee=12, payee_key=HexBytes(accounts[12].key).to_0x_hex())
    url = f"{rig.api}{REFUND_PATH}"
    for client, timeout in (("10.0.0.77", 0.5), ("10.0.0.78", 60.0)):
        answered: list[int] = []
        hooks = {"response": [lambda response, seen=answered: seen.append(response.status_code)]}
        with httpx.Client(headers={"X-Forwarded-For": client}, event_hooks=hooks, timeout=60) as http:
            for n in range(5):  # the client's burst, spent
                http.post(url, json=refund_request(rig.payer.account, rig.payer.domain, n.to_bytes(32, "big")))
            if timeout < 1:
                with pytest.raises(RateLimitedError) as refused:
                    ask_refund(url, rig.payer, rig.channel_id, http=http, timeout=timeout)
                assert (answered, refused.value.details["retryAfter"]) == ([404] * 5 + [429], 1)
            else:
                refunded = ask_refund(url, rig.payer, rig.channel_id, http=http)  # the code before: RateLimitedError
                assert (answered, refunded) == ([404] * 5 + [429, 200], 98 * PRICE)
    assert rig.payer.hub_balance() == 98 * PRICE
    # A payee that answers "retry at once" for ever is asked once a second, until the timeout.
    asked: list[float] = []

    def never(request: httpx.Request) -> httpx.Response:
        asked.append(time.monotonic())
        return httpx.Response(429, json={"code": "rate_limited", "message": "later", "retryAfter": 0})

    with httpx.Client(transport=httpx.MockTransport(never)) as hostile, pytest.raises(RateLimitedError):
        ask_refund(url, rig.payer, "0x" + "42" * 32, http=hostile, timeout=2.5)
    assert len(asked) == 3 and all(b - a >= 1 for a, b in itertools.pairwise(asked))


def test_a_deposit_from_a_hub_balance_another_app_spent_first_is_made_from_the_wallet(
    paid_channel: Callable[..., PaidChannel],
    payer_for: Callable[..., PayerClient],
    devnet: Devnet,
    accounts: list[LocalAccount],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payer's balance in the hub (here its refund, 98 prices) pays its next deposit first. Two apps pay from one
    key: the first reads the balance, enough for its new channel (50 prices), and before its open is sent the second
    withdraws the balance. The open from the balance was refused ("would revert") and the payment failed; refused
    while the balance is short of it, the deposit is now made from the wallet, and the payment goes through."""
    rig = paid_channel("balance-race", paid=2, payer=11, payee=12, payee_key=HexBytes(accounts[12].key).to_0x_hex())
    assert ask_refund(f"{rig.api}{REFUND_PATH}", rig.payer, rig.channel_id) == 98 * PRICE
    scheme = ChannelHubClientScheme(rig.payer, DepositPolicy(multiple=50, follow_hint=False))
    read, going = held_after(monkeypatch, rig.payer, "hub_balance", lambda *_: True)
    with ThreadPoolExecutor(1) as pool:
        paying = pool.submit(paid_get, devnet, scheme, f"{rig.api}/weather")
        assert read.wait(30)  # the first app read its balance: 98 prices, enough
        other = payer_for(rig.payer.account, rig.service, journal="other-app")
        assert other.withdraw() == 98 * PRICE  # the second app of the key takes it
        going.set()
        assert paying.result(timeout=120) == 200  # the code before: PaymentError, "... would revert: ..."
    (opened,) = rig.payer.open_channels(rig.payee.address)
    assert (int(opened["deposit"]), rig.payer.hub_balance()) == (50 * PRICE, 0)


def test_a_refund_request_no_payee_answers_is_our_error_that_says_it_may_have_been_made(
    spawn: Callable[..., ServiceProcess],
    payer_for: Callable[..., PayerClient],
    accounts: list[LocalAccount],
    tmp_path: Path,
) -> None:
    """No one listening at the refund route, or a payee that takes the request and never answers: httpx's own error
    came out of `ask_refund`, outside the SDK's root (`SettlementError`), and a payer could not tell that the refund
    may have been made. Now 503 `service_unavailable`, naming the route without its query (where a key may be)."""
    payer = payer_for(accounts[11], spawn(f"sqlite:///{tmp_path / 'no-answer.db'}"))
    channel = "0x" + "ab" * 32
    with socket.socket() as silent:  # takes connections (the kernel's backlog), reads nothing, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        places = {"refused": free_test_port(), "silent": silent.getsockname()[1]}
        for why, port in places.items():
            with pytest.raises(ServiceRejectedError) as unanswered:
                ask_refund(f"http://127.0.0.1:{port}{REFUND_PATH}?key=SECRET", payer, channel, timeout=1)
            error = unanswered.value  # the code before: httpx.ConnectError, httpx.ReadTimeout
            failure = "ConnectError" if why == "refused" else "ReadTimeout"
            assert (error.status, error.code, str(error)) == (
                503,
                "service_unavailable",
                f"the payee at http://127.0.0.1:{port}{REFUND_PATH} did not answer the refund request of {channel} "
                f"({failure}); it may have made it: ask again (a refund made is answered as made)",
            )


def test_a_payer_asks_the_payee_for_the_refund_and_only_the_payer_can(
    paid_channel: Callable[..., PaidChannel],
    devnet: Devnet,
    accounts: list[LocalAccount],
    hub: Contract,
    clients: httpx.Client,
) -> None:
    """The payer signs a refund request and posts it to the payee's refund route: the payee closes the channel at
    once (closeByPayee), paid what it earned, the rest back to the payer. Every other request is refused with its
    code and changes nothing: signed by someone else, expired, valid for too long, malformed, another payee's
    channel, an unknown channel, and the same request again after the refund."""
    rig = paid_channel("asked-refund", paid=2, payer=11, payee=12, payee_key=HexBytes(accounts[12].key).to_0x_hex())
    service, api, payee_account, payer, scheme = rig.service, rig.api, rig.payee, rig.payer, rig.scheme
    cid, raw = rig.channel_id, bytes.fromhex(rig.channel_id[2:])
    url = f"{api}{REFUND_PATH}"

    def post(signer: LocalAccount, expires_in: int = 300, channel_id: bytes = raw) -> tuple[int, str]:
        answer = clients.post(url, json=refund_request(signer, payer.domain, channel_id, expires_in))
        return answer.status_code, answer.json()["code"] if answer.status_code != 200 else answer.json()["refunded"]

    assert post(accounts[9]) == (403, "forbidden")  # not the payer's signature
    assert post(payer.account, expires_in=-1) == (400, "refund_request_expired")
    assert post(payer.account, expires_in=3_600) == (400, "refund_request_expired")  # usable for too long
    assert post(payer.account, channel_id=b"\x42" * 32) == (404, "channel_not_found")
    elsewhere = payer.open_channel(accounts[8].address, 10**15)  # the same payer's channel to another payee
    assert post(payer.account, channel_id=elsewhere.channel_id) == (403, "forbidden")
    bodies: list[Any] = [{"channelId": cid}, {"channelId": cid, "expires": "soon", "signature": "0x00"}, []]
    for body in bodies:
        answer = clients.post(url, json=body)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request")
    assert hub.functions.channel(raw).call()[ChannelViewField.STATUS] == ChannelStatus.OPEN  # nothing changed

    # Through a proxy that inflates the payee's figure: the payer takes the hub's (its `refunded` is the payee's word).
    tamper = Tampering()
    tamper.rewrite_post = lambda path, data: {**data, "refunded": str(10**30)} if "refunded" in data else data
    with many_clients(transport=tamper) as proxied:
        assert ask_refund(url, payer, cid, http=proxied) == 98 * PRICE
    assert hub.functions.balanceOf(payer.address, ETH).call() == 98 * PRICE  # back at once
    assert hub.functions.balanceOf(payee_account.address, ETH).call() == 2 * PRICE
    assert post(payer.account) == (409, "channel_closed")  # again: nothing left to do
    # The payer asking again (its first answer lost on the way) is told what came back, not refused (code before:
    # ChannelClosedError, for a refund that was made).
    assert ask_refund(url, payer, cid, http=clients) == 98 * PRICE
    # A payee that says `channel_closed` of a channel the hub holds open: its refusal stands, nothing came back.
    tamper.rewrite_post = lambda path, data: {"code": "channel_closed", "message": "closed, it says"}
    with many_clients(transport=tamper) as proxied, pytest.raises(ChannelClosedError):
        ask_refund(url, payer, elsewhere.hex_id, http=proxied, behind=0.5)
    tamper.rewrite_post = lambda path, data: b"<html>Bad gateway</html>"  # a refusal that is not the payee's JSON
    with many_clients(transport=tamper) as proxied, pytest.raises(ServiceRejectedError) as refused:
        ask_refund(url, payer, cid, http=proxied)
    assert (refused.value.status, refused.value.code) == (409, "http_409")
    wait_until(lambda: payer.open_channels(payee_account.address) == [])  # the service saw the close
    assert paid_get(devnet, scheme, f"{api}/weather") == 200  # the payer's next request pays on a new channel
    assert accepted_for(service, payee_account.address) == 3 * PRICE

    (fresh,) = payer.open_channels(payee_account.address)
    raw = bytes.fromhex(fresh["channelId"][2:])
    with ThreadPoolExecutor(2) as pool:  # two requests racing: one refund, one channel_closed, never two closes
        answers = sorted(pool.map(lambda _: post(payer.account, channel_id=raw), range(2)), key=lambda a: a[0])
    assert answers == [(200, str(int(fresh["deposit"]) - PRICE)), (409, "channel_closed")]
    # The SDK asking for it a third time, as a payer whose answer was lost would: the refund's figure again.
    assert ask_refund(url, payer, fresh["channelId"], http=clients) == int(fresh["deposit"]) - PRICE

    # A flood of well-formed requests for made-up channels: each admitted one costs a chain read, so only the
    # burst is read (404 each) and the rest are refused before the chain (429), the clock standing still.
    payee = PayeeClient(HexBytes(payee_account.key).to_0x_hex(), devnet.url, service.url)
    desk = RefundDesk(payee, chain_reads_per_second=5, burst=20, clock=lambda: 0.0)
    codes = []
    for n in range(25):
        body = refund_request(payer.account, payer.domain, n.to_bytes(32, "big"), expires_in=60)
        codes.append(desk.answer(json.dumps(body).encode()).body["code"])
    assert codes == ["channel_not_found"] * 20 + ["rate_limited"] * 5
    payee.shutdown()


BAD_HEADERS = {
    "not base64": "not base64 at all!",
    "not JSON": base64.b64encode(b"not json").decode(),
    "not an object": base64.b64encode(b"[]").decode(),
    "no accepted requirements": base64.b64encode(json.dumps({"x402Version": 2, "payload": {}}).encode()).decode(),
    "nested deeper than Python's JSON reader goes": base64.b64encode(
        b'{"x402Version": 2, "payload": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    ).decode(),
    "another scheme and network": base64.b64encode(
        json.dumps(
            {
                "x402Version": 2,
                "payload": {"channelId": "0x" + "11" * 32, "cumulativeAmount": "1", "signature": "0x" + "22" * 65},
                "accepted": {
                    "scheme": "exact",
                    "network": "eip155:1",
                    "asset": ETH,
                    "amount": "1",
                    "payTo": ETH,
                    "maxTimeoutSeconds": 1,
                    "extra": {},
                },
            }
        ).encode()
    ).decode(),
}


def test_a_bad_payment_header_gets_a_402_never_a_500(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    accounts: list[LocalAccount],
    tmp_path: Path,
) -> None:
    """Every kind on one payee and facilitator (each is refused before anything is kept; a process pair each cost
    ~10 s here): the answers are compared by kind, so a failure names the header that broke."""
    service = spawn(f"sqlite:///{tmp_path / 'bad.db'}", wait=False)  # ready once the paid app is
    api = paid_api(service, accounts[14].address)
    answers = {kind: httpx.get(f"{api}/weather", headers={"PAYMENT-SIGNATURE": h}) for kind, h in BAD_HEADERS.items()}
    seen = {kind: (a.status_code, "payment-required" in a.headers) for kind, a in answers.items()}
    assert seen == dict.fromkeys(BAD_HEADERS, (402, True)), {kind: a.text for kind, a in answers.items()}


ODD_VALUES: list[Any] = [
    None, True, 0, -1, 1.5, 2**256, "", "x" * 300, "0x", "1", "00000", "\u0000", "é", "\ud800", [], {}, [1, [2]],
    {"a": {"b": 1}}, float("nan"), float("inf"), " 1", "1 ", "0x" + "00" * 32, "-1", "1e3", "٣", "eip155:1",
    "channelhub", "exact", ETH, json.loads("[" * 300 + "]" * 300),
]  # fmt: skip


def _paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*at, index))


def _mutated(rng: random.Random, payment: dict[str, Any]) -> dict[str, Any]:
    """`payment` with one to three of its fields (anywhere in it) removed, replaced by an odd value, or given an odd
    sibling."""
    made = copy.deepcopy(payment)
    for _ in range(rng.choice((1, 1, 2, 3))):
        at = rng.choice([p for p in _paths(made) if p])
        parent: Any = made
        for key in at[:-1]:
            parent = parent[key]
        roll = rng.random()
        if roll < 0.15 and isinstance(parent, dict):
            del parent[at[-1]]
        elif roll < 0.25 and isinstance(parent, dict):
            parent[rng.choice(("zz", "extra", "extensions", "payload"))] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            parent[at[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
    return made


def test_odd_payment_headers_are_paid_or_refused_with_a_402_and_fail_no_other_payers_payment(
    devnet: Devnet,
    lane_rig: Callable[..., LaneRig],
    accounts: list[LocalAccount],
    payer_for: Callable[..., PayerClient],
) -> None:
    """A seeded fuzz of the payment header: a payer's real payment, re-signed for the channel's next amount each time
    (a fresh voucher), with one to three of its fields anywhere removed or replaced by an odd value (types, numbers
    past 2^256, other scripts' digits, NaN, lone surrogates, 300 levels of nesting), sent to the payee app and the
    service as real processes, while an honest payer pays the same payee eight requests at a time (their settles share
    the payee's batches). Every odd answer is a 200 (the voucher good, what else changed did not matter) or a 402,
    never a 500 or a 503 (both processes are up: a 503 is a refusal taken for an outage, retried for good); every honest
    request is a 200; and the payee earns exactly one price for each 200. A NaN (x402's client could not write it) was
    such a 503."""
    rig = lane_rig("odd", max_lanes=8)  # its payer the honest one
    ((payee, api),) = rig.payees
    payer = payer_for(accounts[15], rig.service, journal="odd")
    made = payment_for(api, paying_client(devnet, ChannelHubClientScheme(payer))).model_dump(
        by_alias=True, exclude_none=True
    )
    channel_id, position = bytes.fromhex(made["payload"]["channelId"][2:]), 0
    signer = VoucherSigner(accounts[15], payer.domain)
    rng = random.Random(19)
    answers: Counter[int] = Counter()

    def odd_payer() -> None:
        nonlocal position
        for _ in range(150):
            made["payload"]["cumulativeAmount"] = str(position + PRICE)
            made["payload"]["signature"] = "0x" + signer.sign(channel_id, position + PRICE).hex()
            sent = json.dumps(_mutated(rng, made)).encode("utf-8", "surrogatepass")
            answer = httpx.get(f"{api}/weather", headers={"PAYMENT-SIGNATURE": base64.b64encode(sent).decode()})
            assert answer.status_code in (200, 402), (answer.status_code, answer.text, sent[:2000])
            answers[answer.status_code] += 1
            position += PRICE if answer.status_code == 200 else 0

    honest: Counter[int] = Counter()

    async def both() -> None:
        odd = asyncio.create_task(asyncio.to_thread(odd_payer))
        transport = PayAheadTransport(paying_client(devnet, rig.scheme), unanswered=rig.scheme.unanswered)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:

            async def pays() -> None:
                while not odd.done():
                    honest[(await http.get(f"{api}/weather")).status_code] += 1

            await asyncio.gather(odd, *(pays() for _ in range(8)))

    asyncio.run(both())
    assert answers[200] >= 20 and answers[402] >= 20, answers  # both kinds of answer were exercised
    assert set(honest) == {200} and honest[200] >= 100, honest
    assert accepted_for(rig.service, payee) == (answers[200] + honest[200]) * PRICE
    assert position == answers[200] * PRICE


def test_an_erc20_payee_is_paid_in_its_token(
    spawn: Callable[..., ServiceProcess],
    paid_api: Callable[..., str],
    devnet: Devnet,
    accounts: list[LocalAccount],
    token: Contract,
    w3: Web3,
    tmp_path: Path,
    payer_for: Callable[..., PayerClient],
) -> None:
    """The payee prices in an ERC-20: the payer's channel is opened in that token (approved first) and the payee is
    credited in it, never in ETH."""
    service = spawn(f"sqlite:///{tmp_path / 'token.db'}", wait=False)  # ready once the paid app is
    payer_account, payee = accounts[10], accounts[13].address
    send(w3, token.functions.mint(payer_account.address, 10**21), payer_account.address)
    api = paid_api(service, payee, token.address)
    payer = payer_for(payer_account, service)
    scheme = ChannelHubClientScheme(payer)

    assert [paid_get(devnet, scheme, f"{api}/weather", token.address) for _ in range(3)] == [200] * 3
    assert payer.open_channels(payee) == []  # no ETH channel
    (channel,) = payer.open_channels(payee, token.address)
    assert int(channel["acceptedCumulativeAmount"]) == 3 * PRICE
    summary = httpx.get(f"{service.url}/v1/payees/{payee}/summary").json()["assets"]
    assert [(a["token"], a["accepted"]) for a in summary] == [(token.address, str(3 * PRICE))]
