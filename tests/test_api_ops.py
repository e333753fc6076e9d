"""Health, readiness, metrics, the EIP-712 domain, listings, and the HTTP-level errors (never a 500 for bad input)."""

from __future__ import annotations

from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from web3.contract import Contract

from settlement.chain.deployment import Deployment
from settlement.devtools.devnet import Devnet
from settlement.eip712.vouchers import VoucherVerifier, read_domain
from tests.hub_helpers import Channel
from tests.test_ingest_api import body

Sign = Callable[..., bytes]


def test_health_ready_and_domain(
    api: Callable[..., TestClient], devnet: Devnet, hub_deployment: Deployment, hub: Contract
) -> None:
    client = api()
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["contract"] == hub_deployment.address
    assert ready.json()["indexerLag"] >= 0
    info = client.get("/v1/eip712").json()
    assert info["domain"] == {
        "name": "ChannelHub",
        "version": "1",
        "chainId": devnet.chain_id,
        "verifyingContract": hub_deployment.address,
    }
    assert info["primaryType"] == "Voucher"
    # the domain served is the one the contract hashes with
    verifier = VoucherVerifier(read_domain(hub))
    assert verifier.digest(b"\x01" * 32, 5) == bytes(hub.functions.hashVoucher(b"\x01" * 32, 5).call())


def test_openapi_has_stable_operation_ids(api: Callable[..., TestClient]) -> None:
    spec = api().get("/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {
        "submitVoucher",
        "submitVoucherBatch",
        "getChannel",
        "listChannels",
        "listPayments",
        "getPayeeSummary",
        "getEip712Domain",
        "health",
        "ready",
        "metrics",
    } <= ids


def test_listings_and_payee_summary(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    token: Contract,
    sign: Sign,
) -> None:
    client = api()
    payee = accounts[7].address
    eth_a = open_channel(accounts[5], payee, amount=1_000)
    eth_b = open_channel(accounts[8], payee, amount=2_000)
    tok = open_channel(accounts[5], payee, token=token, amount=10**30)
    other = open_channel(accounts[5], accounts[9].address, amount=50)
    for channel, amount in ((eth_a, 300), (eth_b, 700), (tok, 10**29), (other, 50)):
        answer = client.post("/v1/vouchers", json=body(channel, amount, sign(channel.payer, channel.id, amount)))
        assert answer.status_code == 201, answer.text

    summary = client.get(f"/v1/payees/{payee.lower()}/summary").json()
    assert summary["payee"] == payee
    assert summary["assets"] == [
        {"token": "0x" + "0" * 40, "channels": 2, "accepted": "1000", "settled": "0", "unsettled": "1000"},
        {"token": token.address, "channels": 1, "accepted": str(10**29), "settled": "0", "unsettled": str(10**29)},
    ]
    page = client.get("/v1/channels", params={"payee": payee, "limit": 2}).json()
    rest = client.get("/v1/channels", params={"payee": payee, "cursor": page["nextCursor"]}).json()
    ids = [c["channelId"] for c in page["items"] + rest["items"]]
    assert sorted(ids) == sorted("0x" + c.id.hex() for c in (eth_a, eth_b, tok))
    assert rest["nextCursor"] is None
    mine = client.get("/v1/channels", params={"payer": accounts[8].address, "status": "open"}).json()
    assert [c["channelId"] for c in mine["items"]] == ["0x" + eth_b.id.hex()]
    assert client.get("/v1/channels", params={"status": "closed"}).json()["items"] == []


def test_metrics_count_outcomes_by_code(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    client = api()
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10)))
    client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10)))
    client.post("/v1/vouchers", json=body(channel, 5, sign(channel.payer, channel.id, 5)))
    text = client.get("/metrics").text
    assert "settlement_vouchers_accepted_total 1.0" in text
    assert "settlement_vouchers_duplicate_total 1.0" in text
    assert 'settlement_vouchers_rejected_total{code="stale_voucher"} 1.0' in text
    assert "settlement_indexer_cursor_block" in text
