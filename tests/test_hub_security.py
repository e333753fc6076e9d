"""ChannelHub against hostile tokens and random operation sequences: the per-asset invariant always holds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils.abi import function_signature_to_4byte_selector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.chain.batch_codec import SettleEntry
from settlement.domain.model import ChannelStatus, ChannelViewField
from settlement.eip712.vouchers import Domain, sign_voucher
from tests.hub_helpers import (
    CHALLENGE_PERIOD,
    ETH,
    Channel,
    batch,
    channel_id,
    credited,
    events,
    money_and_status,
    reverts_with,
    salt_of,
    send,
    settle_call,
)


def _approve_and_open(w3: Web3, hub: Contract, tok: Contract, payer: str, payee: str, amount: int, salt: int) -> bytes:
    send(w3, tok.functions.mint(payer, amount), payer)
    send(w3, tok.functions.approve(hub.address, amount), payer)
    send(w3, hub.functions.open(payee, tok.address, salt_of(salt), amount), payer)
    return channel_id(payer, payee, tok.address, salt_of(salt))


def test_fee_on_transfer_token_is_credited_what_arrived(
    w3: Web3, hub: Contract, deploy: Callable[..., Contract], accounts: list[LocalAccount]
) -> None:
    fee_token = deploy("FeeOnTransferToken", 100)  # 1% burnt on every transfer
    payer, payee = accounts[1].address, accounts[2].address
    cid = _approve_and_open(w3, hub, fee_token, payer, payee, 10_000, 1)
    assert hub.functions.channel(cid).call()[ChannelViewField.DEPOSIT] == 9_900
    assert fee_token.functions.balanceOf(hub.address).call() == 9_900
    send(w3, fee_token.functions.mint(payer, 1000), payer)
    send(w3, fee_token.functions.approve(hub.address, 1000), payer)
    receipt = send(w3, hub.functions.topUp(cid, 1000), payer)
    assert events(hub, receipt, "ChannelToppedUp") == [{"channelId": cid, "amount": 990, "deposit": 10_890}]


def test_token_without_return_value_works(
    w3: Web3, hub: Contract, deploy: Callable[..., Contract], domain: Domain, accounts: list[LocalAccount]
) -> None:
    usdt_like = deploy("NoReturnToken")
    payer, payee = accounts[1], accounts[2].address
    cid = _approve_and_open(w3, hub, usdt_like, payer.address, payee, 500, 1)
    sig = sign_voucher(payer, domain, cid, 200)
    send(w3, settle_call(hub, batch(payee, usdt_like.address, SettleEntry(payer.address, salt_of(1), 200, sig))), payee)
    send(w3, hub.functions.withdraw(usdt_like.address, 200, payee), payee)
    assert usdt_like.functions.balanceOf(payee).call() == 200
    assert usdt_like.functions.balanceOf(hub.address).call() == 300


def test_token_returning_false_is_refused(
    w3: Web3, hub: Contract, deploy: Callable[..., Contract], accounts: list[LocalAccount]
) -> None:
    liar = deploy("FalseReturnToken")
    payer, payee = accounts[1].address, accounts[2].address
    send(w3, liar.functions.mint(payer, 500), payer)
    send(w3, liar.functions.approve(hub.address, 500), payer)
    send(w3, liar.functions.setFailing(True), payer)
    revert = reverts_with(hub.functions.open(payee, liar.address, salt_of(1), 500), hub.abi, {"from": payer})
    assert revert.data.startswith(
        "0x" + function_signature_to_4byte_selector("SafeERC20FailedOperation(address)").hex()
    )
    assert (
        hub.functions.channel(channel_id(payer, payee, liar.address, salt_of(1))).call()[ChannelViewField.STATUS] == 0
    )
    # a withdrawal whose transfer returns false reverts as a whole: the balance is kept
    send(w3, liar.functions.setFailing(False), payer)
    cid = _approve_and_open(w3, hub, liar, payer, payee, 100, 2)
    send(w3, hub.functions.closeByPayee(cid, 0, b""), payee)
    send(w3, liar.functions.setFailing(True), payer)
    with pytest.raises(Exception, match="0x5274afe7"):  # SafeERC20FailedOperation selector
        hub.functions.withdraw(liar.address, 100, payer).transact({"from": payer})
    assert hub.functions.balanceOf(payer, liar.address).call() == 100


REENTRANCY_SELECTOR = "0x" + function_signature_to_4byte_selector("ReentrancyGuardReentrantCall()").hex()


@pytest.mark.parametrize("attack", ["openFromBalance", "topUpFromBalance", "closeByPayee", "withdraw", "settleBatch"])
def test_reentrant_token_cannot_reenter(
    w3: Web3, hub: Contract, deploy: Callable[..., Contract], accounts: list[LocalAccount], attack: str
) -> None:
    evil = deploy("ReentrantToken")
    payer, payee = accounts[1].address, accounts[2].address
    first = _approve_and_open(w3, hub, evil, payer, payee, 1000, 1)
    payloads: dict[str, Any] = {
        "openFromBalance": hub.functions.openFromBalance(payee, evil.address, salt_of(1), 1),
        "topUpFromBalance": hub.functions.topUpFromBalance(first, 1),
        "closeByPayee": hub.functions.closeByPayee(first, 0, b""),
        "withdraw": hub.functions.withdraw(evil.address, 1, payer),
        "settleBatch": hub.functions.settleBatch(b""),
    }
    data = payloads[attack]._encode_transaction_data()
    send(w3, evil.functions.mint(payer, 10), payer)
    send(w3, evil.functions.approve(hub.address, 10), payer)
    send(w3, evil.functions.arm(hub.address, data), payer)
    send(w3, hub.functions.topUp(first, 10), payer)  # the token calls back into the hub mid-transfer
    assert evil.functions.attempted().call() is True
    assert evil.functions.reentered().call() is False
    assert "0x" + bytes(evil.functions.revertData().call()).hex() == REENTRANCY_SELECTOR
    assert hub.functions.channel(first).call()[ChannelViewField.DEPOSIT] == 1010


# --------------------------------------------------------------------------------------------------------------------
# Random sequences: contract balance == credited balances + sum(deposit - settled) of channels not closed, per asset;
# and each operation does exactly what the contract promises (a model of its effect, from the state before it)
# --------------------------------------------------------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["open", "top_up", "settle", "request_close", "finalize", "close_by_payee", "withdraw"]),
        st.integers(min_value=0, max_value=7),  # which actor / channel
        st.integers(min_value=1, max_value=10**6),  # amount
        st.booleans(),  # ETH or token
    ),
    min_size=4,
    max_size=14,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_invariant_under_random_sequences(
    w3: Web3, hub: Contract, token: Contract, domain: Domain, accounts: list[LocalAccount], sequence: list[Any]
) -> None:
    snapshot = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    try:
        _run_sequence(w3, hub, token, domain, accounts[1:9], sequence)
    finally:
        w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])


def test_a_sequence_the_model_follows_through_every_change(
    w3: Web3, hub: Contract, token: Contract, domain: Domain, accounts: list[LocalAccount]
) -> None:
    """The random sequences' model is not vacuous: in this one every operation takes effect, a settle before and one
    during the close, and one settle that passes the deposit is skipped."""
    actors = accounts[1:9]
    sequence = [
        ("open", 0, 1_000, True),
        ("settle", 0, 400, True),
        ("top_up", 0, 500, True),
        ("settle", 0, 2_000, True),  # 2,400 > the deposit of 1,500: skipped, nothing moves
        ("request_close", 0, 1, True),
        ("settle", 1, 100, True),  # still signed from 2,400: 2,500 > 1,500, skipped
        ("open", 2, 300, False),
        ("settle", 1, 250, False),  # the second channel (index 1), a token one: 250 of 300
        ("finalize", 0, 1, True),
        ("withdraw", 1, 10**6, True),  # the first channel's payee takes its 400
        ("close_by_payee", 1, 1, False),
    ]
    effects = _run_sequence(w3, hub, token, domain, actors, sequence)
    assert effects == Counter(
        {
            "open": 2,
            "settle": 2,
            "skipped": 2,
            "top_up": 1,
            "request_close": 1,
            "finalize": 1,
            "withdraw": 1,
            "close_by_payee": 1,
        }
    )
    assert credited(hub, actors[0].address) == 1_100  # the first payer's 1,500 less 400
    assert credited(hub, actors[1].address) == 0  # withdrawn
    assert credited(hub, actors[3].address, token.address) == 250  # the second payee, not withdrawn
    assert credited(hub, actors[2].address, token.address) == 50  # the second payer's remainder


def _run_sequence(
    w3: Web3, hub: Contract, token: Contract, domain: Domain, actors: list[LocalAccount], sequence: list[Any]
) -> Counter[str]:
    """Play `sequence`, checking after each operation its exact effect and the invariant; returns what took effect
    ("skipped": a settle the contract skipped, as the model said it would)."""
    channels: list[Channel] = []
    signed: dict[bytes, int] = {}
    effects: Counter[str] = Counter()

    for n, (op, who, amount, use_eth) in enumerate(sequence):
        actor = actors[who % len(actors)]
        asset = ETH if use_eth else token.address
        ch = channels[who % len(channels)] if channels else None
        state = money_and_status(hub, ch.id) if ch else None
        if op == "open" or ch is None or state is None:
            payee = actors[(who + 1) % len(actors)].address
            if asset == ETH:
                send(w3, hub.functions.open(payee, ETH, salt_of(n), amount), actor.address, value=amount)
            else:
                send(w3, token.functions.mint(actor.address, amount), actor.address)
                send(w3, token.functions.approve(hub.address, amount), actor.address)
                send(w3, hub.functions.open(payee, asset, salt_of(n), amount), actor.address)
            channels.append(
                Channel(channel_id(actor.address, payee, asset, salt_of(n)), actor, payee, asset, salt_of(n))
            )
            assert money_and_status(hub, channels[-1].id) == (amount, 0, 0, ChannelStatus.OPEN)
            effects["open"] += 1
            _check_invariant(w3, hub, token, actors, channels)
            continue
        deposit, settled, deadline, status = state
        payee_before, payer_before = credited(hub, ch.payee, ch.token), credited(hub, ch.payer.address, ch.token)
        expected = [deposit, settled, deadline, status]
        payee_gets = payer_gets = 0
        if op == "top_up" and status == ChannelStatus.OPEN:
            if ch.token == ETH:
                send(w3, hub.functions.topUp(ch.id, amount), actor.address, value=amount)
            else:
                send(w3, token.functions.mint(actor.address, amount), actor.address)
                send(w3, token.functions.approve(hub.address, amount), actor.address)
                send(w3, hub.functions.topUp(ch.id, amount), actor.address)
            expected[0] += amount
            effects[op] += 1
        elif op == "settle":
            cumulative = signed.get(ch.id, 0) + amount  # may exceed the deposit: then it is skipped
            signed[ch.id] = cumulative
            sig = sign_voucher(ch.payer, domain, ch.id, cumulative)
            receipt = send(w3, settle_call(hub, batch(ch.payee, ch.token, ch.voucher(cumulative, sig))), actor.address)
            mined_at = w3.eth.get_block(receipt["blockNumber"])["timestamp"]
            live = status == ChannelStatus.OPEN or (status == ChannelStatus.CLOSING and mined_at <= deadline)
            if live and settled < cumulative <= deposit:
                expected[1], payee_gets = cumulative, cumulative - settled
                effects[op] += 1
            else:
                effects["skipped"] += 1
        elif op == "request_close" and status == ChannelStatus.OPEN:
            receipt = send(w3, hub.functions.requestClose(ch.id), ch.payer.address)
            mined_at = w3.eth.get_block(receipt["blockNumber"])["timestamp"]
            expected[2:] = [mined_at + CHALLENGE_PERIOD, ChannelStatus.CLOSING]
            effects[op] += 1
        elif op == "finalize" and status == ChannelStatus.CLOSING:
            w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [CHALLENGE_PERIOD + 1])
            w3.provider.make_request(RPCEndpoint("evm_mine"), [])
            send(w3, hub.functions.finalizeClose(ch.id), actor.address)
            expected[3], payer_gets = ChannelStatus.CLOSED, deposit - settled
            effects[op] += 1
        elif op == "close_by_payee" and status in (ChannelStatus.OPEN, ChannelStatus.CLOSING):
            send(w3, hub.functions.closeByPayee(ch.id, 0, b""), ch.payee)
            expected[3], payer_gets = ChannelStatus.CLOSED, deposit - settled
            effects[op] += 1
        elif op == "withdraw":
            balance = credited(hub, actor.address, asset)
            if balance:
                send(w3, hub.functions.withdraw(asset, min(balance, amount), actor.address), actor.address)
                assert credited(hub, actor.address, asset) == balance - min(balance, amount)
                effects[op] += 1
                payee_before, payer_before = (
                    credited(hub, ch.payee, ch.token),
                    credited(hub, ch.payer.address, ch.token),
                )
        assert money_and_status(hub, ch.id) == tuple(expected), (op, state)
        assert credited(hub, ch.payee, ch.token) == payee_before + payee_gets, (op, state)
        assert credited(hub, ch.payer.address, ch.token) == payer_before + payer_gets, (op, state)
        _check_invariant(w3, hub, token, actors, channels)
    return effects


def _check_invariant(
    w3: Web3, hub: Contract, token: Contract, actors: list[LocalAccount], channels: list[Channel]
) -> None:
    views = [hub.functions.channel(ch.id).call() for ch in channels]  # once for both assets: a call each costs
    for asset in (ETH, token.address):
        held = w3.eth.get_balance(hub.address) if asset == ETH else token.functions.balanceOf(hub.address).call()
        owed = sum(credited(hub, a.address, asset) for a in actors)
        locked = 0
        for _, _, tok, deposit, settled, _, status in views:
            assert settled <= deposit
            if tok == asset and status != ChannelStatus.CLOSED:
                locked += deposit - settled
        assert held == owed + locked, f"invariant broken for {asset}"
