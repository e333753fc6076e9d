"""The payee's local verify (`settlement.x402.positions`): after a settle answered a channel's position, the next
payment on that channel is verified in the payee's process, and only when it is exactly what the facilitator would
accept as far as that answer shows; every other payment (one wrong field at a time below) goes to the facilitator."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from web3.contract import Contract
from x402.http import FacilitatorConfig, decode_payment_signature_header
from x402.http.facilitator_client_base import FacilitatorResponseError
from x402.http.types import PaymentOption, RouteConfig
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettleResponse,
    SupportedResponse,
    VerifyResponse,
)
from x402.server import x402ResourceServer

from settlement.devtools.devnet import Devnet
from settlement.eip712.vouchers import Domain
from settlement.recursion import SAFE_RECURSION_LIMIT
from settlement.sdk.bounded import BoundedAsyncTransport
from settlement.server.config import Settings
from settlement.x402.facilitator_client import (
    CONNECT_TIMEOUT,
    ERROR_CODE_READ_MAX,
    GC_YOUNG_THRESHOLD,
    KEEPALIVE_SECONDS,
    SUPPORTED_TIMEOUT,
    ChannelHubFacilitatorClient,
    FacilitatorStatusError,
    _Supported,
)
from settlement.x402.fastapi import PaymentMiddleware
from settlement.x402.positions import Forged, Positions
from settlement.x402.server import ChannelHubServerScheme
from settlement.x402.wire import SETTLE_ATTEMPT
from tests.hub_helpers import ETH, Channel, gzip_bomb, service_of, wait_indexed

Sign = Callable[..., bytes]
PRICE = 10
DEPOSIT = 25  # room for two payments, not three


def requirements(devnet: Devnet, hub: Contract, payee: str, **changes: Any) -> PaymentRequirements:
    fields: dict[str, Any] = {
        "scheme": "channelhub",
        "network": f"eip155:{devnet.chain_id}",
        "asset": ETH,
        "amount": str(PRICE),
        "pay_to": payee,
        "max_timeout_seconds": 60,
        "extra": {"hub": hub.address, "name": "ChannelHub", "version": "1"},
    }
    return PaymentRequirements(**(fields | changes))


def payment(
    required: PaymentRequirements,
    channel: Channel,
    cumulative: int,
    sign: Sign,
    signer: LocalAccount | None = None,
    domain: Domain | None = None,
    extensions: dict[str, Any] | None = None,
) -> PaymentPayload:
    signature = sign(signer or channel.payer, channel.id, cumulative, domain)
    voucher = {"channelId": channel.hex_id, "cumulativeAmount": str(cumulative),
               "signature": "0x" + signature.hex()}  # fmt: skip
    return PaymentPayload(x402_version=2, payload=voucher, accepted=required, extensions=extensions)


def facilitator_body(paid: PaymentPayload, required: PaymentRequirements) -> dict[str, Any]:
    return {"x402Version": 2, "paymentPayload": paid.model_dump(by_alias=True, exclude_none=True),
            "paymentRequirements": required.model_dump(by_alias=True, exclude_none=True)}  # fmt: skip


def settle(client: TestClient, paid: PaymentPayload, required: PaymentRequirements) -> SettleResponse:
    return SettleResponse.model_validate(client.post("/x402/settle", json=facilitator_body(paid, required)).json())


def verify(client: TestClient, paid: PaymentPayload, required: PaymentRequirements) -> VerifyResponse:
    return VerifyResponse.model_validate(client.post("/x402/verify", json=facilitator_body(paid, required)).json())


def answered(
    channel: Channel, required: PaymentRequirements, cumulative: int, deposit: int, **changes: Any
) -> SettleResponse:
    """A successful settle's answer as the facilitator gives it, with `changes`."""
    fields: dict[str, Any] = {
        "success": True,
        "payer": channel.payer.address,
        "transaction": "",
        "network": required.network,
        "extra": {"channel": {"deposit": str(deposit), "cumulativeAmount": str(cumulative)}},
    }
    return SettleResponse(**(fields | changes))


def first_settled(
    client: TestClient, devnet: Devnet, hub: Contract, channel: Channel, sign: Sign
) -> tuple[TestClient, Positions, PaymentRequirements]:
    """The channel's first payment settled by the facilitator, and its answer learnt."""
    positions, required = Positions(), requirements(devnet, hub, channel.payee)
    first = payment(required, channel, PRICE, sign)
    positions.learn(first, required, settle(client, first, required))
    return client, positions, required


@pytest.fixture
def channel(open_channel: Callable[..., Channel], accounts: list[LocalAccount]) -> Channel:
    return open_channel(accounts[5], accounts[6].address, amount=DEPOSIT)


def test_the_exact_next_voucher_is_vouched_for_locally_after_a_settle(
    api: Callable[..., TestClient], devnet: Devnet, hub: Contract, channel: Channel, sign: Sign
) -> None:
    client, positions = api(), Positions()
    required = requirements(devnet, hub, channel.payee)
    first = payment(required, channel, PRICE, sign)
    assert positions.vouch(first, required) is None  # never answered: only the facilitator can tell
    positions.learn(first, required, settle(client, first, required))
    assert len(positions) == 1
    second = payment(required, channel, 2 * PRICE, sign)
    assert positions.vouch(second, required) == channel.payer.address
    positions.learn(second, required, settle(client, second, required))
    # The third would pass the deposit (30 > 25): the facilitator decides (and refuses it).
    assert positions.vouch(payment(required, channel, 3 * PRICE, sign), required) is None


def test_each_wrong_field_sends_the_payment_to_the_facilitator(
    api: Callable[..., TestClient],
    devnet: Devnet,
    hub: Contract,
    channel: Channel,
    sign: Sign,
    accounts: list[LocalAccount],
    open_channel: Callable[..., Channel],
) -> None:
    _client, positions, required = first_settled(api(), devnet, hub, channel, sign)
    other_hub = Domain(devnet.chain_id, "0x" + "42" * 20)
    unknown = open_channel(channel.payer, channel.payee, amount=DEPOSIT)
    next_ok = payment(required, channel, 2 * PRICE, sign)
    assert positions.vouch(next_ok, required) == channel.payer.address  # the control: every case below moves one field
    wrong = {
        "the settled voucher again (a replay)": payment(required, channel, PRICE, sign),
        "less than the price over the position": payment(required, channel, 2 * PRICE - 1, sign),
        "more than the price over the position": payment(required, channel, 2 * PRICE + 1, sign),
        "a channel no settle answered": payment(required, unknown, PRICE, sign),
        "answering another price": next_ok.model_copy(update={"accepted": required.model_copy(update={"amount": "9"})}),
        "not the scheme's payload": next_ok.model_copy(update={"payload": {"channelId": "0x00"}}),
    }
    assert {name: positions.vouch(paid, required) for name, paid in wrong.items()} == dict.fromkeys(wrong)
    # The payee's requirements themselves differ from what the position was learnt under.
    other: dict[str, dict[str, Any]] = {
        "another payTo": {"pay_to": accounts[7].address},
        "another asset": {"asset": "0x" + "11" * 20},
        "another network": {"network": "eip155:1"},
        "another hub named": {"extra": {"hub": other_hub.verifying_contract, "name": "ChannelHub", "version": "1"}},
        "no domain named": {"extra": {}},
    }
    for name, changes in other.items():
        moved = requirements(devnet, hub, channel.payee, **changes)
        assert positions.vouch(next_ok.model_copy(update={"accepted": moved}), moved) is None, name


def test_a_forged_signature_on_a_known_channel_is_refused_by_the_payee_itself(
    api: Callable[..., TestClient],
    devnet: Devnet,
    hub: Contract,
    channel: Channel,
    sign: Sign,
    accounts: list[LocalAccount],
    open_channel: Callable[..., Channel],
) -> None:
    """A forger who read a channel's id off the chain had each payment it sent a payee verified by the facilitator.
    On a channel the payee knows, a signature that is not the channel's payer's is refused in the payee's process,
    `invalid_signature` as the facilitator refuses it, whatever the amount and however old the position (a channel's
    payer is hashed into its id); the same payment sent to the facilitator is refused so too. A channel the payee does
    not know, or another payee's requirements, still go to the facilitator."""
    client, positions, required = first_settled(api(), devnet, hub, channel, sign)
    message = f"the signature does not recover to the payer of channel {channel.hex_id}"
    forged = {
        "the next amount": payment(required, channel, 2 * PRICE, sign, signer=accounts[9]),
        "any amount": payment(required, channel, 7 * PRICE + 3, sign, signer=accounts[9]),
        "the settled amount": payment(required, channel, PRICE, sign, signer=accounts[9]),
        "signed for another hub": payment(required, channel, 2 * PRICE, sign, domain=Domain(devnet.chain_id, ETH)),
    }
    for name, paid in forged.items():
        assert positions.vouch(paid, required) == Forged(channel.payer.address, message), name
        assert verify(client, paid, required).invalid_reason == "invalid_signature", name
    stale = Positions(ttl=0.0)
    stale.learn(payment(required, channel, PRICE, sign), required, answered(channel, required, PRICE, DEPOSIT))
    assert stale.vouch(forged["the next amount"], required) == Forged(channel.payer.address, message)
    assert stale.vouch(payment(required, channel, 2 * PRICE, sign), required) is None  # expired: the facilitator's
    unknown = open_channel(channel.payer, channel.payee, amount=DEPOSIT)
    assert positions.vouch(payment(required, unknown, PRICE, sign, signer=accounts[9]), required) is None
    elsewhere = requirements(devnet, hub, channel.payee, pay_to=accounts[7].address)
    assert positions.vouch(payment(elsewhere, channel, 2 * PRICE, sign, signer=accounts[9]), elsewhere) is None


def test_a_refused_or_unanswered_settle_forgets_the_channel_and_positions_expire(
    api: Callable[..., TestClient], devnet: Devnet, hub: Contract, channel: Channel, sign: Sign
) -> None:
    client, positions, required = first_settled(api(), devnet, hub, channel, sign)
    first = payment(required, channel, PRICE, sign)
    replayed = settle(client, first, required)
    assert (replayed.success, replayed.error_reason) == (False, "voucher_replayed")
    positions.learn(first, required, replayed)
    assert positions.vouch(payment(required, channel, 2 * PRICE, sign), required) is None
    assert len(positions) == 0

    second = payment(required, channel, 2 * PRICE, sign)
    positions.learn(second, required, settle(client, second, required))
    assert len(positions) == 1
    positions.forget(second)  # the facilitator did not answer a settle: what it did is unknown
    assert len(positions) == 0

    expired = Positions(ttl=0.0)
    expired.learn(second, required, answered(channel, required, cumulative=2 * PRICE, deposit=1_000))
    assert len(expired) == 1
    assert expired.vouch(payment(required, channel, 3 * PRICE, sign), required) is None


def test_a_channel_refused_at_settle_is_vouched_for_by_no_one_but_the_facilitator_for_a_while(
    devnet: Devnet, hub: Contract, channel: Channel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    """A payer can make its own payment pass the payee's local verify and fail the facilitator's settle (a payment
    identifier it used before); learnt again at its next paid request, the channel had one handler run free after each.
    After a refusal its payments go to the facilitator for `doubt` seconds, whatever the settles between say."""
    required, room = requirements(devnet, hub, channel.payee), 10 * PRICE  # the deposit the answers say
    first, second, third = (payment(required, channel, n * PRICE, sign) for n in (1, 2, 3))
    refused = SettleResponse(success=False, error_reason="voucher_replayed", transaction="", network=required.network)
    doubting = Positions()
    doubting.learn(first, required, answered(channel, required, PRICE, room))
    assert doubting.vouch(second, required) == channel.payer.address
    doubting.learn(second, required, refused)
    doubting.learn(second, required, answered(channel, required, 2 * PRICE, room))  # paid rightly, after
    assert len(doubting) == 1
    assert doubting.vouch(third, required) is None  # the facilitator's to judge
    forged = payment(required, channel, 3 * PRICE, sign, signer=accounts[9])
    message = f"the signature does not recover to the payer of channel {channel.hex_id}"
    assert doubting.vouch(forged, required) == Forged(channel.payer.address, message)  # still refused here
    other = Positions(doubt=0.0)  # a doubt over: vouched for again
    other.learn(second, required, refused)
    other.learn(second, required, answered(channel, required, 2 * PRICE, room))
    assert other.vouch(third, required) == channel.payer.address

    bounded = Positions(max_channels=2)  # the doubted are bounded as the known are, the oldest going first
    for n in range(1, 4):
        made_up = {**second.payload, "channelId": "0x" + n.to_bytes(32, "big").hex()}
        bounded.learn(second.model_copy(update={"payload": made_up}), required, refused)
    assert [int(doubted, 16) for doubted in bounded._doubted] == [2, 3]


def test_a_settle_answer_that_does_not_match_its_payment_teaches_nothing(
    devnet: Devnet, hub: Contract, channel: Channel, sign: Sign
) -> None:
    positions = Positions()
    required = requirements(devnet, hub, channel.payee)
    paid = payment(required, channel, PRICE, sign)
    changed: tuple[dict[str, Any], ...] = (
        {"extra": {"channel": {"deposit": "25", "cumulativeAmount": str(2 * PRICE)}}},  # another position
        {"extra": {"channel": {"cumulativeAmount": str(PRICE)}}},  # no deposit
        {"extra": {}},  # no position
        {"payer": "nobody"},
        {"success": False},
    )
    for changes in changed:
        positions.learn(paid, required, answered(channel, required, PRICE, DEPOSIT, **changes))
        assert len(positions) == 0, changes
    positions.learn(paid, required, answered(channel, required, PRICE, DEPOSIT))
    assert len(positions) == 1


def test_the_payees_facilitator_client_takes_both_of_x402s_config_forms() -> None:
    """x402's dict form stays accepted; the typed form gets a pool that drops idle connections before the service
    does (KEEPALIVE_SECONDS, below SETTLEMENT_KEEP_ALIVE_SECONDS), and gives up reaching the facilitator in
    CONNECT_TIMEOUT but waits for an answer as long as the config says; /supported waits SUPPORTED_TIMEOUT at most."""
    url = "http://127.0.0.1:8000/x402"
    as_dict = ChannelHubFacilitatorClient({"url": url})
    typed = ChannelHubFacilitatorClient(FacilitatorConfig(url=url))
    assert (as_dict.url, typed.url, as_dict.own_client) == (url, url, None)
    assert isinstance(typed.own_client, httpx.AsyncClient)
    bounded = typed.own_client._transport  # x402's own calls bounded as ours (`BoundedAsyncTransport`), over
    assert isinstance(bounded, BoundedAsyncTransport) and (bounded.max_bytes, bounded.deadline) == (8 * 2**20, 540)
    transport = bounded.inner  # aiohttp's pool under httpx's API, with the idle limit
    assert isinstance(transport, AiohttpTransport) and transport.limits.keepalive_expiry == KEEPALIVE_SECONDS
    assert KEEPALIVE_SECONDS < Settings.model_fields["keep_alive_seconds"].default
    expected = (CONNECT_TIMEOUT, 90.0, 90.0, 90.0)  # connect, read, write, pool: x402's default timeout is 90 s
    timeout = typed.own_client.timeout
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == expected
    assert typed._pool is not None and typed._pool.transport is transport  # verifies, through aiohttp's session
    settles = typed._settle_pool  # settles, through a session of their own (a flood of verifies holds none of it)
    assert settles is not None and settles.transport is not transport and settles.timeout is typed._pool.timeout
    assert isinstance(settles.transport, AiohttpTransport) and settles.transport.limits == transport.limits
    batches = typed._pool.timeout  # the same limits as x402's own calls
    assert batches is not None and (batches.sock_connect, batches.sock_read, batches.connect, batches.total) == (
        CONNECT_TIMEOUT,
        90,
        90,
        540,  # read whole within six times the timeout
    )
    with typed._get_sync_client() as sync:
        assert (sync.timeout.connect, sync.timeout.read) == (CONNECT_TIMEOUT, SUPPORTED_TIMEOUT)
    asyncio.run(typed.aclose())
    assert typed.own_client.is_closed


def bare_payment(amount: int) -> PaymentPayload:
    """A payment of `amount` whose payload no facilitator here looks into (the batch routes below answer it)."""
    return PaymentPayload(x402_version=2, payload={"n": amount}, accepted=PaymentRequirements(
        scheme="channelhub", network="eip155:31337", asset=ETH, amount=str(amount), pay_to=ETH,
        max_timeout_seconds=60, extra={},
    ))  # fmt: skip


V1_PAYMENT = (
    PaymentPayloadV1(x402_version=1, scheme="exact", network="base-sepolia", payload={"n": 1}),
    PaymentRequirementsV1(
        scheme="exact", network="base-sepolia", max_amount_required="1", resource="http://payee.example/",
        pay_to=ETH, max_timeout_seconds=60, asset=ETH,
    ),
)  # fmt: skip  # a payment of x402 v1: verified through x402's own code, not ours
BARE = "paymentPayload,paymentRequirements"  # a settle batch part's keys, sorted: x402's two
ATTEMPTED = "attempt,paymentPayload,paymentRequirements"  # and the attempt beside them


def keys_each(body: dict[str, Any]) -> list[str]:
    """The keys of each part of a settle batch's body, sorted and joined (`BARE`, `ATTEMPTED`)."""
    return [",".join(sorted(item)) for item in body["settlements"]]


def settled_each(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A facilitator's answers to a settle batch's body: each payment settled for its requirements' amount."""
    return [
        {"success": True, "transaction": "", "network": "eip155:31337", "amount": item["paymentRequirements"]["amount"]}
        for item in body["settlements"]
    ]


@asynccontextmanager
async def batch_route(
    handler: Callable[[web.Request], Awaitable[web.Response]],
    route: str = "/settle/batch",
    extensions: list[str] | None = None,
) -> AsyncIterator[str]:
    """A facilitator's URL whose `route` (`/settle/batch`) is `handler`, over real HTTP (aiohttp's server), with a
    `/supported` that lists `extensions` when they are given; any other route is a 404."""
    app = web.Application()
    app.router.add_post(f"/x402{route}", handler)
    if extensions is not None:
        kind = {"x402Version": 2, "scheme": "channelhub", "network": "eip155:31337"}
        supported = {"kinds": [kind], "extensions": extensions, "signers": {}}

        async def listed(_: web.Request) -> web.Response:
            return web.json_response(supported)

        app.router.add_get("/x402/supported", listed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/x402"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def test_the_settle_batches_go_through_the_clients_own_aiohttp_session_which_closing_closes() -> None:
    """Where the client made its pool, a batch of settles is one POST through that pool's aiohttp session (not
    httpx's layers above it), the payments answered each as the facilitator said, and closing the client closes the
    session; a facilitator that answers the batch with a 5xx leaves every payment of it unjudged."""
    seen: list[tuple[str, str, int]] = []
    status = [200]

    async def batch(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.path, request.headers["Content-Type"], len(body["settlements"])))
        return web.json_response({"settlements": settled_each(body)}, status=status[0])

    async def run() -> tuple[list[Any], list[Any], bool, bool]:
        async with batch_route(batch) as url:
            facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url=url), local_verify=False)
            paid = [bare_payment(n) for n in (1, 2, 3)]
            answers = await asyncio.gather(*(facilitator.settle(p, p.accepted) for p in paid))
            status[0] = 503
            refused = await asyncio.gather(*(facilitator.settle(p, p.accepted) for p in paid), return_exceptions=True)
            assert facilitator._settle_pool is not None
            session = facilitator._settle_pool.transport.client
            assert isinstance(session, aiohttp.ClientSession) and not session.closed
            await facilitator.aclose()
            return answers, refused, session.closed, facilitator.own_client is not None

    answers, refused, closed, own = asyncio.run(run())
    assert [(a.success, a.amount) for a in answers] == [(True, "1"), (True, "2"), (True, "3")]
    assert [type(r) for r in refused] == [FacilitatorResponseError] * 3
    assert seen == [("/x402/settle/batch", "application/json", 3)] * 2  # three settles in flight: one call each time
    assert (closed, own) == (True, True)


def test_settles_that_come_while_a_batch_is_out_wait_for_it_and_go_together() -> None:
    """One batch in flight by default (`BATCHES_IN_FLIGHT`): the settles that come while a batch is out are sent
    together once it is answered, each answered as the facilitator said. With `batches_in_flight=2` the first of them
    went at once, alone, and the rest waited for either."""
    sizes: list[list[int]] = []
    held, arrived = asyncio.Event(), asyncio.Event()

    async def batch(request: web.Request) -> web.Response:
        body = await request.json()
        sizes[-1].append(len(body["settlements"]))
        arrived.set()
        await held.wait()  # every batch is held until the test lets them go
        return web.json_response({"settlements": settled_each(body)})

    async def round_of(url: str, first: int, **options: Any) -> list[str | None]:
        sizes.append([])
        held.clear()
        arrived.clear()
        facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url=url), local_verify=False, **options)

        def settle(amount: int) -> asyncio.Task[SettleResponse]:
            payload = bare_payment(amount)
            return asyncio.create_task(facilitator.settle(payload, payload.accepted))

        try:
            out = [settle(first)]
            await asyncio.wait_for(arrived.wait(), 10)  # the first batch is at the facilitator
            out.append(settle(first + 1))
            await asyncio.sleep(0.5)  # time enough for it to reach the facilitator, if it is sent
            out += [settle(first + 2), settle(first + 3)]
            await asyncio.sleep(0.1)
            held.set()
            return [answer.amount for answer in await asyncio.gather(*out)]
        finally:
            await facilitator.aclose()

    async def run() -> tuple[list[str | None], list[str | None]]:
        async with batch_route(batch) as url:
            return await round_of(url, 1), await round_of(url, 11, batches_in_flight=2)

    one, two = asyncio.run(run())
    assert (one, two) == (["1", "2", "3", "4"], ["11", "12", "13", "14"])
    assert sizes == [[1, 3], [1, 1, 2]]


@pytest.mark.parametrize("loss", ["closed", "bad gateway", "mangled"])
@pytest.mark.parametrize(
    ("route", "batch_settles"),
    [
        ("/settle/batch", True),
        ("/settle", False),  # one `/settle` each
        ("/settle", True),  # a facilitator without the batch route (a 404): one `/settle` each
    ],
)
def test_a_settle_whose_answer_was_lost_is_sent_again_as_a_resend_and_one_voucher_is_settled_for_one_request(
    route: str, batch_settles: bool, loss: str
) -> None:
    """A settle batch (or one `/settle`) that reached the facilitator and whose answer was lost (the connection closed
    before it came, a proxy's 502 in its place, or a body that is not the answer) is sent once more, marked `resend`:
    its payments answered as the facilitator answers them then (a payment the first send got accepted, as accepted).
    Each payment carries its `attempt`, an id of its own, the same in the resend: the facilitator answers a resend
    accepted only for the attempt that got the payment accepted. A second request carrying a voucher already being
    settled is refused at once as a replay, unsent."""
    seen: list[tuple[bool, int]] = []
    attempts: list[str] = []

    async def settle(request: web.Request) -> web.Response:
        body = await request.json()
        settlements = body.get("settlements", [body])
        seen.append((body.get("resend", False), len(settlements)))
        attempts.extend(s["attempt"] for s in settlements)
        if len(seen) == 1:  # the work done, the answer lost
            if loss == "bad gateway":
                return web.Response(status=502, text="<html>502 Bad Gateway</html>")
            if loss == "mangled":
                return web.Response(status=200, text='{"settlements": [{"succ', content_type="application/json")
            assert request.transport is not None
            request.transport.close()
        answers = settled_each({"settlements": settlements})
        return web.json_response({"settlements": answers} if "settlements" in body else answers[0])

    voucher = {"channelId": "0x" + "ab" * 32, "cumulativeAmount": "7", "signature": "0x" + "cd" * 65}
    paid = bare_payment(7).model_copy(update={"payload": voucher})

    async def run() -> list[tuple[bool, str | None, str | None]]:
        async with batch_route(settle, route) as url:
            facilitator = ChannelHubFacilitatorClient(
                FacilitatorConfig(url=url), local_verify=False, batch_settles=batch_settles
            )
            try:
                answers = await asyncio.gather(*(facilitator.settle(paid, paid.accepted) for _ in range(2)))
            finally:
                await facilitator.aclose()
        return [(a.success, a.amount, a.error_reason) for a in answers]

    assert asyncio.run(run()) == [(True, "7", None), (False, None, "voucher_replayed")]
    assert seen == [(False, 1), (True, 1)]
    assert attempts[0] == attempts[1] and re.fullmatch("[0-9a-f]{24}", attempts[0]), attempts
    assert asyncio.run(run())[0] == (True, "7", None)  # its answer not lost now: sent once, with an attempt of its own
    assert len(attempts) == 3 and attempts[2] != attempts[0], attempts


@pytest.mark.parametrize(
    ("extensions", "attempted"),
    [
        (None, True),  # /supported not read (an app that calls the client itself): sent
        ([SETTLE_ATTEMPT], True),  # a facilitator that keeps attempts
        ([], False),  # one older than the attempt
        (["bazaar"], False),  # one that lists other extensions only
    ],
)
def test_a_settle_names_its_attempt_only_to_a_facilitator_that_lists_attempts_in_supported(
    extensions: list[str] | None, attempted: bool
) -> None:
    """A facilitator older than the attempt ignores it in a settle it reads with pydantic-core, but it reads a batch
    too deep for pydantic-core (a payer's `extensions` nested past 200 levels) by each payment's two x402 keys alone,
    and refused the whole batch (400) when a payment had a third: every payer's payment in the batch a 503. The
    facilitator here, when its `/supported` does not list `SETTLE_ATTEMPT`, refuses any third key as that one did
    the deep batch's; the payee sends attempts only to a facilitator whose `/supported` lists it (or that it has not
    asked). Before, every payment here carried an attempt, and the two older facilitators refused both payments."""
    parts: list[list[str]] = []

    async def settle(request: web.Request) -> web.Response:
        body = await request.json()
        parts.append(keys_each(body))
        older = extensions is not None and SETTLE_ATTEMPT not in extensions
        if older and any(keys != BARE for keys in parts[-1]):
            return web.json_response({"error": {"code": "malformed_request", "message": "a third key"}}, status=400)
        return web.json_response({"settlements": settled_each(body)})

    async def run() -> list[tuple[bool, str | None]]:
        async with batch_route(settle, extensions=extensions) as url:
            facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url=url), local_verify=False)
            try:
                if extensions is not None:  # as x402's middleware asks it before its first 402
                    assert (await asyncio.to_thread(facilitator.get_supported)).extensions == extensions
                paid = [facilitator.settle(p, p.accepted) for p in (bare_payment(5), bare_payment(6))]
                answers = await asyncio.gather(*paid, return_exceptions=True)
            finally:
                await facilitator.aclose()
        return [(a.success, a.amount) if isinstance(a, SettleResponse) else (False, repr(a)) for a in answers]

    assert asyncio.run(run()) == [(True, "5"), (True, "6")]
    keys = ATTEMPTED if attempted else BARE
    assert parts == [[keys, keys]]


def test_a_running_payee_learns_that_its_facilitator_now_keeps_attempts_and_then_that_it_no_longer_does() -> None:
    """The operator upgrades the service first, then its payees; a payee that runs on learns it from `/supported`,
    fetched again every `supported_refresh` seconds, and sends attempts from then on; and stops when the facilitator
    is put back to a version that does not list them. Before, a payee sent attempts as its first `/supported` said,
    until it restarted."""
    parts: list[list[str]] = []
    extensions: list[str] = []

    async def settle(request: web.Request) -> web.Response:
        body = await request.json()
        parts.append(keys_each(body))
        return web.json_response({"settlements": settled_each(body)})

    async def settle_once(facilitator: ChannelHubFacilitatorClient, amount: int) -> None:
        payment = bare_payment(amount)
        assert (await facilitator.settle(payment, payment.accepted)).success

    async def run() -> None:
        async with batch_route(settle, extensions=extensions) as url:
            facilitator = ChannelHubFacilitatorClient(
                FacilitatorConfig(url=url), local_verify=False, supported_refresh=1.0
            )
            try:
                await asyncio.to_thread(facilitator.get_supported)
                await settle_once(facilitator, 1)
                extensions.append(SETTLE_ATTEMPT)  # the service upgraded
                await settle_once(facilitator, 2)  # the answer still fresh
                await asyncio.sleep(1.05)
                await settle_once(facilitator, 3)  # the answer old: fetched again, this one sent as it said
                await asyncio.to_thread(_join_supported_threads)
                await settle_once(facilitator, 4)
                extensions.clear()  # put back
                await asyncio.sleep(1.05)
                await settle_once(facilitator, 5)
                await asyncio.to_thread(_join_supported_threads)
                await settle_once(facilitator, 6)
            finally:
                await facilitator.aclose()

    asyncio.run(run())
    assert parts == [[BARE], [BARE], [BARE], [ATTEMPTED], [ATTEMPTED], [BARE]]


@pytest.mark.parametrize("way", ["endless", "declared", "dribble", "gzip"])
def test_a_facilitator_answer_that_never_ends_is_cut_off_in_size_and_in_time(way: str) -> None:
    """The payee's own calls to its facilitator read an answer whole within six times the timeout and at most 8 MB,
    as the SDK's calls to the service do: an endless body (a broken proxy on the way) filled the payee's memory, and a
    body sent a byte at a time (each read within aiohttp's per-read timeout) held the paid request for good. Either is
    the facilitator's failure (the payee's 503); an answer too large may be a lost one, so a settle batch is sent once
    more as a resend, an answer too slow is not; one that declares a length past the bound is not read at all. x402's
    `/supported`, asked on a thread, is bounded alike, and so are x402's own calls (a payment of x402 v1: a verify
    through x402's code). The 8 MB were counted before decoding: 64 KB of gzip were read as 64 MB (2 MB as 2 GB); each
    call now asks for its answer plain and refuses one encoded all the same, unread."""
    seen: list[bool] = []
    written = [0]
    asked: list[tuple[str, str | None]] = []

    async def never_ends(request: web.Request) -> web.StreamResponse:
        asked.append((request.path, request.headers.get("Accept-Encoding")))
        if request.method == "POST" and request.path.endswith("/batch"):
            seen.append((await request.json()).get("resend", False))
        if way == "gzip":
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            return web.Response(body=gzip_bomb(), headers=headers)
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        if way == "declared":
            answer.content_length = 100 * 2**20
        await answer.prepare(request)
        try:
            while written[0] < 256 * 2**20:
                chunk = b" " * (1 if way == "dribble" else 65536)
                await answer.write(chunk)
                written[0] += len(chunk)
                if way == "dribble":
                    await asyncio.sleep(0.1)
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        return answer

    async def run() -> tuple[BaseException, float, BaseException, BaseException]:
        app = web.Application()
        app.router.add_post("/x402/settle/batch", never_ends)
        app.router.add_post("/x402/verify", never_ends)
        app.router.add_get("/x402/supported", never_ends)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/x402"  # type: ignore[union-attr]
        facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url=url, timeout=0.5), local_verify=False)
        paid = bare_payment(7)
        started = time.monotonic()
        supported: BaseException | SupportedResponse
        try:
            (settled,) = await asyncio.wait_for(
                asyncio.gather(facilitator.settle(paid, paid.accepted), return_exceptions=True), 20
            )
            took = time.monotonic() - started
            written[0] = 0
            try:
                supported = await asyncio.to_thread(lambda: facilitator._supported.get(20))
            except Exception as ex:
                supported = ex
            written[0] = 0
            (verified,) = await asyncio.wait_for(
                asyncio.gather(facilitator.verify(*V1_PAYMENT), return_exceptions=True), 20
            )
        finally:
            await facilitator.aclose()
            await runner.cleanup()
        assert isinstance(settled, BaseException) and isinstance(supported, BaseException), (settled, supported)
        assert isinstance(verified, BaseException), verified
        return settled, took, supported, verified

    settled, took, supported, verified = asyncio.run(run())
    assert isinstance(settled, FacilitatorResponseError) and isinstance(verified, FacilitatorResponseError)
    paths = ["/x402/settle/batch", "/x402/supported", "/x402/verify"]  # the last, x402's own call
    assert sorted(set(asked)) == [(path, "identity") for path in paths], asked  # (a failed /supported is asked again)
    if way == "gzip":
        encoded = "encoded ('gzip'), not plain as asked"
        assert [encoded in str(ex) for ex in (settled, supported, verified)] == [True] * 3, (settled, verified)
        assert seen == [False, True]  # maybe lost: sent once more
    elif way != "dribble":
        assert "larger than 8,388,608 bytes" in str(settled), settled
        assert seen == [False, True]  # maybe lost: sent once more
        assert "larger than 8388608 bytes" in str(supported), supported
        assert "larger than 8388608 bytes" in str(verified), verified
    else:
        assert 2.9 < took < 6, took  # 0.5 s x 6, where each byte came within the 0.5 s of a read
        assert seen == [False]
        assert "took more than 3s" in str(supported), supported
        assert "took more than 3s" in str(verified), verified


def test_a_facilitators_error_answer_is_read_for_its_code_only_when_small() -> None:
    """The payee reads our service's code off an error answer (`unknown_channels_busy` spends a client's budget of
    unseen channels) only up to 64 KB of it: ours are under 1 KB, and 8 MB of JSON took 65 ms of the payee's event
    loop to read, at each paid request while its facilitator (or a proxy before it) answered so."""
    small = json.dumps({"code": "unknown_channels_busy", "message": "busy"}).encode()
    large = json.dumps({"code": "unknown_channels_busy", "pad": "x" * ERROR_CODE_READ_MAX}).encode()
    assert [FacilitatorStatusError("failed (503)", body).code for body in (small, large, b"<html>")] == [
        "unknown_channels_busy",
        None,
        None,
    ]


class ScriptedFetch:
    """A `/supported` fetch for `_Supported`: each call noted in `calls`, and answered (or raised) by the next of
    `outcomes`, waited for."""

    def __init__(self) -> None:
        self.outcomes: queue.Queue[SupportedResponse | Exception] = queue.Queue()
        self.calls: list[int] = []

    def __call__(self) -> SupportedResponse:
        self.calls.append(len(self.calls))
        outcome = self.outcomes.get(timeout=20)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_supported_is_fetched_again_while_it_fails_and_a_request_waits_only_for_a_fetch_that_may_end_soon() -> None:
    """What the payee's event loop does while the facilitator's /supported is slow, failing, then answering (the
    end-to-end cases: tests/test_x402_e2e.py, a payee started without its facilitator, and one whose facilitator's
    host is down). A request waits (on the event loop) for the fetch in flight, begun for it if none runs, until that
    fetch has run the wait; not at all after a fetch that failed only after longer; the thread fetches again while
    requests ask. Before, each request after a failed fetch began the next and waited for it (with the facilitator's
    host down, a second of the payee's event loop in every connect timeout), and a request that came while a fetch
    ran answered at once, though the facilitator had come back and that fetch was about to say so."""
    fetch = ScriptedFetch()
    outcomes, calls = fetch.outcomes, fetch.calls

    def fetches(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(calls) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(calls) == count

    woken = _Supported(fetch, retry=60, idle=60)  # a failure that came at once: the next request waits for its fetch
    outcomes.put(ConnectionRefusedError("refused"))
    with pytest.raises(ConnectionRefusedError, match="refused"):  # the first fetch, ended within the wait: its error
        woken.get(5)
    outcomes.put(SupportedResponse(kinds=[]))
    assert woken.get(5) == SupportedResponse(kinds=[])  # the thread woken from its 60 s: fetched at once, waited for
    assert woken.get(0) == SupportedResponse(kinds=[])  # kept: no fetch more
    assert calls == [0, 1]

    calls.clear()
    again = _Supported(fetch, retry=0.01, idle=60)  # fetched again by the thread, not by a request
    outcomes.put(ConnectionRefusedError("refused"))
    with pytest.raises(ConnectionRefusedError, match="refused"):
        again.get(5)
    fetches(2)
    answered = threading.Timer(0.2, outcomes.put, [SupportedResponse(kinds=[])])
    answered.start()
    assert again.get(5) == SupportedResponse(kinds=[])  # the fetch in flight, waited for: not the last error
    answered.join()
    _join_supported_threads()
    assert calls == [0, 1]

    calls.clear()
    slow = _Supported(fetch, retry=60, idle=60)  # a failure after longer than the wait: no request waits for the next
    with pytest.raises(TimeoutError, match=r"did not answer /supported in 0\.05 s"):
        slow.get(0.05)
    with pytest.raises(TimeoutError, match="has not answered /supported yet"):  # it has run the wait: no more
        slow.get(0.05)
    time.sleep(0.1)
    outcomes.put(ConnectionResetError("slow"))
    deadline = time.monotonic() + 10
    while True:  # at once each time: "not answered yet" while the first runs, then its error (a second fetch begun)
        with pytest.raises((TimeoutError, ConnectionResetError)) as raised:
            slow.get(0.05)
        if raised.type is ConnectionResetError or time.monotonic() > deadline:
            break
        assert "has not answered /supported yet" in str(raised.value)
        time.sleep(0.005)
    assert (raised.type, str(raised.value)) == (ConnectionResetError, "slow")
    fetches(2)
    with pytest.raises(ConnectionResetError, match="slow"):  # the second runs: at once
        slow.get(0.05)
    outcomes.put(SupportedResponse(kinds=[]))
    _join_supported_threads()
    assert (slow.get(0), calls) == (SupportedResponse(kinds=[]), [0, 1])

    calls.clear()
    idle = _Supported(fetch, retry=0.01, idle=0)  # no request asks within `idle`: the thread stops after a failure
    outcomes.put(ConnectionRefusedError("down"))
    with pytest.raises(ConnectionRefusedError, match="down"):
        idle.get(5)
    _join_supported_threads()
    assert calls == [0]
    outcomes.put(SupportedResponse(kinds=[]))
    assert idle.get(5) == SupportedResponse(kinds=[])  # a thread begun again, and its fetch waited for
    assert calls == [0, 1]


def test_an_answered_supported_is_fetched_again_once_it_is_old_and_kept_while_a_newer_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`current()` never waits: the last answer, and once it is `refresh` seconds old one fetch of a newer one on a
    thread (however many ask meanwhile), whose answer replaces it; a fetch that fails keeps it for another `refresh`
    seconds, and is logged without the URL's credentials, path or query. Before, an answer was kept for as long as the
    app ran."""
    caplog.set_level(logging.INFO, logger="settlement.x402.facilitator_client")
    fetch = ScriptedFetch()
    outcomes, calls = fetch.outcomes, fetch.calls

    older, newer = SupportedResponse(kinds=[]), SupportedResponse(kinds=[], extensions=[SETTLE_ATTEMPT])
    supported = _Supported(fetch, refresh=1.0)
    assert supported.current() is None  # nothing asked yet: nothing fetched
    outcomes.put(older)
    assert supported.get(5) == older
    _join_supported_threads()
    assert [supported.current() for _ in range(3)] == [older] * 3 and calls == [0]  # fresh: not fetched again
    time.sleep(1.05)
    assert [supported.current() for _ in range(3)] == [older] * 3  # old: one fetch begun, the old answer meanwhile
    outcomes.put(newer)
    _join_supported_threads()
    assert (supported.current(), calls) == (newer, [0, 1])
    time.sleep(1.05)
    assert supported.current() == newer
    outcomes.put(ConnectionRefusedError("down at http://key:secret@facilitator.example:8443/x402/supported?k=abc"))
    _join_supported_threads()
    assert (supported.current(), supported.get(0), calls) == (newer, newer, [0, 1, 2])  # kept through the failure
    assert supported.current() == newer and calls == [0, 1, 2]  # and not fetched again at once
    assert [r.getMessage() for r in caplog.records] == [
        "the facilitator's /supported could not be fetched again (the last answer stands): "
        "ConnectionRefusedError: down at http://facilitator.example:8443/…"
    ]


def _join_supported_threads() -> None:
    for thread in threading.enumerate():
        if thread.name == "x402-supported":
            thread.join(10)
            assert not thread.is_alive()


def test_the_facilitator_clients_lifespan_closes_its_pool_when_the_app_stops() -> None:
    facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url="http://127.0.0.1:8000/x402"))
    app = FastAPI(lifespan=facilitator.lifespan)
    with TestClient(app):
        assert facilitator.own_client is not None and not facilitator.own_client.is_closed
    assert facilitator.own_client.is_closed


def test_the_facilitator_clients_lifespan_keeps_what_start_up_built_out_of_the_collectors_scans() -> None:
    facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url="http://127.0.0.1:8000/x402"))
    app = FastAPI(lifespan=facilitator.lifespan)
    built = [["a route table, say"]]  # a list: the collector tracks it
    gc.unfreeze()  # whatever an earlier app of this test process froze
    assert any(o is built for o in gc.get_objects())
    with TestClient(app):
        assert not any(o is built for o in gc.get_objects())  # in the permanent generation: no scan walks it
    assert gc.is_tracked(built)


@pytest.mark.parametrize(
    ("own", "young", "running"),
    [
        (700, GC_YOUNG_THRESHOLD, 20_000),  # Python's default, raised while the app runs
        (50_000, GC_YOUNG_THRESHOLD, 50_000),  # never sooner than the app's own setting
        (0, GC_YOUNG_THRESHOLD, 0),  # an app that turned automatic collections off keeps them off
        (700, None, 700),  # None: the app's setting left alone
    ],
)
def test_the_facilitator_clients_lifespan_scans_the_young_generation_less_often_while_the_app_runs(
    own: int, young: int | None, running: int
) -> None:
    facilitator = ChannelHubFacilitatorClient(
        FacilitatorConfig(url="http://127.0.0.1:8000/x402"), gc_young_threshold=young
    )
    app = FastAPI(lifespan=facilitator.lifespan)
    saved = gc.get_threshold()
    gc.set_threshold(own, 11, 12)
    try:
        with TestClient(app):
            assert gc.get_threshold() == (running, 11, 12)
        assert gc.get_threshold() == (own, 11, 12)  # put back when the app stops
    finally:
        gc.set_threshold(*saved)


def test_the_facilitator_clients_lifespan_keeps_the_recursion_limit_where_json_cannot_run_off_the_stack(
    limit_of_py_ecc: None,
) -> None:
    """py_ecc, imported with eth_account (here, and in a payee app), sets the recursion limit to 100,000, and x402
    reads a payment header with `json.loads`, whose recursion stops at that limit, not at the end of the stack: 200 KB
    of `[` in one header (to an app on a server that bounds no request head, as plain uvicorn with httptools) was a
    segmentation fault of the payee app. While the app runs the limit is the interpreter's default, and such a header
    raises RecursionError, which x402's middleware answers as no payment (a 402); it is put back when the app stops."""
    facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url="http://127.0.0.1:8000/x402"))
    header = base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    with TestClient(FastAPI(lifespan=facilitator.lifespan)):
        assert sys.getrecursionlimit() == SAFE_RECURSION_LIMIT == 1_000
        with pytest.raises(RecursionError):
            decode_payment_signature_header(header)
    assert sys.getrecursionlimit() == 100_000


# --- the payee's settles in flight go to the facilitator together (POST /settle/batch) ---------------------------


class Recorded:
    """The service's app as the facilitator client reaches it, every request's path noted; `answer` replaces the
    service's answer to the batch route (a facilitator without it: 404; one that cannot judge: 503)."""

    def __init__(self, client: TestClient, answer: int | None = None) -> None:
        self.app, self.answer, self.paths = client.app, answer, list[str]()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        if self.answer is not None and scope["path"] == "/x402/settle/batch":
            await send({"type": "http.response.start", "status": self.answer, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await self.app(scope, receive, send)


def facilitator_of(app: Recorded, **options: Any) -> ChannelHubFacilitatorClient:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    return ChannelHubFacilitatorClient(FacilitatorConfig(url="http://testserver/x402", http_client=client), **options)


def settle_all(
    facilitator: ChannelHubFacilitatorClient, *paid: tuple[PaymentPayload, PaymentRequirements]
) -> list[Any]:
    async def run() -> list[Any]:
        return await asyncio.gather(*(facilitator.settle(p, r) for p, r in paid), return_exceptions=True)

    return asyncio.run(run())


def test_settles_in_flight_together_go_in_one_batch_each_answered_as_alone(
    api: Callable[..., TestClient],
    devnet: Devnet,
    hub: Contract,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    service = api()
    app = Recorded(service)
    facilitator = facilitator_of(app)
    required = requirements(devnet, hub, accounts[6].address)
    one, two, three = (open_channel(accounts[5], accounts[6].address, amount=DEPOSIT) for _ in range(3))
    wait_indexed(service_of(service))  # else each id costs the read budget
    answers = settle_all(
        facilitator,
        (payment(required, one, PRICE, sign), required),
        (payment(required, two, PRICE, sign), required),
        (payment(required, three, PRICE - 1, sign), required),  # an underpayment, refused alone
    )
    assert app.paths == ["/x402/settle/batch"], answers  # three settles, one call
    assert [(a.success, a.error_reason, a.amount) for a in answers] == [
        (True, None, "10"),
        (True, None, "10"),
        (False, "underpayment", None),
    ]
    assert len(facilitator.positions or ()) == 2  # both accepted positions learnt: their next payments verify here
    (alone,) = settle_all(facilitator, (payment(required, one, 2 * PRICE, sign), required))
    assert (alone.success, app.paths) == (True, ["/x402/settle/batch"] * 2)
    assert [service.get(f"/v1/channels/{c.hex_id}").json()["acceptedCumulativeAmount"] for c in (one, two)] == [
        "20",
        "10",
    ]


def test_one_payers_payment_never_fails_the_other_payments_of_its_batch(
    api: Callable[..., TestClient],
    devnet: Devnet,
    hub: Contract,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """A payer's payment carries what it likes in `extensions` (and `accepted.extra`, `resource`): a lone surrogate,
    which Python's JSON reader takes from its header and no JSON encoder writes, failed the encoding of the whole
    batch; payments of 40 KB each, together past the service's body limit, had the batch refused (413). Either way
    every other payer's payment in the batch went unsettled and its request answered 503, and the hostile payer
    was charged nothing. Now the unsendable payment is refused alone (`invalid_payload`), and a batch is cut at
    `batch_bytes`: the large payments are settled in batches of their own, and the others as before."""
    service = api(max_body_bytes=65_536)
    app = Recorded(service)
    facilitator = facilitator_of(app, batch_bytes=32_768)
    required = requirements(devnet, hub, accounts[6].address)
    honest, odd, large, larger = (open_channel(accounts[5], accounts[6].address, amount=DEPOSIT) for _ in range(4))
    wait_indexed(service_of(service))

    answers = settle_all(
        facilitator,
        (payment(required, honest, PRICE, sign), required),
        (payment(required, odd, PRICE, sign, extensions={"note": "\ud800"}), required),
        (payment(required, large, PRICE, sign, extensions={"note": "x" * 40_000}), required),
        (payment(required, larger, PRICE, sign, extensions={"note": "y" * 40_000}), required),
    )
    assert [(a.success, a.error_reason) for a in answers] == [
        (True, None),
        (False, "invalid_payload"),
        (True, None),
        (True, None),
    ]
    assert app.paths == ["/x402/settle/batch"] * 3  # the honest one, then each large one alone
    accepted = [
        service.get(f"/v1/channels/{c.hex_id}").json()["acceptedCumulativeAmount"] for c in (honest, odd, large, larger)
    ]
    assert accepted == [str(PRICE), "0", str(PRICE), str(PRICE)]


def test_a_facilitator_without_the_batch_route_gets_one_settle_per_payment(
    api: Callable[..., TestClient], devnet: Devnet, hub: Contract, channel: Channel, sign: Sign
) -> None:
    app = Recorded(api(), answer=404)
    facilitator = facilitator_of(app)
    required = requirements(devnet, hub, channel.payee)
    answers = settle_all(facilitator, (payment(required, channel, PRICE, sign), required))
    assert [a.success for a in answers] == [True]
    assert app.paths == ["/x402/settle/batch", "/x402/settle"]  # asked once, then x402's own route
    assert settle_all(facilitator, (payment(required, channel, 2 * PRICE, sign), required))[0].success
    assert app.paths == ["/x402/settle/batch", "/x402/settle", "/x402/settle"]


@pytest.mark.parametrize("batched", [False, True])
def test_a_payment_is_sent_as_its_batch_writes_it_and_one_that_cannot_be_sent_is_refused_unsent(
    api: Callable[..., TestClient], devnet: Devnet, hub: Contract, channel: Channel, sign: Sign, batched: bool
) -> None:
    """A payer's header carries what Python's JSON reader takes into a payment's `extensions`: a lone surrogate, a NaN.
    x402's own client wrote `/verify` and `/settle` bodies with the standard library's encoder, which fails on a NaN
    and on a lone surrogate anywhere, and the payee answered 503, a payment the payer retried that could never be sent;
    a payment past the service's body limit (a header of any size under uvicorn's httptools) was the service's 413,
    a 503 too. Now every call sends the payment as its settle batch writes it (pydantic-core: a NaN as null, a lone
    surrogate in a key as U+FFFD), judged alike by `/verify` and `/settle`; one that cannot be written (a lone
    surrogate in a string) or is larger than `max_payment_bytes` is refused, `invalid_payload`, unsent."""
    service = api()
    app = Recorded(service)
    # Without local verify too: every verify is the facilitator's (one variant of each: two settings, two runs).
    facilitator = facilitator_of(app, batch_settles=batched, local_verify=batched, max_payment_bytes=8_192)
    required = requirements(devnet, hub, channel.payee)

    unsendable = [
        payment(required, channel, PRICE, sign, extensions={"note": "\ud800"}),
        payment(required, channel, PRICE, sign, extensions={"note": "x" * 8_000}),
    ]
    for odd in unsendable:
        verified = asyncio.run(facilitator.verify(odd, required))
        assert (verified.is_valid, verified.invalid_reason) == (False, "invalid_payload")
    assert "8,192 at most" in str(verified.invalid_message)
    settled = settle_all(facilitator, *((odd, required) for odd in unsendable))
    assert [(s.success, s.error_reason, s.network) for s in settled] == [
        (False, "invalid_payload", required.network)
    ] * 2
    assert app.paths == []

    odd = payment(required, channel, PRICE, sign, extensions={"\udc00": 1, "nan": float("nan"), "inf": float("inf")})
    verified = asyncio.run(facilitator.verify(odd, required))
    assert (verified.is_valid, verified.payer) == (True, channel.payer.address)
    (settled,) = settle_all(facilitator, (odd, required))
    assert (settled.success, settled.amount) == (True, str(PRICE))
    assert settle_all(facilitator, (payment(required, channel, 2 * PRICE, sign), required))[0].success
    settles = ["/x402/settle/batch"] * 2 if batched else ["/x402/settle"] * 2
    assert app.paths == ["/x402/verify", *settles]
    assert service.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == str(2 * PRICE)


def test_a_batch_the_facilitator_cannot_judge_is_unavailable_for_each_of_its_payments(
    api: Callable[..., TestClient],
    devnet: Devnet,
    hub: Contract,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """A 503 (or no answer) for the batch: each payment's request must answer 503, not a refusal (402), and its
    channel's position is forgotten (what the facilitator did is unknown)."""
    service = api()
    required = requirements(devnet, hub, accounts[6].address)
    one, two = (open_channel(accounts[5], accounts[6].address, amount=DEPOSIT) for _ in range(2))
    wait_indexed(service_of(service))
    facilitator = facilitator_of(Recorded(service))
    assert all(
        a.success for a in settle_all(facilitator, *((payment(required, c, PRICE, sign), required) for c in (one, two)))
    )
    assert len(facilitator.positions or ()) == 2
    broken = facilitator_of(Recorded(service, answer=503))
    broken.positions = facilitator.positions
    answers = settle_all(broken, *((payment(required, c, 2 * PRICE, sign), required) for c in (one, two)))
    assert [type(a) for a in answers] == [FacilitatorResponseError] * 2
    assert all("facilitator settle unavailable" in str(a) for a in answers)
    assert len(broken.positions or ()) == 0
    assert [service.get(f"/v1/channels/{c.hex_id}").json()["acceptedCumulativeAmount"] for c in (one, two)] == [
        "10",
        "10",
    ]


@pytest.mark.parametrize("form", ["RouteConfig", "dict"])
def test_a_paid_route_whose_pay_to_has_a_typo_is_refused_at_start(form: str) -> None:
    """A payee's own address pasted into its routes with one character wrong (its EIP-55 checksum broken): x402 takes
    any text, and the payee's 402s asked for payment to the address the typo spells; payers locked deposits for no
    one (now they refuse such requirements, and the payee was told nothing). The app now refuses to start; its
    address in one case, or checksummed, starts."""
    server = x402ResourceServer(ChannelHubFacilitatorClient(FacilitatorConfig(url="http://127.0.0.1:1/x402")))
    server.register("eip155:31337", ChannelHubServerScheme())
    payee = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"
    typo = payee[:-1] + "6"

    def routes(pay_to: str) -> dict[str, Any]:
        if form == "dict":
            return {
                "GET /w": {"accepts": {"scheme": "channelhub", "payTo": pay_to, "price": "1", "network": "eip155:1"}}
            }
        option = PaymentOption(scheme="channelhub", pay_to=pay_to, price="1", network="eip155:31337")
        return {"GET /w": RouteConfig(accepts=[option])}

    with pytest.raises(ValueError) as refused:
        PaymentMiddleware(Starlette(), routes=routes(typo), server=server)
    assert str(refused.value) == (
        f"a paid route's payTo '{typo}' is not an address (0x + 40 hex digits; mixed case must be a correct EIP-55 "
        "checksum)"
    )
    for good in (payee, payee.lower()):
        assert isinstance(PaymentMiddleware(Starlette(), routes=routes(good), server=server), PaymentMiddleware)
