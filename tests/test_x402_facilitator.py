"""The service as an x402 facilitator (`/x402/supported`, `/verify`, `/settle`) for the `channelhub` scheme, on both
stores: every refusal has its stable reason, verify commits nothing, a voucher buys one response, and the payer is
never charged more than the price."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from web3 import Web3
from web3.contract import Contract

from settlement.devtools.devnet import Devnet
from settlement.eip712.receipts import SignedFields, receipt_domain, receipt_signer
from settlement.eip712.vouchers import read_domain
from tests.hub_helpers import (
    ETH,
    Channel,
    behind_the_fast_path,
    recovered,
    send,
    service_of,
    wait_indexed,
    wait_until,
    workers_ready,
    x402_request,
    x402_requirements,
    x402_settle_batch,
)
from tests.hub_helpers import x402_voucher as voucher
from tests.proxy import TcpProxy

Sign = Callable[..., bytes]
T = TypeVar("T")
PRICE = 10


def requirements(devnet: Devnet, pay_to: str, **changes: Any) -> dict[str, Any]:
    return x402_requirements(devnet.chain_id, pay_to, PRICE, **changes)


@pytest.fixture
def channel(open_channel: Callable[..., Channel], accounts: list[LocalAccount]) -> Channel:
    return open_channel(accounts[5], accounts[6].address, amount=1_000)


def at_once(count: int, call: Callable[[], T]) -> list[T]:
    """`call` in `count` threads released together: what each returned."""
    start = threading.Barrier(count)
    results: list[T] = []

    def run() -> None:
        start.wait()
        results.append(call())

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == count
    return results


def accepted(client: TestClient, channel: Channel) -> str:
    return str(client.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"])


def test_supported_names_the_scheme_the_network_and_what_requirements_carry(
    api: Callable[..., TestClient], devnet: Devnet, hub: Contract, accounts: list[LocalAccount]
) -> None:
    answer = api().get("/x402/supported")
    assert answer.status_code == 200
    assert answer.json() == {
        "kinds": [
            {
                "x402Version": 2,
                "scheme": "channelhub",
                "network": f"eip155:{devnet.chain_id}",
                "extra": {"hub": hub.address, "name": "ChannelHub", "version": "1"},
            }
        ],
        "extensions": ["channelhub-settle-attempt"],  # it keeps each settle's attempt: a payee may send them
        "signers": {"eip155:*": [accounts[0].address]},  # the receipts' signer: the operator (the devnet's first)
    }


def test_verify_commits_nothing_settle_accepts_once_and_a_replay_buys_nothing(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    client = api()
    required = requirements(devnet, channel.payee)
    body = x402_request(required, voucher(channel, PRICE, sign), payment_id="order-0001-abcdefgh")
    for _ in range(2):  # verify twice: both valid, nothing stored
        verified = client.post("/x402/verify", json=body)
        assert verified.status_code == 200
        assert verified.json() == {"isValid": True, "payer": channel.payer.address, "extra": {"increment": "10"}}
    assert accepted(client, channel) == "0"

    settled = client.post("/x402/settle", json=body).json()
    receipt = settled["extra"]["receipt"]
    assert (settled["success"], settled["amount"], settled["payer"], settled["transaction"]) == (
        True,
        "10",
        channel.payer.address,
        "",
    )
    assert (receipt["cumulativeAmount"], receipt["increment"], receipt["idempotencyKey"]) == (
        "10",
        "10",
        "order-0001-abcdefgh",
    )
    assert settled["extra"]["channel"] == {"deposit": "1000", "cumulativeAmount": "10", "remaining": "990"}
    assert accepted(client, channel) == "10"

    # The same header again, with its payment identifier: the first payment stands, nothing more is charged.
    for route in ("/x402/verify", "/x402/settle"):
        again = client.post(route, json=body).json()
        reason = again.get("invalidReason") or again.get("errorReason")
        assert (reason, again.get("isValid", again.get("success"))) == ("voucher_replayed", False)
    # A new voucher that reuses the payment identifier for the same price is that same payment: still nothing more.
    retried = x402_request(required, voucher(channel, 2 * PRICE, sign), payment_id="order-0001-abcdefgh")
    assert client.post("/x402/settle", json=retried).json()["errorReason"] == "voucher_replayed"
    assert accepted(client, channel) == "10"
    # The next payment builds on the position and pays exactly the price.
    nxt = client.post("/x402/settle", json=x402_request(required, voucher(channel, 2 * PRICE, sign))).json()
    assert (nxt["success"], nxt["amount"]) == (True, "10")


def test_a_payment_identifier_x402_takes_with_a_final_newline_counts_as_none(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """x402 checks an identifier with `match` and `$`, which takes a final newline: "order-0004-abcdefgh\n" was a key
    of its own beside "order-0004-abcdefgh". It now fails the extension's rules as any odd id does (counted as none),
    as do one too short and one with a space; a valid one is the payment's key."""
    client = api()
    required = requirements(devnet, channel.payee)
    keys = []
    for n, payment_id in enumerate(("order-0004-abcdefgh\n", "short", "order 0004 abcdefgh", "order-0004-abcdefgh")):
        body = x402_request(required, voucher(channel, (n + 1) * PRICE, sign), payment_id=payment_id)
        keys.append(client.post("/x402/settle", json=body).json()["extra"]["receipt"]["idempotencyKey"])
    assert keys == [None, None, None, "order-0004-abcdefgh"]
    assert accepted(client, channel) == str(4 * PRICE)


def test_concurrent_settles_of_one_voucher_charge_once(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    client = api()
    body = x402_request(requirements(devnet, channel.payee), voucher(channel, PRICE, sign))
    answers = at_once(8, lambda: client.post("/x402/settle", json=body).json())
    outcomes = sorted((a["success"], a.get("errorReason")) for a in answers)
    assert outcomes == [(False, "voucher_replayed")] * 7 + [(True, None)]
    assert accepted(client, channel) == "10"


def test_the_fast_path_and_fastapis_x402_routes_give_the_same_answers(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    """/x402/settle and /verify are served in front of FastAPI (settlement.api.fastpath); the documented routes
    behind it must answer alike, on one service, a payment settled by either being a replay for both."""
    fast = api()
    route = behind_the_fast_path(fast)
    required = requirements(devnet, channel.payee)
    clients = (fast, route)

    def pay(cumulative: int) -> dict[str, Any]:
        return x402_request(required, voucher(channel, cumulative, sign))

    verified = [client.post("/x402/verify", json=pay(PRICE)) for client in clients]
    assert [v.json() for v in verified] == [
        {"isValid": True, "payer": channel.payer.address, "extra": {"increment": "10"}}
    ] * 2
    settled = [route.post("/x402/settle", json=pay(PRICE)), fast.post("/x402/settle", json=pay(2 * PRICE))]
    for answer, cumulative in zip(settled, (PRICE, 2 * PRICE), strict=True):
        assert answer.status_code == 200
        assert (answer.json()["success"], answer.json()["amount"]) == (True, "10")
        assert answer.json()["extra"]["channel"]["cumulativeAmount"] == str(cumulative)
    assert [set(a.json()) for a in settled] == [{"success", "payer", "transaction", "network", "amount", "extra"}] * 2
    assert set(settled[0].json()["extra"]["receipt"]) == set(settled[1].json()["extra"]["receipt"])
    for cumulative in (PRICE, 2 * PRICE):  # each settled once, by one of them: a replay for both
        replays = [client.post("/x402/settle", json=pay(cumulative)) for client in clients]
        assert replays[0].json() == replays[1].json()
        assert replays[0].json()["errorReason"] == "voucher_replayed"
    assert accepted(fast, channel) == "20"

    ghost = Channel(id=b"\x42" * 32, payer=channel.payer, payee=channel.payee, token=ETH, salt=bytes(32))
    next_voucher = voucher(channel, 3 * PRICE, sign)
    forged = voucher(channel, 3 * PRICE, sign, signer=accounts[9])
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"json": pay(4 * PRICE)}, 200, "overpayment"),
        ({"json": pay(3 * PRICE - 1)}, 200, "underpayment"),
        ({"json": x402_request(required, forged)}, 200, "invalid_signature"),
        ({"json": x402_request(required | {"scheme": "exact"}, next_voucher)}, 200, "unsupported_scheme_or_network"),
        ({"json": x402_request(required, voucher(ghost, PRICE, sign))}, 200, "channel_not_found"),
        ({"json": {"x402Version": 2}}, 400, "malformed_request"),
        ({"content": b'{"x402Version": ', "headers": {"content-type": "application/json"}}, 400, "malformed_request"),
        ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ]  # fmt: skip
    for request, status, code in refusals:
        for path in ("/x402/verify", "/x402/settle"):
            answers = [client.post(path, **request) for client in clients]
            assert [a.status_code for a in answers] == [status, status], (path, code)
            assert answers[0].json() == answers[1].json()
            found = answers[0].json()
            assert found.get("code", found.get("invalidReason", found.get("errorReason"))) == code
    assert accepted(fast, channel) == "20"


def test_a_paid_voucher_in_another_spelling_is_refused_and_charges_nothing(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """Each payload field has one form. Python's `$` also matches before a final newline, and `bytes.fromhex` and
    `int` skip whitespace, so a voucher already paid, sent again with a newline after a field, passed the payload's
    checks as a channel id (or amount, or signature) no other layer spells that way. Now it is not the payload's
    form (`invalid_payload`); the same voucher in upper-case hex is the voucher it is, and a replay."""
    client = api()
    required = requirements(devnet, channel.payee)
    good = voucher(channel, PRICE, sign)
    assert client.post("/x402/settle", json=x402_request(required, good)).json()["success"]
    spellings = [
        (good | {"channelId": good["channelId"] + "\n"}, "invalid_payload"),
        (good | {"cumulativeAmount": good["cumulativeAmount"] + "\n"}, "invalid_payload"),
        (good | {"signature": good["signature"] + "\n"}, "invalid_payload"),
        (good | {"channelId": good["channelId"][:40] + "\n" + good["channelId"][40:]}, "invalid_payload"),
        (good | {"cumulativeAmount": "0" + good["cumulativeAmount"]}, "invalid_payload"),
        (good | {"channelId": "0x" + good["channelId"][2:].upper()}, "voucher_replayed"),
    ]
    for payload, reason in spellings:
        body = x402_request(required, payload)
        verified = client.post("/x402/verify", json=body)
        settled = client.post("/x402/settle", json=body)
        assert (verified.status_code, settled.status_code) == (200, 200), payload
        assert (verified.json()["isValid"], verified.json().get("invalidReason")) == (False, reason), payload
        assert (settled.json()["success"], settled.json().get("errorReason")) == (False, reason), payload
    assert accepted(client, channel) == str(PRICE)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong scheme", "unsupported_scheme_or_network"),
        ("wrong network", "unsupported_scheme_or_network"),
        ("answers other requirements", "requirements_mismatch"),
        ("payload missing a field", "invalid_payload"),
        ("payload with an extra field", "invalid_payload"),
        ("amount not decimal", "invalid_payload"),
        ("signature not hex", "invalid_payload"),
        ("channel to another payee", "wrong_pay_to"),
        ("channel in another asset", "wrong_asset"),
        ("underpayment", "underpayment"),
        ("overpayment from a stale position", "overpayment"),
        ("foreign signature", "invalid_signature"),
        ("unknown channel", "channel_not_found"),
        ("above the deposit", "amount_exceeds_deposit"),
        ("closing channel", "channel_closed"),
        ("channel its payee stopped", "channel_closed"),
    ],
)
def test_every_bad_payment_gets_its_reason_and_charges_nothing(
    case: str,
    reason: str,
    api: Callable[..., TestClient],
    devnet: Devnet,
    channel: Channel,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    token: Contract,
    sign: Sign,
    w3: Web3,
    hub: Contract,
) -> None:
    client = api()
    required = requirements(devnet, channel.payee)
    good = voucher(channel, PRICE, sign)
    body = x402_request(required, good)
    if case == "wrong scheme":
        body = x402_request(required | {"scheme": "exact"}, good)
    elif case == "wrong network":
        body = x402_request(required | {"network": "eip155:1"}, good)
    elif case == "answers other requirements":
        body = x402_request(required, good, accepted=required | {"amount": "1"})
    elif case == "payload missing a field":
        body = x402_request(required, {k: v for k, v in good.items() if k != "signature"})
    elif case == "payload with an extra field":
        body = x402_request(required, good | {"reference": "x"})
    elif case == "amount not decimal":
        body = x402_request(required, good | {"cumulativeAmount": "0x0a"})
    elif case == "signature not hex":
        body = x402_request(required, good | {"signature": "0x" + "zz" * 65})
    elif case == "channel to another payee":
        body = x402_request(requirements(devnet, accounts[7].address), good)
    elif case == "channel in another asset":
        body = x402_request(required | {"asset": token.address}, good)
    elif case == "underpayment":
        body = x402_request(required, voucher(channel, PRICE - 1, sign))
    elif case == "overpayment from a stale position":
        body = x402_request(required, voucher(channel, 2 * PRICE, sign))
    elif case == "foreign signature":
        body = x402_request(required, voucher(channel, PRICE, sign, signer=accounts[9]))
    elif case == "unknown channel":
        ghost = Channel(id=b"\x42" * 32, payer=channel.payer, payee=channel.payee, token=ETH, salt=bytes(32))
        body = x402_request(required, voucher(ghost, PRICE, sign))
    elif case == "above the deposit":
        small = open_channel(accounts[5], channel.payee, amount=5)
        body = x402_request(required, voucher(small, PRICE, sign))
    elif case == "closing channel":  # the session hub's challenge period is an hour: inside a 2-hour close guard
        send(w3, hub.functions.requestClose(channel.id), channel.payer.address)
        client = api(close_guard_seconds=7200)
        url = f"/v1/channels/{channel.hex_id}"
        wait_until(lambda: client.get(url).json()["status"] == "closing")  # the indexers saw the close
    elif case == "channel its payee stopped":  # to close it with the latest voucher (closeByPayee)
        assert client.post(f"/v1/channels/{channel.hex_id}/stop", json={}).status_code == 200
    for route, flag, why in (("/x402/verify", "isValid", "invalidReason"), ("/x402/settle", "success", "errorReason")):
        answer = client.post(route, json=body)
        assert answer.status_code == 200, answer.text
        assert (answer.json()[flag], answer.json()[why]) == (False, reason), answer.json()
    assert accepted(client, channel) == "0"


@pytest.mark.parametrize(
    "body",
    [{}, {"x402Version": 2}, {"x402Version": 1, "paymentPayload": {}, "paymentRequirements": {}}, []],
    ids=["empty", "no payload", "v1 shape", "not an object"],
)
def test_a_request_that_is_not_x402_is_a_400(api: Callable[..., TestClient], body: Any) -> None:
    client = api()
    for route in ("/x402/verify", "/x402/settle"):
        answer = client.post(route, json=body)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request"), answer.text


def test_the_chain_down_is_a_503_not_a_refused_payment(
    api: Callable[..., TestClient],
    devnet: Devnet,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """A payee must not answer 402 ("pay") when the facilitator cannot judge: it answers 503 (retry)."""
    with TcpProxy(devnet.port) as rpc:
        client = api(rpc_url=rpc.url)
        rpc.cut()
        unseen = open_channel(accounts[5], accounts[6].address, amount=100)  # only the chain could tell
        body = x402_request(requirements(devnet, unseen.payee), voucher(unseen, PRICE, sign))
        for route in ("/x402/verify", "/x402/settle"):
            answer = client.post(route, json=body)
            assert (answer.status_code, answer.json()["code"]) == (503, "chain_unavailable"), answer.text


@pytest.mark.parametrize("field", [None, "channelId", "cumulativeAmount", "increment", "acceptedAt", "paymentId"])
def test_a_settled_receipt_is_signed_by_the_listed_signer_over_every_field(
    field: str | None,
    api: Callable[..., TestClient],
    devnet: Devnet,
    channel: Channel,
    sign: Sign,
    hub: Contract,
) -> None:
    """A payee or an auditor checks a receipt offline: it recovers to the signer /x402/supported lists, and any
    field changed (one at a time) no longer does."""
    client = api()
    body = x402_request(
        requirements(devnet, channel.payee), voucher(channel, PRICE, sign), payment_id="order-0002-abcdefgh"
    )
    receipt = client.post("/x402/settle", json=body).json()["extra"]["receipt"]
    (signer,) = client.get("/x402/supported").json()["signers"]["eip155:*"]
    fields = SignedFields(
        bytes.fromhex(receipt["channelId"][2:]),
        int(receipt["cumulativeAmount"]),
        int(receipt["increment"]),
        int(receipt["acceptedAtSeconds"]),
        receipt["idempotencyKey"],
    )
    assert (fields.cumulative, fields.increment, fields.payment_id) == (PRICE, PRICE, "order-0002-abcdefgh")
    changed = {
        None: fields,
        "channelId": replace(fields, channel_id=b"\x01" * 32),
        "cumulativeAmount": replace(fields, cumulative=PRICE + 1),
        "increment": replace(fields, increment=PRICE + 1),
        "acceptedAt": replace(fields, accepted_at=fields.accepted_at + 1),
        "paymentId": replace(fields, payment_id="order-0003-abcdefgh"),
    }[field]
    domain = receipt_domain(read_domain(hub))
    recovered = receipt_signer(domain, changed, bytes.fromhex(receipt["signature"][2:]))
    assert (recovered == signer == receipt["signer"]) is (field is None)


# --- POST /x402/settle/batch: many payments in one call (the payee's facilitator client sends settles in flight) ---


def test_a_settle_batch_answers_each_payment_as_settle_would_in_order(
    api: Callable[..., TestClient],
    devnet: Devnet,
    channel: Channel,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    client = api()
    required = requirements(devnet, channel.payee)
    other = open_channel(accounts[5], channel.payee, amount=1_000)
    wait_indexed(service_of(client))  # only the made-up id costs the read budget
    assert client.post("/x402/settle", json=x402_request(required, voucher(channel, PRICE, sign))).json()["success"]
    # Known to the facilitator before (verify stores nothing): each payment is then queued in the batch's order.
    assert client.post("/x402/verify", json=x402_request(required, voucher(other, PRICE, sign))).json()["isValid"]
    ghost = Channel(id=b"\x42" * 32, payer=channel.payer, payee=channel.payee, token=ETH, salt=bytes(32))
    twice = x402_request(required, voucher(channel, 2 * PRICE, sign))
    items = [
        twice,
        twice,  # the same voucher twice in one batch: one response bought, the second a replay
        x402_request(required, voucher(other, PRICE - 1, sign)),
        x402_request(required, voucher(other, PRICE, sign, signer=accounts[9])),
        x402_request(required | {"scheme": "exact"}, voucher(other, PRICE, sign)),
        x402_request(required, voucher(ghost, PRICE, sign)),
        x402_request(required, voucher(other, PRICE, sign)),
    ]
    for client_of in (client, behind_the_fast_path(client)):  # the fast path, then FastAPI's route: the same rules
        answer = client_of.post("/x402/settle/batch", json=x402_settle_batch(*items))
        assert answer.status_code == 200, answer.text
        found = [(a["success"], a.get("errorReason"), a.get("amount")) for a in answer.json()["settlements"]]
        if client_of is client:
            assert found == [
                (True, None, "10"),
                (False, "voucher_replayed", None),
                (False, "underpayment", None),
                (False, "invalid_signature", None),
                (False, "unsupported_scheme_or_network", None),
                (False, "channel_not_found", None),
                (True, None, "10"),
            ]
            settled = answer.json()["settlements"]
            assert settled[0]["extra"]["channel"] == {"deposit": "1000", "cumulativeAmount": "20", "remaining": "980"}
            assert settled[6]["extra"]["receipt"]["channelId"] == other.hex_id
        else:  # sent again: each payment accepted before is a replay now; `other` moved past 9 meanwhile
            assert found == [
                (False, "voucher_replayed", None),
                (False, "voucher_replayed", None),
                (False, "stale_voucher", None),
                (False, "invalid_signature", None),
                (False, "unsupported_scheme_or_network", None),
                (False, "channel_not_found", None),
                (False, "voucher_replayed", None),
            ]
    assert (accepted(client, channel), accepted(client, other)) == ("20", "10")


def test_concurrent_batches_carrying_one_voucher_charge_it_once(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """Eight payees' batches racing with the same voucher (a payer handing one voucher to several payees, or a
    payee's retry racing its first send): one response bought, seven replays, one price charged."""
    client = api()
    paid = x402_request(requirements(devnet, channel.payee), voucher(channel, PRICE, sign))
    batches = at_once(
        8, lambda: client.post("/x402/settle/batch", json=x402_settle_batch(paid, paid)).json()["settlements"]
    )
    outcomes = sorted((a["success"], a.get("errorReason")) for answers in batches for a in answers)
    assert outcomes == [(False, "voucher_replayed")] * 15 + [(True, None)]
    assert accepted(client, channel) == "10"


def test_a_resent_batch_answers_a_payment_accepted_before_as_accepted_and_charges_nothing_more(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """A payee whose settle batch's answer was lost sends it again with `resend`: a payment the first send got
    accepted is answered as accepted, with that acceptance's receipt; a new one is judged as ever; the same voucher
    twice in it is one purchase and one replay. Nothing is charged twice, and without `resend` the accepted payment
    is a replay, as before (on the fast path and on FastAPI's route)."""
    client = api()
    required = requirements(devnet, channel.payee)
    first = x402_request(required, voucher(channel, PRICE, sign))
    (sent,) = client.post("/x402/settle/batch", json=x402_settle_batch(first)).json()["settlements"]
    assert sent["success"], sent
    for n, client_of in enumerate((client, behind_the_fast_path(client)), start=2):
        new = x402_request(required, voucher(channel, n * PRICE, sign))
        answer = client_of.post("/x402/settle/batch", json=x402_settle_batch(first, new, new) | {"resend": True})
        assert answer.status_code == 200, answer.text
        resent, accepted_now, twice = answer.json()["settlements"]
        assert (resent["success"], resent["amount"]) == (True, "10")
        assert resent["extra"]["receipt"] == sent["extra"]["receipt"]  # the first send's acceptance
        assert (accepted_now["success"], accepted_now["amount"]) == (True, "10")
        assert accepted_now["extra"]["channel"]["cumulativeAmount"] == str(n * PRICE)
        assert (twice["success"], twice["errorReason"]) == (False, "voucher_replayed")
        (plain,) = client_of.post("/x402/settle/batch", json=x402_settle_batch(first)).json()["settlements"]
        assert (plain["success"], plain["errorReason"]) == (False, "voucher_replayed")
    assert accepted(client, channel) == "30"


def test_a_resent_settle_answers_a_payment_accepted_before_as_accepted_and_charges_nothing_more(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """A payee that settles one payment a `/settle` and lost an answer sends it again with `"resend": true` (beside
    x402's body): a payment accepted before is answered as accepted, with that acceptance's receipt; a new one is
    judged as ever. Without `resend` the accepted payment is a replay, as before, and a `resend` that is not a boolean
    is a 400 (on the fast path and on FastAPI's route)."""
    client = api()
    required = requirements(devnet, channel.payee)
    first = x402_request(required, voucher(channel, PRICE, sign))
    sent = client.post("/x402/settle", json=first).json()
    assert sent["success"], sent
    for n, client_of in enumerate((client, behind_the_fast_path(client)), start=2):
        resent = client_of.post("/x402/settle", json=first | {"resend": True})
        assert resent.status_code == 200, resent.text
        assert (resent.json()["success"], resent.json()["amount"]) == (True, "10")
        assert resent.json()["extra"]["receipt"] == sent["extra"]["receipt"]  # the first send's acceptance
        new = client_of.post("/x402/settle", json=x402_request(required, voucher(channel, n * PRICE, sign)) | {
            "resend": True
        }).json()  # fmt: skip
        assert (new["success"], new["amount"]) == (True, "10")
        assert new["extra"]["channel"]["cumulativeAmount"] == str(n * PRICE)
        plain = client_of.post("/x402/settle", json=first).json()
        assert (plain["success"], plain["errorReason"]) == (False, "voucher_replayed")
        bad = client_of.post("/x402/settle", json=first | {"resend": [True]})
        assert (bad.status_code, bad.json()["code"]) == (400, "malformed_request")
    assert accepted(client, channel) == "30"


def test_a_resend_is_answered_accepted_only_for_the_settle_attempt_that_got_the_payment_accepted(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """A voucher replayed to a payee (two of its processes, or two requests one after the other) is settled twice:
    the first settle accepted, the second refused as a replay. When that refusal's answer was lost, the payee sent
    the settle again as a `resend`, and it was answered accepted: the voucher bought two responses. Each settle now
    carries its `attempt` (the payee's id, the same in its resend), stored with the payment it gets accepted: a
    resend is answered accepted only for the attempt that got the payment accepted (with that acceptance's receipt),
    another attempt's is the replay it was, in a batch or alone, also at another `serve` process on the same store (or
    after a restart); a resend naming no attempt is answered as before, and a malformed attempt is a 400 (on the fast
    path and on FastAPI's route). Nothing is charged twice."""
    client = api()
    required = requirements(devnet, channel.payee)
    paid = x402_request(required, voucher(channel, PRICE, sign))
    own, other = paid | {"attempt": "payee-a-0001"}, paid | {"attempt": "payee-b-0001"}
    (sent,) = client.post("/x402/settle/batch", json=x402_settle_batch(own)).json()["settlements"]
    assert (sent["success"], sent["amount"]) == (True, "10")

    def outcome(answer: dict[str, Any]) -> tuple[bool, str | None]:
        if answer["success"]:
            assert answer["extra"]["receipt"] == sent["extra"]["receipt"], answer  # the first send's acceptance
        return answer["success"], answer.get("errorReason")

    replayed, accepted_again = (False, "voucher_replayed"), (True, None)
    for client_of in (client, behind_the_fast_path(client), api()):  # the last: another process on the same store
        batches = [
            x402_settle_batch(other),
            x402_settle_batch(other) | {"resend": True},
            x402_settle_batch(own) | {"resend": True},
            x402_settle_batch(paid) | {"resend": True},
            x402_settle_batch(other, own) | {"resend": True},
        ]
        answers = [
            [outcome(a) for a in client_of.post("/x402/settle/batch", json=b).json()["settlements"]] for b in batches
        ]
        assert answers == [[replayed], [replayed], [accepted_again], [accepted_again], [replayed, accepted_again]]
        alone = [client_of.post("/x402/settle", json=body | {"resend": True}).json() for body in (other, own)]
        assert [outcome(a) for a in alone] == [replayed, accepted_again]
        for attempt in ("short", "a" * 65, "payee a 0001", 12345678, None):
            bad = [
                client_of.post("/x402/settle", json=other | {"attempt": attempt}),
                client_of.post("/x402/settle/batch", json=x402_settle_batch(other | {"attempt": attempt})),
            ]
            if attempt is None:  # null: as no attempt
                assert [b.status_code for b in bad] == [200, 200]
            else:
                assert [(b.status_code, b.json()["code"]) for b in bad] == 2 * [(400, "malformed_request")], attempt
    assert accepted(client, channel) == "10"


def test_a_large_settle_batch_is_recovered_by_a_worker_process_and_each_payment_answered_in_place(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, accounts: list[LocalAccount], sign: Sign
) -> None:
    """A batch's vouchers go to ingest together, as a voucher batch's do: 24 of them have their signers recovered by
    a worker process, not one by one on the event loop (~60 µs each, every other request waiting), and each payment
    is answered in its place: a forged voucher before the honest one at its amount, another scheme's payment."""
    client = api(recovery_processes=1)
    workers_ready(client)
    required = requirements(devnet, channel.payee)
    items: list[dict[str, Any]] = []
    expected: list[tuple[bool, str | None]] = []
    for n in range(1, 21):
        if n % 5 == 0:
            items.append(x402_request(required, voucher(channel, n * PRICE, sign, signer=accounts[9])))
            expected.append((False, "invalid_signature"))
        if n == 12:
            items.append(x402_request(required | {"scheme": "exact"}, voucher(channel, n * PRICE, sign)))
            expected.append((False, "unsupported_scheme_or_network"))
        items.append(x402_request(required, voucher(channel, n * PRICE, sign)))
        expected.append((True, None))
    answer = client.post("/x402/settle/batch", json=x402_settle_batch(*items))
    assert answer.status_code == 200, answer.text
    settled = answer.json()["settlements"]
    assert [(a["success"], a.get("errorReason")) for a in settled] == expected
    assert [a["extra"]["channel"]["cumulativeAmount"] for a in settled if a["success"]] == [
        str(n * PRICE) for n in range(1, 21)
    ]
    assert (recovered(client, "process"), recovered(client, "thread")) == (24, 0)
    assert accepted(client, channel) == "200"


def test_a_settle_batch_that_is_not_x402_or_too_large_is_refused_whole(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    client = api(batch_max_items=2)
    good = x402_request(requirements(devnet, channel.payee), voucher(channel, PRICE, sign))
    refused: list[tuple[Any, int, str]] = [
        ({"x402Version": 2, "settlements": []}, 400, "malformed_request"),
        ({"x402Version": 1, "settlements": x402_settle_batch(good)["settlements"]}, 400, "malformed_request"),
        ({"settlements": x402_settle_batch(good)["settlements"]}, 400, "malformed_request"),
        ({"x402Version": 2, "settlements": [good["paymentPayload"]]}, 400, "malformed_request"),
        (x402_settle_batch(good, good, good), 413, "batch_too_large"),
    ]
    for body, status, code in refused:
        answers = [c.post("/x402/settle/batch", json=body) for c in (client, behind_the_fast_path(client))]
        assert [a.status_code for a in answers] == [status, status], body
        assert answers[0].json() == answers[1].json()
        assert answers[0].json()["code"] == code
    assert accepted(client, channel) == "0"
    assert client.post("/x402/verify", json=good).json()["isValid"]  # the channel known: queued in the batch's order
    answer = client.post("/x402/settle/batch", json=x402_settle_batch(good, good))
    assert [a["success"] for a in answer.json()["settlements"]] == [True, False]
    assert accepted(client, channel) == "10"


def test_a_payment_of_a_batch_nested_deeper_than_the_json_parser_goes_is_judged_and_a_malformed_one_refused_alone(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """A payee's x402 reads a payment's `extensions` from the payer's header as deep as Python's JSON reader goes
    (~1,000 levels) and passes them on, but pydantic-core reads JSON 200 levels deep at most: one payer's payment
    nested 250 levels deep had the whole batch refused (400), every other payer's request in it a 503. Where the whole
    does not parse but is framed as a batch, each payment is now parsed on its own (from Python's reading of the
    body): the deep one is judged as any other, one that is not x402's shape is refused in its place
    (`invalid_payload`), the others settle; on both of the app's paths."""
    client = api()
    required = requirements(devnet, channel.payee)

    def paid(cumulative: int, deep: bool = False) -> dict[str, Any]:
        made = x402_request(required, voucher(channel, cumulative, sign))
        if deep:
            made["paymentPayload"]["extensions"] = {"note": json.loads("[" * 250 + "]" * 250)}
        return made

    odd = paid(3 * PRICE)
    odd["paymentRequirements"] = "not requirements"
    body = json.dumps(x402_settle_batch(paid(PRICE), paid(2 * PRICE, deep=True), odd, paid(3 * PRICE)))
    answer = client.post("/x402/settle/batch", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert [(a["success"], a.get("errorReason"), a["network"]) for a in answer.json()["settlements"]] == [
        (True, None, required["network"]),
        (True, None, required["network"]),
        (False, "invalid_payload", ""),
        (True, None, required["network"]),
    ]
    assert accepted(client, channel) == str(3 * PRICE)
    for n, path in ((4, client), (5, behind_the_fast_path(client))):
        again = path.post("/x402/settle/batch", json=x402_settle_batch(paid(n * PRICE, deep=True)))
        assert [a["success"] for a in again.json()["settlements"]] == [True]
    assert accepted(client, channel) == str(5 * PRICE)
    escaped = json.dumps(x402_settle_batch(paid(6 * PRICE, deep=True))).replace('"note"', '"\\udc00"', 1)
    refused = client.post("/x402/settle/batch", content=escaped, headers={"content-type": "application/json"})
    assert (refused.status_code, refused.json()["code"]) == (400, "malformed_request")  # as the fast reader says
    assert accepted(client, channel) == str(5 * PRICE)


def test_a_single_payment_nested_deeper_than_the_json_parser_goes_is_judged_as_any_other(
    api: Callable[..., TestClient], devnet: Devnet, channel: Channel, sign: Sign
) -> None:
    """As in a batch, on `/verify` and `/settle`: a payee's x402 passes on a payment's `extensions` read from the
    payer's header up to ~1,000 levels deep. Nested 250 deep, both were a 400 (pydantic-core reads 200 levels), and a
    payee's facilitator client answers a 400 with a 503: the payer retried a payment that could never pass. Judged
    now, on both of the app's paths; one that is not x402's shape beneath the depth is still a 400 naming its field."""
    client = api()
    required = requirements(devnet, channel.payee)

    def deep(cumulative: int) -> str:
        made = x402_request(required, voucher(channel, cumulative, sign))
        made["paymentPayload"]["extensions"] = {"note": json.loads("[" * 250 + "]" * 250)}
        return json.dumps(made)

    json_body = {"content-type": "application/json"}
    for n, path in ((1, client), (2, behind_the_fast_path(client))):
        verified = path.post("/x402/verify", content=deep(n * PRICE), headers=json_body)
        assert (verified.status_code, verified.json()) == (
            200,
            {"isValid": True, "payer": channel.payer.address, "extra": {"increment": str(PRICE)}},
        )
        settled = path.post("/x402/settle", content=deep(n * PRICE), headers=json_body)
        assert (settled.status_code, settled.json()["success"], settled.json()["amount"]) == (200, True, str(PRICE))
        assert accepted(client, channel) == str(n * PRICE)
    odd = json.loads(deep(3 * PRICE))
    odd["paymentRequirements"] = "not requirements"
    for path in (client, behind_the_fast_path(client)):
        refused = path.post("/x402/settle", content=json.dumps(odd), headers=json_body)
        assert (refused.status_code, refused.json()["code"]) == (400, "malformed_request")
        assert refused.json()["errors"][0]["field"] == "paymentRequirements"
    escaped = deep(3 * PRICE).replace('"note"', '"\\udc00"', 1)
    refused = client.post("/x402/settle", content=escaped, headers=json_body)
    assert (refused.status_code, refused.json()["code"]) == (400, "malformed_request")  # as the fast reader says
    assert accepted(client, channel) == str(2 * PRICE)


def test_a_payment_of_a_batch_that_cannot_be_judged_is_a_503_in_its_place_and_the_others_stand(
    api: Callable[..., TestClient],
    devnet: Devnet,
    channel: Channel,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    with TcpProxy(devnet.port) as rpc:
        client = api(rpc_url=rpc.url)
        required = requirements(devnet, channel.payee)
        assert client.post("/x402/settle", json=x402_request(required, voucher(channel, PRICE, sign))).json()["success"]
        rpc.cut()
        unseen = open_channel(accounts[5], channel.payee, amount=100)  # only the chain could tell
        body = x402_settle_batch(
            x402_request(required, voucher(unseen, PRICE, sign)),
            x402_request(required, voucher(channel, 2 * PRICE, sign)),
        )
        answer = client.post("/x402/settle/batch", json=body)
        assert answer.status_code == 200, answer.text
        unjudged, settled = answer.json()["settlements"]
        assert (unjudged["status"], unjudged["error"]["code"]) == (503, "chain_unavailable")
        assert (settled["success"], settled["amount"]) == (True, "10")
        assert accepted(client, channel) == "20"
