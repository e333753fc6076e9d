"""The engine inside `serve`: it settles on its own, and with two processes on one PostgreSQL exactly one leads and
the other takes over when the leader is killed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from web3.contract import Contract

from tests.hub_helpers import ETH, Channel, body, recovered, settled_on_chain, wait_until, workers_ready
from tests.servers import ServiceProcess

Sign = Callable[..., bytes]


def leader(url: str) -> bool:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^settlement_engine_leader (\S+)$", text, re.M)
    return match is not None and float(match.group(1)) == 1.0


@pytest.fixture
def engine_api(api: Callable[..., TestClient], accounts: list[LocalAccount]) -> Callable[..., TestClient]:
    """Factory: a service whose engine settles every 0.2 s with the settler account (overrides for the rest)."""
    key = HexBytes(accounts[19].key).to_0x_hex()

    def make(**overrides: Any) -> TestClient:
        return api(engine_enabled=True, private_key=key, settle_interval=0.2, engine_tick=0.05, **overrides)

    return make


def test_serve_settles_accepted_vouchers_on_its_own(
    engine_api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    sign: Sign,
    mining: str,
) -> None:
    client = engine_api()
    payee = accounts[7].address
    channel = open_channel(accounts[5], payee, amount=10**18)
    for amount in (10, 25, 60):
        assert client.post("/v1/vouchers", json=body(channel, amount, sign(accounts[5], channel.id, amount))).is_success
    wait_until(lambda: hub.functions.balanceOf(payee, ETH).call() == 60)
    summary = client.get(f"/v1/payees/{payee}/summary").json()["assets"][0]
    wait_until(lambda: client.get(f"/v1/payees/{payee}/summary").json()["assets"][0]["settled"] == "60")
    assert summary["accepted"] == "60"
    assert "settlement_engine_leader 1.0" in client.get("/metrics").text


def test_serve_settles_a_batch_whose_signers_a_worker_recovered(
    engine_api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    sign: Sign,
    mining: str,
) -> None:
    """A batch's signers recovered in the worker process go to the chain like any others, on automine and on a chain
    that puts many transactions in each block: exactly the accepted vouchers are credited, the forged one never."""
    client = engine_api(recovery_processes=1)
    workers_ready(client)
    payee = accounts[7].address
    channels = [open_channel(accounts[5], payee, amount=10**18), open_channel(accounts[6], payee, amount=10**18)]
    items = [body(c, n, sign(c.payer, c.id, n)) for n in range(1, 11) for c in channels]
    items.append(body(channels[0], 500, sign(accounts[9], channels[0].id, 500)))  # forged: never paid
    results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [r["status"] for r in results] == [201] * 20 + [400]
    assert (recovered(client, "process"), recovered(client, "thread")) == (21, 0)
    wait_until(lambda: hub.functions.balanceOf(payee, ETH).call() == 20)
    wait_until(lambda: client.get(f"/v1/payees/{payee}/summary").json()["assets"][0]["settled"] == "20")
    assert [settled_on_chain(hub, c) for c in channels] == [10, 10]


@pytest.mark.faults
@pytest.mark.postgres
def test_leader_failover_between_two_processes(
    spawn: Callable[..., ServiceProcess],
    fresh_postgres: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    sign: Sign,
) -> None:
    key = HexBytes(accounts[19].key).to_0x_hex()
    options = {"engine_enabled": "true", "private_key": key, "settle_interval": "0.3", "engine_tick": "0.1"}
    services = [spawn(fresh_postgres, name, wait=False, **options) for name in "ab"]  # both start (and migrate) at once
    for service in services:
        service.ready()
    wait_until(lambda: sum(leader(s.url) for s in services) == 1)
    first = next(s for s in services if leader(s.url))
    other = next(s for s in services if s is not first)
    payee = accounts[7].address
    channel = open_channel(accounts[5], payee, amount=10**18)
    assert httpx.post(f"{other.url}/v1/vouchers", json=body(channel, 5, sign(accounts[5], channel.id, 5))).is_success
    wait_until(lambda: hub.functions.balanceOf(payee, ETH).call() == 5)

    first.kill()
    wait_until(lambda: leader(other.url), timeout=30)
    assert httpx.post(f"{other.url}/v1/vouchers", json=body(channel, 9, sign(accounts[5], channel.id, 9))).is_success
    wait_until(lambda: hub.functions.balanceOf(payee, ETH).call() == 9)
    first.start()  # back as a standby: the survivor keeps the lease
    time.sleep(1)
    assert leader(other.url) and not leader(first.url)
