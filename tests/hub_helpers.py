"""Small helpers for driving ChannelHub from tests: transactions from anvil's unlocked accounts, event decoding."""

from __future__ import annotations

import contextlib
import functools
import gzip
import itertools
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, Self, cast

import httpx
import httpx2
import pytest
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD
from web3.types import RPCEndpoint, TxReceipt

from settlement.chain.batch_codec import SettleEntry, decode_settlements, encode_batch
from settlement.chain.node import Revert, revert_of
from settlement.chain.provider import FailoverProvider
from settlement.devtools.devnet import Devnet, port_free
from settlement.domain.buckets import TokenBucket
from settlement.domain.model import Address, ChannelId, ChannelStatus, ChannelViewField, Receipt, Voucher
from settlement.domain.model import Channel as StoredChannel
from settlement.eip712.refunds import sign_refund_request
from settlement.eip712.vouchers import Domain, channel_id, sign_voucher
from settlement.errors import PaymentUncertainError
from settlement.indexer.follower import Indexer
from settlement.sdk.payer import ChannelRef, PayerClient
from settlement.server.api_keys import Role, make_key
from settlement.server.config import Settings
from settlement.server.service import Service
from settlement.settle.engine import Settler
from settlement.store import Database
from settlement.store import channels as channel_q
from settlement.store import settlements as batch_q
from settlement.store.chainlog import ChainEvent, record_events
from settlement.store.keys import add_key

__all__ = ["channel_id"]  # re-exported: tests import it from here with the other helpers

ROOT = Path(__file__).resolve().parent.parent
CHALLENGE_PERIOD = 3600
TEST_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]  # the defaults, and what TestClient sends
ETH = "0x0000000000000000000000000000000000000000"
SKIP = {
    "UnknownChannel": 1,
    "ChannelClosed": 2,
    "ChallengeExpired": 3,
    "NotAboveSettled": 4,
    "ExceedsDeposit": 5,
    "InvalidSignature": 6,
}


def operator_env(settings: Settings, settler: LocalAccount) -> dict[str, str]:
    """The environment an operator's `settlement` command reads for the service of `settings`: its chain, deployment
    file and store, deposits counted at once, `settler`'s key."""
    return {
        "SETTLEMENT_RPC_URL": settings.rpc_url,
        "SETTLEMENT_DEPLOYMENT_FILE": str(settings.deployment_file),
        "SETTLEMENT_DATABASE_URL": settings.database_url,
        "SETTLEMENT_CONFIRMATIONS": "0",
        "SETTLEMENT_PRIVATE_KEY": HexBytes(settler.key).to_0x_hex(),
    }


def devnet_settings(**overrides: Any) -> Settings:
    """Settings for a test devnet, independent of the caller's environment and .env file."""
    return Settings(_env_file=None, **({"allowed_hosts": TEST_HOSTS} | overrides))  # type: ignore[call-arg]


@dataclass
class ForkedDevnet(Devnet):
    """An anvil forked from `fork_url` at `fork_block`: the same chain up to that block and none after it, as a
    node behind the others is (a fallback RPC, another node behind a provider's balancer)."""

    fork_url: str = ""
    fork_block: int = 0

    def command(self, port: int) -> list[str]:
        return [*super().command(port), "--fork-url", self.fork_url, "--fork-block-number", str(self.fork_block)]


def reverts_with(call: Any, abi: Sequence[Any], tx: dict[str, Any]) -> Revert:
    """Send `call` expecting a custom-error revert; return the decoded error. `abi`: a contract's (web3's `ABI`)."""
    with pytest.raises((ContractCustomError, ContractLogicError)) as info:
        call.transact(tx)
    revert = revert_of(info.value, [dict(entry) for entry in abi])
    assert revert is not None, f"no revert data in {info.value!r}"
    return revert


def send(w3: Web3, call: Any, sender: str, value: int = 0) -> TxReceipt:
    """Send from an unlocked devnet account and require success."""
    receipt = w3.eth.wait_for_transaction_receipt(call.transact({"from": sender, "value": value}))
    assert receipt["status"] == 1
    return receipt


def events(contract: Contract, receipt: TxReceipt, name: str) -> list[dict[str, Any]]:
    return [dict(e["args"]) for e in contract.events[name]().process_receipt(receipt, errors=DISCARD)]


def credited(hub: Contract, who: str, asset: str = ETH) -> int:
    """What the hub holds for `who` to withdraw, in `asset`."""
    return int(hub.functions.balanceOf(who, asset).call())


def fee_paid(receipt: TxReceipt) -> int:
    """The wei a mined transaction cost its sender in gas."""
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def salt_of(n: int) -> bytes:
    return n.to_bytes(32, "big")


@dataclass
class Channel:
    """A channel opened in a test, with what settlement needs to name it."""

    id: bytes
    payer: LocalAccount
    payee: str
    token: str
    salt: bytes
    deposit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hex_id(self) -> ChannelId:
        """The id as the service's layers name it: 0x + 64 hex."""
        return ChannelId("0x" + self.id.hex())

    def voucher(self, cumulative: int, signature: bytes) -> SettleEntry:
        return SettleEntry(self.payer.address, self.salt, cumulative, signature)


# What a test's HTTP client answers: httpx's, or FastAPI's TestClient's, which starlette builds on httpx2.
Answer = httpx.Response | httpx2.Response

Sign = Callable[..., bytes]


def voucher_signer(domain: Domain) -> Sign:
    """sign(account, channel_id, cumulative, domain=None) -> a 65-byte voucher signature, on `domain` unless told."""

    def sign(account: LocalAccount, channel: bytes, cumulative: int, other: Domain | None = None) -> bytes:
        return sign_voucher(account, other or domain, channel, cumulative)

    return sign


def open_eth_channel(w3: Web3, hub: Contract, payer: LocalAccount, payee: str, amount: int, salt: bytes) -> Channel:
    """An ETH channel from `payer` to `payee` holding `amount`, opened on chain."""
    send(w3, hub.functions.open(payee, ETH, salt, amount), payer.address, value=amount)
    cid = channel_id(payer.address, payee, ETH, salt)
    return Channel(id=cid, payer=payer, payee=payee, token=ETH, salt=salt, deposit=amount)


Group = tuple[str, str, list[SettleEntry]]


def batch(payee: str, token: str, *vouchers: SettleEntry) -> Group:
    return (payee, token, list(vouchers))


def settle_call(hub: Contract, *groups: Group) -> Any:
    """settleBatch over `groups`, packed as the settlement engine packs them."""
    return hub.functions.settleBatch(encode_batch(groups))


def record(cid: bytes, cumulative: int) -> bytes:
    """One channel's record in ChannelsSettled.settlements."""
    return cid + cumulative.to_bytes(13, "big")


def settled(contract: Contract, receipt: TxReceipt) -> dict[bytes, int]:
    """channel id -> cumulative amount, from every ChannelsSettled event of the receipt."""
    out: dict[bytes, int] = {}
    for e in events(contract, receipt, "ChannelsSettled"):
        out.update((bytes.fromhex(cid[2:]), amount) for cid, amount in decode_settlements(e["settlements"]))
    return out


Tx = tuple[Any, str, int]  # (contract call, sender, value)


def in_one_block(w3: Web3, *txs: Tx, gas: int = 1_000_000) -> list[TxReceipt]:
    """Send `txs` in this order into one block, as a real chain would mine them; returns every receipt (reverted
    ones included: the caller asserts what it expects). Mining stops while they queue, and the chain mines as it did
    before after (automine, or a block every N seconds: `mining`'s interval chain stays one)."""
    automine = w3.provider.make_request(RPCEndpoint("anvil_getAutomine"), [])["result"]
    interval = w3.provider.make_request(RPCEndpoint("anvil_getIntervalMining"), [])["result"]
    w3.provider.make_request(RPCEndpoint("evm_setIntervalMining"), [0])
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        hashes = [call.transact({"from": sender, "value": value, "gas": gas}) for call, sender, value in txs]
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    finally:
        if interval:
            w3.provider.make_request(RPCEndpoint("evm_setIntervalMining"), [interval])
        else:
            w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [bool(automine)])
    receipts = [w3.eth.wait_for_transaction_receipt(h) for h in hashes]
    assert len({r["blockNumber"] for r in receipts}) == 1, "the transactions did not share a block"
    return receipts


# --- the service and its settlement engine ---------------------------------------------------------------------


def pay(service: Service, channel: Channel, cumulative: int, sign: Sign) -> None:
    voucher = Voucher(channel.hex_id, cumulative, sign(channel.payer, channel.id, cumulative))
    outcome = service.ingestor.ingest([voucher])[0]
    assert not isinstance(outcome, Exception), outcome


class ChannelMoney(NamedTuple):
    """The money and state of a channel as the hub's `channel(id)` view has them, by name."""

    deposit: int
    settled: int
    close_deadline: int
    status: int


def money_and_status(hub: Contract, cid: bytes) -> ChannelMoney:
    """The hub's deposit, settled total, close deadline and status of a channel."""
    view = hub.functions.channel(cid).call()
    return ChannelMoney(
        deposit=int(view[ChannelViewField.DEPOSIT]),
        settled=int(view[ChannelViewField.SETTLED]),
        close_deadline=int(view[ChannelViewField.CLOSE_DEADLINE]),
        status=int(view[ChannelViewField.STATUS]),
    )


def settled_on_chain(hub: Contract, channel: Channel) -> int:
    return money_and_status(hub, channel.id).settled


def wait_indexed(service: Service) -> None:
    service.indexer.catch_up()


def wait_cursor(indexer: Indexer, block: int) -> None:
    """Until a running indexer's cursor reaches `block` (for its confirmed blocks: the head less its confirmations)."""
    wait_until(lambda: indexer.progress is not None and indexer.progress.cursor >= block)


def run_until_idle(settler: Settler, service: Service, ticks: int = 10, pause: float = 0.0) -> None:
    """Tick until no batch is open; `pause` seconds between ticks on a chain that mines on an interval (a batch is
    mined up to a block later, not as it is sent)."""
    for _ in range(ticks):
        settler.tick()
        wait_indexed(service)
        with service.db.read() as conn:
            if not batch_q.open_batches(conn):
                return
        time.sleep(pause)
    raise AssertionError("batches still open")


# --- the operator CLI -----------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "settlement.cli"]


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m settlement.cli *args` in a fresh interpreter, as a user starts it (tests/servers.py's `forked_cli`
    runs a command in a fork of the suite's fork server instead, its imports done once)."""
    return subprocess.run([*CLI, *args], env=cli_env(env), cwd=cwd, capture_output=True, text=True, timeout=120)


def typed_env(*dropped: str) -> dict[str, str]:
    """The test process's environment as a terminal's would be: without what `make test`'s make passes its children
    (a nested make prints "make[1]:" and joins that make's jobs), and without `dropped`."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", *dropped)}


def cli_env(env: dict[str, str]) -> dict[str, str]:
    """A command's environment: the test process's without its SETTLEMENT_* settings, and `env`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SETTLEMENT_")} | env


# --- the API and the SDK ------------------------------------------------------------------------------------


def body(channel: Channel, cumulative: int, signature: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "channelId": channel.hex_id,
        "cumulativeAmount": str(cumulative),
        "signature": "0x" + signature.hex(),
        **extra,
    }


def scraped(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A running service's samples named `name` (from its /metrics), by their labels (sorted name/value pairs)."""
    return samples(httpx.get(f"{url}/metrics").text, name)


def samples(exposition: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples named `name` in a /metrics text, by their labels (sorted name/value pairs)."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    }


def recovered(client: TestClient, where: str) -> float:
    """How many signers the service recovered in a worker `process` or on a `thread` (its metric)."""
    found = samples(client.get("/metrics").text, "settlement_signers_recovered_total")
    return found.get((("where", where),), 0.0)


def workers_ready(client: TestClient) -> None:
    """Wait until the service's signature recovery workers answer."""
    recovery = service_of(client).ingestor.recovery
    wait_until(lambda: recovery.workers_ready)


def stand_still(monkeypatch: pytest.MonkeyPatch, budget: TokenBucket) -> None:
    """Stop a process-wide budget's clock for the test (until `monkeypatch.undo()`): what it admits is its burst,
    exactly, however slowly a loaded machine runs the test (at the real clock a slow step refilled it mid-test)."""
    take = budget.take
    monkeypatch.setattr(budget, "take", lambda _now: take(0.0))


def wait_until(done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def behind_the_fast_path(client: TestClient) -> TestClient:
    """A client of the same app's FastAPI routes, past the guards and the fast path in front of them (same service):
    what the documented routes answer, to compare with the fast path's answers."""
    app: Any = client.app
    while not isinstance(app, FastAPI):
        app = app.app
    return TestClient(app, raise_server_exceptions=False)


def stream_through(
    client: PayerClient, channel: ChannelRef, disrupt: Callable[[], object], times: int = 2
) -> list[Receipt]:
    """Pay 3 at a time on another thread; after every 30 receipts call `disrupt()`, `times` times, then take 20 more.
    A payment whose outcome is uncertain is paid again with its idempotency key until it has a receipt, as an app
    should: so what the payee was credited must equal exactly 3 per receipt returned, not more (a double charge) and
    not less (a lost payment)."""
    receipts: list[Receipt] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            key = uuid.uuid4().hex
            while True:
                try:
                    receipts.append(client.pay(channel, 3, idempotency_key=key))
                    break
                except PaymentUncertainError:
                    time.sleep(0.05)

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


def stored_payments(url: str, channel_id: str) -> list[Receipt]:
    db = Database(url)
    try:
        with db.read() as conn:
            return channel_q.list_payments(conn, channel_id, limit=1000).items
    finally:
        db.dispose()


def service_of(client: TestClient) -> Service:
    """The Service behind an app `create_app` made, served by FastAPI's TestClient (typed as any ASGI app there)."""
    return cast(Service, cast(FastAPI, client.app).state.service)


def provider_of(client: TestClient) -> FailoverProvider:
    """The chain provider of that service (`settlement serve` makes it a FailoverProvider, which counts its calls)."""
    return cast(FailoverProvider, service_of(client).w3.provider)


def signed_in(client: httpx.Client | TestClient, account: LocalAccount) -> dict[str, str]:
    """The Authorization header of `account` signed in with its own key (challenge, personal_sign, token)."""
    challenge = client.post("/v1/auth/challenge", json={"address": account.address}).json()
    signature = account.sign_message(encode_defunct(text=challenge["message"])).signature.to_0x_hex()
    answer = client.post("/v1/auth/token", json={"message": challenge["message"], "signature": signature})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def x402_requirements(chain_id: int, pay_to: str, price: int, **changes: Any) -> dict[str, Any]:
    """A payee's `channelhub` requirements in ETH, as x402 sends them (camelCase), with `changes`."""
    return {
        "scheme": "channelhub",
        "network": f"eip155:{chain_id}",
        "asset": ETH,
        "amount": str(price),
        "payTo": pay_to,
        "maxTimeoutSeconds": 60,
        "extra": {},
        **changes,
    }


def x402_request(
    required: dict[str, Any],
    payload: dict[str, Any],
    *,
    accepted: dict[str, Any] | None = None,
    payment_id: str | None = None,
) -> dict[str, Any]:
    """The body of a facilitator's /verify or /settle for one payment."""
    paid: dict[str, Any] = {"x402Version": 2, "payload": payload, "accepted": accepted or required}
    if payment_id is not None:
        paid["extensions"] = {"payment-identifier": {"info": {"required": False, "id": payment_id}, "schema": {}}}
    return {"x402Version": 2, "paymentPayload": paid, "paymentRequirements": required}


def x402_settle_batch(*requests: dict[str, Any]) -> dict[str, Any]:
    """The body of a facilitator's /settle/batch for these /settle bodies (`x402_request`), in order (with the
    `attempt` of a body that has one)."""
    return {
        "x402Version": 2,
        "settlements": [
            {k: r[k] for k in ("paymentPayload", "paymentRequirements", "attempt") if k in r} for r in requests
        ],
    }


def x402_voucher(channel: Channel, cumulative: int, sign: Sign, signer: LocalAccount | None = None) -> dict[str, str]:
    """A `channelhub` payload: the channel's voucher for `cumulative`, signed by its payer (or `signer`)."""
    signature = sign(signer or channel.payer, channel.id, cumulative)
    return {
        "channelId": channel.hex_id,
        "cumulativeAmount": str(cumulative),
        "signature": "0x" + signature.hex(),
    }


_EPHEMERAL_FLOOR = 32768  # Linux's ip_local_port_range starts here: kernel-picked and outgoing ports live above it
_TEST_PORTS_FLOOR = 20000
# Starts at this process's pid: two test sessions on one machine (a CI run and a developer's pytest) start their
# draws at different points of the same range instead of both at its first port.
_port_draws = itertools.count(os.getpid())


def free_test_port() -> int:
    """A port for a server a test starts, from this xdist worker's own range below the kernel's ephemeral ports:
    with several workers, a port taken from the kernel (bind to 0, then close) could be handed to another worker's
    server or used by an outgoing connection before ours binds it, and our health check would then reach someone
    else's server. Here no other worker draws from the range and the kernel never does."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or "0")
    size = (_EPHEMERAL_FLOOR - _TEST_PORTS_FLOOR) // max(1, workers)
    low = _TEST_PORTS_FLOOR + worker * size
    for _ in range(size):
        port = low + next(_port_draws) % size
        if port_free("127.0.0.1", port):
            return port
    raise RuntimeError(f"no free port in {low}..{low + size}")


def store_at_revision(url: str, revision: str) -> Database:
    """A store migrated only up to `revision` (an empty database first): to test a later migration on the rows an
    earlier schema held. The caller disposes of it."""
    from alembic import command

    from settlement.store.database import _alembic_config

    db = Database(url)
    with db.engine.connect() as conn:
        config = _alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        conn.commit()
    return db


def a_channel(n: int = 1, payee: str = "0x" + "bb" * 20, deposit: int = 2**256 - 1) -> StoredChannel:
    """A channel as the store holds it, for tests of the store alone (no chain): id n, payer 0xaa…, in ETH."""
    return StoredChannel(
        channel_id=ChannelId("0x" + f"{n:064x}"),
        payer=Address("0x" + "aa" * 20),
        payee=Address(payee),
        token=Address(ETH),
        salt="0x" + "00" * 32,
        deposit=deposit,
        settled=0,
        status=ChannelStatus.OPEN,
        close_deadline=None,
        as_of_block=1,
    )


def positions(first_block: int, count: int, per_block: int = 3) -> list[tuple[int, int]]:
    """`count` (block, log index) positions from `first_block` on, `per_block` events in each block: as a real chain
    mines them (automine's one per block hid a critical bug once)."""
    return [(first_block + n // per_block, n % per_block) for n in range(count)]


def chain_happened(
    db: Database, event: str, at: list[tuple[int, int]], channel: str | None = None, **args: Any
) -> None:
    """Hub events straight into the store at these positions, as the indexer records what it read."""
    cid = None if channel is None else ChannelId(channel)
    with db.write() as conn:
        record_events(conn, [ChainEvent(b, i, "0x" + "11" * 32, "0x" + "22" * 32, event, cid, args) for b, i in at])


def end_sessions(url: str) -> int:
    """Ends every session on `url`'s PostgreSQL database, as a server restart does, and waits until each has ended
    (up to 5 s each); how many there were."""
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            ended = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                    " WHERE datname = :name"
                ),
                {"name": make_url(url).database},
            ).scalar_one()
    finally:
        admin.dispose()
    return int(ended)


@contextmanager
def database_down(url: str) -> Iterator[None]:
    """The database refuses connections and drops the ones it has, as a failed primary does, until the block ends."""
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        end_sessions(url)
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def refund_request(signer: LocalAccount, domain: Domain, channel: bytes, expires_in: int = 300) -> dict[str, Any]:
    """The JSON body of a payer's refund request for `channel`, signed by `signer`, valid `expires_in` seconds."""
    expires = int(time.time()) + expires_in
    signature = sign_refund_request(signer, domain, channel, expires)
    return {"channelId": "0x" + channel.hex(), "expires": expires, "signature": "0x" + signature.hex()}


def held_after(
    monkeypatch: pytest.MonkeyPatch, owner: object, method: str, when: Callable[..., bool]
) -> tuple[threading.Event, threading.Event]:
    """Hold each call of `owner.method` that `when` takes (its arguments) once it ran, until the second event is set:
    (set when one is held, the one to set to let it on)."""
    real, reached, going = getattr(owner, method), threading.Event(), threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            reached.set()
            assert going.wait(30), "never let on"
        return result

    monkeypatch.setattr(owner, method, held)
    return reached, going


def many_clients(**kwargs: Any) -> httpx.Client:
    """An httpx client each of whose requests comes, as a local proxy tells uvicorn (`X-Forwarded-For`, which it takes
    from 127.0.0.1), from an address of its own: a test's requests are not one client's to budgets kept per client
    (a payee's refund route)."""
    numbers = itertools.count(1)

    def address(request: httpx.Request) -> None:
        n = next(numbers)
        request.headers["X-Forwarded-For"] = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"

    return httpx.Client(event_hooks={"request": [address]}, **kwargs)


class Tampering(httpx.BaseTransport):
    """Between the SDK and the service, as a proxy would be: forwards every request for real, then may drop the
    answer (`after_post`: called once the voucher was delivered; raise to lose the answer) or rewrite a JSON answer
    (into other JSON, or into bytes that are not JSON: an error page, a truncated body)."""

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()
        self.after_post: Callable[[], None] | None = None
        self.rewrite: Callable[[str, Any], object] | None = None  # a GET's JSON answer, by the request's path
        self.rewrite_post: Callable[[str, Any], object] | None = None  # a POST's JSON answer

    def close(self) -> None:
        self.real.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.real.handle_request(request)
        if request.method == "POST" and self.after_post is not None:
            response.read()
            self.after_post()
        rewrite = self.rewrite if request.method == "GET" else self.rewrite_post
        if rewrite is None:
            return response
        data = rewrite(request.url.path, json.loads(response.read()))
        if isinstance(data, bytes):
            return httpx.Response(response.status_code, content=data)
        return httpx.Response(response.status_code, json=data)


# JSON nested 100,000 deep (200 KB): past the stack for the standard library's decoder under py_ecc's recursion limit
# (a segmentation fault, not an error: settlement.recursion)
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
GZIP_BOMB_DECODED = 64 * 2**20


@functools.cache
def gzip_bomb() -> bytes:
    """A gzip-encoded answer body of ~64 KB that decodes to `GZIP_BOMB_DECODED` bytes (spaces: JSON's whitespace)."""
    return gzip.compress(b" " * GZIP_BOMB_DECODED, compresslevel=9)


class LocalServer:
    """An HTTP server a test runs on 127.0.0.1 (a port of this worker's range, `url`), on a thread of its own while
    the `with` block lasts; a subclass gives its request handler (`handler`)."""

    def __init__(self) -> None:
        self.port = free_test_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ThreadingHTTPServer | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class TamperingProxy(LocalServer):
    """An HTTP proxy in front of a service, as `Tampering` is for the SDK's client but for any program (the CLI):
        forwards each GET for real, then `rewrite(path, JSON answer)` gives the JSON (or bytes) it answers instead; or,
        where `hostile(path)` names a way, answers 200 and then a body that never ends ("endless": as fast as the client
        reads, up to 256 MB, counted in `written`) or comes a byte every 0.2 s ("dribble"), or sends its headers a byte
        every 0.2 s ("slow_headers": 100 of them, 20 s, then the end of the headers and `{}`), or whole but
        gzip-encoded, 64 KB that decode to 64 MB ("gzip": `GZIP_BOMB`); each hostile answer's request's
        Accept-Encoding is noted in `asked`. Every POST is answered
    `failing_posts` (a status and a body) when given, as a failing server or a proxy's error page is (else 501)."""

    def __init__(
        self,
        target: str,
        rewrite: Callable[[str, Any], object],
        hostile: Callable[[str], str | None] = lambda _path: None,
        failing_posts: tuple[int, bytes] | None = None,
    ) -> None:
        super().__init__()
        self.target, self.rewrite, self.hostile = target.rstrip("/"), rewrite, hostile
        self.failing_posts = failing_posts
        self.written = 0
        self.asked: list[str | None] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def answer_slow_headers(self) -> None:
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
                    for _ in range(100):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        proxy.written += 1
                        time.sleep(0.2)
                    self.wfile.write(b"\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                except OSError:
                    pass  # the client hung up
                self.close_connection = True

            def answer_hostile(self, way: str) -> None:
                proxy.asked.append(self.headers.get("accept-encoding"))
                if way == "slow_headers":
                    self.answer_slow_headers()
                    return
                if way == "gzip":
                    bomb = gzip_bomb()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-encoding", "gzip")
                    self.send_header("content-length", str(len(bomb)))
                    self.end_headers()
                    self.wfile.write(bomb)
                    proxy.written += len(bomb)
                    return
                self.send_response(200)  # HTTP/1.0: the body runs until the connection closes
                self.send_header("content-type", "application/json")
                self.end_headers()
                chunk = b"x" * 65536 if way == "endless" else b"x"
                try:
                    while proxy.written < 256 * 2**20:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        proxy.written += len(chunk)
                        if way == "dribble":
                            time.sleep(0.2)
                except OSError:
                    pass  # the client hung up
                self.close_connection = True

            def do_GET(self) -> None:
                way = proxy.hostile(self.path.split("?")[0])
                if way is not None:
                    self.answer_hostile(way)
                    return
                sent = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept")}
                real = httpx.get(proxy.target + self.path, headers=sent, timeout=30)
                data = proxy.rewrite(self.path.split("?")[0], real.json())
                raw = data if isinstance(data, bytes) else json.dumps(data).encode()
                self.send_response(real.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:
                if proxy.failing_posts is None:
                    self.send_error(501)
                    return
                self.rfile.read(int(self.headers.get("content-length", "0")))
                status, body = proxy.failing_posts
                self.send_response(status)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


class RpcProxy(LocalServer):
    """A JSON-RPC endpoint in front of a node (`target`) that forwards each call, except those `answer(call)` answers
    itself (a JSON-RPC answer, or None to forward): a subclass is the provider a test needs."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.client = httpx.Client(timeout=30)

    def answer(self, call: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def ask(self, method: str, params: list[Any]) -> dict[str, Any]:
        """The node's own answer to one call: its `result` or its `error`."""
        asked = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        answer = self.client.post(self.target, json=asked).json()
        return {key: answer[key] for key in ("result", "error") if key in answer}

    def block_of(self, tag: str | None, head: int | None = None) -> int:
        """A block number of eth_getLogs' `fromBlock`/`toBlock`: a number, "earliest", or a tag of the head (`head`,
        or the node's own)."""
        if tag is not None and tag.startswith("0x"):
            return int(tag, 16)
        if tag == "earliest":
            return 0
        return head if head is not None else int(self.ask("eth_blockNumber", [])["result"], 16)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        rpc = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                call = json.loads(body)
                own = rpc.answer(call) if isinstance(call, dict) else None
                if own is not None:
                    answer = json.dumps({"jsonrpc": "2.0", "id": call.get("id")} | own).encode()
                else:
                    real = rpc.client.post(rpc.target, content=body, headers={"content-type": "application/json"})
                    answer = real.content
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def __exit__(self, *_exc: object) -> None:
        super().__exit__()
        self.client.close()


class RangeCappedRpc(RpcProxy):
    """A JSON-RPC endpoint in front of a node, as a provider that caps `eth_getLogs` is: a call over more than
    `max_blocks` blocks is refused in such a provider's words (code -32005); everything else is forwarded.
    `ranges` lists every eth_getLogs range asked for, taken or not."""

    def __init__(self, target: str, max_blocks: int) -> None:
        super().__init__(target)
        self.max_blocks = max_blocks
        self.ranges: list[tuple[int, int]] = []

    def answer(self, call: dict[str, Any]) -> dict[str, Any] | None:
        if call.get("method") != "eth_getLogs":
            return None
        asked = call["params"][0]
        first, last = self.block_of(asked.get("fromBlock")), self.block_of(asked.get("toBlock"))
        self.ranges.append((first, last))
        if last - first + 1 <= self.max_blocks:
            return None
        return {"error": {"code": -32005, "message": f"query exceeds max block range {self.max_blocks}"}}


BLOCK_PARAM = {  # where each JSON-RPC method that reads the chain's state takes its block
    "eth_call": 1,
    "eth_getBalance": 1,
    "eth_getCode": 1,
    "eth_getTransactionCount": 1,
    "eth_getStorageAt": 2,
    "eth_getBlockByNumber": 0,
}


class LaggingRpc(RpcProxy):
    """A JSON-RPC endpoint in front of a node, as a provider's balancer is that sends some calls to a node behind the
    others: while `at` is set, the calls of `methods` read the chain as the node at block `at` does ("latest" and the
    other tags are that block, a later one is unknown there: geth's "header not found"; `eth_getLogs` as geth answers
    it, a range past its head with the logs of the blocks it has and no error, a block asked by its hash that it has
    not with "unknown block"); every other call, and every call once `at` is None again (the node caught up), reads
    the chain as it is."""

    def __init__(self, target: str, methods: frozenset[str]) -> None:
        super().__init__(target)
        assert methods <= {*BLOCK_PARAM, "eth_blockNumber", "eth_getLogs"}, methods
        self.methods = methods
        self.at: int | None = None
        self.unknown = 0  # calls answered "header not found"

    def answer(self, call: dict[str, Any]) -> dict[str, Any] | None:
        method, at = call.get("method"), self.at
        if at is None or method not in self.methods:
            return None
        if method == "eth_blockNumber":
            return {"result": hex(at)}
        if method == "eth_getLogs":
            return self.logs(dict(call["params"][0]), at)
        params = list(call.get("params") or [])
        where = BLOCK_PARAM[str(method)]
        block = params[where] if len(params) > where else "latest"
        if isinstance(block, str) and block.startswith("0x"):
            if int(block, 16) > at:
                self.unknown += 1
                return {"error": {"code": -32000, "message": "header not found"}}
            return None
        params[len(params) :] = [None] * (where + 1 - len(params))
        params[where] = hex(at)
        return self.ask(str(method), params)

    def logs(self, query: dict[str, Any], at: int) -> dict[str, Any]:
        """`eth_getLogs` as a node at block `at` answers it."""
        if "blockHash" in query:
            block = self.ask("eth_getBlockByHash", [query["blockHash"], False]).get("result")
            if block is None or int(block["number"], 16) > at:
                self.unknown += 1
                return {"error": {"code": -32000, "message": "unknown block"}}
            return self.ask("eth_getLogs", [query])
        first, last = self.block_of(query.get("fromBlock"), at), self.block_of(query.get("toBlock"), at)
        if first > at:
            return {"result": []}
        return self.ask("eth_getLogs", [query | {"fromBlock": hex(first), "toBlock": hex(min(last, at))}])


class StreamEvent(NamedTuple):
    """One server-sent event of a payee's stream."""

    kind: str  # its `event:` line ("message" when it has none)
    data: dict[str, Any]  # its `data:` line, read as JSON


class EventStream:
    """A live stream of payee events (`GET /v1/payees/{address}/events`) read on a thread of its own, so that a test
    waits for its events, or for its end, with a timeout. A refused stream has its status and `json()` only."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.client = httpx.Client(timeout=httpx.Timeout(10, read=None))
        self.response = self.client.send(self.client.build_request("GET", url, headers=headers), stream=True)
        self.status = self.response.status_code
        self.events: queue.Queue[StreamEvent | None] = queue.Queue()
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self.response.read()

    def json(self) -> Any:
        return self.response.json()

    def _read(self) -> None:
        kind = "message"
        try:
            for line in self.response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    self.events.put(StreamEvent(kind, json.loads(line[5:].strip())))
                    kind = "message"
        except httpx.HTTPError:
            pass  # closed by the test
        self.events.put(None)

    def next(self, timeout: float = 10.0) -> StreamEvent | None:
        """The next event, or None once the service ended the stream; AssertionError if none came."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event in {timeout}s") from None

    def close(self) -> None:
        """Hang up at once: the socket is shut first (closing the response waits for the reading thread, which waits
        for the next line, a ping 15 s away)."""
        if self.status == 200 and not self.response.is_closed:
            with contextlib.suppress(OSError):
                self.response.extensions["network_stream"].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        self.response.close()
        self.client.close()


def new_key(store_url: str, role: Role, account: str | None = None) -> str:
    """An API key the operator made (`settlement keys create`), straight into the store."""
    db = Database(store_url)
    try:
        db.migrate()
        made = make_key(role, account, f"test {role}", time.time_ns() // 1000)
        with db.write() as conn:
            add_key(conn, made.row, made.digest)
        return made.secret
    finally:
        db.dispose()


class Answers:
    """A raw socket's answers in turn: bytes read past one answer (a pipelined answer sent with it) are the next's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.read = b""

    def head(self) -> bytes:
        """The next head (an interim one, as `100 Continue`, or one with no body), its blank line included."""
        while b"\r\n\r\n" not in self.read and (chunk := self.sock.recv(65536)):
            self.read += chunk
        head, blank, self.read = self.read.partition(b"\r\n\r\n")
        return head + blank

    def whole(self) -> tuple[bytes, bytes]:
        """The next answer's head and its whole body (by its Content-Length)."""
        head = self.head()
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        assert length is not None, head
        while len(self.read) < int(length.group(1)) and (chunk := self.sock.recv(65536)):
            self.read += chunk
        body, self.read = self.read[: int(length.group(1))], self.read[int(length.group(1)) :]
        return head, body


def trickled(sock: socket.socket, piece: bytes, most: int, every: float) -> int:
    """Send `piece` every `every` seconds, `most` times, unless the peer cuts the connection off: how many went."""
    sent = 0
    try:
        while sent < most:
            sock.sendall(piece)
            sent += 1
            time.sleep(every)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the peer closed it
    return sent
