"""Retention on both stores: settled payment rows past their time go, each channel's latest and every unsettled one
stay, totals do not move, and a re-sent voucher that was removed is refused as stale (never accepted again)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from web3 import Web3
from web3.contract import Contract

from settlement.server.service import Service
from settlement.store.retention import compact
from tests.hub_helpers import ETH, Channel, batch, body, send, service_of, settle_call, wait_until
from tests.servers import forked_cli

Sign = Callable[..., bytes]
NOW_US = time.time_ns() // 1000


def test_settled_payments_past_retention_go_and_the_rest_stay(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    hub: Contract,
    w3: Web3,
    store_url: str,
    tmp_path: Path,
) -> None:
    client = api()
    service: Service = service_of(client)
    settled, unsettled = (open_channel(accounts[n], accounts[4].address, amount=1_000) for n in (3, 5))

    def pay(channel: Channel, cumulative: int) -> int:
        voucher = body(channel, cumulative, sign(channel.payer, channel.id, cumulative))
        return client.post("/v1/vouchers", json=voucher).status_code

    wait_until(lambda: pay(settled, 10) == 201)
    wait_until(lambda: pay(unsettled, 5) == 201)
    assert [pay(settled, n) for n in (20, 30, 40)] + [pay(unsettled, 6)] == [201] * 4
    entry = settled.voucher(30, sign(settled.payer, settled.id, 30))
    send(w3, settle_call(hub, batch(settled.payee, ETH, entry)), accounts[19].address)
    wait_until(lambda: client.get(f"/v1/channels/0x{settled.id.hex()}").json()["settled"] == "30")
    summary = client.get(f"/v1/payees/{settled.payee}/summary").json()

    assert compact(service.db, 30, NOW_US) == 0  # a month's retention: nothing is that old
    assert compact(service.db, 0, time.time_ns() // 1000 + 1_000_000) == 3  # 10, 20, 30: settled, not the latest

    def amounts(channel: Channel) -> list[str]:
        page = client.get(f"/v1/channels/{channel.hex_id}/payments").json()
        return [p["cumulativeAmount"] for p in page["items"]]

    assert (amounts(settled), amounts(unsettled)) == (["40"], ["6", "5"])
    assert client.get(f"/v1/payees/{settled.payee}/summary").json() == summary
    again = client.post("/v1/vouchers", json=body(settled, 20, sign(settled.payer, settled.id, 20)))
    assert (again.status_code, again.json()["code"]) == (409, "stale_voucher")
    assert pay(settled, 40) == 200  # the latest is still there: a re-send gets its receipt again
    assert compact(service.db, 0, time.time_ns() // 1000 + 1_000_000) == 0

    env = {"SETTLEMENT_DATABASE_URL": store_url}
    kept = forked_cli("compact", "--days", "30", env=env, cwd=tmp_path)
    assert (kept.returncode, kept.stdout.strip()) == (
        0,
        "removed 0 settled payment rows accepted more than 30 days ago",
    ), kept.stderr
    zero = forked_cli("compact", "--days", "0", env=env, cwd=tmp_path)
    assert (zero.returncode, "[config_invalid]" in zero.stderr) == (1, True)
