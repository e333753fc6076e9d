"""Hostile payers must not cost the operator or the payee: settlement is economic, a close is settled at most twice,
front-running is noticed, and the engine's timing survives a failover.

Each attack test ends with the payee credited every voucher the service accepted up to the close, or with a CRITICAL
alert naming what is at risk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.domain.model import ChannelId, ChannelViewField
from settlement.server.service import Service
from settlement.settle.engine import UNSETTLED_REPORT_SECONDS, Broadcast, Outcome, Settler
from settlement.store import settlements as batch_q
from settlement.store.settlements import SentTx
from tests.hub_helpers import (
    ETH,
    Channel,
    Sign,
    batch,
    in_one_block,
    pay,
    run_until_idle,
    send,
    settle_call,
    settled_on_chain,
    wait_indexed,
)

ECONOMIC = {"settle_fee_share_percent": 10, "settle_interval": 30.0}
GWEI = 10**9


def chain_time(w3: Web3) -> int:
    return int(w3.eth.get_block("latest")["timestamp"])


def batches(service: Service) -> list[batch_q.CountedBatch]:
    with service.db.read() as conn:
        return batch_q.recent_batches(conn, 1000)


def entries(service: Service) -> list[tuple[ChannelId, int]]:
    """Every (channel, cumulative) the engine ever put in a batch, oldest batch first."""
    out: list[tuple[ChannelId, int]] = []
    for b, _n in reversed(batches(service)):
        with service.db.read() as conn:
            out += [(e.channel_id, e.cumulative) for e in batch_q.entries_of(conn, b.batch_id)]
    return out


def idle(mining: str) -> dict[str, Any]:
    """run_until_idle's pace on this chain: on interval mining, ticks a quarter second apart for up to 10 s."""
    return {"ticks": 40, "pause": 0.25} if mining == "interval" else {}


Clocked = Callable[..., tuple[Service, Settler, list[float]]]


@pytest.fixture
def clocked(engine: Callable[..., tuple[Service, Settler]], w3: Web3) -> Clocked:
    """Factory: clocked(**settings) -> (service, settler, now): the settler reads `now[0]`, which starts at the
    chain's time; a test moves it."""

    def make(**settings: Any) -> tuple[Service, Settler, list[float]]:
        now = [float(chain_time(w3))]
        service, settler = engine(clock=lambda: now[0], **settings)
        return service, settler, now

    return make


def close_requested(w3: Web3, hub: Contract, channel: Channel) -> int:
    """The channel's payer requests its close; returns the close's deadline, as the hub holds it."""
    send(w3, hub.functions.requestClose(channel.id), channel.payer.address)
    return int(hub.functions.channel(channel.id).call()[ChannelViewField.CLOSE_DEADLINE])


def step(settler: Settler, service: Service, now: list[float], seconds: float) -> str | None:
    """Let `seconds` pass on the engine's clock, tick once, and let the indexer see what was mined."""
    now[0] += seconds
    started = settler.tick().started
    wait_indexed(service)
    return started


def test_a_closing_payer_streaming_one_wei_vouchers_buys_no_extra_batches(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    hub: Contract,
    sign: Sign,
) -> None:
    """The measured attack: a close request, then +1 wei a second, beside 40 one-gwei channels. It made 17 batches
    (8.2 M gas) in 56 s. Now: one batch when the close is seen, one when ingest stops taking vouchers, both carrying
    the closing channel only; the dust channels are never worth their gas."""
    service, settler, now = clocked(**ECONOMIC)
    attacker = open_channel(accounts[5], accounts[7].address, amount=10**18)
    dust = [open_channel(accounts[6], accounts[7].address, amount=10**15) for _ in range(40)]
    wait_indexed(service)
    for channel in dust:
        pay(service, channel, GWEI, sign)
    pay(service, attacker, 1_000, sign)
    deadline = close_requested(w3, hub, attacker)
    wait_indexed(service)

    cumulative = 1_000
    for _ in range(60):  # a minute of +1 wei vouchers, the engine ticking every second
        cumulative += 1
        pay(service, attacker, cumulative, sign)
        step(settler, service, now, 1.0)
    assert entries(service) == [(attacker.hex_id, 1_001)]  # the close, settled once as soon as it was seen

    now[0] = deadline - service.settings.close_guard_seconds  # ingest takes no more vouchers from here
    assert step(settler, service, now, 0) is not None
    for _ in range(5):
        step(settler, service, now, 1.0)
    assert entries(service) == [(attacker.hex_id, 1_001), (attacker.hex_id, cumulative)]
    assert [n for _b, n in batches(service)] == [1, 1]
    spent = [b.gas_used for b, _n in batches(service)]
    assert all(gas is not None and gas <= 60_000 for gas in spent), spent  # the documented bound: 2 x 60,000 gas
    assert settled_on_chain(hub, attacker) == cumulative  # the payee got every accepted wei
    assert [settled_on_chain(hub, c) for c in dust] == [0] * 40


def test_regular_batches_take_only_channels_worth_their_gas(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    token: Contract,
    w3: Web3,
    hub: Contract,
    sign: Sign,
) -> None:
    service, settler, now = clocked(token_min_settle_amounts={token.address: 500}, **ECONOMIC)
    big = open_channel(accounts[5], accounts[7].address, amount=10**18)
    small = open_channel(accounts[6], accounts[7].address, amount=10**18)
    token_big = open_channel(accounts[5], accounts[8].address, token=token, amount=10**6)
    token_small = open_channel(accounts[6], accounts[8].address, token=token, amount=10**6)
    wait_indexed(service)
    price = int(w3.eth.get_block("latest")["baseFeePerGas"]) + int(w3.eth.max_priority_fee)  # the node's tip
    threshold = service.settings.settle_gas_per_channel * price * 100 // 10  # gas may cost 10% of the value
    pay(service, big, threshold, sign)
    pay(service, small, threshold // 2, sign)
    pay(service, token_big, 500, sign)
    pay(service, token_small, 499, sign)
    assert step(settler, service, now, 31.0) is not None
    run_until_idle(settler, service)
    assert sorted(entries(service)) == sorted([(big.hex_id, threshold), (token_big.hex_id, 500)])
    assert step(settler, service, now, 31.0) is None  # what is left is still not worth a batch
    assert settler.tick(force=True).started is not None  # an operator's `settlement settle` takes everything
    run_until_idle(settler, service)
    assert [settled_on_chain(hub, c) for c in (big, small, token_big, token_small)] == [
        threshold,
        threshold // 2,
        500,
        499,
    ]


def test_a_token_a_payer_made_never_crowds_other_payees_out_of_regular_batches(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    deploy: Callable[..., Contract],
    accounts: list[LocalAccount],
    w3: Web3,
    hub: Contract,
    sign: Sign,
    mining: str,
) -> None:
    """A regular batch took the first `batch_max_entries` channels ranked by unsettled base units, closing ones
    first, and only then dropped the closing ones: amounts of a token a payer made (10^30 units each cost it nothing)
    outranked every ETH channel, and its closing channels (settled by the watchtower, then paid again) took places
    too. With as many of them as a batch has places, no other payee's channel was ever settled before it closed.
    Now a regular batch reads open channels only, ETH's and the configured tokens' first."""
    service, settler, now = clocked(settle_fee_share_percent=0, settle_interval=30.0, batch_max_entries=2)
    made = deploy("DevToken", "Made Up", "MADE", 18)
    honest = open_channel(accounts[5], accounts[7].address, amount=10**18)
    junk = [open_channel(accounts[6], accounts[8].address, token=made, amount=10**31) for _ in range(3)]
    wait_indexed(service)
    pay(service, junk[2], 10**30, sign)
    in_one_block(  # the close request shares its block with another payer's top-up, as on a busy chain
        w3, (hub.functions.requestClose(junk[2].id), junk[2].payer.address, 0), (hub.functions.topUp(honest.id, 1),
        honest.payer.address, 1),
    )  # fmt: skip
    wait_indexed(service)
    assert step(settler, service, now, 0) is not None  # the watchtower's first settlement of the close
    run_until_idle(settler, service, **idle(mining))
    assert entries(service) == [(junk[2].hex_id, 10**30)]
    pay(service, junk[2], 2 * 10**30, sign)  # the closing channel paid again: its second settlement is not due yet
    for channel in junk[:2]:
        pay(service, channel, 10**30, sign)
    pay(service, honest, 100, sign)

    assert step(settler, service, now, 31) is not None  # a regular batch of two places; the close is not due
    run_until_idle(settler, service, **idle(mining))
    first_junk = min(junk[:2], key=lambda c: c.hex_id)  # the two open ones tie: the channel id decides
    assert sorted(entries(service)[1:]) == sorted([(honest.hex_id, 100), (first_junk.hex_id, 10**30)])
    assert settled_on_chain(hub, honest) == 100


def test_a_token_a_payer_made_spends_its_own_ceiling_not_the_settlers(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    deploy: Callable[..., Contract],
    token: Contract,
    accounts: list[LocalAccount],
    hub: Contract,
    sign: Sign,
    caplog: pytest.LogCaptureFixture,
    mining: str,
) -> None:
    """The engine cannot price a token the operator did not name, so any amount of one was worth settling: a payer
    that made its own token and paid itself on many channels (vouchers are free) had every regular batch carry them at
    the operator's gas, until the settler's whole hourly ceiling was spent and no regular batch went out for anyone.
    Such channels now have a ceiling of their own (the batches' gas shared evenly by their entries); past it they
    are left out of regular batches and an alert says so, while ETH and the configured tokens settle on."""
    service, settler, now = clocked(
        settle_fee_share_percent=0,
        settle_interval=30.0,
        max_unpriced_spend_per_hour_wei=1,
        token_min_settle_amounts={token.address: 1},
    )
    made = deploy("DevToken", "Made Up", "MADE", 18)
    honest = open_channel(accounts[5], accounts[7].address, amount=10**18)
    configured = open_channel(accounts[5], accounts[7].address, token=token, amount=10**6)
    junk = open_channel(accounts[6], accounts[8].address, token=made, amount=10**31)
    wait_indexed(service)
    for channel in (honest, configured, junk):
        pay(service, channel, 10, sign)
    assert step(settler, service, now, 31) is not None
    run_until_idle(settler, service, **idle(mining))
    assert sorted(entries(service)) == sorted([(honest.hex_id, 10), (configured.hex_id, 10), (junk.hex_id, 10)])
    hour_ago = datetime.fromtimestamp(now[0] - 3600, UTC)
    with service.db.read() as conn:
        spent = batch_q.spent_since(conn, hour_ago)
        on_junk = batch_q.spent_on_others_since(conn, hour_ago, [ETH, token.address])
    assert spent > 0 and on_junk == spent // 3  # one entry of three

    for channel in (honest, configured, junk):
        pay(service, channel, 20, sign)
    caplog.set_level(logging.CRITICAL)
    assert step(settler, service, now, 31) is not None
    run_until_idle(settler, service, **idle(mining))
    assert sorted(entries(service)[3:]) == sorted([(honest.hex_id, 20), (configured.hex_id, 20)])
    assert [settled_on_chain(hub, c) for c in (honest, configured, junk)] == [20, 20, 10]
    alerts = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "settlement.settle.engine"]
    assert alerts == ["ALERT unpriced_spend_ceiling"]
    assert settler.tick(force=True).started is not None  # an operator's `settlement settle` takes it still
    run_until_idle(settler, service, **idle(mining))
    assert settled_on_chain(hub, junk) == 20


def test_the_unsettled_gauge_reads_zero_once_settled_and_names_few_of_the_tokens_payers_pick(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    deploy: Callable[..., Contract],
    token: Contract,
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    """`settlement_unsettled_value{token}` was set for the assets the store's sum named, which are those with value
    left: once every voucher of an asset settled, its series kept its last figure for good (an operator's alert on
    it never cleared). And every token a payer opened a channel in became a series of every scrape, for good (a
    token costs a payer one deployment). ETH and the configured tokens are always named, 0 when all is settled; other
    assets only while they have value unsettled, `SETTLEMENT_UNSETTLED_TOKENS_SHOWN` of them at most."""
    service, settler, now = clocked(
        settle_fee_share_percent=0, unsettled_tokens_shown=1, token_min_settle_amounts={token.address: 1}
    )
    payee = accounts[7].address
    picked = [deploy("DevToken", f"Picked {n}", f"P{n}", 18) for n in (1, 2)]
    eth = open_channel(accounts[5], payee, amount=10**18)
    first, second = (open_channel(accounts[6], payee, token=t, amount=10**6) for t in picked)
    open_channel(accounts[5], payee, token=token, amount=10**6)  # the configured token: nothing paid on it
    wait_indexed(service)
    for channel, amount in ((eth, 100), (first, 7), (second, 9)):
        pay(service, channel, amount, sign)

    def gauge() -> dict[str, float]:
        [family] = service.metrics.unsettled.collect()
        return {s.labels["token"]: s.value for s in family.samples}

    assert step(settler, service, now, 0) is None  # the interval is not over: a report, no batch
    lower = min(picked, key=lambda t: t.address)  # the one named: the others in address order, one here
    assert gauge() == {ETH: 100.0, token.address: 0.0, lower.address: 7.0 if lower is picked[0] else 9.0}
    assert step(settler, service, now, 3600) is not None  # a regular batch of the three channels
    run_until_idle(settler, service)
    assert [settled_on_chain(service.hub, c) for c in (eth, first, second)] == [100, 7, 9]
    step(settler, service, now, UNSETTLED_REPORT_SECONDS)
    assert gauge() == {ETH: 0.0, token.address: 0.0}


def test_the_spend_ceiling_stops_regular_batches_but_not_closes(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    hub: Contract,
    sign: Sign,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, settler, now = clocked(settle_interval=30.0, max_spend_per_hour_wei=1)
    first, second, closing = (open_channel(accounts[5], accounts[7].address, amount=10**18) for _ in range(3))
    wait_indexed(service)
    pay(service, first, 100, sign)
    assert step(settler, service, now, 31.0) is not None
    run_until_idle(settler, service)
    pay(service, second, 100, sign)
    pay(service, closing, 100, sign)
    with caplog.at_level(logging.CRITICAL, logger="settlement.settle.engine"):
        assert step(settler, service, now, 31.0) is None
    assert "ALERT spend_ceiling" in caplog.text
    send(w3, hub.functions.requestClose(closing.id), closing.payer.address)
    wait_indexed(service)
    assert step(settler, service, now, 1.0) is not None
    run_until_idle(settler, service)
    assert [settled_on_chain(hub, c) for c in (first, second, closing)] == [100, 0, 100]


def test_a_close_due_while_a_mined_batch_waits_for_its_confirmations_is_settled_at_once(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    hub: Contract,
    sign: Sign,
) -> None:
    """One batch is in flight at a time, and a batch is in flight until it is `confirmations` deep. A close's final
    settlement is due `close_guard_seconds` (120) before its deadline, when ingest stops taking its vouchers; a regular
    batch mined just before held it for its confirmations: with 12 of mainnet's 12-s blocks, 144 s, past the
    deadline, and the payee lost what the payer paid since the close was seen. A mined batch holds its nonce no
    more: a close due while it deepens goes out at once with the next nonce (regular batches still wait)."""
    service, settler, now = clocked(confirmations=2, settle_interval=30.0)
    regular = open_channel(accounts[5], accounts[7].address, amount=10**18)
    closing = open_channel(accounts[6], accounts[7].address, amount=10**18)

    def mine(blocks: int = 2) -> None:
        w3.provider.make_request(RPCEndpoint("anvil_mine"), [hex(blocks)])
        wait_indexed(service)

    mine()
    pay(service, regular, 100, sign)
    pay(service, closing, 100, sign)
    deadline = close_requested(w3, hub, closing)
    mine()
    assert step(settler, service, now, 0) is not None  # the close seen: settled at once
    mine()
    settler.tick()  # confirmed
    assert [settled_on_chain(hub, c) for c in (regular, closing)] == [0, 100]
    pay(service, regular, 200, sign)
    pay(service, closing, 300, sign)  # paid after the close was seen, before the guard

    now[0] = deadline - service.settings.close_guard_seconds - 1
    regular_batch = step(settler, service, now, 0)  # the interval is over: a regular batch, mined at once
    assert regular_batch is not None and settled_on_chain(hub, regular) == 200
    with service.db.read() as conn:
        assert [b.batch_id for b in batch_q.open_batches(conn)] == [regular_batch]  # 0 of its 2 confirmations
    final = step(settler, service, now, 1)  # ingest takes no more of the closing channel's vouchers: due
    assert final is not None  # the code before: None, until the regular batch was 2 blocks deep
    assert settled_on_chain(hub, closing) == 300
    mine()
    run_until_idle(settler, service)
    assert entries(service) == [(closing.hex_id, 100), (regular.hex_id, 200), (closing.hex_id, 300)]


def test_a_front_run_batch_is_noticed_not_resent_and_the_payee_is_paid(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    hub: Contract,
    sign: Sign,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A payer sees the engine's batch in the mempool and outbids it with settlements of its own latest vouchers:
    the engine's entries become paid-for skips."""
    service, settler, now = clocked(settle_interval=30.0)
    payer = accounts[5]
    channels = [open_channel(payer, accounts[7].address, amount=10**18) for _ in range(3)]
    wait_indexed(service)
    for channel in channels:
        pay(service, channel, 700, sign)
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        now[0] += 31
        assert settler.tick().started is not None  # in the mempool
        for channel in channels:
            entry = channel.voucher(700, sign(payer, channel.id, 700))
            settle_call(hub, batch(channel.payee, channel.token, entry)).transact(
                {"from": payer.address, "gas": 200_000, "maxPriorityFeePerGas": 100 * GWEI, "maxFeePerGas": 200 * GWEI}
            )
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
    with caplog.at_level(logging.CRITICAL, logger="settlement.settle.engine"):
        run_until_idle(settler, service)
    [(front_run, _n)] = batches(service)
    with service.db.read() as conn:
        assert [e.outcome for e in batch_q.entries_of(conn, front_run.batch_id)] == [Outcome.NOT_ABOVE_SETTLED] * 3
    assert f"ALERT front_run: batch {front_run.batch_id}: 3 of 3 entries were already settled" in caplog.text
    assert payer.address in caplog.text
    assert service.metrics.skipped.labels("not_above_settled")._value.get() == 3
    for _ in range(3):
        assert step(settler, service, now, 31.0) is None  # never sent again
    assert [settled_on_chain(hub, c) for c in channels] == [700, 700, 700]


@pytest.mark.parametrize("same_block_as", ["settlement", "top_up"])
def test_a_close_requested_in_the_same_block_as_a_settlement_or_top_up_is_watched(
    same_block_as: str,
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    hub: Contract,
    sign: Sign,
) -> None:
    """Then the payer finalizes one second after the deadline: by then the payee holds every accepted voucher."""
    service, settler, now = clocked(**ECONOMIC)
    channel = open_channel(accounts[5], accounts[7].address, amount=10**18)
    payer = channel.payer.address
    wait_indexed(service)
    pay(service, channel, 5_000, sign)
    first = (
        (
            settle_call(
                hub, batch(channel.payee, channel.token, channel.voucher(1, sign(channel.payer, channel.id, 1)))
            ),
            payer,
            0,
        )
        if same_block_as == "settlement"
        else (hub.functions.topUp(channel.id, 10), payer, 10)
    )
    receipts = in_one_block(w3, first, (hub.functions.requestClose(channel.id), payer, 0))
    assert [r["status"] for r in receipts] == [1, 1]
    deadline = int(w3.eth.get_block(receipts[1]["blockNumber"])["timestamp"]) + 3600
    wait_indexed(service)
    assert step(settler, service, now, 1.0) is not None  # seen as closing: settled at once
    run_until_idle(settler, service)
    pay(service, channel, 9_000, sign)  # still before the close guard
    now[0] = deadline - service.settings.close_guard_seconds
    assert step(settler, service, now, 0) is not None
    run_until_idle(settler, service)
    w3.provider.make_request(RPCEndpoint("evm_setNextBlockTimestamp"), [deadline + 1])  # the first second it is allowed
    [finalized] = in_one_block(w3, (hub.functions.finalizeClose(channel.id), payer, 0))
    assert finalized["status"] == 1
    assert settled_on_chain(hub, channel) == 9_000
    assert int(hub.functions.balanceOf(channel.payee, channel.token).call()) == 9_000


def test_a_standby_engine_keeps_the_leaders_interval_and_alert_throttle(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    sign: Sign,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failover used to reset the engine's timing: an immediate batch, every alert again."""
    service, leader, now = clocked(settle_interval=30.0, low_balance_wei=10**30)
    channel = open_channel(accounts[5], accounts[7].address, amount=10**18)
    wait_indexed(service)
    pay(service, channel, 100, sign)
    with caplog.at_level(logging.CRITICAL, logger="settlement.settle.engine"):
        assert step(leader, service, now, 31.0) is not None
        run_until_idle(leader, service)
        pay(service, channel, 200, sign)
        standby = Settler(
            service.db, service.w3, service.hub, leader.account, service.settings, service.metrics, clock=lambda: now[0]
        )
        assert step(standby, service, now, 10.0) is None  # 10 s after the leader's batch: not due
        assert step(standby, service, now, 21.0) is not None  # 31 s after it
    assert caplog.text.count("ALERT low_balance") == 1  # the standby did not repeat the leader's alert


def test_fee_bumps_follow_the_engines_clock_not_the_wall_clock(
    clocked: Clocked,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    w3: Web3,
    sign: Sign,
) -> None:
    service, settler, now = clocked(bump_after=30.0)
    channel = open_channel(accounts[5], accounts[7].address, amount=10**18)
    wait_indexed(service)
    pay(service, channel, 100, sign)
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        started = settler.tick(force=True).started
        assert started is not None
        now[0] += 29
        settler.tick()

        def sent() -> list[SentTx]:
            with service.db.read() as conn:
                return batch_q.txs_of(conn, started)

        assert len(sent()) == 1
        now[0] += 1
        settler.tick()
        assert len(sent()) == 2  # replaced with higher fees at exactly bump_after on the engine's clock
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])


def test_broadcast_outcomes_are_read_from_the_chain(
    engine: Callable[..., tuple[Service, Settler]], w3: Web3, accounts: list[LocalAccount]
) -> None:
    """The nodes word "already known" and "nonce too low" each their own way: the engine asks the chain."""
    _service, settler = engine()
    account = settler.account
    nonce = w3.eth.get_transaction_count(account.address)

    def signed(n: int, value: int) -> SentTx:
        tx = account.sign_transaction(
            {
                "to": accounts[3].address,
                "value": value,
                "nonce": n,
                "gas": 21_000,
                "maxFeePerGas": 10 * GWEI,
                "maxPriorityFeePerGas": GWEI,
                "chainId": w3.eth.chain_id,
                "type": 2,
            }
        )
        return SentTx(HexBytes(tx.hash).to_0x_hex(), n, 10 * GWEI, GWEI, bytes(tx.raw_transaction), None, None)  # type: ignore[arg-type]

    first = signed(nonce, 1)
    assert settler._send_raw(first) == Broadcast.ACCEPTED
    assert settler._send_raw(first) == Broadcast.ALREADY_KNOWN
    assert settler._send_raw(signed(nonce, 2)) == Broadcast.NONCE_USED  # another transaction took the nonce
