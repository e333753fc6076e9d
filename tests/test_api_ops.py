"""Health, readiness, metrics, the EIP-712 domain, listings, and the HTTP-level errors (never a 500 for bad input)."""

from __future__ import annotations

import re
from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract

from settlement.chain.deployment import Deployment
from settlement.devtools.devnet import Devnet
from settlement.eip712.vouchers import VoucherVerifier, read_domain
from tests.hub_helpers import ETH, Channel, body, send, service_of, wait_cursor, wait_until
from tests.proxy import TcpProxy

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
        "stopChannel",
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
    assert summary["settleInterval"] is None  # no engine ran on this store
    nothing = {"settled": "0", "withdrawable": "0", "withdrawn": "0"}
    assert summary["assets"] == [
        {"token": "0x" + "0" * 40, "channels": 2, "accepted": "1000", "unsettled": "1000", **nothing},
        {"token": token.address, "channels": 1, "accepted": str(10**29), "unsettled": str(10**29), **nothing},
    ]
    page = client.get("/v1/channels", params={"payee": payee, "limit": 2}).json()
    rest = client.get("/v1/channels", params={"payee": payee, "cursor": page["nextCursor"]}).json()
    ids = [c["channelId"] for c in page["items"] + rest["items"]]
    assert sorted(ids) == sorted(c.hex_id for c in (eth_a, eth_b, tok))
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
    batch = [(20, channel.payer), (30, channel.payer), (20, channel.payer), (25, channel.payer), (40, accounts[9])]
    items = [body(channel, n, sign(signer, channel.id, n)) for n, signer in batch]
    results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [r["status"] for r in results] == [201, 201, 200, 409, 400]
    text = client.get("/metrics").text  # a batch's outcomes counted together, each in its own counter
    assert "settlement_vouchers_accepted_total 3.0" in text
    assert "settlement_vouchers_duplicate_total 2.0" in text
    assert 'settlement_vouchers_rejected_total{code="stale_voucher"} 2.0' in text
    assert 'settlement_vouchers_rejected_total{code="invalid_signature"} 1.0' in text
    assert "settlement_indexer_cursor_block" in text


def test_a_payee_sees_what_it_can_withdraw_and_what_it_withdrew(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    devnet: Devnet,
    sign: Sign,
) -> None:
    """Found missing: the summary showed accepted/settled/unsettled, and a payee had to guess when it could withdraw
    and could not see what it had withdrawn."""
    key = HexBytes(accounts[19].key).to_0x_hex()
    with TcpProxy(devnet.port) as rpc:
        client = api(rpc_url=rpc.url, engine_enabled=True, private_key=key, settle_interval=0.2, engine_tick=0.05)
        payee = accounts[7]
        channel = open_channel(accounts[5], payee.address, amount=10**18)
        assert client.post("/v1/vouchers", json=body(channel, 60, sign(accounts[5], channel.id, 60))).is_success

        def asset() -> dict[str, str]:
            summary = client.get(f"/v1/payees/{payee.address}/summary").json()
            assert summary["settleInterval"] == 0.2  # the running engine's
            only: dict[str, str] = summary["assets"][0]
            return only

        wait_until(lambda: asset()["settled"] == "60")
        assert asset() == {
            "token": ETH, "channels": 1, "accepted": "60", "settled": "60", "unsettled": "0",
            "withdrawable": "60", "withdrawn": "0",
        }  # fmt: skip
        send(w3, hub.functions.withdraw(ETH, 25, accounts[8].address), payee.address)  # to another account
        stranger = accounts[9].address
        open_channel(accounts[5], stranger, amount=100)  # a payee whose summary nobody asked for yet
        indexer = service_of(client).indexer
        wait_cursor(indexer, w3.eth.block_number - indexer.confirmations)
        wait_until(lambda: asset()["withdrawn"] == "25")
        assert (asset()["withdrawable"], asset()["settled"]) == ("35", "60")
        rpc.cut()  # the chain is down: the store's figures stand, with the hub balance as read at their block
        assert {k: v for k, v in asset().items() if k in ("withdrawable", "withdrawn")} == {
            "withdrawable": "35",
            "withdrawn": "25",
        }
        never_read = client.get(f"/v1/payees/{stranger}/summary").json()["assets"]
        assert [(a["channels"], a["withdrawable"]) for a in never_read] == [(1, None)]  # unknown, not a guess


def test_docs_load_swagger_ui_from_the_service_not_a_cdn(api: Callable[..., TestClient]) -> None:
    """Found blank offline: /docs loaded Swagger UI from a CDN."""
    client = api()
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assets = sorted(set(re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', page.text)))
    assert assets == ["/docs-assets/favicon.png", "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"]
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 1000, asset
    assert client.get("/docs-assets/../../etc/passwd").status_code == 404  # nothing but the package's files
