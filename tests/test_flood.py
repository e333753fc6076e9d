"""Unknown channel ids cost the chain a bounded number of RPC calls: a repeated unknown id is remembered for a
moment, and look-ups of ids never seen are capped per second (issue 17: one 259 KB batch cost 7,000 RPC calls)."""

from __future__ import annotations

from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient

from tests.hub_helpers import ETH, Channel, body, wait_until

Sign = Callable[..., bytes]


def rpc_calls(client: TestClient) -> int:
    """The calls a channel look-up makes (the indexer's own head polls run beside it on their own schedule)."""
    calls = client.app.state.service.w3.provider.calls  # type: ignore[attr-defined]
    return int(calls["eth_call"] + calls["eth_getLogs"])


def ghost(channel: Channel, n: int) -> Channel:
    return Channel(id=n.to_bytes(32, "big"), payer=channel.payer, payee=channel.payee, token=ETH, salt=bytes(32))


def test_a_repeated_unknown_channel_id_costs_the_chain_nothing_more(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client = api(indexer_interval=60, unknown_channel_ttl=30)  # the indexer's own polls out of the count:
    indexer = client.app.state.service.indexer  # type: ignore[attr-defined]
    head = client.app.state.service.w3.eth.block_number  # type: ignore[attr-defined]
    # its first catch-up polls back to back (one eth_getLogs a range) until it reaches the head, then rests 60 s.
    wait_until(lambda: indexer.progress is not None and indexer.progress.cursor >= head)
    unknown = ghost(channel, 7)
    first = client.post("/v1/vouchers", json=body(unknown, 1, sign(channel.payer, unknown.id, 1)))
    assert (first.status_code, first.json()["code"]) == (404, "channel_not_found")
    before = rpc_calls(client)
    items = [body(unknown, n, sign(channel.payer, unknown.id, n)) for n in range(1, 201)]
    answer = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()
    assert [r["status"] for r in answer["results"]] == [404] * 200
    for _ in range(50):
        assert client.get(f"/v1/channels/0x{unknown.id.hex()}").status_code == 404
    assert rpc_calls(client) - before == 0
    metrics = client.get("/metrics").text
    assert 'settlement_rpc_requests{method="eth_call"}' in metrics


def test_lookups_of_never_seen_ids_are_capped_and_an_honest_channel_still_pays(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    mining: str,
) -> None:
    """On automine and on a chain mining many transactions a block (the existence probe reads the latest block)."""
    client = api(indexer_interval=60, chain_lookups_per_second=5)  # burst 10
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    provider = client.app.state.service.w3.provider  # type: ignore[attr-defined]
    before = provider.calls["eth_call"]
    flood = [ghost(channel, n) for n in range(1000, 1300)]
    items = [body(g, 1, sign(channel.payer, g.id, 1)) for g in flood]
    results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    codes = [r["error"]["code"] for r in results]
    looked_up = codes.count("channel_not_found")
    assert 10 <= looked_up <= 12 and codes.count("chain_lookups_exhausted") == 300 - looked_up  # the burst, no more
    cost = provider.calls["eth_call"] - before
    assert cost == looked_up, cost  # bounded by the budget, not by the flood: one raw eth_call a made-up id
    # The honest payer's channel is known to the store (or looked up within the next second's budget): it pays.
    wait_until(
        lambda: (
            client.post("/v1/vouchers", json=body(channel, 5, sign(channel.payer, channel.id, 5))).status_code == 201
        )
    )
