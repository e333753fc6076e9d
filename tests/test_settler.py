"""The settlement engine on the real hub and both stores: batches settle exactly what was accepted, once, whatever
crash comes between the steps; fee bumps; the watchtower; a settler without funds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from web3 import Web3
from web3.contract import Contract
from web3.types import Nonce, RPCEndpoint, TxData, Wei

from settlement.chain.node import connect
from settlement.devtools.devnet import Devnet
from settlement.server.service import Service
from settlement.settle.engine import NONCE_USED_GRACE_SECONDS, SETTLED, Settler
from settlement.store import channels as channel_q
from settlement.store import settlements as batch_q
from tests.hub_helpers import (
    ETH,
    Channel,
    RpcProxy,
    Sign,
    pay,
    run_until_idle,
    send,
    settled_on_chain,
    wait_indexed,
)


class Crash(Exception):
    """Stands for the process dying at a chosen point."""


@pytest.fixture
def paid_channel(
    open_channel: Callable[..., Channel], accounts: list[LocalAccount], sign: Sign
) -> Callable[[Service, int], Channel]:
    """Factory: paid_channel(service, cumulative) -> a 1 ETH channel (accounts 5 -> 7) the service accepted
    `cumulative` on."""

    def make(service: Service, cumulative: int) -> Channel:
        channel = open_channel(accounts[5], accounts[7].address, amount=10**18)
        wait_indexed(service)
        pay(service, channel, cumulative, sign)
        return channel

    return make


def test_batches_settle_exactly_the_accepted_amounts(
    engine: Callable[..., tuple[Service, Settler]],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    token: Contract,
    hub: Contract,
    sign: Sign,
) -> None:
    service, settler = engine()
    alice, bob = accounts[7].address, accounts[8].address
    channels = [
        open_channel(accounts[5], alice, amount=10**18),
        open_channel(accounts[6], alice, amount=10**18),
        open_channel(accounts[5], bob, token=token, amount=10**24),
    ]
    wait_indexed(service)
    for round_amounts in ([100, 200, 300], [1_000, 2_000, 10**23]):
        for channel, amount in zip(channels, round_amounts, strict=True):
            pay(service, channel, amount, sign)
        started = settler.tick(force=True).started
        assert started is not None
        run_until_idle(settler, service)
        assert [settled_on_chain(hub, c) for c in channels] == round_amounts
        assert hub.functions.balanceOf(alice, ETH).call() == sum(round_amounts[:2])
        assert hub.functions.balanceOf(bob, token.address).call() == round_amounts[2]
    with service.db.read() as conn:
        batches = batch_q.recent_batches(conn)
        entries = [batch_q.entries_of(conn, b.batch_id) for b, _ in batches]
        left = batch_q.settleable(conn)
    assert [(b.status, n) for b, n in batches] == [("confirmed", 3), ("confirmed", 3)]
    assert all(e.outcome == SETTLED for batch in entries for e in batch)
    assert left == []
    assert settler.tick(force=True).started is None  # nothing left to settle
    assert "settlement_voucher_to_settlement_seconds_count 6.0" in _metrics(service)


def test_a_large_batch_names_its_slots_in_an_access_list_and_a_small_one_does_not(
    engine: Callable[..., tuple[Service, Settler]],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    sign: Sign,
) -> None:
    """Listing a slot up front saves ~100 gas per channel, listing the hub costs 2,400: only large batches list."""
    service, settler = engine()
    channels = [open_channel(accounts[5], accounts[7].address, amount=10**18) for _ in range(40)]
    wait_indexed(service)
    sent: list[TxData] = []
    for paid in (channels, channels[:1]):
        for channel in paid:
            pay(service, channel, 100 + len(sent), sign)
        batch_id = settler.tick(force=True).started
        assert batch_id is not None
        run_until_idle(settler, service)
        with service.db.read() as conn:
            (tx,) = batch_q.txs_of(conn, batch_id)
        sent.append(service.w3.eth.get_transaction(HexStr(tx.tx_hash)))
        assert [settled_on_chain(hub, c) for c in paid] == [100 + len(sent) - 1] * len(paid)
    large, small = sent
    (listed,) = large["accessList"]
    assert listed["address"] == hub.address
    assert len(listed["storageKeys"]) == 41  # 40 channel slots and the payee's balance
    assert not small.get("accessList")


def test_a_regular_batch_waits_for_the_interval_and_the_minimum(
    engine: Callable[..., tuple[Service, Settler]],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Sign,
) -> None:
    now = [1_000_000.0]
    service, settler = engine(clock=lambda: now[0], min_settle_amount=50, settle_interval=30)
    small = open_channel(accounts[5], accounts[7].address, amount=1_000)
    big = open_channel(accounts[6], accounts[7].address, amount=1_000)
    wait_indexed(service)
    pay(service, small, 10, sign)
    pay(service, big, 60, sign)
    assert settler.tick().started is None  # not due yet
    now[0] += 31
    started = settler.tick().started
    assert started is not None
    with service.db.read() as conn:
        assert [e.channel_id for e in batch_q.entries_of(conn, started)] == ["0x" + big.id.hex()]


@pytest.mark.faults
@pytest.mark.parametrize("crash_in", ["_send", "_broadcast", "mark_sent", "record"])
def test_a_crash_at_any_step_settles_once_after_restart(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    accounts: list[LocalAccount],
    settler_account: LocalAccount,
    hub: Contract,
    w3: Web3,
    monkeypatch: pytest.MonkeyPatch,
    crash_in: str,
) -> None:
    """_send: after the intent, before a transaction exists; _broadcast: signed and stored, never sent;
    mark_sent: sent (and mined, anvil mines at once) but not recorded as sent; record: mined, outcome not recorded."""
    service, settler = engine()
    payee = accounts[7].address
    channel = paid_channel(service, 777)
    nonce_before = w3.eth.get_transaction_count(settler_account.address)

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise Crash(crash_in)

    if crash_in == "mark_sent":
        monkeypatch.setattr(batch_q, "mark_sent", crash)
    elif crash_in == "record":
        monkeypatch.setattr(batch_q, "finish_batch", crash)
    else:
        monkeypatch.setattr(Settler, crash_in, crash)
    with pytest.raises(Crash):  # 'record' crashes on the tick that reads the receipt, the others on the first
        for _ in range(5):
            settler.tick(force=True)
    monkeypatch.undo()

    _, restarted = engine()
    run_until_idle(restarted, service)
    assert settled_on_chain(hub, channel) == 777
    assert hub.functions.balanceOf(payee, ETH).call() == 777
    assert w3.eth.get_transaction_count(settler_account.address) == nonce_before + 1  # one transaction, no gap
    with service.db.read() as conn:
        (batch, entries), *_ = batch_q.recent_batches(conn)
    assert (batch.status, entries) == ("confirmed", 1)


@pytest.mark.faults
def test_an_unmined_batch_is_replaced_with_higher_fees(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    hub: Contract,
    w3: Web3,
) -> None:
    service, settler = engine(bump_after=0.01)
    channel = paid_channel(service, 500)
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        batch_id = settler.tick(force=True).started
        assert batch_id is not None
        time.sleep(0.05)
        settler.tick()  # not mined after bump_after: replaced with the same nonce
        with service.db.read() as conn:
            txs = batch_q.txs_of(conn, batch_id)
        assert len(txs) == 2 and txs[0].nonce == txs[1].nonce
        assert txs[1].max_fee > txs[0].max_fee and txs[1].priority_fee > txs[0].priority_fee
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
    run_until_idle(settler, service)
    assert settled_on_chain(hub, channel) == 500
    with service.db.read() as conn:
        (batch, _), *_ = batch_q.recent_batches(conn)
    assert batch.tx_hash == txs[1].tx_hash  # the replacement is the one that mined


@pytest.mark.faults
@pytest.mark.parametrize("spiked", ["after_sending", "before_sending"])
def test_a_batch_under_a_fee_spike_is_replaced_at_the_fees_of_the_moment(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    settler_account: LocalAccount,
    hub: Contract,
    w3: Web3,
    spiked: str,
) -> None:
    """The base fee jumps 100 times over (a busy hour on a chain), after a batch was sent, or before, past the
    block it was priced at (the node refuses it; a full pool refuses the cheapest "underpriced" the same). Its
    replacement, `bump_after` later, offers twice the base fee of the moment plus the tip, and is mined.

    Before, a replacement only raised the last offer by 20 %: under the base fee still (anvil refused it), a bump
    every `bump_after` (30 s) for each 20 % of the jump, and every batch after it (a close's settlement) waited behind
    its nonce. And a refused transaction was never counted as sent, so never replaced: its bytes were sent again at
    every tick, refused each time, until the base fee came down. Its wait now counts from its signing."""
    service, settler = engine(bump_after=0.01)
    channel = paid_channel(service, 500)
    spike = 100 * int(w3.eth.get_block("latest")["baseFeePerGas"])
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        if spiked == "before_sending":
            w3.provider.make_request(RPCEndpoint("anvil_setNextBlockBaseFeePerGas"), [hex(spike)])
        batch_id = settler.tick(force=True).started
        assert batch_id is not None
        with service.db.read() as conn:
            (first,) = batch_q.txs_of(conn, batch_id)
        assert (first.sent_at is None) == (spiked == "before_sending")  # refused: never sent
        if spiked == "after_sending":
            w3.provider.make_request(RPCEndpoint("anvil_setNextBlockBaseFeePerGas"), [hex(spike)])
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])  # the spike's block: the batch is not in it
        assert w3.eth.get_block("latest")["baseFeePerGas"] == spike
        assert w3.eth.get_transaction_count(settler_account.address, "latest") == first.nonce
        time.sleep(0.05)
        settler.tick()  # not mined after bump_after: replaced
        with service.db.read() as conn:
            txs = batch_q.txs_of(conn, batch_id)
        tip = first.priority_fee * 120 // 100 + 1
        assert [(tx.nonce, tx.max_fee, tx.priority_fee) for tx in txs[1:]] == [(first.nonce, 2 * spike + tip, tip)]
        assert txs[1].sent_at is not None
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])  # the base fee 7/8 of the spike's: the replacement fits
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
    assert settled_on_chain(hub, channel) == 500
    run_until_idle(settler, service)
    with service.db.read() as conn:
        (batch, _), *_ = batch_q.recent_batches(conn)
    assert batch.tx_hash == txs[1].tx_hash


class SuggestingRpc(RpcProxy):
    """A node that suggests a tip of `tip` wei a gas (`eth_maxPriorityFeePerGas`), as an L2's does."""

    def __init__(self, target: str, tip: int) -> None:
        super().__init__(target)
        self.tip = tip

    def answer(self, call: dict[str, Any]) -> dict[str, Any] | None:
        return {"result": hex(self.tip)} if call.get("method") == "eth_maxPriorityFeePerGas" else None


@pytest.mark.parametrize(("configured", "tip"), [(None, 10**6), (3 * 10**9, 3 * 10**9)], ids=["suggested", "set"])
def test_a_batch_tips_what_the_node_suggests_unless_a_tip_is_set(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    devnet: Devnet,
    w3: Web3,
    configured: int | None,
    tip: int,
) -> None:
    """A fixed tip of 1 gwei (the default before) is mainnet's; an L2's node suggests a thousandth of that or less,
    and there every entry of every batch cost its gas at ~1,000 times the going tip (and channels owed less than
    `settle_fee_share_percent` of that waited). The tip is the node's suggestion, read at each sending, unless
    SETTLEMENT_PRIORITY_FEE_PER_GAS sets one."""
    with SuggestingRpc(devnet.url, tip=10**6) as l2:
        service, settler = engine(chain=connect(l2.url), priority_fee_per_gas=configured)
        channel = paid_channel(service, 500)
        base = int(w3.eth.get_block("latest")["baseFeePerGas"])
        batch_id = settler.tick(force=True).started
        assert batch_id is not None
        with service.db.read() as conn:
            (sent,) = batch_q.txs_of(conn, batch_id)
        assert (sent.max_fee, sent.priority_fee) == (2 * base + tip, tip)
        run_until_idle(settler, service)
    assert settled_on_chain(service.hub, channel) == 500


@pytest.mark.faults
def test_a_batch_whose_nonce_another_transaction_took_fails_only_after_a_grace_period(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    settler_account: LocalAccount,
    hub: Contract,
    w3: Web3,
) -> None:
    """The operator's key sends something else with the batch's nonce (a dearer tx wins the block). A node may show a
    nonce as used before it serves the receipt, so the engine waits NONCE_USED_GRACE_SECONDS before calling it."""
    now = [1_000_000.0]
    service, settler = engine(clock=lambda: now[0])
    channel = paid_channel(service, 250)
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        batch_id = settler.tick(force=True).started
        assert batch_id is not None
        with service.db.read() as conn:
            (ours,) = batch_q.txs_of(conn, batch_id)
        w3.eth.send_transaction(
            {
                "from": settler_account.address,
                "to": settler_account.address,
                "nonce": Nonce(ours.nonce),
                "maxFeePerGas": Wei(ours.max_fee * 3),
                "maxPriorityFeePerGas": Wei(ours.priority_fee * 3),
            }
        )
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
    assert settled_on_chain(hub, channel) == 0  # the replacement took the nonce; our batch never mined
    assert settler.reconcile() == []  # nonce used, no receipt of ours: not concluded yet
    now[0] += NONCE_USED_GRACE_SECONDS
    assert settler.reconcile() == [batch_id]
    with service.db.read() as conn:
        (batch, _), *_ = batch_q.recent_batches(conn)
    assert (batch.status, batch.error) == ("failed", "nonce used by another transaction")
    run_until_idle(settler, service)  # the next batch settles the channel with a fresh nonce
    settler.tick(force=True)
    run_until_idle(settler, service)
    assert settled_on_chain(hub, channel) == 250


@pytest.mark.faults
def test_watchtower_settles_a_close_that_happened_while_the_service_was_down(
    engine: Callable[..., tuple[Service, Settler]],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    sign: Sign,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, _ = engine()
    payer, payee = accounts[5], accounts[7].address
    channel = open_channel(payer, payee, amount=10**18)
    wait_indexed(service)
    pay(service, channel, 40, sign)
    pay(service, channel, 90, sign)
    service.stop()
    # the payer closes while nothing watches; the hub's challenge period is an hour; 50 minutes pass
    send(w3, hub.functions.requestClose(channel.id), payer.address)
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [3000])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])

    restarted, watch = engine(close_alert_seconds=10**9)  # any deadline counts as near: the alert must fire
    wait_indexed(restarted)
    with caplog.at_level(logging.CRITICAL, logger="settlement.settle.engine"):
        assert watch.tick().started is not None  # no interval wait: a close is pending
    assert "close_deadline_at_risk" in caplog.text
    run_until_idle(watch, restarted)
    assert settled_on_chain(hub, channel) == 90
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [601])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    send(w3, hub.functions.finalizeClose(channel.id), payer.address)
    assert hub.functions.balanceOf(payee, ETH).call() == 90
    assert hub.functions.balanceOf(payer.address, ETH).call() == 10**18 - 90


@pytest.mark.faults
def test_a_missed_deadline_raises_a_critical_alert(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    hub: Contract,
    w3: Web3,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, _ = engine()
    channel = paid_channel(service, 40)
    send(w3, hub.functions.requestClose(channel.id), channel.payer.address)
    wait_indexed(service)
    watching, late = engine(clock=lambda: 4_000_000_000.0)  # long after the deadline
    with caplog.at_level(logging.CRITICAL, logger="settlement.settle.engine"):
        late.tick()
    assert "close_deadline_missed" in caplog.text
    assert 'settlement_alerts_total{kind="close_deadline_missed"}' in _metrics(watching)


@pytest.mark.faults
def test_a_settler_without_funds_keeps_the_intent_and_resumes_after_a_top_up(
    engine: Callable[..., tuple[Service, Settler]],
    paid_channel: Callable[[Service, int], Channel],
    settler_account: LocalAccount,
    hub: Contract,
    w3: Web3,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, settler = engine()
    channel = paid_channel(service, 321)
    funds = w3.eth.get_balance(settler_account.address)
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [settler_account.address, hex(10**9)])
    with caplog.at_level(logging.CRITICAL, logger="settlement.settle.engine"):
        batch_id = settler.tick(force=True).started
        settler.tick()
    assert batch_id is not None and "low_funds" in caplog.text and "low_balance" in caplog.text
    with service.db.read() as conn:
        assert [b.batch_id for b in batch_q.open_batches(conn)] == [batch_id]
        assert batch_q.txs_of(conn, batch_id) == []
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [settler_account.address, hex(funds)])
    run_until_idle(settler, service)
    assert settled_on_chain(hub, channel) == 321
    with service.db.read() as conn:
        assert channel_q.get_channel(conn, channel.hex_id).settled == 321  # type: ignore[union-attr]


def _metrics(service: Service) -> str:
    from prometheus_client import generate_latest

    return generate_latest(service.metrics.registry).decode()
