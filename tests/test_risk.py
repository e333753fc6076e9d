"""Risk controls on the real app and both stores: the least increment per asset, channels the operator holds, and
the monitor's risk events (dust, a burst, a payer spreading over new channels, a close requested while vouchers
stream), listed for the operator only and counted in the metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from sqlalchemy import insert
from web3 import Web3
from web3.contract import Contract

from settlement.eip712.vouchers import channel_id
from settlement.ingest.pipeline import Ingestor
from settlement.server.config import Settings
from settlement.server.metrics import Metrics
from settlement.server.risk import RiskMonitor
from settlement.server.service import Service
from settlement.store import Database, tables
from tests.hub_helpers import (
    ETH,
    Channel,
    body,
    chain_happened,
    in_one_block,
    positions,
    service_of,
    signed_in,
    wait_until,
)

Sign = Callable[..., bytes]


def voucher(channel: Channel, sign: Sign, cumulative: int) -> dict[str, Any]:
    return body(channel, cumulative, sign(channel.payer, channel.id, cumulative))


def risk_events(client: TestClient, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get(f"/v1/risk/events?kind={kind}").json()["items"]
    return items


def test_a_voucher_below_the_least_increment_is_refused_and_repeated_dust_is_reported(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    token: Contract,
) -> None:
    client = api(min_increments={ETH: 100}, risk_window_seconds=2, risk_refusals_per_window=5)
    eth = open_channel(accounts[3], accounts[4].address, amount=10_000)
    erc20 = open_channel(accounts[5], accounts[4].address, token=token, amount=10_000)
    wait_until(lambda: client.post("/v1/vouchers", json=voucher(eth, sign, 100)).status_code == 201)
    wait_until(lambda: client.post("/v1/vouchers", json=voucher(erc20, sign, 1)).status_code == 201)  # no floor set
    # The six dust vouchers are sent at the start of one of the monitor's 2 s windows (its clock is this process's),
    # so they are counted in one window however slow the machine: none is left to the next one.
    monitor = service_of(client).risk
    assert monitor is not None
    wait_until(lambda: time.monotonic() - monitor._window_started < 0.5, timeout=10)
    dust = client.post("/v1/vouchers", json=voucher(eth, sign, 199))
    assert (dust.status_code, dust.json()["code"], dust.json()["minIncrement"]) == (409, "increment_too_small", "100")
    assert client.post("/v1/vouchers", json=voucher(eth, sign, 200)).status_code == 201
    items = [voucher(eth, sign, 200 + n) for n in range(1, 6)]
    answers = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [a["error"]["code"] for a in answers] == ["increment_too_small"] * 5
    wait_until(lambda: len(risk_events(client, "dust")) == 1, timeout=10)
    (event,) = risk_events(client, "dust")
    assert (event["payer"], event["detail"]["code"], event["detail"]["count"]) == (
        eth.payer.address,
        "increment_too_small",
        6,
    )
    assert 'settlement_risk_events_total{kind="dust"} 1.0' in client.get("/metrics").text


def test_a_held_channel_takes_no_voucher_until_released(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    client = api()
    held, other = (open_channel(accounts[n], accounts[6].address, amount=1_000) for n in (7, 8))
    wait_until(lambda: client.post("/v1/vouchers", json=voucher(held, sign, 10)).status_code == 201)
    wait_until(lambda: client.post("/v1/vouchers", json=voucher(other, sign, 10)).status_code == 201)
    cid = "0x" + held.id.hex()
    answer = client.put(f"/v1/risk/holds/{cid}", json={"reason": "chargeback under review"})
    assert answer.json() == {"channelId": cid, "reason": "chargeback under review"}
    rules = service_of(client).ingestor
    wait_until(lambda: cid in rules.rules.held, timeout=5)  # the monitor hands holds to ingest every 0.25 s
    refused = client.post("/v1/vouchers", json=voucher(held, sign, 20)).json()
    assert (refused["code"], refused["reason"]) == ("channel_held", "chargeback under review")
    assert client.post("/v1/vouchers", json=voucher(other, sign, 20)).status_code == 201
    assert client.post("/v1/vouchers", json=voucher(held, sign, 10)).status_code == 200  # what it took stands
    assert client.get("/v1/risk/holds").json() == [{"channelId": cid, "reason": "chargeback under review"}]
    assert [(e["channelId"], e["detail"]) for e in risk_events(client, "channel_held")] == [
        (cid, {"reason": "chargeback under review"})
    ]
    assert client.delete(f"/v1/risk/holds/{cid}").status_code == 204
    assert client.delete(f"/v1/risk/holds/{cid}").status_code == 404
    wait_until(lambda: cid not in rules.rules.held, timeout=5)
    assert client.post("/v1/vouchers", json=voucher(held, sign, 20)).status_code == 201
    bad = client.put(f"/v1/risk/holds/{cid}", json={"reason": ""})
    assert (bad.status_code, bad.json()["code"]) == (400, "malformed_request")


def test_bursts_and_payers_spreading_over_new_channels_become_risk_events(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    hub: Contract,
    w3: Web3,
) -> None:
    client = api(risk_window_seconds=1.0, risk_payer_vouchers_per_window=12, risk_new_channels_per_window=3)
    salts = [n.to_bytes(32, "big") for n in (71, 72, 73)]
    opens = [(hub.functions.open(accounts[n].address, ETH, salt, 1_000), accounts[9].address, 1_000)
             for n, salt in zip((10, 11, 12), salts, strict=True)]  # fmt: skip
    in_one_block(w3, *opens)  # the three openings in ONE block, as a real chain may mine them
    spreader = [
        Channel(channel_id(accounts[9].address, accounts[n].address, ETH, salt), accounts[9], accounts[n].address,
                ETH, salt, 1_000)
        for n, salt in zip((10, 11, 12), salts, strict=True)
    ]  # fmt: skip
    wait_until(lambda: len(risk_events(client, "channel_spread")) == 1, timeout=10)
    (spread,) = risk_events(client, "channel_spread")
    assert (spread["payer"], spread["detail"]["count"]) == (accounts[9].address, 3)

    channel = spreader[0]
    wait_until(lambda: client.get(f"/v1/channels/{channel.hex_id}").status_code == 200)
    items = [voucher(channel, sign, n) for n in range(1, 13)]  # one group commit: counted in one window
    assert [r["status"] for r in client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]] == [
        201
    ] * 12
    wait_until(lambda: len(risk_events(client, "burst")) == 1, timeout=10)
    (burst,) = risk_events(client, "burst")
    assert (burst["payer"], burst["detail"]["count"], burst["detail"]["previousCount"]) == (accounts[9].address, 12, 0)


def test_a_close_requested_while_vouchers_stream_is_a_risk_event_and_a_close_of_an_unpaid_channel_is_not(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    hub: Contract,
    w3: Web3,
) -> None:
    # A window far longer than the indexer's and the monitor's lag on a loaded machine: the paid close is found in
    # it however slow the run (a 1 s window failed once in CI, the close seen more than 1 s after the payment).
    client = api(risk_window_seconds=30.0)
    paid, unpaid = (open_channel(accounts[n], accounts[15].address, amount=1_000) for n in (13, 14))
    wait_until(lambda: client.post("/v1/vouchers", json=voucher(paid, sign, 5)).status_code == 201)
    wait_until(lambda: client.get(f"/v1/channels/0x{unpaid.id.hex()}").status_code == 200)
    # Both closes in ONE block, the unpaid channel's first: once the paid one is reported, the unpaid one was read.
    in_one_block(
        w3,
        (hub.functions.requestClose(unpaid.id), unpaid.payer.address, 0),
        (hub.functions.requestClose(paid.id), paid.payer.address, 0),
    )
    wait_until(lambda: len(risk_events(client, "close_while_streaming")) >= 1, timeout=10)
    (close,) = risk_events(client, "close_while_streaming")
    assert close["channelId"] == "0x" + paid.id.hex() and 0 <= close["detail"]["secondsSinceLastPayment"] < 30
    assert 'settlement_risk_events_total{kind="close_while_streaming"} 1.0' in client.get("/metrics").text


def test_risk_routes_are_the_operators(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount]
) -> None:
    client = api(access_control=True)
    channel = open_channel(accounts[13], accounts[14].address, amount=1)
    cid = channel.hex_id
    payee = signed_in(client, accounts[14])  # even the channel's own payee is not the operator
    calls = [
        ("GET", "/v1/risk/events", None),
        ("GET", "/v1/risk/holds", None),
        ("DELETE", f"/v1/risk/holds/{cid}", None),
        ("PUT", f"/v1/risk/holds/{cid}", {"reason": "x"}),
    ]
    for method, path, body_ in calls:
        anyone = client.request(method, path, json=body_)
        assert (anyone.status_code, anyone.json()["code"]) == (401, "authentication_required"), path
        party = client.request(method, path, json=body_, headers=payee)
        assert (party.status_code, party.json()["code"]) == (403, "forbidden"), path
    assert client.get("/v1/risk/holds", headers=payee).status_code == 403


def test_risk_routes_refuse_malformed_input(api: Callable[..., TestClient]) -> None:
    client = api()
    for method, path, body_ in (
        ("PUT", "/v1/risk/holds/0x1234", {"reason": "x"}),
        ("PUT", f"/v1/risk/holds/0x{'ab' * 32}", {"reason": "x" * 501}),
        ("PUT", f"/v1/risk/holds/0x{'ab' * 32}", {"reason": "x", "extra": 1}),
        ("DELETE", "/v1/risk/holds/nothex", None),
        ("GET", "/v1/risk/events?cursor=-1", None),
        ("GET", "/v1/risk/events?limit=0", None),
        ("GET", "/v1/risk/events?kind=", None),
        ("GET", "/v1/risk/events?kind=Burst", None),
    ):
        answer = client.request(method, path, json=body_)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request"), path


def test_a_kind_of_risk_event_that_does_not_exist_is_refused_not_answered_with_nothing(
    api: Callable[..., TestClient],
) -> None:
    """An operator's typo (`kind=brust`) was answered 200 with no events, as if none had happened."""
    client = api()
    answer = client.get("/v1/risk/events?kind=brust")
    assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request")
    assert [problem["field"] for problem in answer.json()["errors"]] == ["query.kind"]
    for kind in ("burst", "dust", "repeated_refusals", "channel_spread", "close_while_streaming", "channel_held"):
        assert client.get(f"/v1/risk/events?kind={kind}").json() == {"items": [], "nextCursor": None}, kind


def test_the_monitor_looks_past_the_chain_events_it_does_not_watch(db: Database, store_url: str) -> None:
    """Each tick reads the openings and close requests after where the last one stood. It stood at the last one it
    found, so every tick walked again all the deposits and settlements since (one per payee and asset per batch);
    now it stands past every event it looked at, and at most CHAIN_EVENTS_PER_TICK of its own at a time."""
    ingestor = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)  # gives the rules only
    monitor = RiskMonitor(db, Settings(_env_file=None, database_url=store_url), ingestor, Metrics())  # type: ignore[call-arg]

    try:
        chain_happened(db, "ChannelOpened", [(5, 0)], payer="0x" + "aa" * 20)
        monitor.refresh()
        assert monitor.position == (5, 0)  # from its first look on
        chain_happened(db, "ChannelsSettled", positions(6, 1500), payee="0x" + "bb" * 20)  # three a block
        monitor.tick()
        assert monitor.position == (505, 2)
        chain_happened(db, "CloseRequested", positions(3000, 1200))  # three a block: a page ends inside one
        monitor.tick()
        assert monitor.position == (3333, 0)  # the 1,000th close request: the rest at the next tick
        monitor.tick()
        assert monitor.position == (3399, 2)
    finally:
        monitor.close()


def test_a_stored_event_of_a_kind_this_version_does_not_know_is_still_listed(api: Callable[..., TestClient]) -> None:
    """A newer version may record a kind this one does not name (a rollback, a rolling deploy): the listing shows it
    as stored rather than failing whole."""
    client = api()
    service: Service = service_of(client)
    with service.db.write() as conn:
        row = {"at_us": 1, "kind": "future_kind", "payer": None, "channel_id": None, "detail": "{}"}
        conn.execute(insert(tables.risk_events).values(**row))
    items = client.get("/v1/risk/events").json()["items"]
    assert [(item["kind"], item["at"], item["detail"]) for item in items] == [("future_kind", 1, {})]
