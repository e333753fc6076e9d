"""Unknown channel ids cost the chain a bounded number of RPC calls: a repeated unknown id is remembered for a
moment, and look-ups of ids never seen are capped per second (issue 17: one 259 KB batch cost 7,000 RPC calls)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.domain.ledger import Verdict
from settlement.domain.model import Voucher
from settlement.eip712.vouchers import channel_id
from settlement.errors import SettlementError, UnknownChannelsBusyError
from settlement.indexer.follower import Indexer
from settlement.server.service import Service
from tests.hub_helpers import (
    ETH,
    Channel,
    body,
    in_one_block,
    provider_of,
    service_of,
    stand_still,
    wait_cursor,
    wait_until,
    x402_request,
    x402_requirements,
    x402_settle_batch,
    x402_voucher,
)

Sign = Callable[..., bytes]


def rpc_calls(client: TestClient) -> int:
    """The calls a channel look-up makes (the indexer's own head polls run beside it on their own schedule)."""
    calls = provider_of(client).calls
    return int(calls["eth_call"] + calls["eth_getLogs"])


def ghost(channel: Channel, n: int) -> Channel:
    return Channel(id=n.to_bytes(32, "big"), payer=channel.payer, payee=channel.payee, token=ETH, salt=bytes(32))


def test_a_repeated_unknown_channel_id_costs_the_chain_nothing_more(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client = api(indexer_interval=60, unknown_channel_ttl=30)  # the indexer's own polls out of the count:
    indexer = service_of(client).indexer
    head = service_of(client).w3.eth.block_number
    # its first catch-up polls back to back (one eth_getLogs a range) until it reaches the head, then rests 60 s.
    wait_cursor(indexer, head)
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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On automine and on a chain mining many transactions a block (the existence probe reads the latest block)."""
    # The chain's budget is the subject here: store reads of unknown ids are not limited first.
    client = api(indexer_interval=60, chain_lookups_per_second=5, unknown_channel_reads_per_second=10_000)  # burst 10
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    service = service_of(client)
    provider = provider_of(client)
    stand_still(monkeypatch, service.indexer._lookups)  # while the flood is judged
    before = provider.calls["eth_call"]
    flood = [ghost(channel, n) for n in range(1000, 1300)]
    items = [body(g, 1, sign(channel.payer, g.id, 1)) for g in flood]
    results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    codes = [r["error"]["code"] for r in results]
    assert codes == ["channel_not_found"] * 10 + ["chain_lookups_exhausted"] * 290  # the burst, no more
    cost = provider.calls["eth_call"] - before
    assert cost == 10, cost  # bounded by the budget, not by the flood: one raw eth_call a made-up id
    monkeypatch.undo()  # the real clock again: the budget refills
    # The honest payer's channel is known to the store (or looked up within the next second's budget): it pays.
    wait_until(
        lambda: (
            client.post("/v1/vouchers", json=body(channel, 5, sign(channel.payer, channel.id, 5))).status_code == 201
        )
    )


def test_unknown_ids_beyond_the_read_budget_are_refused_before_any_read_and_known_payers_pay_at_once(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    mining: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood of made-up ids is decided on the event loop: beyond SETTLEMENT_UNKNOWN_CHANNEL_READS_PER_SECOND it is
    503 `unknown_channels_busy` with no store read, no thread and no chain call, anonymous reads included (the fast
    path), while a payer whose channel this process holds (the indexer told ingest of it) pays with no wait."""
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client = api(indexer_interval=60, unknown_channel_reads_per_second=2)  # burst 4
    service = service_of(client)
    stand_still(monkeypatch, service.ingestor._unknown_reads)
    head = service.w3.eth.block_number
    wait_cursor(service.indexer, head)
    before = rpc_calls(client)
    items = [body(g, 1, sign(channel.payer, g.id, 1)) for g in (ghost(channel, n) for n in range(2000, 2300))]
    results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [r["error"]["code"] for r in results] == ["channel_not_found"] * 4 + ["unknown_channels_busy"] * 296
    assert rpc_calls(client) - before == 4  # the four admitted: one existence probe each
    assert client.post("/v1/vouchers", json=body(channel, 5, sign(channel.payer, channel.id, 5))).status_code == 201
    made_up = f"/v1/channels/0x{ghost(channel, 3000).id.hex()}"
    for headers in ({}, {"Authorization": "Bearer cht_not-a-token"}):  # the fast path, and FastAPI's route
        refused = client.get(made_up, headers=headers)
        assert (refused.status_code, refused.json()["code"], refused.headers["retry-after"]) == (
            503,
            "unknown_channels_busy",
            "1",
        )
    denied = client.get(f"/v1/channels/0x{ghost(channel, 2000).id.hex()}")  # found absent moments ago: no budget
    assert (denied.status_code, denied.json()["code"]) == (404, "channel_not_found")
    assert client.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == "5"
    assert rpc_calls(client) - before == 4


def test_a_new_channels_concurrent_first_payments_share_one_admission(
    make_service: Callable[..., Service],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read budget counts distinct ids, not requests: twenty threads sending the same first voucher of a channel
    the process does not hold yet all get its receipt (one payment) under a budget of one read, while a second
    unknown id right after is refused."""
    service = make_service(indexer_interval=60, unknown_channel_reads_per_second=0.5)  # burst 1
    stand_still(monkeypatch, service.ingestor._unknown_reads)
    head = service.w3.eth.block_number  # the indexer's first pass ends before the channel opens: it never holds it
    wait_cursor(service.indexer, head)
    channel = open_channel(accounts[7], accounts[8].address, amount=100)
    voucher = Voucher(channel.hex_id, 7, sign(channel.payer, channel.id, 7))
    start = threading.Barrier(20)

    def submit(_: int) -> object:
        start.wait()
        return service.ingestor.ingest([voucher])[0]

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(submit, range(20)))
    assert [isinstance(o, Verdict) for o in outcomes] == [True] * 20, outcomes
    assert sorted(o.new for o in outcomes if isinstance(o, Verdict)) == [False] * 19 + [True]
    other = ghost(channel, 6000)
    refused = service.ingestor.ingest([Voucher(other.hex_id, 1, sign(channel.payer, other.id, 1))])[0]
    assert isinstance(refused, UnknownChannelsBusyError)


def test_a_restarted_service_holds_its_stored_payers_from_the_start(
    make_service: Callable[..., Service], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    """After a restart no known payer's voucher needs a store read: a flood that spends the read budget from the
    first second does not keep them waiting."""
    channel = open_channel(accounts[7], accounts[8].address, amount=100)
    make_service().indexer.catch_up()  # stores the channel
    restarted = make_service(indexer_interval=60, unknown_channel_reads_per_second=0.001)  # admits no unknown id
    cid = channel.hex_id
    unknown = ghost(channel, 4000).hex_id
    outcomes = restarted.ingestor.ingest(
        [
            Voucher(unknown, 1, sign(channel.payer, bytes.fromhex(unknown[2:]), 1)),
            Voucher(cid, 3, sign(channel.payer, channel.id, 3)),
        ]
    )
    assert isinstance(outcomes[0], UnknownChannelsBusyError)
    assert isinstance(outcomes[1], Verdict) and outcomes[1].new


def test_channels_opened_in_one_block_are_held_from_the_indexer_without_a_read(
    api: Callable[..., TestClient], accounts: list[LocalAccount], sign: Sign, hub: Contract, w3: Web3
) -> None:
    """Three channels opened in ONE block (as a real chain mines them): the indexer's one pass over that block tells
    ingest of each, so their first vouchers need no store read even when the read budget admits none."""
    client = api(unknown_channel_reads_per_second=0.001)  # admits no channel id it does not hold
    salts = [n.to_bytes(32, "big") for n in (81, 82, 83)]
    payers = (accounts[10], accounts[11], accounts[12])
    opens = [(hub.functions.open(accounts[13].address, ETH, salt, 1_000), p.address, 1_000)
             for p, salt in zip(payers, salts, strict=True)]  # fmt: skip
    in_one_block(w3, *opens)
    channels = [Channel(channel_id(p.address, accounts[13].address, ETH, salt), p, accounts[13].address, ETH, salt,
                        1_000) for p, salt in zip(payers, salts, strict=True)]  # fmt: skip
    # Until the indexer stores them the answer is 503 (no read admitted); then each pays with no read at all.
    for channel in channels:

        def paid(c: Channel = channel) -> bool:
            return client.post("/v1/vouchers", json=body(c, 1, sign(c.payer, c.id, 1))).status_code == 201

        wait_until(paid, timeout=10)


def budgeted_facilitator(
    api: Callable[..., TestClient], channel: Channel, monkeypatch: pytest.MonkeyPatch
) -> tuple[TestClient, dict[str, Any]]:
    """A service whose read budget for unknown ids is its burst of 4 (its clock stands), its indexer past the
    channel's opening (and then idle), and the payee's requirements at a price of 5."""
    client = api(indexer_interval=60, unknown_channel_reads_per_second=2)
    service = service_of(client)
    stand_still(monkeypatch, service.ingestor._unknown_reads)
    head = service.w3.eth.block_number
    wait_cursor(service.indexer, head)
    return client, x402_requirements(service.deployment.chain_id, channel.payee, 5)


def test_the_x402_facilitator_admits_made_up_ids_as_ingest_does_and_known_payments_go_on(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`/x402/verify` and `/x402/settle` with made-up channel ids: beyond the read budget 503 (no store read, no
    chain call: a payee's middleware answers its payer 503, never a 402), an id found absent moments ago is refused
    at once for free, and a payment on a channel this process holds settles at once."""
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client, required = budgeted_facilitator(api, channel, monkeypatch)
    before = rpc_calls(client)
    answers = []
    for n in range(4000, 4040):
        made_up = ghost(channel, n)
        route = "/x402/verify" if n % 2 else "/x402/settle"
        answers.append(client.post(route, json=x402_request(required, x402_voucher(made_up, 5, sign, channel.payer))))
    reasons = [a.json().get("invalidReason") or a.json().get("errorReason") or a.json()["code"] for a in answers]
    assert reasons == ["channel_not_found"] * 4 + ["unknown_channels_busy"] * 36
    assert [a.status_code for a in answers] == [200] * 4 + [503] * 36
    assert rpc_calls(client) - before == 4  # the four admitted: one existence probe each
    again = client.post("/x402/settle", json=x402_request(required, x402_voucher(ghost(channel, 4000), 5, sign)))
    assert (again.status_code, again.json()["errorReason"]) == (200, "channel_not_found")  # remembered: no budget
    honest = client.post("/x402/settle", json=x402_request(required, x402_voucher(channel, 5, sign))).json()
    assert (honest["success"], honest["amount"]) == (True, "5")
    assert rpc_calls(client) - before == 4


def test_a_settle_batch_of_made_up_ids_costs_what_as_many_settles_cost_and_the_honest_payment_in_it_stands(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One `/x402/settle/batch` request naming 40 made-up channel ids around an honest payment: the read budget is
    spent per id, as by 40 settles (4 probes, 36 answered 503 in their places, no chain call), and the honest payment
    is accepted."""
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client, required = budgeted_facilitator(api, channel, monkeypatch)
    made_up = [
        x402_request(required, x402_voucher(ghost(channel, n), 5, sign, channel.payer)) for n in range(5000, 5040)
    ]
    honest = x402_request(required, x402_voucher(channel, 5, sign))
    items = [*made_up[:20], honest, *made_up[20:]]
    before = rpc_calls(client)
    answer = client.post(
        "/x402/settle/batch",
        json=x402_settle_batch(*items),
    )
    assert answer.status_code == 200, answer.text
    settled = answer.json()["settlements"]
    assert (settled[20]["success"], settled[20]["amount"]) == (True, "5")
    ghosts = settled[:20] + settled[21:]
    assert sum(a.get("errorReason") == "channel_not_found" for a in ghosts) == 4
    assert sum(a.get("status") == 503 and a["error"]["code"] == "unknown_channels_busy" for a in ghosts) == 36
    assert rpc_calls(client) - before == 4  # the four admitted: one existence probe each


def test_refusals_leave_no_garbage_for_the_collector(
    api: Callable[..., TestClient], open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> None:
    """A refusal kept as an outcome, or raised and answered, held the frames that held it through its traceback: a
    reference cycle per refused request, freed only by the garbage collector, whose pauses (up to 35 ms under the
    flood bench) became the honest payers' p99. A flood's kinds of refusal, through the fast path, the batch route
    and a read: none of their errors is left for the collector."""
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    client = api(unknown_channel_reads_per_second=50)  # the subject is the garbage: every made-up id gets read
    paid = body(channel, 1, sign(channel.payer, channel.id, 1))
    wait_until(lambda: client.post("/v1/vouchers", json=paid).status_code == 201)
    forged = body(channel, 2, sign(accounts[7], channel.id, 2))
    made_up = [body(g, 1, sign(channel.payer, g.id, 1)) for g in (ghost(channel, n) for n in range(4000, 4010))]
    junk = {"content": b"\x00\x01", "headers": {"Content-Type": "application/json"}}
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        codes = [client.post("/v1/vouchers", json=forged).json()["code"] for _ in range(5)]
        codes += [client.post("/v1/vouchers", json=item).json()["code"] for item in made_up]
        codes += [client.post("/v1/vouchers", **junk).json()["code"]]  # type: ignore[arg-type]
        codes += [client.get(f"/v1/channels/0x{ghost(channel, 5000 + n).id.hex()}").json()["code"] for n in range(3)]
        batch = client.post("/v1/vouchers/batch", json={"vouchers": [forged, *made_up[:3]]}).json()["results"]
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, SettlementError)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert (
        codes
        == ["invalid_signature"] * 5 + ["channel_not_found"] * 10 + ["malformed_request"] + ["channel_not_found"] * 3
    )
    assert [r["status"] for r in batch] == [400, 404, 404, 404]
    assert left == []


def _until_unchanged(count: Callable[[], int], quiet: float = 0.5) -> None:
    """Wait until `count` has not moved for `quiet` seconds."""
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        if (now := count()) != last:
            last, since = now, time.monotonic()


def test_a_flood_of_readiness_checks_costs_the_chain_no_call_each(api: Callable[..., TestClient], w3: Web3) -> None:
    """/ready read the chain's head for each request: anyone may ask it, and a flood of checks spent the RPC
    provider's quota the indexer and the engine share (the engine must settle closing channels in time). It now
    reuses the head as last read (here by the indexer) for `ready_chain_max_age` seconds while no read failed; 0
    reads it every time, as before."""
    for max_age, cost in ((3600.0, 0), (0.0, 50)):
        client = api(indexer_interval=3600.0, ready_chain_max_age=max_age)
        indexer: Indexer = service_of(client).indexer

        def caught_up(i: Indexer = indexer) -> bool:
            return i.progress is not None and i.progress.cursor >= i.progress.confirmed

        wait_until(caught_up)
        calls = provider_of(client).calls
        # A poll that advanced is followed at once by another (it reads the head and the cursor's block, then finds
        # nothing to do): counted inside the checks below, it made the cost 1 or 2 when it came late.

        def polls(c: Any = calls) -> int:
            return int(c["eth_getBlockByNumber"])

        _until_unchanged(polls)
        before = calls["eth_getBlockByNumber"]
        answers = [client.get("/ready") for _ in range(50)]
        assert {(a.status_code, a.json()["headBlock"]) for a in answers} == {(200, w3.eth.block_number)}
        assert calls["eth_getBlockByNumber"] - before == cost


def test_a_flood_of_payee_summaries_reads_each_balance_once_a_block(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
    w3: Web3,
) -> None:
    """A payee's summary read the hub's balance for each request, and a payee is anyone with a key and a 1-wei
    channel to itself: a flood of summaries spent the chain's RPC quota. A balance at a block never changes: it is
    read once for the block the store's facts are current to, and again only when they move on."""
    client = api()
    channel = open_channel(accounts[5], accounts[11].address, amount=100)
    assert client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10))).status_code == 201
    calls = provider_of(client).calls
    indexer = service_of(client).indexer
    wait_cursor(indexer, w3.eth.block_number - indexer.confirmations)
    summary = f"/v1/payees/{channel.payee}/summary"
    first = client.get(summary).json()
    before = calls["eth_call"]
    answers = [client.get(summary).json() for _ in range(50)]
    assert answers == [first] * 50
    assert [a["withdrawable"] for a in first["assets"]] == ["0"]
    assert calls["eth_call"] - before == 0
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])  # the store's facts move to a new block: read there, once
    wait_cursor(indexer, w3.eth.block_number - indexer.confirmations)
    before = calls["eth_call"]
    assert [client.get(summary).json()["assets"][0]["withdrawable"] for _ in range(10)] == ["0"] * 10
    assert calls["eth_call"] - before == 1
    balances = service_of(client).balances
    before = calls["eth_call"]
    assert indexer.progress is not None
    assert balances.at(channel.payee, ETH, indexer.progress.cursor, "0x" + "ab" * 32) == 0  # that number, another
    assert calls["eth_call"] - before == 1  # block (a reorganisation): read again


def test_a_payee_paid_in_many_tokens_costs_a_few_balance_reads_a_summary(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    deploy: Callable[..., Contract],
    token: Contract,
    accounts: list[LocalAccount],
    w3: Web3,
) -> None:
    """A payer picks its channel's token, and a payee's summary read the hub's balance of every asset it was paid in:
    a payer that opened channels to a payee in many tokens of its own making (a payee may be itself) made each
    summary of that payee cost as many RPC calls (each new block), on one of the service's four request threads. A
    summary now reads SETTLEMENT_SUMMARY_BALANCES_MAX balances at most, ETH's and the configured tokens' first, and
    names the others in `balancesUnread` (their `withdrawable` null, not a guess)."""
    client = api(summary_balances_max=2, token_min_settle_amounts={token.address: 1})
    payee = accounts[11].address
    made = [deploy("DevToken", f"Made {n}", f"M{n}", 18) for n in range(3)]
    for asset in (*made, token, None):
        open_channel(accounts[5], payee, token=asset, amount=1_000)
    indexer = service_of(client).indexer
    wait_cursor(indexer, w3.eth.block_number - indexer.confirmations)
    calls = provider_of(client).calls
    before = calls["eth_call"]
    summary = client.get(f"/v1/payees/{payee}/summary").json()
    assert calls["eth_call"] - before == 2
    listed = sorted([ETH, token.address, *(t.address for t in made)])
    assert [a["token"] for a in summary["assets"]] == listed
    read = {ETH: "0", token.address: "0"}
    assert [a["withdrawable"] for a in summary["assets"]] == [read.get(t) for t in listed]
    assert summary["balancesUnread"] == [t for t in listed if t not in read]
