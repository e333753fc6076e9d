"""Events of one channel that share a block, or a transaction: every one is applied, on both stores.

A real chain puts many transactions in a block. Each case sends two operations on one channel into ONE block (automine
off, then one `evm_mine`), lets the indexer apply the block, and requires the stored channel to equal the hub's own
state. The indexer once took every event after a channel's first in a block for already applied: a payer could hide a
close request behind a 1-wei settlement of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.domain.model import ChannelStatus
from settlement.indexer.follower import Indexer
from settlement.store import Database
from settlement.store import channels as channel_q
from tests.hub_helpers import ETH, Channel, Tx, batch, channel_id, in_one_block, salt_of, send, settle_call

DEPOSIT = 1_000
CHALLENGE = 3600


class Ops:
    """The channel operations of the hub, each as the transaction a payer, a payee or anyone would send."""

    def __init__(self, hub: Contract, channel: Channel, sign: Callable[..., bytes]) -> None:
        self.hub, self.channel, self.sign = hub, channel, sign
        self._cumulative = 0

    def _next(self) -> int:
        self._cumulative += 100
        return self._cumulative

    def open(self) -> Tx:
        c = self.channel
        return self.hub.functions.open(c.payee, ETH, c.salt, DEPOSIT), c.payer.address, DEPOSIT

    def top_up(self) -> Tx:
        return self.hub.functions.topUp(self.channel.id, 10), self.channel.payer.address, 10

    def settle(self) -> Tx:
        """The payer settles its own voucher (settleBatch is permissionless)."""
        c, amount = self.channel, self._next()
        call = settle_call(self.hub, batch(c.payee, c.token, c.voucher(amount, self.sign(c.payer, c.id, amount))))
        return call, c.payer.address, 0

    def request_close(self) -> Tx:
        return self.hub.functions.requestClose(self.channel.id), self.channel.payer.address, 0

    def finalize(self) -> Tx:
        return self.hub.functions.finalizeClose(self.channel.id), self.channel.payer.address, 0

    def close_by_payee(self) -> Tx:
        return self.hub.functions.closeByPayee(self.channel.id, 0, b""), self.channel.payee, 0

    def close_by_payee_with_voucher(self) -> Tx:
        """ChannelsSettled then ChannelClosed, in one transaction."""
        c, amount = self.channel, self._next()
        return self.hub.functions.closeByPayee(c.id, amount, self.sign(c.payer, c.id, amount)), c.payee, 0


# (state before the block, first operation, second operation): every ordered pair of channel events that can share
# a block. "new": the channel is not opened yet; "open"; "expired": closing with its challenge period over.
PAIRS = [
    *[("new", "open", second) for second in ("top_up", "settle", "request_close", "close_by_payee")],
    ("new", "open", "close_by_payee_with_voucher"),
    *[
        ("open", first, second)
        for first in ("top_up", "settle")
        for second in ("top_up", "settle", "request_close", "close_by_payee", "close_by_payee_with_voucher")
    ],
    *[("open", "request_close", second) for second in ("settle", "close_by_payee", "close_by_payee_with_voucher")],
    ("expired", "settle", "finalize"),  # the settlement comes too late (skipped): the close still counts
    ("expired", "finalize", "settle"),
    ("expired", "close_by_payee", "settle"),
]


@pytest.fixture
def ops(hub: Contract, accounts: list[LocalAccount], sign: Callable[..., bytes]) -> Callable[[int], Ops]:
    """Factory: the operations on a fresh channel (not yet opened) of a payer and a payee of the devnet."""

    def make(n: int) -> Ops:
        payer, payee = accounts[7], accounts[8].address
        salt = salt_of(10_000 + n)
        return Ops(hub, Channel(channel_id(payer.address, payee, ETH, salt), payer, payee, ETH, salt, DEPOSIT), sign)

    return make


def stored_equals_chain(db: Database, hub: Contract, cid: bytes) -> dict[str, Any]:
    _payer, _payee, _token, deposit, settled, deadline, status = hub.functions.channel(cid).call()
    chain = {"deposit": deposit, "settled": settled, "status": ChannelStatus(status), "deadline": deadline or None}
    with db.read() as conn:
        found = channel_q.get_channel(conn, "0x" + cid.hex())
    assert found is not None
    store: dict[str, Any] = {"deposit": found.deposit, "settled": found.settled, "status": found.status}
    store["deadline"] = found.close_deadline
    assert store == chain
    return store


def prepare(w3: Web3, ops: Ops, state: str) -> None:
    if state == "new":
        return
    call, sender, value = ops.open()
    send(w3, call, sender, value)
    if state == "expired":
        call, sender, value = ops.request_close()
        send(w3, call, sender, value)
        w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [CHALLENGE + 1])


@pytest.mark.parametrize(("state", "first", "second"), PAIRS, ids=[f"{s}:{a}+{b}" for s, a, b in PAIRS])
def test_two_events_of_one_channel_in_one_block_are_both_applied(
    state: str,
    first: str,
    second: str,
    w3: Web3,
    hub: Contract,
    db: Database,
    make_indexer: Callable[..., Indexer],
    ops: Callable[[int], Ops],
) -> None:
    channel_ops = ops(PAIRS.index((state, first, second)))
    indexer = make_indexer()
    prepare(w3, channel_ops, state)
    indexer.catch_up()  # the store knows the channel before the block (unless it is opened in it)
    receipts = in_one_block(w3, getattr(channel_ops, first)(), getattr(channel_ops, second)())
    assert [r["status"] for r in receipts] == [1, 1]
    indexer.catch_up()
    stored_equals_chain(db, hub, channel_ops.channel.id)


# Pairs that can share ONE transaction: a contract makes both calls (tests' Multicall). As a third party it can top
# up, settle (the vouchers are the payer's) and finalize; as a payer it can open, top up and request a close (it
# cannot sign vouchers, so its own channels are never settled here). The payee's `closeByPayee` with a voucher makes
# two events in one transaction by itself (test_one_transaction_settling_a_channel_twice_and_closing_it).
ONE_TX_AS_ANYONE = [
    ("open", "top_up", "top_up"),
    ("open", "top_up", "settle"),
    ("open", "settle", "top_up"),
    ("open", "settle", "settle"),
    ("expired", "settle", "finalize"),
    ("expired", "finalize", "settle"),
]
ONE_TX_AS_PAYER = [
    ("new", "open", "top_up"),
    ("new", "open", "request_close"),
    ("open", "top_up", "request_close"),
    ("open", "top_up", "top_up"),
]


def one_transaction(w3: Web3, multicall: Contract, hub: Contract, *txs: Tx) -> Any:
    calls = [bytes.fromhex(call._encode_transaction_data()[2:]) for call, _sender, _value in txs]
    values = [value for _call, _sender, value in txs]
    runner = multicall.functions.run(hub.address, calls, values)
    return send(w3, runner, txs[0][1], value=sum(values))


@pytest.fixture
def multicall(deploy: Callable[..., Contract]) -> Contract:
    return deploy("Multicall")


@pytest.mark.parametrize(
    ("role", "state", "first", "second"),
    [("anyone", *p) for p in ONE_TX_AS_ANYONE] + [("payer", *p) for p in ONE_TX_AS_PAYER],
    ids=[f"anyone-{s}:{a}+{b}" for s, a, b in ONE_TX_AS_ANYONE] + [f"payer-{s}:{a}+{b}" for s, a, b in ONE_TX_AS_PAYER],
)
def test_two_events_of_one_channel_in_one_transaction_are_both_applied(
    role: str,
    state: str,
    first: str,
    second: str,
    w3: Web3,
    hub: Contract,
    db: Database,
    make_indexer: Callable[..., Indexer],
    multicall: Contract,
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    if role == "payer":  # the multicall contract is the channel's payer
        salt = salt_of(20_000 + ONE_TX_AS_PAYER.index((state, first, second)))
        payer_account = LocalAccount.__new__(LocalAccount)  # never signs: only its address is used
        payee = accounts[8].address
        channel = Channel(channel_id(multicall.address, payee, ETH, salt), payer_account, payee, ETH, salt, DEPOSIT)
        channel_ops: Ops = _ContractPayerOps(hub, channel, sign, multicall.address)
    else:
        n = 30_000 + ONE_TX_AS_ANYONE.index((state, first, second))
        channel_ops = Ops(hub, _fresh_channel(accounts, n), sign)
    indexer = make_indexer()
    if state != "new":
        call, _sender, value = channel_ops.open()
        runner_sender = accounts[9].address
        if role == "payer":
            one_transaction(w3, multicall, hub, (call, runner_sender, value))
        else:
            send(w3, call, channel_ops.channel.payer.address, value)
    if state == "expired":
        send(w3, hub.functions.requestClose(channel_ops.channel.id), channel_ops.channel.payer.address)
        w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [CHALLENGE + 1])
        # mined: the gas estimate runs on the latest block, past the deadline
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    indexer.catch_up()
    pair = [getattr(channel_ops, first)(), getattr(channel_ops, second)()]
    receipt = one_transaction(w3, multicall, hub, *[(c, accounts[9].address, v) for c, _s, v in pair])
    assert receipt["status"] == 1
    indexer.catch_up()
    stored_equals_chain(db, hub, channel_ops.channel.id)


def _fresh_channel(accounts: list[LocalAccount], n: int) -> Channel:
    payer, payee = accounts[7], accounts[8].address
    salt = salt_of(n)
    return Channel(channel_id(payer.address, payee, ETH, salt), payer, payee, ETH, salt, DEPOSIT)


class _ContractPayerOps(Ops):
    """The operations of a channel whose payer is the Multicall contract: `open` as the contract."""

    def __init__(self, hub: Contract, channel: Channel, sign: Callable[..., bytes], payer: str) -> None:
        super().__init__(hub, channel, sign)
        self.payer = payer

    def open(self) -> Tx:
        c = self.channel
        return self.hub.functions.open(c.payee, ETH, c.salt, DEPOSIT), self.payer, DEPOSIT

    def top_up(self) -> Tx:
        return self.hub.functions.topUp(self.channel.id, 10), self.payer, 10

    def request_close(self) -> Tx:
        return self.hub.functions.requestClose(self.channel.id), self.payer, 0


def test_a_payers_own_settlement_does_not_hide_its_close_request(
    w3: Web3, hub: Contract, db: Database, make_indexer: Callable[..., Indexer], ops: Callable[[int], Ops]
) -> None:
    """The attack that was found: a 1-wei self-settlement and requestClose in one block left the channel OPEN in the
    store, so no close guard, no urgent settlement and no alert; vouchers were accepted until the payer took its
    refund."""
    channel_ops = ops(1_000)
    indexer = make_indexer()
    prepare(w3, channel_ops, "open")
    indexer.catch_up()
    settle, close = channel_ops.settle(), channel_ops.request_close()
    receipts = in_one_block(w3, settle, close)
    deadline = w3.eth.get_block(receipts[1]["blockNumber"])["timestamp"] + CHALLENGE
    indexer.catch_up()
    assert stored_equals_chain(db, hub, channel_ops.channel.id) == {
        "deposit": DEPOSIT,
        "settled": 100,
        "status": ChannelStatus.CLOSING,
        "deadline": deadline,
    }


def test_one_transaction_settling_a_channel_twice_and_closing_it(
    w3: Web3,
    hub: Contract,
    db: Database,
    make_indexer: Callable[..., Indexer],
    ops: Callable[[int], Ops],
    sign: Callable[..., bytes],
) -> None:
    """Two records of one channel in one ChannelsSettled event, and a settlement plus a close in one transaction."""
    channel_ops = ops(1_001)
    c = channel_ops.channel
    indexer = make_indexer()
    prepare(w3, channel_ops, "open")
    indexer.catch_up()
    twice = settle_call(
        hub, batch(c.payee, c.token, c.voucher(100, sign(c.payer, c.id, 100)), c.voucher(250, sign(c.payer, c.id, 250)))
    )
    send(w3, twice, c.payer.address)
    indexer.catch_up()
    assert stored_equals_chain(db, hub, c.id)["settled"] == 250
    channel_ops._cumulative = 300  # the payee's final voucher: 400
    call, sender, value = channel_ops.close_by_payee_with_voucher()
    send(w3, call, sender, value)
    indexer.catch_up()
    assert stored_equals_chain(db, hub, c.id) == {
        "deposit": DEPOSIT,
        "settled": 400,
        "status": ChannelStatus.CLOSED,
        "deadline": None,
    }


def test_reconcile_reports_accepted_value_a_closed_channel_never_settled(
    w3: Web3,
    hub: Contract,
    make_service: Callable[..., Any],
    ops: Callable[[int], Ops],
    sign: Callable[..., bytes],
) -> None:
    """Whatever the store believes the status to be: after the close that value can never reach the payee."""
    from settlement.domain.model import Voucher
    from settlement.settle.reconcile import reconcile

    service = make_service()
    channel_ops = ops(1_002)
    c = channel_ops.channel
    prepare(w3, channel_ops, "open")
    service.indexer.catch_up()
    cid = c.hex_id
    [outcome] = service.ingestor.ingest([Voucher(cid, 700, sign(c.payer, c.id, 700))])
    assert outcome.new
    call, sender, value = channel_ops.close_by_payee()  # the payee closes without its voucher: 700 is never paid
    send(w3, call, sender, value)
    _block, rows = reconcile(service.db, service.indexer)
    [row] = [r for r in rows if r.channel_id == cid]
    assert (row.status, row.problem, row.explained) == ("closed", "closed with 700 accepted but never settled", False)
