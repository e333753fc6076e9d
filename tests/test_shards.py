"""A deployment split by payer over two databases (docs/scaling.md): each shard's service takes only the vouchers of
the payers that hash to it and stores only their channels, one store down fails only its own payers, and each
shard's engine settles its own channels on the one hub."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from pydantic import ValidationError
from web3 import Web3
from web3.contract import Contract

from settlement.domain.model import Address
from settlement.domain.shards import Shard, shard_of
from settlement.sdk import service_for
from settlement.server.config import Settings
from tests.hub_helpers import (
    ETH,
    Channel,
    body,
    channel_id,
    database_down,
    in_one_block,
    salt_of,
    settled_on_chain,
    wait_until,
    x402_request,
    x402_requirements,
    x402_voucher,
)

Sign = Callable[..., bytes]
DEPOSIT = 10**18
PAYERS = {0: 3, 1: 5}  # devnet accounts whose addresses hash to shard 0 and to shard 1 of two


def test_shard_of_spreads_payers_evenly_and_never_changes(accounts: list[LocalAccount]) -> None:
    assert [shard_of(Address(a.address), 2) for a in accounts[:4]] == [0, 1, 0, 0]
    assert {k: shard_of(Address(accounts[n].address), 2) for k, n in PAYERS.items()} == {0: 0, 1: 1}
    made_up = [Address(to_checksum_address(keccak(n.to_bytes(4, "big"))[:20])) for n in range(10_000)]
    assert sorted(Counter(shard_of(a, 4) for a in made_up).items()) == [(0, 2493), (1, 2511), (2, 2424), (3, 2572)]
    assert shard_of(Address(accounts[1].address.lower()), 2) == 1  # the address, not its spelling
    assert service_for(accounts[1].address.lower(), ["http://a", "http://b"]) == "http://b"


def test_a_shard_outside_the_count_is_refused() -> None:
    with pytest.raises(ValidationError, match="SETTLEMENT_SHARD=2 is not one of SETTLEMENT_SHARDS=2"):
        Settings(_env_file=None, shard=2, shards=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="shard 1 is not one of 1 shards"):
        Shard(1, 1)
    with pytest.raises(ValueError, match="shards must be at least 1"):
        shard_of(Address("0x" + "11" * 20), 0)


def open_in_one_block(w3: Web3, hub: Contract, payers: list[LocalAccount], payee: str) -> list[Channel]:
    """Both shards' channels opened in one block: each shard's indexer stores its own and skips the other's."""
    channels = [
        Channel(channel_id(p.address, payee, ETH, salt_of(n)), p, payee, ETH, salt_of(n), DEPOSIT)
        for n, p in enumerate(payers, 1)
    ]
    in_one_block(w3, *[(hub.functions.open(payee, ETH, c.salt, DEPOSIT), c.payer.address, DEPOSIT) for c in channels])
    return channels


def answer(client: TestClient, channel: Channel, cumulative: int, sign: Sign) -> tuple[int, str]:
    response = client.post("/v1/vouchers", json=body(channel, cumulative, sign(channel.payer, channel.id, cumulative)))
    return response.status_code, response.json().get("code", "")


@pytest.mark.postgres
def test_two_shards_take_their_own_payers_and_settle_on_one_hub(
    make_postgres: Callable[[], str],  # before `api`: its databases outlive the services on them
    api: Callable[..., TestClient],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    sign: Sign,
    mining: str,
) -> None:
    second = make_postgres()
    engine = {"shards": 2, "engine_enabled": True, "settle_interval": 0.2, "engine_tick": 0.05}
    shards = [
        api(shard=0, private_key=HexBytes(accounts[19].key).to_0x_hex(), **engine),
        api(shard=1, database_url=second, private_key=HexBytes(accounts[18].key).to_0x_hex(), **engine),
    ]
    payee = accounts[7].address
    channels = open_in_one_block(w3, hub, [accounts[PAYERS[k]] for k in (0, 1)], payee)

    for k, channel in enumerate(channels):
        assert answer(shards[k], channel, 10, sign) == (201, "")
        refused = shards[1 - k].post("/v1/vouchers", json=body(channel, 20, sign(channel.payer, channel.id, 20)))
        assert (refused.status_code, refused.json().get("code"), refused.json().get("shard")) == (
            421,
            "wrong_shard",
            k,
        ), refused.text
    # One batch naming both payers: each voucher answered on its own.
    items = [body(c, 30, sign(c.payer, c.id, 30)) for c in channels]
    results = shards[0].post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [(r["status"], (r["error"] or {}).get("code")) for r in results] == [(201, None), (421, "wrong_shard")]

    # x402: the other shard's facilitator neither verifies nor settles the payer's voucher.
    required = x402_requirements(w3.eth.chain_id, payee, 5)
    paid = x402_request(required, x402_voucher(channels[0], 35, sign))
    verdicts = [shards[1].post(route, json=paid).json() for route in ("/x402/verify", "/x402/settle")]
    assert [(v.get("isValid", v.get("success")), v.get("invalidReason", v.get("errorReason"))) for v in verdicts] == [
        (False, "wrong_shard"),
        (False, "wrong_shard"),
    ]

    with database_down(second):
        assert answer(shards[1], channels[1], 40, sign) == (503, "store_unavailable")
        assert answer(shards[0], channels[0], 40, sign) == (201, "")
    wait_until(lambda: answer(shards[1], channels[1], 40, sign) == (201, ""))  # not acknowledged: sent again

    # Each store holds only its own payers' channels; each engine settled its own; the payee got both, once.
    wait_until(lambda: hub.functions.balanceOf(payee, ETH).call() == 80)
    # `withdrawable` is the hub's balance of the payee (one for every shard) at the block the shard's store is at.
    summary = {"token": ETH, "channels": 1, "accepted": "40", "settled": "40", "unsettled": "0"}
    expected = [{**summary, "withdrawable": "80", "withdrawn": "0"}]

    def summarised(client: TestClient) -> Callable[[], bool]:
        return lambda: bool(client.get(f"/v1/payees/{payee}/summary").json()["assets"] == expected)

    for client in shards:
        wait_until(summarised(client))
    assert [settled_on_chain(hub, c) for c in channels] == [40, 40]
    assert shards[1].get(f"/v1/channels/0x{channels[0].id.hex()}").json()["code"] == "wrong_shard"
