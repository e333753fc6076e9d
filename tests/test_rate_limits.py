"""Per-client rate limits against a real `serve`: a client over its rate gets 429 `rate_limited` with Retry-After
before any work is done for it, and another client is not slowed; X-Forwarded-For names the client only when a
trusted proxy sends it (a forged one from anyone else changes nothing). Per-connection refusal budgets: a
connection that keeps being refused is answered late. Per-payer rates: only vouchers a payer's own key signed count,
over all its channels."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send
from web3 import Web3

from settlement.api.middleware import CONNECTION, RefusalTarpit
from settlement.domain.clients import client_key
from tests.hub_helpers import (
    Channel,
    body,
    scraped,
    wait_until,
    x402_request,
    x402_requirements,
    x402_settle_batch,
    x402_voucher,
)
from tests.servers import ServiceProcess

Sign = Callable[..., bytes]

RATE, BURST = "0.01", "20"  # 20 requests at once, then one every 100 s: nothing refills during a test


def flood(url: str, count: int, client_ip: str | None = None) -> list[int]:
    headers = {"X-Forwarded-For": client_ip} if client_ip else {}
    with httpx.Client(timeout=10) as http:
        return [http.get(f"{url}/health", headers=headers).status_code for _ in range(count)]


def refusals_delayed(url: str) -> int:
    """`settlement_refusals_delayed_total` of a running service."""
    return int(scraped(url, "settlement_refusals_delayed_total")[()])


def test_a_client_over_its_rate_is_refused_and_a_forged_forwarded_for_does_not_help(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    started = time.monotonic()  # before the start-up probe, whose token's refill counts from then
    service = spawn(f"sqlite:///{tmp_path / 'limits.db'}", client_requests_per_second=RATE, client_burst=BURST)
    assert flood(service.url, 30) == [200] * 19 + [429] * 11  # the start-up probe's /health took the 20th
    refused = httpx.get(f"{service.url}/v1/eip712")
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
    # A token comes back 100 s after the bucket emptied, less each whole second it has been refilling since the
    # probe took the first: 100 when the start, the flood and this request took less than a second, 99 after one
    # (counted from after the start, the bound failed on a slow machine whose probe came a moment before it).
    wait = refused.json()["retryAfter"]
    assert (refused.headers["retry-after"], 100 - int(time.monotonic() - started) <= wait <= 100) == (str(wait), True)
    # Not behind a trusted proxy: the header is the client's own claim and is ignored.
    assert flood(service.url, 3, client_ip="10.9.9.9") == [429] * 3


def test_behind_a_trusted_proxy_each_client_has_its_own_rate(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    service = spawn(
        f"sqlite:///{tmp_path / 'proxied.db'}",
        client_requests_per_second=RATE,
        client_burst=BURST,
        trusted_proxies=json.dumps(["127.0.0.1"]),
    )
    flooder = flood(service.url, 40, client_ip="10.0.0.1")
    assert flooder == [200] * 20 + [429] * 20
    assert flood(service.url, 20, client_ip="10.0.0.2") == [200] * 20  # an honest client behind the same proxy


def test_an_ipv6_client_is_counted_by_its_network_not_by_each_of_its_addresses(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """A host is given a /64 (or more) and may send from any address in it: counted by address, each of its 2^64
    addresses was a fresh client with a full budget. An IPv6 client is now its /64 (SETTLEMENT_CLIENT_IPV6_PREFIX),
    an IPv4-mapped address its IPv4 address, an address with a port the address."""
    service = spawn(
        f"sqlite:///{tmp_path / 'ipv6.db'}",
        client_requests_per_second=RATE,
        client_burst=BURST,
        trusted_proxies=json.dumps(["127.0.0.1"]),
    )
    assert flood(service.url, 20, client_ip="2001:db8:1:2::1") == [200] * 20
    for other_address in ("2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2:0:0:0:abc"):
        assert flood(service.url, 1, client_ip=other_address) == [429], other_address
    assert flood(service.url, 20, client_ip="2001:db8:1:3::1") == [200] * 20  # the next /64: another client
    assert flood(service.url, 20, client_ip="::ffff:10.0.0.9") == [200] * 20
    assert flood(service.url, 1, client_ip="10.0.0.9") == [429]
    # A proxy that writes the client's port too (each connection a new one) names the same client.
    for with_port in ("10.0.0.9:4711", "[::ffff:10.0.0.9]:4712", "[2001:db8:1:2::9]:443"):
        assert flood(service.url, 1, client_ip=with_port) == [429], with_port


def test_a_clients_key_has_one_form_per_network() -> None:
    """Every spelling of an IPv6 address in one network is one client; an IPv4 address and its IPv4-mapped form are
    one; a scope id changes nothing; what is not an address (a name a proxy gave) is counted as given."""
    forms = {
        "10.0.0.1": "10.0.0.1",
        "::ffff:10.0.0.1": "10.0.0.1",
        "2001:db8:1:2::1": "2001:db8:1:2::/64",
        "2001:DB8:1:2:FFFF:0:0:9": "2001:db8:1:2::/64",
        "2001:0db8:0001:0002:0000:0000:0000:0001": "2001:db8:1:2::/64",
        "fe80::1%eth0": "fe80::/64",
        "not:an:address": "not:an:address",
        "": "",
    }
    assert {host: client_key(host, 64) for host in forms} == forms
    assert client_key("2001:db8:1:2:3::1", 48) == "2001:db8:1::/48"
    assert client_key("2001:db8::1", 128) == "2001:db8::1/128"


def test_a_connection_that_keeps_being_refused_is_paced_whatever_clients_it_names(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """A flood behind a proxy names a new client in every request, so per-client limits never bite. Its connection
    is the same: beyond a burst of 3 refusals, each refusal on it waits its turn, one every 2 s here. What it is
    refused for does not matter (bodies that are not JSON, vouchers for made-up channels); an accepted request on
    the same connection is never delayed, and another connection has a budget of its own.
    `settlement_refusals_delayed` counts the late answers. Each burst is of bodies that are not JSON, answered in
    milliseconds: bursts of made-up channels, each read from the chain, took more than 2 s on a loaded machine, a
    place came back meanwhile, and only two refusals were late (twice: at 2 a second, then at 0.5)."""
    service = spawn(
        f"sqlite:///{tmp_path / 'tarpit.db'}",
        trusted_proxies=json.dumps(["127.0.0.1"]),
        connection_refusals_per_second="0.5",
        connection_refusal_burst="3",
    )
    made_up = json.dumps({"channelId": "0x" + "ab" * 32, "cumulativeAmount": "1", "signature": "0x" + "11" * 65})

    with httpx.Client(base_url=service.url, timeout=10) as flooder:
        started = time.monotonic()
        codes = [
            flooder.post(
                "/v1/vouchers",
                content=made_up.encode() if n in (3, 5) else b"\x00not json",
                headers={"Content-Type": "application/json", "X-Forwarded-For": f"10.1.{n}.1"},
            ).json()["code"]
            for n in range(6)
        ]
        took = time.monotonic() - started
        assert codes == ["malformed_request"] * 3 + ["channel_not_found", "malformed_request", "channel_not_found"]
        assert refusals_delayed(service.url) == 3
        assert took >= 5.8  # the 4th, 5th and 6th at 2, 4 and 6 s
        assert flooder.get("/health").status_code == 200  # accepted: on time
        assert refusals_delayed(service.url) == 3
    with httpx.Client(base_url=service.url, timeout=10) as other:
        assert [other.post("/v1/vouchers", content=body, headers={"Content-Type": "application/json"}).status_code
                for body in (b"\x00not json",) * 3 + (made_up.encode(),)] == [400, 400, 400, 404]  # fmt: skip
    assert refusals_delayed(service.url) == 4  # its own three on time, the fourth late


def test_a_payees_settle_batches_are_not_paced_for_one_payers_refused_payments(
    spawn: Callable[..., ServiceProcess],
    tmp_path: Path,
    w3: Web3,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """A payee app's settle batches carry all its payers' payments on its connections. One payer whose payment is
    sent again (the same voucher in every later batch: a replay) has it refused in its place, and the batch is
    answered 200 at once: the connection is not paced for it (burst 3 at 2 a second here, so six batches each with a
    refused payment would be answered late from the fourth on), and the other payer's payments are each accepted."""
    service = spawn(
        f"sqlite:///{tmp_path / 'batches.db'}", connection_refusals_per_second="2", connection_refusal_burst="3"
    )
    payee = accounts[6].address
    honest, replaying = open_channel(accounts[5], payee, amount=1_000), open_channel(accounts[8], payee, amount=1_000)
    required = x402_requirements(w3.eth.chain_id, payee, 5)
    replayed = x402_request(required, x402_voucher(replaying, 5, sign))

    def batch(http: httpx.Client, n: int) -> list[object]:
        items = [x402_request(required, x402_voucher(honest, 5 * n, sign)), replayed]
        answer = http.post("/x402/settle/batch", json=x402_settle_batch(*items))
        assert answer.status_code == 200, answer.text
        return [a.get("errorReason", a["success"]) for a in answer.json()["settlements"]]

    for channel in (honest, replaying):  # indexed (each poll on a connection of its own: a 404 is a refusal)

        def indexed(c: Channel = channel) -> bool:
            return httpx.get(f"{service.url}/v1/channels/{c.hex_id}").status_code == 200

        wait_until(indexed)
    with httpx.Client(base_url=service.url, timeout=10) as http:
        answers = [batch(http, n) for n in range(1, 7)]
        channel = http.get(f"/v1/channels/0x{honest.id.hex()}").json()
    assert answers == [[True, True]] + [[True, "voucher_replayed"]] * 5
    assert channel["acceptedCumulativeAmount"] == "30"
    assert refusals_delayed(service.url) == 0


@pytest.mark.parametrize("phased", [True, False])
def test_connections_refused_together_are_answered_at_phases_of_their_own(
    monkeypatch: pytest.MonkeyPatch, phased: bool
) -> None:
    """A flood's connections start together; paced at one rate from one instant they would be answered together and
    come back together: the whole flood in one burst each interval, which the event loop serves while honest requests
    wait. Each paced connection keeps a phase of its own (drawn once, a fraction of the interval), so the same pace
    is a steady trickle. Here two connections refused at the same instants, burst 2 at 5 a second (0.2 s)."""
    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(round(seconds, 9))

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop(_message: Message) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    draws = iter([0.25, 0.75] if phased else [0.0, 0.0])
    delayed: list[int] = []
    tarpit = RefusalTarpit(refuse, 5.0, 2.0, lambda: delayed.append(1), clock=lambda: 100.0, phase=lambda: next(draws))
    monkeypatch.setattr("settlement.api.middleware.asyncio.sleep", no_sleep)
    connections: list[dict[str, object]] = [{}, {}]
    for _ in range(4):
        for connection in connections:
            asyncio.run(tarpit({"type": "http", CONNECTION: connection}, receive, noop))
    # Each connection: two at once (its burst), then one every 0.2 s, shifted by 0.05 s (A) and 0.15 s (B).
    expected = [0.25, 0.35, 0.45, 0.55] if phased else [0.2, 0.2, 0.4, 0.4]
    assert waits == expected
    assert len(delayed) == 4
    assert next(draws, None) is None  # one phase drawn per paced connection, not per refusal


def test_a_payer_over_its_voucher_rate_is_refused_on_every_channel_and_forgeries_spend_none_of_it(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    client = api(payer_vouchers_per_second=0.01, payer_burst=5)  # 5 at once, then one every 100 s
    payer, other, forger = accounts[5], accounts[8], accounts[7]
    first, second = (open_channel(payer, accounts[6].address, amount=1_000) for _ in range(2))
    honest = open_channel(other, accounts[6].address, amount=1_000)
    # Twenty vouchers a forger signed on the honest payer's channel: refused by the ledger, and the payer's rate
    # untouched (a forgery cannot make a payer's own vouchers wait).
    forged = [body(honest, n, sign(forger, honest.id, n)) for n in range(1, 21)]
    results = client.post("/v1/vouchers/batch", json={"vouchers": forged}).json()["results"]
    assert [r["error"]["code"] for r in results] == ["invalid_signature"] * 20
    for n in range(1, 6):
        assert client.post("/v1/vouchers", json=body(honest, n, sign(other, honest.id, n))).status_code == 201
    # The payer's five, over two channels, then a sixth on either channel is over its rate.
    statuses = [
        client.post("/v1/vouchers", json=body(c, n, sign(payer, c.id, n))).status_code
        for n in (1, 2, 3)
        for c in (first, second)
        if (c, n) != (second, 3)
    ]
    assert statuses == [201] * 5
    refused = client.post("/v1/vouchers", json=body(second, 3, sign(payer, second.id, 3)))
    assert (refused.status_code, refused.json()["code"]) == (429, "payer_rate_limited")
    assert refused.headers["retry-after"] == str(refused.json()["retryAfter"]) == "100"
    batch = [body(first, 4, sign(payer, first.id, 4)), body(honest, 6, sign(other, honest.id, 6))]
    results = client.post("/v1/vouchers/batch", json={"vouchers": batch}).json()["results"]
    assert [r["status"] for r in results] == [429, 429]  # the other payer spent its burst too
    assert [r["error"]["code"] for r in results] == ["payer_rate_limited"] * 2
    # Nothing refused was stored: the channel stands where its last accepted voucher left it.
    assert client.get(f"/v1/channels/0x{second.id.hex()}").json()["acceptedCumulativeAmount"] == "2"


def test_a_client_sending_forged_vouchers_in_batches_is_refused_before_their_recovery_and_only_it(
    spawn: Callable[..., ServiceProcess],
    tmp_path: Path,
    w3: Web3,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """A batch is answered 200 whatever its items' refusals, so the connection's refusal pace never slowed a client
    that sent a thousand forged vouchers a batch, each a signature recovery: one client could keep the cores busy
    with a few requests a second. A client's forged vouchers in batches are now budgeted (50 at once here, then one
    every 100 s): past it, its next batch (of vouchers or of x402 settlements, forged or not) is 429 `rate_limited`
    before any recovery; another client behind the same proxy, and payments refused for other reasons, spend none
    of it."""
    service = spawn(
        f"sqlite:///{tmp_path / 'forgeries.db'}",
        client_forged_per_second=RATE,
        client_forged_burst="50",
        trusted_proxies=json.dumps(["127.0.0.1"]),
    )
    payee, forger = accounts[6].address, accounts[7]
    channel = open_channel(accounts[5], payee, amount=10_000)
    wait_until(lambda: httpx.get(f"{service.url}/v1/channels/{channel.hex_id}").status_code == 200)
    forged = {"vouchers": [body(channel, n, sign(forger, channel.id, n)) for n in range(1, 41)]}
    required = x402_requirements(w3.eth.chain_id, payee, 5)

    def settlements(*payloads: dict[str, str]) -> dict[str, Any]:
        return x402_settle_batch(*(x402_request(required, payload) for payload in payloads))

    def recovered() -> float:
        return sum(scraped(service.url, "settlement_signers_recovered_total").values())

    def post(path: str, payload: dict[str, Any], client: str) -> httpx.Response:
        return httpx.post(f"{service.url}{path}", json=payload, headers={"X-Forwarded-For": client}, timeout=30)

    for _ in range(2):  # 40, then 40 more: the budget of 50 is passed during the second batch, which still counts
        answer = post("/v1/vouchers/batch", forged, "10.0.0.1")
        assert [r["error"]["code"] for r in answer.json()["results"]] == ["invalid_signature"] * 40
    before = recovered()
    honest = {"vouchers": [body(channel, 5, sign(accounts[5], channel.id, 5))]}
    for path, payload in (("/v1/vouchers/batch", forged), ("/v1/vouchers/batch", honest),
                          ("/x402/settle/batch", settlements(x402_voucher(channel, 5, sign))),):  # fmt: skip
        refused = post(path, payload, "10.0.0.1")
        assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited"), path
        assert refused.headers["retry-after"] == str(refused.json()["retryAfter"])
    assert recovered() == before  # refused before any recovery

    # Another client behind the same proxy: its own budget. A replayed payment is refused, and costs none of it.
    settled = post("/x402/settle/batch", settlements(x402_voucher(channel, 5, sign)), "10.0.0.2").json()
    assert [s["success"] for s in settled["settlements"]] == [True]
    for _ in range(3):
        again = post("/x402/settle/batch", settlements(x402_voucher(channel, 5, sign)), "10.0.0.2").json()
        assert [s["errorReason"] for s in again["settlements"]] == ["voucher_replayed"]
    forged_payments = settlements(*(x402_voucher(channel, 5 * n, sign, signer=forger) for n in range(2, 62)))
    answer = post("/x402/settle/batch", forged_payments, "10.0.0.2").json()
    assert [s["errorReason"] for s in answer["settlements"]] == ["invalid_signature"] * 60
    refused = post("/x402/settle/batch", settlements(x402_voucher(channel, 10, sign)), "10.0.0.2")
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
    third = post("/v1/vouchers/batch", {"vouchers": [body(channel, 10, sign(accounts[5], channel.id, 10))]}, "10.0.0.3")
    assert [r["status"] for r in third.json()["results"]] == [201]

    # An IPv6 client is one network (a /64): another address of it owes what the first forged.
    forged_more = {"vouchers": [body(channel, n, sign(forger, channel.id, n)) for n in range(100, 160)]}
    answer = post("/v1/vouchers/batch", forged_more, "2001:db8:5:6::1")
    assert [r["error"]["code"] for r in answer.json()["results"]] == ["invalid_signature"] * 60
    refused = post("/v1/vouchers/batch", honest, "2001:db8:5:6:ffff::9")
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
    elsewhere = post("/v1/vouchers/batch", forged, "2001:db8:5:7::1")  # another network: its own budget
    assert [r["error"]["code"] for r in elsewhere.json()["results"]] == ["invalid_signature"] * 40
