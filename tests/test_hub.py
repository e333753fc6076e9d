"""ChannelHub against a real anvil: every function, every custom error, every skip reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.types import RPCEndpoint, Wei

from settlement.chain.batch_codec import MAX_AMOUNT, SettleEntry, encode_batch, group_header, packed_entry
from settlement.chain.contracts import HUB, load_artifact
from settlement.domain.model import MAX_UINT256, ChannelStatus
from settlement.eip712.vouchers import SECP256K1_N, Domain, VoucherVerifier, to_compact
from tests.hub_helpers import (
    ETH,
    SKIP,
    Channel,
    Group,
    batch,
    channel_id,
    events,
    money_and_status,
    record,
    reverts_with,
    salt_of,
    send,
    settle_call,
    settled,
)
from tests.signatures import REFUSED_FORMS

OpenChannel = Callable[..., Channel]
Sign = Callable[..., bytes]


def time_travel(w3: Web3, seconds: int) -> None:
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [seconds])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])


def settle(w3: Web3, hub: Contract, *groups: Group, sender: str | None = None) -> Any:
    return send(w3, settle_call(hub, *groups), sender or w3.eth.accounts[0])


def settle_raw(w3: Web3, hub: Contract, data: bytes) -> Any:
    return send(w3, hub.functions.settleBatch(data), w3.eth.accounts[0])


def view(hub: Contract, cid: bytes) -> tuple[Any, ...]:
    return tuple(hub.functions.channel(cid).call())


# --------------------------------------------------------------------------------------------------------------------
# Deployment and views
# --------------------------------------------------------------------------------------------------------------------


def test_constructor_enforces_minimum_challenge_period(w3: Web3, hub: Contract, accounts: list[LocalAccount]) -> None:
    factory = w3.eth.contract(abi=hub.abi, bytecode=load_artifact().bytecode)
    revert = reverts_with(factory.constructor(59), hub.abi, {"from": accounts[0].address})
    assert (revert.name, revert.args) == ("ChannelHubInvalidChallengePeriod", (59,))
    assert hub.functions.MIN_CHALLENGE_PERIOD().call() == 60


def test_eip712_domain_is_erc5267(hub: Contract, w3: Web3) -> None:
    fields, name, version, chain_id, contract, salt, extensions = hub.functions.eip712Domain().call()
    assert (fields, name, version, chain_id, contract) == (b"\x0f", "ChannelHub", "1", w3.eth.chain_id, hub.address)
    assert salt == b"\x00" * 32 and extensions == []
    domain = Domain(chain_id=chain_id, verifying_contract=contract)
    assert bytes(hub.functions.domainSeparator().call()) == domain.separator()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cid=st.binary(min_size=32, max_size=32), amount=st.integers(min_value=0, max_value=MAX_UINT256))
def test_python_digest_equals_hash_voucher(hub: Contract, domain: Domain, cid: bytes, amount: int) -> None:
    assert VoucherVerifier(domain).digest(cid, amount) == bytes(hub.functions.hashVoucher(cid, amount).call())


def test_channel_id_is_the_abi_encoded_hash(hub: Contract, accounts: list[LocalAccount]) -> None:
    payer, payee = accounts[1].address, accounts[2].address
    expected = channel_id(payer, payee, ETH, salt_of(7))
    assert bytes(hub.functions.channelIdOf(payer, payee, ETH, salt_of(7)).call()) == expected


# --------------------------------------------------------------------------------------------------------------------
# Opening and funding
# --------------------------------------------------------------------------------------------------------------------


def test_open_eth_channel(w3: Web3, hub: Contract, accounts: list[LocalAccount]) -> None:
    payer, payee = accounts[1], accounts[2].address
    receipt = send(w3, hub.functions.open(payee, ETH, salt_of(1), 5 * 10**17), payer.address, value=5 * 10**17)
    cid = channel_id(payer.address, payee, ETH, salt_of(1))
    assert events(hub, receipt, "ChannelOpened") == [
        {
            "channelId": cid,
            "payer": payer.address,
            "payee": payee,
            "token": ETH,
            "salt": salt_of(1),
            "deposit": 5 * 10**17,
        }
    ]
    assert view(hub, cid) == (payer.address, payee, ETH, 5 * 10**17, 0, 0, ChannelStatus.OPEN)
    assert w3.eth.get_balance(hub.address) == 5 * 10**17


def test_open_token_channel(
    open_channel: OpenChannel, hub: Contract, token: Contract, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, token, 1234)
    assert view(hub, ch.id) == (accounts[1].address, accounts[2].address, token.address, 1234, 0, 0, ChannelStatus.OPEN)
    assert token.functions.balanceOf(hub.address).call() == 1234


def test_unknown_channel_view(hub: Contract) -> None:
    assert view(hub, b"\x42" * 32) == (ETH, ETH, ETH, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("payee_index", "value", "amount", "error"),
    [
        (None, 1, 1, "ChannelHubInvalidPayee"),  # zero payee
        (1, 1, 1, "ChannelHubInvalidPayee"),  # payer pays itself
        (2, 0, 0, "ChannelHubZeroAmount"),
        (2, 5, 6, "ChannelHubWrongValue"),
    ],
)
def test_open_rejects_bad_parameters(
    hub: Contract, accounts: list[LocalAccount], payee_index: int | None, value: int, amount: int, error: str
) -> None:
    payee = ETH if payee_index is None else accounts[payee_index].address
    revert = reverts_with(
        hub.functions.open(payee, ETH, salt_of(1), amount), hub.abi, {"from": accounts[1].address, "value": value}
    )
    assert revert.name == error


def test_eth_sent_to_token_channel_is_refused(hub: Contract, token: Contract, accounts: list[LocalAccount]) -> None:
    revert = reverts_with(
        hub.functions.open(accounts[2].address, token.address, salt_of(1), 10),
        hub.abi,
        {"from": accounts[1].address, "value": 10},
    )
    assert (revert.name, revert.args) == ("ChannelHubWrongValue", (10, 0))


def test_channel_id_never_reused(
    w3: Web3, hub: Contract, open_channel: OpenChannel, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, salt=salt_of(9))
    call = hub.functions.open(ch.payee, ETH, ch.salt, 1)
    assert reverts_with(call, hub.abi, {"from": ch.payer.address, "value": 1}).name == "ChannelHubChannelExists"
    send(w3, hub.functions.closeByPayee(ch.id, 0, b""), ch.payee)
    assert reverts_with(call, hub.abi, {"from": ch.payer.address, "value": 1}).name == "ChannelHubChannelExists"


def test_deposit_above_max_is_refused(
    w3: Web3, hub: Contract, token: Contract, open_channel: OpenChannel, accounts: list[LocalAccount]
) -> None:
    payer = accounts[1]
    too_much = 2**104
    send(w3, token.functions.mint(payer.address, too_much * 2), payer.address)
    send(w3, token.functions.approve(hub.address, too_much * 2), payer.address)
    revert = reverts_with(
        hub.functions.open(accounts[2].address, token.address, salt_of(1), too_much), hub.abi, {"from": payer.address}
    )
    assert (revert.name, revert.args) == ("ChannelHubDepositTooLarge", (too_much,))
    ch = open_channel(payer, accounts[2].address, token, 2**104 - 1)
    send(w3, token.functions.approve(hub.address, 1), payer.address)
    revert = reverts_with(hub.functions.topUp(ch.id, 1), hub.abi, {"from": payer.address})
    assert (revert.name, revert.args) == ("ChannelHubDepositTooLarge", (too_much,))


def test_top_up(w3: Web3, hub: Contract, open_channel: OpenChannel, accounts: list[LocalAccount]) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=100)
    receipt = send(w3, hub.functions.topUp(ch.id, 50), accounts[3].address, value=50)  # anyone may fund
    assert events(hub, receipt, "ChannelToppedUp") == [{"channelId": ch.id, "amount": 50, "deposit": 150}]
    assert money_and_status(hub, ch.id).deposit == 150


def test_top_up_errors(w3: Web3, hub: Contract, open_channel: OpenChannel, accounts: list[LocalAccount]) -> None:
    sender = {"from": accounts[1].address, "value": 1}
    assert reverts_with(hub.functions.topUp(b"\x01" * 32, 1), hub.abi, sender).name == "ChannelHubUnknownChannel"
    ch = open_channel(accounts[1], accounts[2].address, amount=100)
    assert reverts_with(hub.functions.topUp(ch.id, 0), hub.abi, sender | {"value": 0}).name == "ChannelHubZeroAmount"
    send(w3, hub.functions.requestClose(ch.id), ch.payer.address)
    assert reverts_with(hub.functions.topUp(ch.id, 1), hub.abi, sender).name == "ChannelHubChannelNotOpen"


def test_open_and_top_up_from_balance(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    payer, earner, third = accounts[1], accounts[2], accounts[3].address
    ch = open_channel(payer, earner.address, amount=1000)
    settle(w3, hub, batch(earner.address, ETH, ch.voucher(600, sign(payer, ch.id, 600))))
    assert hub.functions.balanceOf(earner.address, ETH).call() == 600
    # the payee spends its earnings on a channel of its own, no withdraw/deposit round trip
    send(w3, hub.functions.openFromBalance(third, ETH, salt_of(1), 400), earner.address)
    own = channel_id(earner.address, third, ETH, salt_of(1))
    assert money_and_status(hub, own) == (400, 0, 0, ChannelStatus.OPEN)
    send(w3, hub.functions.topUpFromBalance(own, 150), earner.address)
    assert money_and_status(hub, own).deposit == 550
    assert hub.functions.balanceOf(earner.address, ETH).call() == 50
    revert = reverts_with(hub.functions.topUpFromBalance(own, 51), hub.abi, {"from": earner.address})
    assert (revert.name, revert.args) == ("ChannelHubInsufficientBalance", (ETH, 50, 51))
    revert = reverts_with(hub.functions.openFromBalance(third, ETH, salt_of(2), 51), hub.abi, {"from": earner.address})
    assert revert.name == "ChannelHubInsufficientBalance"
    assert w3.eth.get_balance(hub.address) == 1000


# --------------------------------------------------------------------------------------------------------------------
# Settlement
# --------------------------------------------------------------------------------------------------------------------


def test_settle_credits_increments_once(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    payer, payee = accounts[1], accounts[2].address
    ch = open_channel(payer, payee, amount=1000)
    first = batch(payee, ETH, ch.voucher(100, sign(payer, ch.id, 100)))
    receipt = settle(w3, hub, first)
    assert events(hub, receipt, "ChannelsSettled") == [
        {"payee": payee, "token": ETH, "credited": 100, "settlements": record(ch.id, 100)}
    ]
    receipt = settle(w3, hub, batch(payee, ETH, ch.voucher(350, sign(payer, ch.id, 350))))
    assert events(hub, receipt, "ChannelsSettled")[0]["credited"] == 250
    receipt = settle(w3, hub, first)  # re-sending an old batch is harmless
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": ch.id, "reason": SKIP["NotAboveSettled"]}]
    assert events(hub, receipt, "ChannelsSettled") == []
    assert hub.functions.balanceOf(payee, ETH).call() == 350
    money = money_and_status(hub, ch.id)
    assert (money.deposit, money.settled) == (1000, 350)


def test_settle_is_callable_by_anyone_and_pays_only_the_payee(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    payer, payee, stranger = accounts[1], accounts[2].address, accounts[9].address
    ch = open_channel(payer, payee, amount=1000)
    settle(w3, hub, batch(payee, ETH, ch.voucher(10, sign(payer, ch.id, 10))), sender=stranger)
    assert hub.functions.balanceOf(payee, ETH).call() == 10
    assert hub.functions.balanceOf(stranger, ETH).call() == 0
    # claiming the channel for another payee names another channel id, which does not exist: nobody credited
    receipt = settle(w3, hub, batch(stranger, ETH, ch.voucher(20, sign(payer, ch.id, 20))), sender=stranger)
    claimed = channel_id(payer.address, stranger, ETH, ch.salt)
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": claimed, "reason": SKIP["UnknownChannel"]}]
    assert hub.functions.balanceOf(stranger, ETH).call() == 0
    assert money_and_status(hub, ch.id).settled == 10


def test_mixed_batch_settles_the_valid_entries(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, token: Contract, accounts: list[LocalAccount]
) -> None:
    payer, payee, other_payee = accounts[1], accounts[2].address, accounts[3].address
    good = [open_channel(payer, payee, amount=1000) for _ in range(3)]
    over = open_channel(payer, payee, amount=10)
    unknown = channel_id(payer.address, payee, ETH, salt_of(777))
    tok = open_channel(accounts[4], other_payee, token, 500)
    vouchers = [
        good[0].voucher(5, sign(payer, good[0].id, 5)),
        over.voucher(11, sign(payer, over.id, 11)),  # above deposit
        good[1].voucher(7, sign(accounts[5], good[1].id, 7)),  # wrong signer
        SettleEntry(payer.address, salt_of(777), 1, sign(payer, unknown, 1)),  # unknown channel
        good[2].voucher(9, sign(payer, good[2].id, 9)),
    ]
    receipt = settle(
        w3,
        hub,
        batch(payee, ETH, *vouchers),
        batch(other_payee, token.address, tok.voucher(44, sign(accounts[4], tok.id, 44))),
    )
    skipped = {e["channelId"]: e["reason"] for e in events(hub, receipt, "VoucherSkipped")}
    assert skipped == {
        over.id: SKIP["ExceedsDeposit"],
        good[1].id: SKIP["InvalidSignature"],
        unknown: SKIP["UnknownChannel"],
    }
    assert settled(hub, receipt) == {good[0].id: 5, good[2].id: 9, tok.id: 44}
    assert hub.functions.balanceOf(payee, ETH).call() == 14
    assert hub.functions.balanceOf(other_payee, token.address).call() == 44


def test_amounts_above_104_bits_cannot_be_packed_and_the_largest_is_skipped(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    """Amounts travel in 13 bytes: anything larger could never be within a deposit (MAX_DEPOSIT is 2^104 - 1)."""
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    too_big = ch.voucher(MAX_AMOUNT + 1, sign(ch.payer, ch.id, MAX_AMOUNT + 1))
    with pytest.raises(ValueError, match="104 bits"):
        encode_batch([batch(ch.payee, ETH, too_big)])
    receipt = settle(w3, hub, batch(ch.payee, ETH, ch.voucher(MAX_AMOUNT, sign(ch.payer, ch.id, MAX_AMOUNT))))
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": ch.id, "reason": SKIP["ExceedsDeposit"]}]
    assert money_and_status(hub, ch.id).settled == 0


def test_malformed_batches_revert(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    good = encode_batch([batch(ch.payee, ETH, ch.voucher(10, sign(ch.payer, ch.id, 10)))])
    empty_group = bytes.fromhex(ch.payee[2:]) + bytes(20) + bytes(2)
    cases = {
        "header cut short": (good + good[:41], len(good)),
        "entry cut short": (good[:-1], 0),
        "count above the entries": (good[:40] + (2).to_bytes(2, "big") + good[42:], 0),
        "empty group": (good + empty_group, len(good)),
    }
    for name, (data, offset) in cases.items():
        revert = reverts_with(hub.functions.settleBatch(data), hub.abi, {"from": accounts[0].address})
        assert (revert.name, revert.args) == ("ChannelHubMalformedBatch", (offset,)), name
    assert settle_raw(w3, hub, b"")["status"] == 1  # nothing to settle is not an error
    settle_raw(w3, hub, good + good)  # the same group twice: the second entry is skipped, not reverted
    assert money_and_status(hub, ch.id).settled == 10


def test_settle_exactly_the_deposit(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    settle(w3, hub, batch(ch.payee, ETH, ch.voucher(1000, sign(ch.payer, ch.id, 1000))))
    assert hub.functions.balanceOf(ch.payee, ETH).call() == 1000


# One negative test per signed field: change only that field, the entry is skipped with InvalidSignature.


@pytest.fixture
def eth_channel(open_channel: OpenChannel, accounts: list[LocalAccount]) -> Channel:
    return open_channel(accounts[1], accounts[2].address, amount=1000)


def assert_skipped_invalid(w3: Web3, hub: Contract, ch: Channel, cumulative: int, signature: bytes) -> None:
    """Settle a voucher whose signature is well formed but signs something else: skipped, nothing credited."""
    receipt = settle(w3, hub, batch(ch.payee, ch.token, ch.voucher(cumulative, signature)))
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": ch.id, "reason": SKIP["InvalidSignature"]}]
    assert money_and_status(hub, ch.id).settled == 0


def test_signed_field_chain_id(w3: Web3, hub: Contract, eth_channel: Channel, domain: Domain, sign: Sign) -> None:
    other = Domain(chain_id=domain.chain_id + 1, verifying_contract=domain.verifying_contract)
    assert_skipped_invalid(w3, hub, eth_channel, 10, sign(eth_channel.payer, eth_channel.id, 10, other))


def test_signed_field_contract(w3: Web3, hub: Contract, eth_channel: Channel, domain: Domain, sign: Sign) -> None:
    other = Domain(chain_id=domain.chain_id, verifying_contract="0x" + "11" * 20)
    assert_skipped_invalid(w3, hub, eth_channel, 10, sign(eth_channel.payer, eth_channel.id, 10, other))


def test_signed_field_channel(w3: Web3, hub: Contract, eth_channel: Channel, sign: Sign) -> None:
    assert_skipped_invalid(w3, hub, eth_channel, 10, sign(eth_channel.payer, b"\x01" * 32, 10))


def test_signed_field_amount(w3: Web3, hub: Contract, eth_channel: Channel, sign: Sign) -> None:
    assert_skipped_invalid(w3, hub, eth_channel, 11, sign(eth_channel.payer, eth_channel.id, 10))


TOP_BIT = 1 << 255


def _int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _word(n: int) -> bytes:
    return n.to_bytes(32, "big")


@pytest.mark.parametrize(
    "mutation",
    [
        # s -> n - s (the malleable twin): its top bit is set, so it reads as the other parity and another s
        pytest.param(lambda r, vs: (r, _word(SECP256K1_N - (_int(vs) & (TOP_BIT - 1)))), id="s->n-s"),
        # high s with the original parity bit: OpenZeppelin refuses s > n/2
        pytest.param(lambda r, vs: (r, _word(((SECP256K1_N - 1) & (TOP_BIT - 1)) | (_int(vs) & TOP_BIT))), id="high-s"),
        pytest.param(lambda r, vs: (r, _word(_int(vs) ^ TOP_BIT)), id="v-parity-flipped"),
        pytest.param(lambda r, vs: (_word(0), _word(0)), id="zero-recovers-address0"),
        pytest.param(lambda r, vs: (_word(SECP256K1_N + 1), vs), id="r-not-on-curve"),
        pytest.param(lambda r, vs: (vs, r), id="garbage"),
    ],
)
def test_signed_field_signature(
    w3: Web3, hub: Contract, eth_channel: Channel, sign: Sign, mutation: Callable[[bytes, bytes], tuple[bytes, bytes]]
) -> None:
    ch = eth_channel
    r, vs = to_compact(sign(ch.payer, ch.id, 10))
    header = group_header(ch.payee, ch.token, 1)
    receipt = settle_raw(w3, hub, header + packed_entry(ch.payer.address, ch.salt, 10, *mutation(r, vs)))
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": ch.id, "reason": SKIP["InvalidSignature"]}]
    assert money_and_status(hub, ch.id).settled == 0
    settle_raw(w3, hub, header + packed_entry(ch.payer.address, ch.salt, 10, r, vs))  # the unmutated one settles
    assert money_and_status(hub, ch.id).settled == 10


def _tweak(word: bytes, kind: str, bit: int, noise: bytes) -> bytes:
    n = _int(word)
    if kind == "flip":
        return _word(n ^ (1 << bit))
    if kind == "negate-s":  # keeps the parity bit, s -> n - s
        return _word((n & TOP_BIT) | ((SECP256K1_N - (n & (TOP_BIT - 1))) % 2**255))
    if kind == "random":
        return noise
    return word


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(target="r", kind="none", bit=0, noise=bytes(32))  # the payer's own signature: both accept it
@example(target="vs", kind="flip", bit=255, noise=bytes(32))  # the other parity: both refuse it
@given(
    target=st.sampled_from(["r", "vs"]),
    kind=st.sampled_from(["none", "flip", "negate-s", "random"]),
    bit=st.integers(min_value=0, max_value=255),
    noise=st.binary(min_size=32, max_size=32),
)
def test_inlined_recovery_agrees_with_openzeppelin(
    w3: Web3, hub: Contract, eth_channel: Channel, sign: Sign, target: str, kind: str, bit: int, noise: bytes
) -> None:
    """settleBatch recovers signers in assembly; closeByPayee through OpenZeppelin's ECDSA. Same verdict, always."""
    ch = eth_channel
    r, vs = to_compact(sign(ch.payer, ch.id, 10))
    if target == "r":
        r = _tweak(r, kind, bit, noise)
    else:
        vs = _tweak(vs, kind, bit, noise)
    s_value, parity = _int(vs) & (TOP_BIT - 1), _int(vs) >> 255
    openzeppelin_accepts = True
    try:
        hub.functions.closeByPayee(ch.id, 10, r + _word(s_value) + bytes((27 + parity,))).call({"from": ch.payee})
    except ContractCustomError:
        openzeppelin_accepts = False
    assert openzeppelin_accepts or kind != "none"  # the untouched signature is the payer's: never refused
    snapshot = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    try:
        settle_raw(w3, hub, group_header(ch.payee, ch.token, 1) + packed_entry(ch.payer.address, ch.salt, 10, r, vs))
        assert (money_and_status(hub, ch.id).settled == 10) == openzeppelin_accepts
    finally:
        w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])


@pytest.mark.parametrize(
    "mutation", [*REFUSED_FORMS, pytest.param(lambda sig: sig[:64] + bytes((55 - sig[64],)), id="v=27<->28")]
)
def test_close_by_payee_signature_forms(
    w3: Web3, hub: Contract, eth_channel: Channel, sign: Sign, mutation: Callable[[bytes], bytes]
) -> None:
    ch = eth_channel
    good = sign(ch.payer, ch.id, 10)
    assert good[64] in (27, 28)
    revert = reverts_with(hub.functions.closeByPayee(ch.id, 10, mutation(good)), hub.abi, {"from": ch.payee})
    assert (revert.name, revert.args) == ("ChannelHubInvalidSignature", (ch.id,))
    send(w3, hub.functions.closeByPayee(ch.id, 10, good), ch.payee)
    money = money_and_status(hub, ch.id)
    assert (money.settled, money.close_deadline, money.status) == (10, 0, ChannelStatus.CLOSED)


def test_wrong_payer_salt_or_token_names_no_channel(
    w3: Web3, hub: Contract, eth_channel: Channel, sign: Sign, token: Contract, accounts: list[LocalAccount]
) -> None:
    """The entry names its channel by (payer, salt) within the group's (payee, token): change any, no channel."""
    ch = eth_channel
    sig = sign(ch.payer, ch.id, 10)
    wrong = [
        (ETH, SettleEntry(ch.payer.address, salt_of(999), 10, sig)),
        (ETH, SettleEntry(accounts[5].address, ch.salt, 10, sig)),
        (token.address, ch.voucher(10, sig)),
    ]
    receipt = settle(w3, hub, *(batch(ch.payee, asset, e) for asset, e in wrong))
    expected = [channel_id(e.payer, ch.payee, asset, e.salt) for asset, e in wrong]
    skipped = events(hub, receipt, "VoucherSkipped")
    assert skipped == [{"channelId": cid, "reason": SKIP["UnknownChannel"]} for cid in expected]
    assert money_and_status(hub, ch.id).settled == 0
    assert hub.functions.balanceOf(ch.payee, token.address).call() == 0


def test_vouchers_from_another_chain_do_not_settle(accounts: list[LocalAccount], sign: Sign) -> None:
    """A hub deployed on an anvil with another chain id refuses vouchers signed for this chain."""
    from settlement.chain.node import connect
    from settlement.devtools.devnet import Devnet
    from tests.hub_helpers import devnet_settings

    with Devnet(devnet_settings(devnet_chain_id=4242)) as other_net:
        other = connect(other_net.url)
        artifact = load_artifact(HUB)
        tx = (
            other.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
            .constructor(600)
            .transact({"from": other_net.accounts[0].address})
        )
        hub = cast(
            Contract,
            other.eth.contract(address=other.eth.wait_for_transaction_receipt(tx)["contractAddress"], abi=artifact.abi),
        )
        payer, payee = other_net.accounts[1], other_net.accounts[2].address
        send(other, hub.functions.open(payee, ETH, salt_of(1), 100), payer.address, value=100)
        cid = channel_id(payer.address, payee, ETH, salt_of(1))
        this_chain = Domain(chain_id=31337, verifying_contract=hub.address)
        right_chain = Domain(chain_id=4242, verifying_contract=hub.address)
        wrong = SettleEntry(payer.address, salt_of(1), 10, sign(payer, cid, 10, this_chain))
        receipt = settle(other, hub, batch(payee, ETH, wrong))
        assert events(hub, receipt, "VoucherSkipped") == [{"channelId": cid, "reason": SKIP["InvalidSignature"]}]
        right = SettleEntry(payer.address, salt_of(1), 10, sign(payer, cid, 10, right_chain))
        settle(other, hub, batch(payee, ETH, right))
        assert hub.functions.balanceOf(payee, ETH).call() == 10


# --------------------------------------------------------------------------------------------------------------------
# Closing
# --------------------------------------------------------------------------------------------------------------------


def test_close_with_challenge_period(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    revert = reverts_with(hub.functions.requestClose(ch.id), hub.abi, {"from": ch.payee})
    assert (revert.name, revert.args) == ("ChannelHubNotPayer", (ch.id, ch.payee))
    receipt = send(w3, hub.functions.requestClose(ch.id), ch.payer.address)
    deadline = w3.eth.get_block(receipt["blockNumber"])["timestamp"] + 3600
    assert events(hub, receipt, "CloseRequested") == [{"channelId": ch.id, "deadline": deadline}]
    money = money_and_status(hub, ch.id)
    assert (money.close_deadline, money.status) == (deadline, ChannelStatus.CLOSING)
    assert reverts_with(hub.functions.requestClose(ch.id), hub.abi, {"from": ch.payer.address}).name == (
        "ChannelHubChannelNotOpen"
    )
    # vouchers still settle during the challenge period
    settle(w3, hub, batch(ch.payee, ETH, ch.voucher(300, sign(ch.payer, ch.id, 300))))
    revert = reverts_with(hub.functions.finalizeClose(ch.id), hub.abi, {"from": ch.payer.address})
    assert (revert.name, revert.args) == ("ChannelHubChallengeNotOver", (ch.id, deadline))
    time_travel(w3, 3601)
    receipt = settle(w3, hub, batch(ch.payee, ETH, ch.voucher(400, sign(ch.payer, ch.id, 400))))
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": ch.id, "reason": SKIP["ChallengeExpired"]}]
    receipt = send(w3, hub.functions.finalizeClose(ch.id), accounts[9].address)  # anyone; refund goes to payer
    assert events(hub, receipt, "ChannelClosed") == [{"channelId": ch.id, "settled": 300, "refund": 700}]
    assert hub.functions.balanceOf(ch.payer.address, ETH).call() == 700
    assert hub.functions.balanceOf(accounts[9].address, ETH).call() == 0
    assert money_and_status(hub, ch.id).status == ChannelStatus.CLOSED
    assert reverts_with(hub.functions.finalizeClose(ch.id), hub.abi, {"from": ch.payer.address}).name == (
        "ChannelHubChannelClosed"
    )
    receipt = settle(w3, hub, batch(ch.payee, ETH, ch.voucher(500, sign(ch.payer, ch.id, 500))))
    assert events(hub, receipt, "VoucherSkipped") == [{"channelId": ch.id, "reason": SKIP["ChannelClosed"]}]


def test_settle_at_the_deadline_and_one_second_after(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    receipt = send(w3, hub.functions.requestClose(ch.id), ch.payer.address)
    deadline = events(hub, receipt, "CloseRequested")[0]["deadline"]
    w3.provider.make_request(RPCEndpoint("evm_setNextBlockTimestamp"), [deadline])
    receipt = settle(w3, hub, batch(ch.payee, ETH, ch.voucher(100, sign(ch.payer, ch.id, 100))))
    assert settled(hub, receipt) == {ch.id: 100}
    w3.provider.make_request(RPCEndpoint("evm_setNextBlockTimestamp"), [deadline + 1])
    receipt = settle(w3, hub, batch(ch.payee, ETH, ch.voucher(200, sign(ch.payer, ch.id, 200))))
    assert events(hub, receipt, "VoucherSkipped")[0]["reason"] == SKIP["ChallengeExpired"]


@pytest.mark.parametrize("close_first", [True, False], ids=["close-then-settle", "settle-then-close"])
def test_a_payer_racing_the_settlement_with_request_close(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount], close_first: bool
) -> None:
    """requestClose and the payee's settlement land in the same block, in either order: the payee is paid the
    voucher and the payer gets back only the rest, after the challenge period."""
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    close = hub.functions.requestClose(ch.id)
    payout = settle_call(hub, batch(ch.payee, ETH, ch.voucher(300, sign(ch.payer, ch.id, 300))))
    first, second = (
        ((close, ch.payer.address), (payout, ch.payee))
        if close_first
        else ((payout, ch.payee), (close, ch.payer.address))
    )
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        hashes = [
            call.transact(
                {
                    "from": Web3.to_checksum_address(sender),
                    "gas": 500_000,
                    "maxPriorityFeePerGas": Wei(tip),
                    "maxFeePerGas": Wei(10**11),
                }
            )
            for (call, sender), tip in ((first, 2 * 10**9), (second, 10**9))  # the higher tip goes first
        ]
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    finally:
        w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
    receipts = [w3.eth.get_transaction_receipt(h) for h in hashes]
    assert [r["status"] for r in receipts] == [1, 1]
    assert receipts[0]["blockNumber"] == receipts[1]["blockNumber"]
    assert [r["transactionIndex"] for r in receipts] == [0, 1]
    money = money_and_status(hub, ch.id)
    assert (money.settled, money.status) == (300, ChannelStatus.CLOSING)
    assert hub.functions.balanceOf(ch.payee, ETH).call() == 300
    time_travel(w3, 3601)
    send(w3, hub.functions.finalizeClose(ch.id), ch.payer.address)
    assert hub.functions.balanceOf(ch.payer.address, ETH).call() == 700


def test_finalize_errors(w3: Web3, hub: Contract, open_channel: OpenChannel, accounts: list[LocalAccount]) -> None:
    tx = {"from": accounts[1].address}
    assert reverts_with(hub.functions.finalizeClose(b"\x05" * 32), hub.abi, tx).name == "ChannelHubUnknownChannel"
    ch = open_channel(accounts[1], accounts[2].address, amount=10)
    revert = reverts_with(hub.functions.finalizeClose(ch.id), hub.abi, tx)
    assert (revert.name, revert.args) == ("ChannelHubChannelNotClosing", (ch.id,))  # open: requestClose first
    assert reverts_with(hub.functions.requestClose(b"\x05" * 32), hub.abi, tx).name == "ChannelHubUnknownChannel"


def test_close_by_payee_with_final_voucher(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    settle(w3, hub, batch(ch.payee, ETH, ch.voucher(100, sign(ch.payer, ch.id, 100))))
    sig = sign(ch.payer, ch.id, 640)
    revert = reverts_with(hub.functions.closeByPayee(ch.id, 640, sig), hub.abi, {"from": ch.payer.address})
    assert (revert.name, revert.args) == ("ChannelHubNotPayee", (ch.id, ch.payer.address))
    receipt = send(w3, hub.functions.closeByPayee(ch.id, 640, sig), ch.payee)
    assert events(hub, receipt, "ChannelsSettled") == [
        {"payee": ch.payee, "token": ETH, "credited": 540, "settlements": record(ch.id, 640)}
    ]
    assert events(hub, receipt, "ChannelClosed") == [{"channelId": ch.id, "settled": 640, "refund": 360}]
    assert hub.functions.balanceOf(ch.payee, ETH).call() == 640
    assert hub.functions.balanceOf(ch.payer.address, ETH).call() == 360
    revert = reverts_with(hub.functions.closeByPayee(ch.id, 0, b""), hub.abi, {"from": ch.payee})
    assert revert.name == "ChannelHubChannelClosed"


def test_close_by_payee_errors(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    ch = open_channel(accounts[1], accounts[2].address, amount=1000)
    tx = {"from": ch.payee}
    revert = reverts_with(hub.functions.closeByPayee(ch.id, 1001, sign(ch.payer, ch.id, 1001)), hub.abi, tx)
    assert (revert.name, revert.args) == ("ChannelHubExceedsDeposit", (ch.id, 1001, 1000))
    revert = reverts_with(hub.functions.closeByPayee(ch.id, 10, sign(accounts[5], ch.id, 10)), hub.abi, tx)
    assert (revert.name, revert.args) == ("ChannelHubInvalidSignature", (ch.id,))
    revert = reverts_with(hub.functions.closeByPayee(b"\x09" * 32, 0, b""), hub.abi, tx)
    assert revert.name == "ChannelHubUnknownChannel"
    send(w3, hub.functions.requestClose(ch.id), ch.payer.address)
    time_travel(w3, 3601)
    revert = reverts_with(hub.functions.closeByPayee(ch.id, 10, sign(ch.payer, ch.id, 10)), hub.abi, tx)
    assert revert.name == "ChannelHubChallengeExpired"
    receipt = send(w3, hub.functions.closeByPayee(ch.id, 0, b""), ch.payee)  # closing without a voucher still works
    assert events(hub, receipt, "ChannelClosed") == [{"channelId": ch.id, "settled": 0, "refund": 1000}]


# --------------------------------------------------------------------------------------------------------------------
# Withdrawals
# --------------------------------------------------------------------------------------------------------------------


def test_withdraw_eth_and_token(
    w3: Web3, hub: Contract, open_channel: OpenChannel, sign: Sign, token: Contract, accounts: list[LocalAccount]
) -> None:
    payee, dest = accounts[2].address, accounts[7].address
    eth_ch = open_channel(accounts[1], payee, amount=10**18)
    tok_ch = open_channel(accounts[1], payee, token, 5000)
    settle(
        w3,
        hub,
        batch(payee, ETH, eth_ch.voucher(10**17, sign(accounts[1], eth_ch.id, 10**17))),
        batch(payee, token.address, tok_ch.voucher(3000, sign(accounts[1], tok_ch.id, 3000))),
    )
    before = w3.eth.get_balance(dest)
    receipt = send(w3, hub.functions.withdraw(ETH, 4 * 10**16, dest), payee)
    assert events(hub, receipt, "Withdrawn") == [{"account": payee, "token": ETH, "to": dest, "amount": 4 * 10**16}]
    assert w3.eth.get_balance(dest) == before + 4 * 10**16
    send(w3, hub.functions.withdraw(token.address, 3000, payee), payee)
    assert token.functions.balanceOf(payee).call() == 3000
    assert hub.functions.balanceOf(payee, token.address).call() == 0
    revert = reverts_with(hub.functions.withdraw(token.address, 1, payee), hub.abi, {"from": payee})
    assert (revert.name, revert.args) == ("ChannelHubInsufficientBalance", (token.address, 0, 1))
    assert reverts_with(hub.functions.withdraw(ETH, 1, ETH), hub.abi, {"from": payee}).name == (
        "ChannelHubInvalidRecipient"
    )
    # a withdrawal of nothing used to succeed and log a Withdrawn event of 0
    assert reverts_with(hub.functions.withdraw(ETH, 0, payee), hub.abi, {"from": payee}).name == "ChannelHubZeroAmount"


def test_withdraw_to_a_contract_that_rejects_eth(
    w3: Web3,
    hub: Contract,
    open_channel: OpenChannel,
    sign: Sign,
    deploy: Callable[..., Contract],
    accounts: list[LocalAccount],
) -> None:
    rejecter = deploy("EthRejecter")
    ch = open_channel(accounts[1], accounts[2].address, amount=100)
    settle(w3, hub, batch(ch.payee, ETH, ch.voucher(100, sign(ch.payer, ch.id, 100))))
    revert = reverts_with(hub.functions.withdraw(ETH, 100, rejecter.address), hub.abi, {"from": ch.payee})
    assert (revert.name, revert.args) == ("ChannelHubEthTransferFailed", (rejecter.address, 100))
    assert hub.functions.balanceOf(ch.payee, ETH).call() == 100  # nothing lost
