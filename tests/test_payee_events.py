"""Payees told the moment they are paid: webhooks to a real receiver (ordered, signed, at least once, retried through
failures, a receiver down, a slow one, the service killed mid-delivery) and the live stream (SSE, resumable), on the
real app and both stores."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from sqlalchemy import event
from web3 import Web3
from web3.contract import Contract

from settlement.domain.model import Channel as StoredChannel
from settlement.domain.model import Receipt, utcnow
from settlement.errors import MalformedRequestError
from settlement.sdk.webhooks import is_authentic, signature
from settlement.server.config import Settings
from settlement.server.payee_events import Feed, Horizon, Position, read_events
from settlement.server.webhooks import PASSED_SAVED, Target, WebhookSender, check_target
from settlement.store import Database
from settlement.store import channels as channel_q
from settlement.store.payee_events import (
    WebhookRow,
    add_webhook,
    delete_webhook,
    due_webhooks,
    last_payment_id,
    payee_webhooks,
)
from settlement.store.standing import Admission, Limits
from tests.hub_helpers import (
    ETH,
    Answer,
    Channel,
    EventStream,
    LocalServer,
    a_channel,
    batch,
    body,
    chain_happened,
    in_one_block,
    positions,
    service_of,
    settle_call,
    signed_in,
    wait_until,
)
from tests.hub_helpers import events as events_of
from tests.servers import ServiceProcess, ServiceThread

Sign = Callable[..., bytes]


class Receiver(LocalServer):
    """A payee's webhook endpoint on a real socket (`url`, from `start()` to `stop()`): records every delivery whose
    body arrived whole; `fail` answers that many with 500, `delay` sleeps before answering."""

    def __init__(self, fail: int = 0, delay: float = 0.0) -> None:
        super().__init__()
        self.url = f"{self.url}/hook"
        self.deliveries: list[tuple[int, dict[str, str], bytes]] = []  # (status answered, headers, body)
        self.fail, self.delay = fail, delay

    def accepted(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for status, _, raw in self.deliveries if status == 200]

    def start(self) -> Receiver:
        return self.__enter__()

    def stop(self) -> None:
        self.__exit__()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                raw = self.rfile.read(length)
                if len(raw) < length:  # the sender died mid-body: no delivery, as any HTTP server would drop it
                    self.close_connection = True
                    return
                time.sleep(receiver.delay)
                status = 500 if receiver.fail > 0 else 200
                receiver.fail -= 1 if receiver.fail > 0 else 0
                receiver.deliveries.append((status, dict(self.headers.items()), raw))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Factory: receiver(fail=0, delay=0.0, started=True) -> a webhook receiver; all are stopped after the test."""
    made: list[Receiver] = []

    def make(fail: int = 0, delay: float = 0.0, started: bool = True) -> Receiver:
        hook = Receiver(fail=fail, delay=delay)
        made.append(hook.start() if started else hook)
        return hook

    yield make
    for hook in made:
        hook.stop()


def pay(client: TestClient, channel: Channel, sign: Sign, *amounts: int) -> None:
    for cumulative in amounts:
        answer = client.post(
            "/v1/vouchers", json=body(channel, cumulative, sign(channel.payer, channel.id, cumulative))
        )
        assert answer.status_code == 201, answer.text


def subscribe(client: TestClient, payee: str, url: str, **headers: str) -> dict[str, Any]:
    answer = client.post(f"/v1/payees/{payee}/webhooks", json={"url": url}, headers=headers)
    assert answer.status_code == 201, answer.text
    made: dict[str, Any] = answer.json()
    return made


@pytest.fixture
def known_channel(
    open_channel: Callable[..., Channel], accounts: list[LocalAccount]
) -> Callable[[TestClient, int, int], Channel]:
    """Factory: known_channel(client, payer, payee) -> a channel of 1,000 wei from one devnet account to another that
    the service behind `client` has seen (it answers the channel's reads)."""

    def make(client: TestClient, payer: int, payee: int) -> Channel:
        channel = open_channel(accounts[payer], accounts[payee].address, amount=1_000)
        wait_until(lambda: client.get(f"/v1/channels/{channel.hex_id}").status_code == 200)
        return channel

    return make


def test_a_payee_is_told_of_each_payment_settlement_and_close_in_order_signed(
    api: Callable[..., TestClient],
    known_channel: Callable[[TestClient, int, int], Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    receiver: Callable[..., Receiver],
    hub: Contract,
    w3: Web3,
) -> None:
    client = api(webhook_tick=0.05)
    channel = known_channel(client, 3, 4)
    pay(client, channel, sign, 1)  # before the webhook: not sent to it
    hook = receiver()
    made = subscribe(client, channel.payee, hook.url)
    assert made["secret"].startswith("whsec_") and made["failures"] == 0
    pay(client, channel, sign, 10, 25, 60)
    signature = sign(channel.payer, channel.id, 60)
    # The batch and a close in ONE block, as a real chain mines them: both events, in log order.
    _, closed = in_one_block(
        w3,
        (settle_call(hub, batch(channel.payee, ETH, channel.voucher(60, signature))), accounts[19].address, 0),
        (hub.functions.requestClose(channel.id), channel.payer.address, 0),
    )
    (requested,) = events_of(hub, closed, "CloseRequested")
    wait_until(lambda: len(hook.accepted()) == 5, timeout=30)
    delivered = hook.accepted()
    assert [
        (e["type"], e["data"].get("cumulativeAmount") or e["data"].get("settledAmount")) for e in delivered[:4]
    ] == [
        ("payment.accepted", "10"),
        ("payment.accepted", "25"),
        ("payment.accepted", "60"),
        ("payment.settled", "60"),
    ]
    closing = delivered[4]
    assert (closing["type"], closing["data"]["channelId"], closing["data"]["closeDeadline"]) == (
        "channel.closing",
        channel.hex_id,
        requested["deadline"],
    )
    assert closing["data"]["transaction"] == closed["transactionHash"].to_0x_hex()
    assert [e["data"]["increment"] for e in delivered[:3]] == ["9", "15", "35"]  # after the 1 paid before
    assert len({e["id"] for e in delivered}) == 5
    for _, headers, raw in hook.deliveries:
        assert is_authentic(made["secret"], headers["Settlement-Signature"], raw)
        assert not is_authentic("whsec_wrong", headers["Settlement-Signature"], raw)
        assert not is_authentic(made["secret"], headers["Settlement-Signature"], raw + b" ")
        assert headers["Settlement-Event-Id"] == json.loads(raw)["id"]
    old = hook.deliveries[0]
    assert not is_authentic(made["secret"], old[1]["Settlement-Signature"], old[2], now=time.time() + 301)
    listed = client.get(f"/v1/payees/{channel.payee}/webhooks").json()
    assert [(w["webhookId"], w["failures"], w.get("secret")) for w in listed] == [(made["webhookId"], 0, None)]


def test_a_failing_or_slow_receiver_is_retried_in_order_and_does_not_hold_others_back(
    api: Callable[..., TestClient],
    known_channel: Callable[[TestClient, int, int], Channel],
    sign: Sign,
    receiver: Callable[..., Receiver],
) -> None:
    # A 2 s timeout: a healthy delivery from a loaded machine must not time out (its retry would be a second 200);
    # the slow receiver answers after twice that.
    client = api(webhook_tick=0.05, webhook_backoff_max_seconds=0.3, webhook_timeout_seconds=2.0)
    channel = known_channel(client, 5, 6)
    failing, slow, healthy = receiver(fail=3), receiver(delay=4.0), receiver()
    for hook in (failing, slow, healthy):
        subscribe(client, channel.payee, hook.url)
    pay(client, channel, sign, 5, 7, 9)
    wait_until(lambda: len(healthy.accepted()) == 3, timeout=10)
    expected = ["5", "7", "9"]
    assert [e["data"]["cumulativeAmount"] for e in healthy.accepted()] == expected
    wait_until(lambda: len(failing.accepted()) == 3, timeout=30)
    assert [s for s, _, _ in failing.deliveries] == [500, 500, 500, 200, 200, 200]
    assert [e["data"]["cumulativeAmount"] for e in failing.accepted()] == expected
    assert {json.loads(raw)["id"] for _, _, raw in failing.deliveries[:3]} == {failing.accepted()[0]["id"]}
    slow.delay = 0.0  # it answered too late: each of those is a failure, and the event comes again
    wait_until(lambda: [e["data"]["cumulativeAmount"] for e in slow.accepted()][-3:] == expected, timeout=30)
    firsts = list(dict.fromkeys(e["id"] for e in slow.accepted()))
    assert firsts == [e["id"] for e in healthy.accepted()]  # at least once, in order, the same ids


def test_a_receiver_slow_to_answer_does_not_hold_back_another_payees_webhook(
    api: Callable[..., TestClient],
    known_channel: Callable[[TestClient, int, int], Channel],
    sign: Sign,
    receiver: Callable[..., Receiver],
) -> None:
    """A receiver answering each delivery just inside the timeout (a payee's own, on purpose or not) held every other
    webhook's next tick until all its due events were delivered: the sender waited for the whole tick, up to 100
    such answers. Its turn now ends after TURN_SECONDS and ticks go on without it: another payee's event arrives
    while the slow one's are still coming, and the slow one still gets every event, in order."""
    client = api(webhook_tick=0.05, webhook_timeout_seconds=5.0)
    busy, quiet = known_channel(client, 5, 6), known_channel(client, 7, 8)
    slow, other = receiver(delay=0.6), receiver()
    subscribe(client, busy.payee, slow.url)
    subscribe(client, quiet.payee, other.url)
    amounts = list(range(1, 9))
    vouchers = [body(busy, n, sign(busy.payer, busy.id, n)) for n in amounts]  # one commit: all due at one tick
    assert client.post("/v1/vouchers/batch", json={"vouchers": vouchers}).json()["accepted"] == len(amounts)
    wait_until(lambda: len(slow.accepted()) >= 1, timeout=10)  # its turn is under way
    pay(client, quiet, sign, 5)
    wait_until(lambda: len(other.accepted()) == 1, timeout=10)
    assert len(slow.accepted()) <= 3  # a turn of 1 s at 0.6 s an answer, and the next begun; old code: all 8 first
    wait_until(lambda: len(slow.accepted()) == len(amounts), timeout=30)
    assert [e["data"]["cumulativeAmount"] for e in slow.accepted()] == [str(n) for n in amounts]


def test_many_slow_receivers_never_hold_the_threads_other_payees_webhooks_are_delivered_on(
    api: Callable[..., TestClient],
    known_channel: Callable[[TestClient, int, int], Channel],
    sign: Sign,
    receiver: Callable[..., Receiver],
) -> None:
    """A turn ends after TURN_SECONDS, but a receiver that takes a second to answer holds its thread that long each
    turn: a payee's ten webhooks on such receivers (its own, on a channel it pays itself) held every sender thread,
    and another payee's event waited behind all their turns, every time they had an event. A webhook whose receiver
    answered slowly now takes its turns on a quarter as many threads of their own for a minute: once they are
    known, another payee's event is delivered while theirs wait their turns, and they still get every event, in
    order. Old code: the other payee's event came after at least four of their second deliveries."""
    client = api(webhook_tick=0.05, webhook_timeout_seconds=5.0, webhook_concurrency=4)  # 1 slow thread
    busy, quiet = known_channel(client, 5, 6), known_channel(client, 7, 8)
    slow = [receiver(delay=1.0) for _ in range(8)]
    for hook in slow:
        subscribe(client, busy.payee, hook.url)
    other = receiver()
    subscribe(client, quiet.payee, other.url)  # the last made: due after them
    pay(client, busy, sign, 1)
    wait_until(lambda: all(len(hook.accepted()) == 1 for hook in slow), timeout=30)  # each answered slowly once
    pay(client, busy, sign, 2)
    time.sleep(0.3)  # ticks: all eight turns begun or waiting for a thread
    pay(client, quiet, sign, 5)
    wait_until(lambda: len(other.accepted()) == 1, timeout=30)
    assert sum(len(hook.accepted()) - 1 for hook in slow) <= 1
    wait_until(lambda: all(len(hook.accepted()) == 2 for hook in slow), timeout=30)
    assert [[e["data"]["cumulativeAmount"] for e in hook.accepted()] for hook in slow] == [["1", "2"]] * 8


class HostileReceiver(LocalServer):
    """A webhook endpoint that never finishes its answer (`url`, while its `with` block lasts): `endless` answers 200
    and then a body that goes on (up to `body_cap` bytes, counted in `written`), `dribble` sends its status line and
    then a header byte every 0.2 s."""

    def __init__(self, mode: str, body_cap: int = 256 * 2**20) -> None:
        super().__init__()
        self.url = f"{self.url}/hook"
        self.mode, self.body_cap, self.written, self.posts = mode, body_cap, 0, 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                hostile.posts += 1
                try:
                    if hostile.mode == "endless":
                        self.send_response(200)
                        self.send_header("transfer-encoding", "chunked")
                        self.end_headers()
                        chunk = b"x" * 65536
                        while hostile.written < hostile.body_cap:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            hostile.written += len(chunk)
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
                        for _ in range(600):
                            time.sleep(0.2)
                            self.wfile.write(b"a")
                            self.wfile.flush()
                except OSError:
                    pass  # the sender hung up
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def test_a_receiver_that_never_finishes_its_answer_holds_nothing(
    api: Callable[..., TestClient],
    known_channel: Callable[[TestClient, int, int], Channel],
    sign: Sign,
    receiver: Callable[..., Receiver],
) -> None:
    """The sender read a receiver's whole answer with a timeout per read: a receiver streaming an endless body had it
    read into the service's memory (~400 MB a second on loopback, until the process died), one dribbling its headers
    a byte at a time held a sender thread for good. Now an answer's status is all that is read, and an exchange ends
    at `webhook_timeout_seconds` in all: the endless one's 200s are deliveries, the dribbling one's are failures,
    retried with backoff, and a healthy receiver beside them gets every event."""
    client = api(webhook_tick=0.05, webhook_timeout_seconds=1.0, webhook_backoff_max_seconds=0.5)
    channel = known_channel(client, 5, 6)
    healthy = receiver()
    with HostileReceiver("endless") as endless, HostileReceiver("dribble") as dribble:
        made = {name: subscribe(client, channel.payee, hook.url) for name, hook in
                (("endless", endless), ("dribble", dribble), ("healthy", healthy))}  # fmt: skip
        pay(client, channel, sign, 5, 7)
        wait_until(lambda: len(healthy.accepted()) == 2, timeout=15)
        first, last = healthy.accepted()[0]["id"], int(healthy.accepted()[-1]["id"].removeprefix("pay_"))

        def listed() -> dict[str, dict[str, Any]]:
            hooks = client.get(f"/v1/payees/{channel.payee}/webhooks").json()
            return {name: next(h for h in hooks if h["webhookId"] == m["webhookId"]) for name, m in made.items()}

        def delivered(hook: dict[str, Any]) -> int:
            """The last payment a webhook delivered: its position's first part. Not the whole position: its chain
            part is where the webhook began reading chain events, and a chain event the indexer records between two
            webhooks' creation gives them different ones for good (a flake: the two compared whole)."""
            position = Position.parse(hook["position"])
            assert position is not None
            return position.payment

        wait_until(lambda: delivered(listed()["endless"]) == last, timeout=15)
        wait_until(lambda: listed()["dribble"]["failures"] >= 2, timeout=15)
        hooks = listed()
        assert (hooks["endless"]["failures"], endless.posts) == (0, 2)  # two events, each delivered once
        assert endless.written < 64 * 2**20  # what the sockets' buffers took before the sender hung up; old: 256 MB
        assert hooks["dribble"]["lastError"].startswith(f"{first}: TimeoutError")
        assert delivered(hooks["dribble"]) == delivered(made["dribble"])  # its first event still to deliver


def test_a_receiver_down_gets_everything_when_it_comes_back(
    api: Callable[..., TestClient],
    known_channel: Callable[[TestClient, int, int], Channel],
    sign: Sign,
    receiver: Callable[..., Receiver],
) -> None:
    client = api(webhook_tick=0.05, webhook_backoff_max_seconds=0.3)
    channel = known_channel(client, 7, 8)
    hook = receiver(started=False)
    subscribe(client, channel.payee, hook.url)
    pay(client, channel, sign, *range(1, 121))  # more than one tick's batch of 100
    wait_until(lambda: client.get(f"/v1/payees/{channel.payee}/webhooks").json()[0]["failures"] >= 2, timeout=10)
    state = client.get(f"/v1/payees/{channel.payee}/webhooks").json()[0]
    assert "ConnectError" in state["lastError"]
    hook.start()
    wait_until(lambda: len(hook.accepted()) == 120, timeout=30)
    assert [e["data"]["cumulativeAmount"] for e in hook.accepted()] == [str(n) for n in range(1, 121)]
    assert client.get(f"/v1/payees/{channel.payee}/webhooks").json()[0]["failures"] == 0


def test_webhooks_are_the_payees_and_their_targets_are_checked(
    api: Callable[..., TestClient], accounts: list[LocalAccount], receiver: Callable[..., Receiver]
) -> None:
    client = api(access_control=True, webhooks_per_payee=2)
    payee, other = accounts[4], accounts[6]

    hook = receiver()
    path = f"/v1/payees/{payee.address}/webhooks"
    assert client.post(path, json={"url": hook.url}).status_code == 401
    refused = client.post(path, json={"url": hook.url}, headers=signed_in(client, other))
    assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
    assert client.get(f"/v1/payees/{payee.address}/events", headers=signed_in(client, other)).status_code == 403
    own = signed_in(client, payee)
    first = subscribe(client, payee.address, hook.url, **own)
    subscribe(client, payee.address, hook.url, **own)
    third = client.post(path, json={"url": hook.url}, headers=own)
    assert (third.status_code, third.json()["code"]) == (409, "webhook_limit")
    for bad in ("ftp://example.com/x", "http://user:pw@example.com/", "not a url", "http:///nohost"):
        answer = client.post(path, json={"url": bad}, headers=own)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request"), bad
    malformed = client.delete(f"{path}/not-a-webhook-id", headers=own)
    assert (malformed.status_code, malformed.json()["code"]) == (400, "malformed_request")
    gone = client.delete(f"{path}/{first['webhookId']}", headers=own)
    assert gone.status_code == 204
    assert client.delete(f"{path}/{first['webhookId']}", headers=own).status_code == 404
    listed = [w["webhookId"] for w in client.get(path, headers=own).json()]
    assert first["webhookId"] not in listed and len(listed) == 1


def test_concurrent_webhook_requests_cannot_pass_the_limit_together(
    spawn: Callable[..., ServiceProcess],
    store_url: str,
    accounts: list[LocalAccount],
    receiver: Callable[..., Receiver],
) -> None:
    """Eight payee requests at once against a limit of two, on a real serve and both stores: two made, six refused."""
    service = spawn(store_url, webhooks_per_payee="2")
    url = receiver().url
    path = f"{service.url}/v1/payees/{accounts[4].address}/webhooks"
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: httpx.post(path, json={"url": url}, timeout=30).status_code, range(8)))
    assert codes == [201, 201] + [409] * 6
    assert len(httpx.get(path).json()) == 2


def test_the_service_holds_at_most_its_webhooks_in_all_even_when_payees_ask_at_once(
    spawn: Callable[..., ServiceProcess],
    store_url: str,
    accounts: list[LocalAccount],
    receiver: Callable[..., Receiver],
) -> None:
    """The sender reads every live webhook's row at each tick, and anyone may sign in with a fresh key and make ten
    for its own address: a million fresh addresses were ten million rows read twice a second. The service now holds
    `SETTLEMENT_WEBHOOKS_MAX` in all (503 `webhooks_full` beyond): eight payees at once against three, on a real serve
    and both stores, make three; a deleted one frees its place."""
    service = spawn(store_url, webhooks_max="3")
    url = receiver().url
    paths = [f"{service.url}/v1/payees/{account.address}/webhooks" for account in accounts[2:10]]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda path: httpx.post(path, json={"url": url}, timeout=30), paths))
    assert sorted(a.status_code for a in answers) == [201] * 3 + [503] * 5
    assert {a.json()["code"] for a in answers if a.status_code == 503} == {"webhooks_full"}
    made = [(path, a.json()["webhookId"]) for path, a in zip(paths, answers, strict=True) if a.status_code == 201]
    assert sum(len(httpx.get(path).json()) for path in paths) == 3
    refused = next(path for path, a in zip(paths, answers, strict=True) if a.status_code == 503)
    first_path, first_id = made[0]
    assert httpx.delete(f"{first_path}/{first_id}", timeout=30).status_code == 204
    assert httpx.post(refused, json={"url": url}, timeout=30).status_code == 201
    assert httpx.post(first_path, json={"url": url}, timeout=30).json()["code"] == "webhooks_full"


def test_fresh_keys_fill_no_more_than_their_share_of_webhooks_and_never_hold_back_a_payee_of_a_channel(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    receiver: Callable[..., Receiver],
) -> None:
    """With the limit in all alone, a thousand fresh keys (signing in is free) making ten webhooks each took every
    place, and no payee with channels could make one until the operator stepped in. Payees of no channel in the store
    now share SETTLEMENT_WEBHOOKS_WITHOUT_CHANNELS (503 `webhooks_full` beyond), and a payee of a channel still finds
    the rest, on both stores."""
    client = api(access_control=True, webhooks_without_channels=2, webhooks_max=4)
    url = receiver().url
    fresh = [Account.create() for _ in range(3)]

    def make(key: Any) -> Answer:
        return client.post(f"/v1/payees/{key.address}/webhooks", json={"url": url}, headers=signed_in(client, key))

    assert [make(fresh[0]).status_code, make(fresh[0]).status_code] == [201, 201]
    refused = make(fresh[1])
    assert (refused.status_code, refused.json()["code"]) == (503, "webhooks_full")
    assert "SETTLEMENT_WEBHOOKS_WITHOUT_CHANNELS" in refused.json()["message"]
    payee = accounts[6]
    channel = open_channel(accounts[5], payee.address, amount=1_000)
    wait_until(lambda: client.get(f"/v1/channels/{channel.hex_id}", headers=signed_in(client, payee)).is_success)
    assert [make(payee).status_code, make(payee).status_code] == [201, 201]  # 4 in all: not held back by them
    full = make(accounts[7])
    assert (full.status_code, full.json()["code"]) == (503, "webhooks_full")
    assert "SETTLEMENT_WEBHOOKS_MAX" in full.json()["message"]
    first = client.get(f"/v1/payees/{fresh[0].address}/webhooks", headers=signed_in(client, fresh[0])).json()[0]
    gone = client.delete(
        f"/v1/payees/{fresh[0].address}/webhooks/{first['webhookId']}", headers=signed_in(client, fresh[0])
    )
    assert gone.status_code == 204
    assert make(fresh[2]).status_code == 201  # a place given back is a fresh key's again


def test_off_a_devnet_a_webhook_cannot_aim_inside_the_network() -> None:
    for url in ("http://127.0.0.1:5432/", "http://localhost/x", "http://169.254.169.254/latest", "http://10.1.2.3/"):
        with pytest.raises(MalformedRequestError, match="private, loopback or reserved"):
            check_target(url, allow_private=False)
    check_target("http://93.184.216.34/hook", allow_private=False)  # a public address
    check_target("http://127.0.0.1:9000/hook", allow_private=True)


def resolving_to(*ips: str) -> Callable[[str, int], list[tuple[Any, ...]]]:
    """A resolver (socket.getaddrinfo's shape) answering `ips` for any host."""

    def resolve(_host: str, port: int) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

    return resolve


def test_a_webhook_host_slow_to_resolve_holds_no_request_thread(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount]
) -> None:
    """Making a webhook looked its host up on a request thread (4 of them): hosts in a zone whose DNS answers slowly
    (an attacker's own) held them all, and every store read of every client waited. The look-ups now wait on
    threads of their own, and a request gives up after the look-up's timeout. While such hosts hold every look-up
    thread, another payee's webhook is refused at once, retryable (before, it waited behind them and was told its own
    host did not resolve); once they answer, it is made."""
    client = api()
    lookups = service_of(client).lookups
    answer_now = threading.Event()

    def slow(host: str, port: int) -> list[tuple[Any, ...]]:  # a zone that answers when the test says so
        answer_now.wait(30)
        raise OSError(f"{host}: no answer")

    lookups.resolve, lookups.timeout = slow, 30.0
    channel = open_channel(accounts[5], accounts[6].address, amount=1_000)
    path = f"/v1/channels/{channel.hex_id}"
    wait_until(lambda: client.get(path).status_code == 200)
    made = f"/v1/payees/{channel.payee}/webhooks"
    other = f"/v1/payees/{accounts[7].address}/webhooks"  # another payee's (access control is off here)
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(client.post, made, json={"url": f"https://h{n}.slow.test/in"}) for n in range(4)]
        time.sleep(1.0)  # all four waiting for their hosts, on the four look-up threads
        assert client.get(path).status_code == 200  # a store read on a request thread: none is held
        assert [request.done() for request in pending] == [False] * 4
        busy = client.post(other, json={"url": "https://hooks.example.com/in"})
        assert (busy.status_code, busy.json()["code"], busy.headers["retry-after"]) == (503, "lookups_busy", "5")
        answer_now.set()
        assert [request.result().json()["code"] for request in pending] == ["malformed_request"] * 4
    lookups.resolve = resolving_to("93.184.216.34")
    assert client.post(other, json={"url": "https://hooks.example.com/in"}).status_code == 201
    lookups.resolve = slow
    answer_now.clear()
    lookups.timeout = 0.2
    late = client.post(made, json={"url": "https://late.slow.test/in"})
    assert (late.status_code, late.json()["message"]) == (
        400,
        "the webhook's host 'late.slow.test' did not resolve in 0.2s",
    )
    answer_now.set()


def test_a_webhook_is_sent_to_the_address_that_was_checked_for_its_own_name() -> None:
    """Every address a host resolves to is checked, and the delivery goes to the first, by its name (Host, and SNI
    for TLS, which the certificate is checked against): the HTTP client never looks the name up again."""
    public = resolving_to("93.184.216.34")
    assert check_target("https://Hooks.Example.com/in?x=1#f", False, public) == Target(
        "https://93.184.216.34:443/in?x=1", "hooks.example.com", "hooks.example.com"
    )
    assert check_target("http://hooks.example.com:8080", False, resolving_to("2606:2800:220:1::1")) == Target(
        "http://[2606:2800:220:1::1]:8080/", "hooks.example.com:8080", None
    )
    with pytest.raises(MalformedRequestError, match=re.escape("private, loopback or reserved address (127.0.0.1)")):
        check_target("https://hooks.example.com/in", False, resolving_to("93.184.216.34", "127.0.0.1"))
    with pytest.raises(MalformedRequestError, match="does not resolve"):
        check_target("https://hooks.example.com/in", False, resolving_to())


def test_an_ipv6_address_carrying_an_inside_ipv4_address_is_inside() -> None:
    """Python's `is_global` counts IPv6 forms that carry an IPv4 address by the IPv6 prefix alone: a host resolving to
    64:ff9b::a9fe:a9fe reached 169.254.169.254 (a cloud's metadata) through a NAT64 gateway, and 6to4 or
    IPv4-compatible forms of 127.0.0.1 and 10.0.0.1 passed the check. Each carried address is judged now; the same
    forms of a public address pass, on every Python: 2002:808:808::1 (8.8.8.8's 6to4 form) was refused on 3.13 and on
    Debian's 3.11.2, whose tables count 2002::/16 as private."""
    inside = [
        "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::c0a8:101",  # NAT64 of inside addresses
        "64:ff9b:1::808:808",  # RFC 8215's local-use NAT64 prefix: the network's own choice of target
        "2002:7f00:1::1", "2002:a00:1::", "2002:a9fe:a9fe::1",  # 6to4
        "::7f00:1", "::a00:1",  # IPv4-compatible (deprecated)
        "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    ]  # fmt: skip
    refused = []
    for ip in inside:
        with pytest.raises(MalformedRequestError, match="private, loopback or reserved") as caught:
            check_target("https://hooks.example.com/in", False, resolving_to(ip))
        refused.append(f"({ipaddress.ip_address(ip)})" in caught.value.message)
    assert refused == [True] * len(inside)
    # 8.8.8.8 in each form, and a public IPv6 address
    for ip in ("64:ff9b::808:808", "2002:808:808::1", "::808:808", "::ffff:808:808", "2606:2800:220:1::1"):
        assert check_target("http://hooks.example.com", False, resolving_to(ip)).url.startswith("http://[")


def test_a_delivery_reaches_only_the_address_its_one_look_up_found(
    db: Database, store_url: str, receiver: Callable[..., Receiver]
) -> None:
    """DNS rebinding: a webhook host answering a public address to the check and one inside the network to the HTTP
    client's own look-up a moment later carried the delivery inside. Now each delivery looks its host up once and
    sends to that address: `hooks.rebind.test` resolves only through the sender's resolver here (the system does
    not know the name), to the receiver, which is asked for it by name."""
    hook = receiver()
    lookups: list[tuple[str, int]] = []
    loopback = resolving_to("127.0.0.1")

    def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        lookups.append((host, port))
        return loopback(host, port)

    channel = a_channel(1, QUIET)
    url = f"http://hooks.rebind.test:{hook.port}/hook"
    with db.write() as conn:
        channel_q.insert_channel(conn, channel, utcnow())
        row = WebhookRow("wh_" + "1" * 16, QUIET, url, "s", 0, 0, 0, -1, 0, 0, None)
        assert add_webhook(conn, row, Limits(10, 1_000, 1_000)) is Admission.ADMITTED
    paid(db, channel, range(1, 3))
    settings = Settings(_env_file=None, database_url=store_url)  # type: ignore[call-arg]
    sender = WebhookSender(db, settings, True, Horizon(db), resolve)
    try:
        assert sender.tick(wait=30) == 2
    finally:
        sender.close()
    assert lookups == [("hooks.rebind.test", hook.port)] * 2
    hosts = [
        (status, {k.lower(): v for k, v in headers.items()}["host"], json.loads(raw)["data"]["cumulativeAmount"])
        for status, headers, raw in hook.deliveries
    ]
    assert hosts == [(200, f"hooks.rebind.test:{hook.port}", "1"), (200, f"hooks.rebind.test:{hook.port}", "2")]


def test_deliveries_survive_the_service_killed_mid_delivery(
    spawn: Callable[..., ServiceProcess],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    receiver: Callable[..., Receiver],
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'hooks.db'}"
    service = spawn(store, webhook_tick="0.05", webhook_timeout_seconds="5")
    channel = open_channel(accounts[9], accounts[10].address, amount=1_000)
    hook = receiver(delay=0.3)  # each delivery in flight for a while: the kill lands inside one
    made = httpx.post(f"{service.url}/v1/payees/{channel.payee}/webhooks", json={"url": hook.url}).json()
    wait_until(lambda: httpx.get(f"{service.url}/v1/channels/{channel.hex_id}").status_code == 200)
    for cumulative in range(1, 11):
        voucher = body(channel, cumulative, sign(channel.payer, channel.id, cumulative))
        assert httpx.post(f"{service.url}/v1/vouchers", json=voucher).status_code == 201
    wait_until(lambda: len(hook.deliveries) >= 3, timeout=20)
    service.kill()
    service.start()
    wait_until(lambda: len({json.loads(raw)["id"] for _, _, raw in hook.deliveries}) == 10, timeout=30)
    ids = [json.loads(raw)["id"] for _, _, raw in hook.deliveries]
    assert list(dict.fromkeys(ids)) == [f"pay_{n}" for n in range(1, 11)]  # a fresh store: payment ids 1 to 10
    repeated = [i for n, i in enumerate(ids) if i in ids[:n]]
    assert len(repeated) <= 1  # only the delivery the kill interrupted (its answer lost) may come twice
    assert ids == sorted(ids, key=lambda i: int(i.split("_")[1]))  # and never out of order
    assert all(is_authentic(made["secret"], h["Settlement-Signature"], raw) for _, h, raw in hook.deliveries)


def test_the_live_stream_sends_events_as_they_happen_and_resumes_after_the_last_one(
    serve_here: Callable[..., ServiceThread],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    tmp_path: Path,
) -> None:
    service = serve_here(f"sqlite:///{tmp_path / 'stream.db'}")
    channel = open_channel(accounts[11], accounts[12].address, amount=1_000)
    wait_until(lambda: httpx.get(f"{service.url}/v1/channels/{channel.hex_id}").status_code == 200)
    url = f"{service.url}/v1/payees/{channel.payee}/events"

    def pay_many(*amounts: int) -> None:
        for cumulative in amounts:
            voucher = body(channel, cumulative, sign(channel.payer, channel.id, cumulative))
            assert httpx.post(f"{service.url}/v1/vouchers", json=voucher).status_code == 201

    def read(count: int, headers: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
        got: list[tuple[str, dict[str, Any]]] = []
        with httpx.stream("GET", url, headers=headers, timeout=10) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            event_id = ""
            for line in stream.iter_lines():
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    got.append((event_id, json.loads(line[5:].strip())))
                    if len(got) == count:
                        return got
        return got

    pay_many(3)
    threading.Timer(0.5, pay_many, args=(4, 6)).start()
    first = read(2, {})  # from now on: the payment before the stream opened is not in it
    assert [e["data"]["cumulativeAmount"] for _, e in first] == ["4", "6"]
    pay_many(9, 12)
    resumed = read(2, {"Last-Event-ID": first[-1][0]})
    assert [e["data"]["cumulativeAmount"] for _, e in resumed] == ["9", "12"]
    assert resumed[0][1]["id"] != first[-1][1]["id"]
    too_far = ("9223372036854775808.0.-1", "0.9223372036854775808.-1", "0.0.2147483648")  # past 64- and 32-bit
    for token in ("x.y", "1.2.-2", *too_far):  # (the databases refused to compare with them: a broken stream)
        bad = httpx.get(url, headers={"Last-Event-ID": token}, timeout=10)
        assert (bad.status_code, bad.json()["code"]) == (400, "malformed_request"), token
    # Digits to str.isdigit that int() refuses (a 500 before) or reads as another form of a number, a double sign.
    for token in ("1.2.\u00b2", "\u0661.0.0", "--1.0.0", "1.2.3\n", " 1.2.3"):
        bad = httpx.get(url, params={"after": token}, timeout=10)
        assert (bad.status_code, bad.json()["code"]) == (400, "malformed_request"), token


def test_live_streams_are_bounded_per_account_and_per_process_and_an_idle_one_reads_nothing(
    serve_here: Callable[..., ServiceThread],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Signing in is free, and each stream read the store twice a tick, idle or not, without a bound on their number:
    300 idle streams of one fresh key took a core of the service and made an honest read ~20x slower (scratch run,
    docs/payee-events.md). An account now holds at most SETTLEMENT_EVENT_STREAMS_PER_ACCOUNT streams, a process serves
    at most SETTLEMENT_EVENT_STREAMS_MAX, a closed stream gives its place back, and a stream reads its payee's feed
    only when the process's one read of the front shows something new."""
    feed_reads: list[str] = []

    def counted(db: Database, horizon: int, payee: str, after: Position, limit: int = 100) -> Feed:
        feed_reads.append(payee)
        return read_events(db, horizon, payee, after, limit)

    monkeypatch.setattr("settlement.api.routes_payees.read_events", counted)
    service = serve_here(
        f"sqlite:///{tmp_path / 'streams.db'}", access_control=True, event_streams_per_account=2, event_streams_max=3
    )
    alice, bob = accounts[11], accounts[12]
    channel = open_channel(accounts[13], alice.address, amount=1_000)
    with httpx.Client(base_url=service.url, timeout=10) as client:
        as_alice, as_bob = signed_in(client, alice), signed_in(client, bob)
        wait_until(lambda: client.get(f"/v1/channels/{channel.hex_id}", headers=as_alice).status_code == 200)
    events_of_alice, events_of_bob = (f"{service.url}/v1/payees/{who.address}/events" for who in (alice, bob))
    opened: list[EventStream] = []

    def stream(url: str, headers: dict[str, str]) -> EventStream:
        made = EventStream(url, headers)
        opened.append(made)
        return made

    try:
        first, second = stream(events_of_alice, as_alice), stream(events_of_alice, as_alice)
        third = stream(events_of_alice, as_alice)
        assert (first.status, second.status, third.status) == (200, 200, 429)
        assert third.json()["code"] == "stream_limit"
        own = stream(events_of_bob, as_bob)
        full = stream(events_of_bob, as_bob)
        assert (own.status, full.status, full.json()["code"]) == (200, 503, "streams_full")
        assert full.response.headers["retry-after"] == "5"
        second.close()  # its place comes back once the service sees the disconnect
        wait_until(lambda: stream(events_of_bob, as_bob).status == 200)
        for _ in range(5):  # an account opening and closing streams never leaks one of its places
            opened[-1].close()
            wait_until(lambda: stream(events_of_alice, as_alice).status == 200)
        live = [s for s in opened if s.status == 200 and not s.response.is_closed]
        assert [s.response.url.path.split("/")[3] for s in live] == [alice.address, bob.address, alice.address]

        # A stream reads its feed once when it starts: the last one opened may do so only now on a loaded machine (a
        # CI run counted its read in the idle window). Counted once the reads stop for half a second (ten at most).
        reads = len(feed_reads)
        for _ in range(20):
            time.sleep(0.5)
            if len(feed_reads) == reads:
                break
            reads = len(feed_reads)
        time.sleep(2)  # four ticks of the front: nothing happened, so no stream read the store
        assert len(feed_reads) == reads
        voucher = body(channel, 7, sign(channel.payer, channel.id, 7))
        assert httpx.post(f"{service.url}/v1/vouchers", json=voucher).status_code == 201
        for alices in (live[0], live[2]):
            kind, event = alices.next() or ("", {})
            assert (kind, event["data"]["cumulativeAmount"]) == ("payment.accepted", "7")
        time.sleep(1)
        assert sorted(feed_reads[reads:]) == sorted([alice.address, bob.address, alice.address])  # one read each
    finally:
        for made in opened:
            made.close()


def test_fresh_keys_take_no_more_than_their_share_of_a_processs_streams(
    serve_here: Callable[..., ServiceThread],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    store_url: str,
) -> None:
    """An account holds at most SETTLEMENT_EVENT_STREAMS_PER_ACCOUNT (4) streams of a process and the process serves
    SETTLEMENT_EVENT_STREAMS_MAX (100): 25 fresh keys (free) took every stream, for as long as they held them, and no
    payee of a channel could have one. Payees of no channel now share SETTLEMENT_EVENT_STREAMS_WITHOUT_CHANNELS of
    them (503 `streams_full` beyond), on both stores; a stream closed gives its place back to its kind."""
    service = serve_here(
        store_url,
        access_control=True,
        event_streams_per_account=2,
        event_streams_max=5,
        event_streams_without_channels=3,
    )
    payee = accounts[11]
    fresh = [Account.create() for _ in range(2)]
    channel = open_channel(accounts[13], payee.address, amount=1_000)
    with httpx.Client(base_url=service.url, timeout=10) as client:
        as_payee, as_fresh = signed_in(client, payee), [signed_in(client, key) for key in fresh]
        wait_until(lambda: client.get(f"/v1/channels/{channel.hex_id}", headers=as_payee).status_code == 200)
    opened: list[EventStream] = []

    def stream(who: Any, headers: dict[str, str]) -> EventStream:
        opened.append(EventStream(f"{service.url}/v1/payees/{who.address}/events", headers))
        return opened[-1]

    try:
        held = [stream(fresh[0], as_fresh[0]), stream(fresh[0], as_fresh[0]), stream(fresh[1], as_fresh[1])]
        refused = stream(fresh[1], as_fresh[1])
        assert [s.status for s in held] + [refused.status] == [200, 200, 200, 503]
        assert refused.json()["code"] == "streams_full"
        assert "SETTLEMENT_EVENT_STREAMS_WITHOUT_CHANNELS" in refused.json()["message"]
        assert [stream(payee, as_payee).status, stream(payee, as_payee).status] == [200, 200]  # 5: the process's
        full = stream(fresh[1], as_fresh[1])
        assert (full.status, full.json()["code"]) == (503, "streams_full")
        assert "SETTLEMENT_EVENT_STREAMS_MAX" in full.json()["message"]
        held[0].close()
        wait_until(lambda: stream(fresh[1], as_fresh[1]).status == 200)
    finally:
        for made in opened:
            made.close()


def test_a_forged_delivery_signature_is_not_authentic_and_never_an_error() -> None:
    """The header is the sender's text: whatever it holds, `is_authentic` answers False (a payee's webhook route
    answering it with a 500 was one forged request away: "t=²" and a 5,000-digit time raised in int())."""
    secret, body, now = "whsec_test", b'{"id":"evt_1"}', 1_800_000_000
    good = signature(secret, body, now)
    assert is_authentic(secret, good, body, now=now)
    mac = good.split("v1=", 1)[1]
    forged = [
        None, "", "t=", "v1=" + mac, f"t=\u00b2,v1={mac}", f"t={'9' * 5000},v1={mac}", f"t=\u0661{now},v1={mac}",
        f"t=-{now},v1={mac}", f"t={now} 5,v1={mac}", f"t={now},t={now},v1={mac}", f"t={now},v1={mac[:-1]}",
        f"t={now + 1},v1={mac}", f"t={now},v1=", "t=x,v1=y", ",,,", "=",
    ]  # fmt: skip
    assert [is_authentic(secret, header, body, now=now) for header in forged] == [False] * len(forged)
    assert is_authentic(secret, f"t={now},v1={'0' * 64},v1={mac}", body, now=now)  # a second, rotated MAC holds


def paid(db: Database, channel: StoredChannel, amounts: range) -> int:
    """Payments straight into the store; the id of the last one."""
    with db.write() as conn:
        now = utcnow()
        channel_q.record_payments(conn, [(Receipt(channel.channel_id, n, 1, 1, now), b"\x01" * 65) for n in amounts])
        return last_payment_id(conn)


QUIET, BUSY = "0x" + "a1" * 20, "0x" + "b2" * 20


def test_a_quiet_payees_feed_passes_what_it_looked_at_and_reaches_its_own_close_behind_others_settlements(
    db: Database,
) -> None:
    """A read of the feed leaves its reader past every row it looked at, the payee's or not. Before, a page of other
    payees' settlements (100) in front of a payee's own close stopped its stream and its webhooks for good, and a
    quiet payee's every read walked again every payment made since its last one (200 ms a read on PostgreSQL with a
    million)."""
    quiet, busy = a_channel(1, QUIET), a_channel(2, BUSY)
    with db.write() as conn:
        for channel in (quiet, busy):
            channel_q.insert_channel(conn, channel, utcnow())
    # 150 settlements of the busy payee, three a block (blocks 10-59): the first page of 100 ends inside block 43;
    # the quiet payee's close comes in the block of the last three.
    chain_happened(db, "ChannelsSettled", positions(10, 150), payee=BUSY, token=ETH)
    chain_happened(db, "CloseRequested", [(59, 3)], channel=quiet.channel_id, deadline=9)
    paid(db, busy, range(1, 251))
    own = paid(db, quiet, range(1, 2))
    horizon = Horizon(db)
    reads: list[tuple[list[str], Position, bool]] = []
    position = Position()
    for _ in range(3):
        feed = read_events(db, horizon.refresh(), QUIET, position)
        reads.append(([e.type for e in feed.events], feed.position, feed.more))
        position = feed.position
    assert reads == [
        (["payment.accepted"], Position(own, 43, 0), True),  # 100 settlements looked at, none the payee's
        (["channel.closing"], Position(own, 59, 3), False),
        ([], Position(own, 59, 3), False),
    ]
    last = paid(db, busy, range(251, 551))  # the busy payee's: the quiet one's reader passes them, once
    assert read_events(db, horizon.refresh(), QUIET, position) == Feed([], Position(last, 59, 3), False)
    mine = paid(db, quiet, range(2, 3))  # above the horizon given: not safe to pass yet, nor to step over
    assert read_events(db, mine - 1, QUIET, Position(last, 59, 3)) == Feed([], Position(last, 59, 3), False)
    feed = read_events(db, mine, QUIET, Position(last, 59, 3))
    assert ([e.data["cumulativeAmount"] for e in feed.events], feed.position) == (["2"], Position(mine, 59, 3))
    largest = Position.parse(f"{2**63 - 1}.{2**63 - 1}.{2**31 - 1}")  # the furthest a reader may ask: read
    assert largest is not None and read_events(db, mine, QUIET, largest) == Feed([], largest, False)


def test_a_quiet_payees_webhook_stores_what_it_passed_without_a_delivery(db: Database, store_url: str) -> None:
    """A webhook's stored position moves past the other payees' rows its reads looked at: past settlements at once,
    past payments once there are PASSED_SAVED of them (a write per webhook at every tick would cost more than the
    walk it saves), so a quiet payee's webhook never walks more than that many again."""
    quiet, busy = a_channel(1, QUIET), a_channel(2, BUSY)
    with db.write() as conn:
        for channel in (quiet, busy):
            channel_q.insert_channel(conn, channel, utcnow())
        row = WebhookRow("wh_" + "0" * 16, QUIET, "http://127.0.0.1:9/never", "s", 0, 0, 0, -1, 0, 0, None)
        assert add_webhook(conn, row, Limits(10, 1_000, 1_000)) is Admission.ADMITTED
    sender = WebhookSender(db, Settings(_env_file=None, database_url=store_url), True, Horizon(db))  # type: ignore[call-arg]

    def stored() -> Position:
        with db.read() as conn:
            (hook,) = payee_webhooks(conn, QUIET)
        assert (hook.failures, hook.last_error) == (0, None)  # nothing was sent: nothing failed
        return Position(hook.after_payment, hook.after_block, hook.after_log)

    try:
        paid(db, busy, range(1, PASSED_SAVED))
        assert (sender.tick(wait=30), stored()) == (0, Position(0, 0, -1))
        last = paid(db, busy, range(PASSED_SAVED, PASSED_SAVED + 1))
        assert (sender.tick(wait=30), stored()) == (0, Position(last, 0, -1))
        chain_happened(db, "ChannelsSettled", positions(7, 2), payee=BUSY, token=ETH)  # two in block 7
        assert (sender.tick(wait=30), stored()) == (0, Position(last, 7, 1))
    finally:
        sender.close()


def test_a_webhook_host_slow_to_resolve_fails_at_the_timeout_and_holds_no_sender_thread(
    db: Database, store_url: str, receiver: Callable[..., Receiver]
) -> None:
    """The sender looked a webhook's host up before each delivery with no deadline of its own: a host whose DNS
    answers slowly held a sender thread for as long as the resolver waited, and with it the webhooks queued behind.
    The look-up is now within the delivery's timeout: a failure like any other, retried with backoff. One sender
    thread here, so a held one would hold the other payee's delivery too."""
    hook = receiver()
    answer_now = threading.Event()

    def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        if host == "slow.test":
            answer_now.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    slow, fast = a_channel(1, QUIET), a_channel(2, BUSY)
    with db.write() as conn:
        for n, (channel, host) in enumerate(((slow, "slow.test"), (fast, "fast.test"))):
            channel_q.insert_channel(conn, channel, utcnow())
            url = f"http://{host}:{hook.port}/hook"
            row = WebhookRow(f"wh_{n:016x}", channel.payee, url, "s", 0, 0, 0, -1, 0, 0, None)
            assert add_webhook(conn, row, Limits(10, 1_000, 1_000)) is Admission.ADMITTED
    settings = Settings(_env_file=None, database_url=store_url, webhook_timeout_seconds=0.5, webhook_concurrency=1)  # type: ignore[call-arg]
    sender = WebhookSender(db, settings, True, Horizon(db), resolve)
    try:
        paid(db, slow, range(1, 2))
        paid(db, fast, range(1, 2))
        assert sender.tick(wait=20) == 1  # old code: the fast payee's delivery waited behind the look-up
        with db.read() as conn:
            (stuck,) = payee_webhooks(conn, QUIET)
        assert (stuck.failures, (stuck.last_error or "").split(":")[1].strip()) == (1, "TimeoutError")
        assert [json.loads(raw)["id"] for _, _, raw in hook.deliveries] == ["pay_2"]
    finally:
        answer_now.set()
        sender.close()


def test_a_webhook_with_nothing_new_costs_no_read_of_its_feed(
    db: Database, store_url: str, receiver: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every due webhook's turn read its payee's feed at every tick (two queries, twice a second), idle or not, and
    anyone may make ten webhooks for its own address: a thousand idle ones took the store's and the machine's time.
    A webhook now reads only when its payee has an event since it last read all it had, or when a read would move
    its stored position (a chain event, PASSED_SAVED payments of others); 21 webhooks here, tick by tick."""
    reads: list[str] = []

    def counted(db: Database, horizon: int, payee: str, after: Position, limit: int = 100) -> Feed:
        reads.append(payee.lower())
        return read_events(db, horizon, payee, after, limit)

    monkeypatch.setattr("settlement.server.webhooks.read_events", counted)
    hook = receiver()
    quiet_payees = ["0x" + f"{n:040x}" for n in range(1, 21)]
    busy, quiet = a_channel(1, BUSY), a_channel(2, quiet_payees[0])
    with db.write() as conn:
        for channel in (busy, quiet):
            channel_q.insert_channel(conn, channel, utcnow())
        for n, payee in enumerate([BUSY, *quiet_payees]):
            row = WebhookRow(f"wh_{n:016x}", payee, hook.url, "s", 0, 0, 0, -1, 0, 0, None)
            assert add_webhook(conn, row, Limits(10, 1_000, 1_000)) is Admission.ADMITTED
    sender = WebhookSender(db, Settings(_env_file=None, database_url=store_url), True, Horizon(db))  # type: ignore[call-arg]

    def tick() -> tuple[int, list[str]]:
        reads.clear()
        return sender.tick(wait=30), sorted(reads)

    try:
        assert tick() == (0, sorted([BUSY, *quiet_payees]))  # each reads once: nothing known of them yet
        assert tick() == (0, [])  # nothing happened: nothing read (old code: 21 reads every tick)
        paid(db, busy, range(1, 4))
        assert tick() == (3, [BUSY])  # only the busy payee's webhook reads, and delivers
        assert tick() == (0, [])
        paid(db, quiet, range(1, 2))
        assert tick() == (1, [quiet_payees[0]])
        chain_happened(db, "ChannelsSettled", positions(9, 1), payee="0x" + "dd" * 20, token=ETH)  # another's
        assert tick() == (0, sorted([BUSY, *quiet_payees]))  # a chain event: each moves its position past it once
        assert tick() == (0, [])
    finally:
        sender.close()
    assert [json.loads(raw)["data"]["cumulativeAmount"] for _, _, raw in hook.deliveries] == ["1", "2", "3", "1"]


def test_the_senders_look_for_due_webhooks_reads_only_the_live_ones_on_their_index(db: Database) -> None:
    """Twice a second the sender asks which webhooks are due. Deleted webhooks are kept, so a payee that makes and
    deletes them grew that scan for everyone; the live ones now have an index of their own (revision 0017)."""
    with db.write() as conn:
        for n in range(40):  # 40 webhooks of 4 payees (10 each: the limit), every other one deleted, half due
            payee = f"0x{n % 4:040x}"
            row = WebhookRow(
                f"wh_{n:016x}", payee, "http://h/x", "s", n, 0, 0, -1, 0, 1_000 + 1_000 * (n % 4 // 2), None
            )
            assert add_webhook(conn, row, Limits(10, 1_000, 1_000)) is Admission.ADMITTED
            if n % 2:
                assert delete_webhook(conn, payee, row.webhook_id, 5)
    statements: list[tuple[str, Any]] = []
    with db.read() as conn:
        event.listen(
            conn, "before_cursor_execute", lambda _c, _u, sql, params, _x, _m: statements.append((sql, params))
        )
        due = sorted(row.webhook_id for row in due_webhooks(conn, 1_500))
    assert due == [f"wh_{n:016x}" for n in range(0, 40, 4)]
    ((sql, params),) = statements
    with db.read() as conn:
        if not db.is_sqlite:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a table this small is read whole otherwise
        plan = " ".join(
            str(row[-1])
            for row in conn.exec_driver_sql(f"EXPLAIN {'QUERY PLAN ' if db.is_sqlite else ''}{sql}", params)
        )
    assert "ix_webhooks_due" in plan
