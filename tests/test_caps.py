"""Spending caps on the real app and both stores: a payee caps what each payer may spend on its channels per window,
the operator caps a payer over every payee; a voucher past a cap gets 409 `spending_cap_reached` with Retry-After and
is not stored; a cap holds exactly with two services writing on one store; only the payee and the operator see or
change a payee's caps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient

import settlement.server.risk
import settlement.store.caps
from settlement.domain.ledger import Verdict
from settlement.domain.model import Voucher
from settlement.errors import SettlementError, SpendingCapError
from settlement.server.api_keys import Role
from settlement.server.service import Service
from tests.hub_helpers import Channel, body, new_key, service_of, signed_in, wait_until

Sign = Callable[..., bytes]


def voucher(channel: Channel, sign: Sign, cumulative: int) -> dict[str, Any]:
    return body(channel, cumulative, sign(channel.payer, channel.id, cumulative))


def hold_ingest_clock(client: TestClient, second: int) -> None:
    """Stop the service's ingest clock at that unix second (call again to move it), so a refusal's window and
    Retry-After are exact."""
    service: Service = service_of(client)
    service.ingestor.clock = lambda: datetime.fromtimestamp(second, UTC)


def caps_reach_ingest(*services: Service, count: int = 1) -> None:
    """The risk monitor hands the store's caps to ingest every quarter of a second, in each process."""
    wait_until(lambda: all(len(s.ingestor.rules.caps) == count for s in services), timeout=5)


def test_a_payee_caps_what_each_payer_spends_on_its_channels_per_window(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    client = api()
    now = int(time.time())
    hold_ingest_clock(client, now)
    payee = accounts[6].address
    first, second = open_channel(accounts[3], payee, amount=1_000), open_channel(accounts[4], payee, amount=1_000)
    elsewhere = open_channel(accounts[3], accounts[7].address, amount=1_000)  # the same payer, another payee
    cap = client.put(f"/v1/payees/{payee}/caps", json={"amount": "100", "windowSeconds": 3600})
    assert cap.json() == {
        "capId": cap.json()["capId"],
        "payee": payee,
        "payer": "*",
        "token": "0x" + "00" * 20,
        "amount": "100",
        "windowSeconds": 3600,
    }
    caps_reach_ingest(service_of(client))
    assert client.post("/v1/vouchers", json=voucher(first, sign, 60)).status_code == 201
    assert client.post("/v1/vouchers", json=voucher(first, sign, 100)).status_code == 201  # 100 in the window
    refused = client.post("/v1/vouchers", json=voucher(first, sign, 101))
    error = refused.json()
    window_ends = now // 3600 * 3600 + 3600
    assert (refused.status_code, error["code"], error["capAmount"], error["spent"], error["windowEnds"]) == (
        409,
        "spending_cap_reached",
        "100",
        "100",
        window_ends,
    )
    assert error["retryAfter"] == window_ends - now and refused.headers["retry-after"] == str(window_ends - now)
    assert client.post("/v1/vouchers", json=voucher(first, sign, 100)).status_code == 200  # a re-send costs nothing
    # Each payer on its own count; the payer's channel to another payee is not this payee's to cap.
    batch = [voucher(second, sign, 100), voucher(elsewhere, sign, 500), voucher(second, sign, 101)]
    results = client.post("/v1/vouchers/batch", json={"vouchers": batch}).json()["results"]
    assert [r["status"] for r in results] == [201, 201, 409]
    assert results[2]["error"]["code"] == "spending_cap_reached"
    assert client.get(f"/v1/channels/0x{first.id.hex()}").json()["acceptedCumulativeAmount"] == "100"
    # Raised: the same payer, asset and window is one cap whose amount changes.
    again = client.put(f"/v1/payees/{payee}/caps", json={"amount": "150", "windowSeconds": 3600}).json()
    assert (again["capId"], again["amount"]) == (cap.json()["capId"], "150")
    wait_until(lambda: client.post("/v1/vouchers", json=voucher(first, sign, 150)).status_code == 201, timeout=5)
    assert client.delete(f"/v1/payees/{payee}/caps/{again['capId']}").status_code == 204
    assert client.get(f"/v1/payees/{payee}/caps").json() == []
    caps_reach_ingest(service_of(client), count=0)
    assert client.post("/v1/vouchers", json=voucher(first, sign, 900)).status_code == 201


def test_a_short_window_ends_and_the_payer_may_pay_again(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    client = api()
    start = int(time.time()) // 2 * 2  # the start of a 2-s window
    hold_ingest_clock(client, start)
    channel = open_channel(accounts[8], accounts[9].address, amount=1_000)
    payer = channel.payer.address
    cap = {"payer": payer, "amount": "10", "windowSeconds": 2}
    assert client.put(f"/v1/payees/{channel.payee}/caps", json=cap).status_code == 200
    caps_reach_ingest(service_of(client))
    assert client.post("/v1/vouchers", json=voucher(channel, sign, 10)).status_code == 201
    for second, wait in ((start, 2), (start + 1, 1)):
        hold_ingest_clock(client, second)
        refused = client.post("/v1/vouchers", json=voucher(channel, sign, 11))
        error = refused.json()
        assert (refused.status_code, error["code"], error["spent"], error["windowEnds"], error["retryAfter"]) == (
            409,
            "spending_cap_reached",
            "10",
            start + 2,
            wait,
        )
        assert refused.headers["retry-after"] == str(wait)
    hold_ingest_clock(client, start + 2)  # the next window: its count starts at nothing
    assert client.post("/v1/vouchers", json=voucher(channel, sign, 11)).status_code == 201
    refused = client.post("/v1/vouchers", json=voucher(channel, sign, 21)).json()
    assert (refused["code"], refused["spent"], refused["windowEnds"]) == ("spending_cap_reached", "1", start + 4)
    assert client.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == "11"


def test_the_operator_caps_a_payer_over_every_payee(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    client = api()
    payer = accounts[10]
    one, two = (open_channel(payer, accounts[n].address, amount=1_000) for n in (11, 12))
    cap = client.put("/v1/risk/caps", json={"payer": payer.address, "amount": "50", "windowSeconds": 86400}).json()
    assert (cap["payee"], cap["payer"], cap["amount"]) == ("*", payer.address, "50")
    caps_reach_ingest(service_of(client))
    assert client.post("/v1/vouchers", json=voucher(one, sign, 30)).status_code == 201
    assert client.post("/v1/vouchers", json=voucher(two, sign, 20)).status_code == 201
    for channel in (one, two):
        refused = client.post("/v1/vouchers", json=voucher(channel, sign, 31 if channel is one else 21)).json()
        assert (refused["code"], refused["spent"]) == ("spending_cap_reached", "50")
    assert [c["capId"] for c in client.get("/v1/risk/caps").json()] == [cap["capId"]]
    assert client.get(f"/v1/payees/{accounts[11].address}/caps").json() == []  # not a payee's own cap
    assert client.delete(f"/v1/payees/{accounts[11].address}/caps/{cap['capId']}").status_code == 404
    assert client.delete(f"/v1/risk/caps/{cap['capId']}").status_code == 204
    assert client.delete(f"/v1/risk/caps/{cap['capId']}").status_code == 404


def test_a_cap_holds_exactly_with_two_services_writing_on_one_store(
    make_service: Callable[..., Service],
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """Two processes' writers (two services, their own connections and group commits) take one payer's vouchers on
    two channels at once; the payer's window is one locked row, so together they accept exactly the cap."""
    client = api()
    payee = accounts[15].address
    channels = [open_channel(accounts[14], payee, amount=10_000) for _ in range(2)]
    client.put(f"/v1/payees/{payee}/caps", json={"amount": "500", "windowSeconds": 86400})
    services = [make_service(), make_service()]
    caps_reach_ingest(*services)
    for service in services:
        service.indexer.catch_up()
    outcomes: list[list[Any]] = [[], []]

    def pay(n: int) -> None:
        service, channel = services[n], channels[n]
        cid = channel.hex_id
        for step in range(1, 41):  # 40 vouchers of 10 each way: 800 asked, 500 allowed
            outcomes[n] += service.ingestor.ingest(
                [Voucher(cid, step * 10, sign(channel.payer, channel.id, step * 10))]
            )

    threads = [threading.Thread(target=pay, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [o for part in outcomes for o in part]
    accepted = [o for o in flat if isinstance(o, Verdict) and o.new]
    refused = [o.code for o in flat if isinstance(o, SettlementError)]
    assert sum(o.receipt.increment for o in accepted) == 500 and len(accepted) == 50
    assert refused == ["spending_cap_reached"] * 30
    # x402's verify (a preview, nothing stored) refuses what settle would.
    channel = channels[0]
    last = max(o.receipt.cumulative for o in outcomes[0] if isinstance(o, Verdict))
    with pytest.raises(SpendingCapError):
        services[0].ingestor.preview(Voucher(channel.hex_id, last + 10, sign(channel.payer, channel.id, last + 10)))


def test_only_the_payee_and_the_operator_reach_a_payees_caps(
    api: Callable[..., TestClient], accounts: list[LocalAccount]
) -> None:
    client = api(access_control=True)
    payee, payer, stranger = (signed_in(client, a) for a in (accounts[17], accounts[16], accounts[18]))
    path = f"/v1/payees/{accounts[17].address}/caps"
    made = client.put(path, json={"amount": "5", "windowSeconds": 60}, headers=payee)
    assert made.status_code == 200
    assert client.get(path, headers=payee).json() == [made.json()]
    for method, url, body_ in (
        ("GET", path, None),
        ("PUT", path, {"amount": "1000", "windowSeconds": 60}),
        ("DELETE", f"{path}/{made.json()['capId']}", None),
        ("GET", "/v1/risk/caps", None),
        ("PUT", "/v1/risk/caps", {"amount": "1", "windowSeconds": 60}),
    ):
        assert client.request(method, url, json=body_).status_code == 401, url
        for who in (payer, stranger) if url.startswith(path) else (payee, payer):
            answer = client.request(method, url, json=body_, headers=who)
            assert (answer.status_code, answer.json()["code"]) == (403, "forbidden"), url
    assert [c["amount"] for c in client.get(path, headers=payee).json()] == ["5"]  # nobody else changed it


def test_cap_routes_refuse_malformed_input(api: Callable[..., TestClient], accounts: list[LocalAccount]) -> None:
    client = api()
    path = f"/v1/payees/{accounts[6].address}/caps"
    for sent in (
        {"amount": "0", "windowSeconds": 60},
        {"amount": str(2**256), "windowSeconds": 60},
        {"amount": "-1", "windowSeconds": 60},
        {"amount": "1.5", "windowSeconds": 60},
        {"amount": 5, "windowSeconds": 60},
        {"amount": "5", "windowSeconds": 0},
        {"amount": "5", "windowSeconds": 366 * 86400 + 1},
        {"amount": "5", "windowSeconds": 60, "payer": "0x12"},
        {"amount": "5", "windowSeconds": 60, "payer": "0x" + "aB" * 20},  # a wrong EIP-55 checksum
        {"amount": "5", "windowSeconds": 60, "token": "*"},
        {"amount": "5", "windowSeconds": 60, "payee": "*"},  # a payee's route names its payee in the path
        {"amount": "5"},
    ):
        answer = client.put(path, json=sent)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request"), sent
    assert client.put("/v1/payees/*/caps", json={"amount": "5", "windowSeconds": 60}).status_code == 400
    assert client.delete(f"{path}/0").status_code == 400
    assert client.delete(f"{path}/77").status_code == 404
    assert client.get(path).json() == []


def test_a_payee_has_at_most_so_many_caps(api: Callable[..., TestClient], accounts: list[LocalAccount]) -> None:
    """Every process holds every cap and checks the ones covering each payment: their number per payee is bounded."""
    client = api(caps_per_payee=2)
    path = f"/v1/payees/{accounts[6].address}/caps"
    for payer in (accounts[3].address, accounts[4].address):
        assert client.put(path, json={"payer": payer, "amount": "5", "windowSeconds": 60}).status_code == 200
    third = client.put(path, json={"payer": accounts[5].address, "amount": "5", "windowSeconds": 60})
    assert (third.status_code, third.json()["code"], third.json()["maxCaps"]) == (409, "cap_limit", 2)
    changed = client.put(path, json={"payer": accounts[4].address, "amount": "9", "windowSeconds": 60})
    assert (changed.status_code, changed.json()["amount"]) == (200, "9")  # changing one is not a new one
    assert len(client.get(path).json()) == 2
    assert client.put(
        "/v1/risk/caps", json={"payer": accounts[5].address, "amount": "5", "windowSeconds": 60}
    ).is_success


def test_fresh_keys_fill_no_more_than_their_share_of_caps_and_never_hold_back_a_payee_of_a_channel(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    store_url: str,
) -> None:
    """Every process reads every cap four times a second and holds them all, and a fresh key signed in is a payee
    that may set its own: keys made by the thousand set caps without end (no bound but each payee's), and once a
    total was reached, no payee with channels could set one. Now payees of no channel in the store share
    SETTLEMENT_CAPS_WITHOUT_CHANNELS and every payee's caps SETTLEMENT_CAPS_MAX (503 `caps_full`), on both stores; a
    payee the operator made a key for is held to the bound in all only."""
    client = api(access_control=True, caps_per_payee=2, caps_without_channels=3, caps_max=6)
    fresh = [Account.create() for _ in range(4)]
    cap = {"amount": "5", "windowSeconds": 60}

    def put(key: Any, headers: dict[str, str] | None = None, **sent: Any) -> Any:
        return client.put(
            f"/v1/payees/{key.address}/caps", json={**cap, **sent}, headers=headers or signed_in(client, key)
        )

    made = [put(fresh[0], payer="*"), put(fresh[0], payer=accounts[3].address), put(fresh[1])]
    assert [answer.status_code for answer in made] == [200, 200, 200]
    refused = put(fresh[2])
    assert (refused.status_code, refused.json()["code"]) == (503, "caps_full")
    assert "SETTLEMENT_CAPS_WITHOUT_CHANNELS" in refused.json()["message"]
    again = put(fresh[0], amount="7")  # changing a cap it has is not a new one
    assert (again.status_code, again.json()["amount"]) == (200, "7")
    keyed = {"Authorization": f"Bearer {new_key(store_url, Role.PAYEE, fresh[3].address)}"}
    assert put(fresh[3], keyed).status_code == 200  # the operator's key: not a fresh one's (4 in all)

    payee = accounts[6]
    channel = open_channel(accounts[3], payee.address, amount=1_000)
    as_payee = signed_in(client, payee)
    wait_until(lambda: client.get(f"/v1/channels/{channel.hex_id}", headers=as_payee).status_code == 200)
    assert put(payee, as_payee).status_code == 200  # not held back by the fresh keys
    assert put(payee, as_payee, payer=accounts[3].address).status_code == 200  # 6 in all
    full = put(accounts[7])
    assert (full.status_code, full.json()["code"]) == (503, "caps_full")
    assert "SETTLEMENT_CAPS_MAX" in full.json()["message"]
    for key, made_cap in ((fresh[1], made[2]), (fresh[0], made[0])):
        path = f"/v1/payees/{key.address}/caps/{made_cap.json()['capId']}"
        assert client.delete(path, headers=signed_in(client, key)).status_code == 204
    assert put(fresh[2]).status_code == 200  # a place given back is a fresh key's again (3 of no channel, 5 in all)


def test_caps_are_read_again_only_when_they_changed(
    api: Callable[..., TestClient], accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process handed ingest the caps four times a second by reading them all: 10,000 caps were 50 ms of CPU a
    read, a fifth of a core a process, changed or not. They are read again only when a change moved their generation;
    every change (a new cap, a new amount, a removal) still reaches ingest, on both stores."""
    client = api()
    service: Service = service_of(client)
    reads: list[int] = []
    real = settlement.store.caps.caps  # what the risk monitor reads the caps with

    def counted(conn: Any) -> list[Any]:
        reads.append(1)
        return real(conn)

    monkeypatch.setattr(settlement.server.risk, "caps", counted)
    path = f"/v1/payees/{accounts[6].address}/caps"
    made = client.put(path, json={"amount": "5", "windowSeconds": 60}).json()
    caps_reach_ingest(service)
    assert service.risk is not None
    service.risk.refresh()
    before = len(reads)
    for _ in range(5):
        service.risk.refresh()
    assert len(reads) == before
    assert client.put(path, json={"amount": "9", "windowSeconds": 60}).json()["capId"] == made["capId"]
    wait_until(lambda: [c.amount for c in service.ingestor.rules.caps] == [9], timeout=5)
    assert client.delete(f"{path}/{made['capId']}").status_code == 204
    caps_reach_ingest(service, count=0)
