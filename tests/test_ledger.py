"""The acceptance rules alone: no chain, no store. Each rule, its error code, and the order the rules apply in."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from settlement.domain.ledger import ANY, Cap, Rules, Verdict, judge
from settlement.domain.model import ETH, MAX_UINT256, Address, Channel, ChannelId, ChannelStatus, Receipt, Voucher
from settlement.errors import (
    AmountExceedsDepositError,
    AmountOutOfRangeError,
    ChannelClosedError,
    ChannelNotFoundError,
    ChannelSuspendedError,
    ExistsWithDifferentMetadataError,
    IdempotencyKeyReusedError,
    InvalidSignatureError,
    OverpaymentError,
    SettlementError,
    StaleVoucherError,
    UnderpaymentError,
    VoucherRejectedError,
)

PAYER = Address("0x" + "a1" * 20)
SIGNER = bytes.fromhex("a1" * 20)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CID = ChannelId("0x" + "cd" * 32)


def channel(**changes: object) -> Channel:
    base = Channel(
        channel_id=CID,
        payer=PAYER,
        payee=Address("0x" + "b2" * 20),
        token=ETH,
        salt="0x" + "00" * 32,
        deposit=1_000,
        settled=0,
        status=ChannelStatus.OPEN,
        close_deadline=None,
        as_of_block=10,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def voucher(cumulative: int) -> Voucher:
    return Voucher(CID, cumulative, b"\x01" * 65, "ref")


def run(
    ch: Channel | None, cumulative: int, signer: bytes | None = SIGNER, prior: Receipt | None = None, guard: int = 60
):
    return judge(ch, voucher(cumulative), signer, prior=prior, now=NOW, close_guard=guard)


def test_new_voucher_pays_the_increment_above_the_floor() -> None:
    verdict = run(channel(accepted=100, signature=b"s"), 250)
    assert verdict.new
    assert (verdict.receipt.increment, verdict.receipt.remaining, verdict.receipt.accepted_at) == (150, 750, NOW)
    assert verdict.receipt.reference == "ref"


def test_settled_on_chain_above_accepted_raises_the_floor() -> None:
    verdict = run(channel(accepted=100, signature=b"s", settled=200), 250)
    assert verdict.receipt.increment == 50
    with pytest.raises(StaleVoucherError):
        run(channel(accepted=100, signature=b"s", settled=200), 150)


@pytest.mark.parametrize(
    ("ch", "cumulative", "signer", "error", "status", "code"),
    [
        (None, 5, SIGNER, ChannelNotFoundError, 404, "channel_not_found"),
        (channel(), 5, None, InvalidSignatureError, 400, "invalid_signature"),
        (channel(), 5, b"\x02" * 20, InvalidSignatureError, 400, "invalid_signature"),
        (channel(suspended_reason="reorg"), 5, SIGNER, ChannelSuspendedError, 409, "channel_suspended"),
        (channel(status=ChannelStatus.CLOSED), 5, SIGNER, ChannelClosedError, 409, "channel_closed"),
        (
            channel(status=ChannelStatus.CLOSING, close_deadline=int(NOW.timestamp()) + 59),
            5,
            SIGNER,
            ChannelClosedError,
            409,
            "channel_closed",
        ),
        (channel(), 0, SIGNER, AmountOutOfRangeError, 400, "amount_out_of_range"),
        (channel(), MAX_UINT256 + 1, SIGNER, AmountOutOfRangeError, 400, "amount_out_of_range"),
        (channel(accepted=7, signature=b"s"), 7, SIGNER, StaleVoucherError, 409, "stale_voucher"),
        (channel(accepted=7, signature=b"s"), 3, SIGNER, StaleVoucherError, 409, "stale_voucher"),
        (channel(), 1_001, SIGNER, AmountExceedsDepositError, 409, "amount_exceeds_deposit"),
    ],
)
def test_each_rule_has_its_code(
    ch: Channel | None, cumulative: int, signer: bytes | None, error: type[SettlementError], status: int, code: str
) -> None:
    with pytest.raises(error) as info:
        run(ch, cumulative, signer)
    assert (info.value.status, info.value.code) == (status, code)


def test_closing_channel_accepts_while_the_guard_allows() -> None:
    deadline = int((NOW + timedelta(seconds=61)).timestamp())
    assert run(channel(status=ChannelStatus.CLOSING, close_deadline=deadline), 5).new


def test_the_close_guard_counts_from_the_chains_clock_where_it_is_ahead() -> None:
    """The hub judges a deadline by its blocks' times: a chain whose clock runs ahead of ours (a sequencer's stamps)
    has less time left than our clock says, and the guard counts from the later of the two."""
    closing = channel(status=ChannelStatus.CLOSING, close_deadline=int(NOW.timestamp()) + 1_000)
    ours = int(NOW.timestamp())
    for chain_time, accepted in ((0, True), (ours - 3_600, True), (ours + 939, True), (ours + 941, False)):
        if accepted:
            assert judge(closing, voucher(5), SIGNER, prior=None, now=NOW, close_guard=60, chain_time=chain_time).new
        else:
            with pytest.raises(ChannelClosedError, match="ends in 59 s"):
                judge(closing, voucher(5), SIGNER, prior=None, now=NOW, close_guard=60, chain_time=chain_time)


def test_a_resend_wins_over_every_later_state_but_not_over_a_bad_signature() -> None:
    prior = Receipt(CID, 5, 5, 995, NOW - timedelta(hours=1), "ref")
    closed = channel(status=ChannelStatus.CLOSED, accepted=9, signature=b"s", suspended_reason="reorg")
    verdict = run(closed, 5, prior=prior)
    assert (verdict.new, verdict.receipt) == (False, prior)
    with pytest.raises(InvalidSignatureError):
        run(closed, 5, signer=b"\x03" * 20, prior=prior)


def test_a_resend_with_other_metadata_is_reported_and_one_without_asserts_nothing() -> None:
    """The reference and the key are not signed: whoever submits a voucher first sets them. The payer's own
    submission must learn that, not get 200 carrying someone else's reference."""
    prior = Receipt(CID, 5, 5, 995, NOW - timedelta(hours=1), "attacker", "k-1")
    ch = channel(accepted=5, signature=b"s")
    with pytest.raises(ExistsWithDifferentMetadataError) as info:
        run(ch, 5, prior=prior)  # voucher() carries reference "ref"
    assert cast(dict[str, Any], info.value.body()["receipt"])["reference"] == "attacker"
    bare = Voucher(CID, 5, b"\x01" * 65)
    assert judge(ch, bare, SIGNER, prior=prior, now=NOW, close_guard=60) == Verdict(prior, new=False)
    other_key = Voucher(CID, 5, b"\x01" * 65, "attacker", "k-2")
    with pytest.raises(ExistsWithDifferentMetadataError):
        judge(ch, other_key, SIGNER, prior=prior, now=NOW, close_guard=60)


def test_a_key_that_paid_answers_its_retry_and_refuses_another_amount() -> None:
    """A retry signed from a re-read position carries a higher cumulative amount for the same payment."""
    keyed = Receipt(CID, 100, 40, 900, NOW - timedelta(seconds=5), None, "pay-7")
    ch = channel(accepted=100, signature=b"s")
    retry = Voucher(CID, 140, b"\x01" * 65, None, "pay-7")  # 40 more than the floor: the same amount
    assert judge(ch, retry, SIGNER, prior=None, keyed=keyed, now=NOW, close_guard=60) == Verdict(keyed, new=False)
    other = Voucher(CID, 150, b"\x01" * 65, None, "pay-7")
    with pytest.raises(IdempotencyKeyReusedError) as info:
        judge(ch, other, SIGNER, prior=None, keyed=keyed, now=NOW, close_guard=60)
    assert cast(dict[str, Any], info.value.body()["receipt"])["cumulativeAmount"] == "100"


def test_stale_error_carries_the_current_value() -> None:
    with pytest.raises(StaleVoucherError) as info:
        run(channel(accepted=70, signature=b"s"), 60)
    assert info.value.body()["currentCumulativeAmount"] == "70"


@example(deposit=1_000, accepted=100, settled=50, cumulative=600)  # accepted: 500 over the floor of 100
@example(deposit=1_000, accepted=100, settled=300, cumulative=300)  # stale: the chain's settle raised the floor
@example(deposit=1_000, accepted=0, settled=0, cumulative=1_001)  # past the deposit
@example(deposit=1_000, accepted=0, settled=0, cumulative=0)  # no amount at all
@given(
    deposit=st.integers(0, MAX_UINT256),
    accepted=st.integers(0, MAX_UINT256),
    settled=st.integers(0, MAX_UINT256),
    cumulative=st.integers(-5, MAX_UINT256 + 5),
)
def test_accepted_vouchers_never_pay_past_the_deposit_nor_twice(
    deposit: int, accepted: int, settled: int, cumulative: int
) -> None:
    """Each voucher gets exactly the verdict the rules give, from a model of them: the exact refusal, or the exact
    increment over the floor and what remains of the deposit."""
    ch = channel(
        deposit=deposit, accepted=accepted, settled=min(settled, deposit), signature=b"s" if accepted else None
    )
    floor = max(accepted, min(settled, deposit))
    refusal: type[VoucherRejectedError] | None = None
    if not 0 < cumulative <= MAX_UINT256:
        refusal = AmountOutOfRangeError
    elif cumulative <= floor:
        refusal = StaleVoucherError
    elif cumulative > deposit:
        refusal = AmountExceedsDepositError
    if refusal is not None:
        with pytest.raises(VoucherRejectedError) as info:
            run(ch, cumulative)
        assert type(info.value) is refusal
        return
    verdict = run(ch, cumulative)
    assert (verdict.new, verdict.receipt.increment, verdict.receipt.remaining) == (
        True,
        cumulative - floor,
        deposit - cumulative,
    )


def test_a_priced_voucher_pays_exactly_its_price_over_the_position() -> None:
    """x402: a voucher answers one price; from a moved position it would pay less (underpayment) or more
    (overpayment, a position the service never accepted), and both are refused with the position to resync to."""
    at = channel(accepted=40, signature=b"\x02" * 65)
    priced = replace(voucher(50), price=10)
    verdict = judge(at, priced, SIGNER, prior=None, now=NOW, close_guard=60)
    assert (verdict.new, verdict.receipt.increment) == (True, 10)
    for cumulative, error in ((49, UnderpaymentError), (51, OverpaymentError)):
        with pytest.raises(error) as info:
            judge(at, replace(voucher(cumulative), price=10), SIGNER, prior=None, now=NOW, close_guard=60)
        assert info.value.details == {"currentCumulativeAmount": "40", "price": "10"}
    with pytest.raises(StaleVoucherError):  # not above the position at all: stale, as any voucher
        judge(at, replace(voucher(40), price=10), SIGNER, prior=None, now=NOW, close_guard=60)


def test_with_voucher_keeps_every_other_fact_of_the_channel() -> None:
    """The writer's fast copy names every field by position: a field added to Channel must be carried over too."""
    full = {f.name: getattr(channel(), f.name) for f in fields(Channel)}
    distinct = {
        **full,
        "close_deadline": 99,
        "as_of_log": 4,
        "accepted": 5,
        "signature": b"\x02" * 65,
        "suspended_reason": "held",
        "stopped_at_us": 1_700_000_000_000_000,
        "status": ChannelStatus.CLOSING,
        "settled": 3,
    }
    assert set(distinct) == {f.name for f in fields(Channel)} and None not in distinct.values()
    before = Channel(**distinct)
    assert before.with_voucher(7, b"\x03" * 65) == replace(before, accepted=7, signature=b"\x03" * 65)


def covers(cap: Cap, ch: Channel) -> bool:
    """What a cap covers, by definition (docs/security.md#spending-caps): the index must find exactly these."""
    return cap.token == ch.token and cap.payee in (ANY, ch.payee) and cap.payer in (ANY, ch.payer)


def test_the_caps_covering_a_channel_are_found_by_index_exactly_as_defined() -> None:
    """Every combination of payee, payer (each exact, another, or ANY) and token: the indexed look-up finds exactly
    the caps whose definition covers the channel (4 of the 27 here, for each of the three channels)."""
    parties = {"payee": ("0x" + "b2" * 20, "0x" + "b3" * 20, ANY), "payer": (PAYER, "0x" + "a2" * 20, ANY)}
    caps = tuple(
        Cap(n, payee, payer, token, 10, 60)
        for n, (payee, payer, token) in enumerate(
            (payee, payer, token)
            for payee in parties["payee"]
            for payer in parties["payer"]
            for token in (ETH, "0x" + "70" * 20, "0x" + "71" * 20)
        )
    )
    rules = Rules(caps=caps)
    for token in (ETH, "0x" + "70" * 20, "0x" + "71" * 20):
        ch = channel(token=token)
        found = sorted(c.cap_id for c in rules.covering(ch))
        assert found == sorted(c.cap_id for c in caps if covers(c, ch)) and len(found) == 4
