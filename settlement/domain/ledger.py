"""The acceptance rules for vouchers: pure functions of the channel as stored, the voucher and its recovered signer.

The ingest pipeline calls `judge` inside the store transaction that holds the channel's row lock, so the state it
judges against is the state it writes over. The order of the checks is part of the API (docs/api.md): the channel
must exist; an amount no voucher can carry is refused next; then the voucher is matched to its signer (so an invalid
signature is never reported as anything else); then it is deduplicated on its signed content, then on its
idempotency key; then it is held to the channel's status and amounts.

The idempotency key names a payment, not a voucher: a client that lost the answer may sign its retry from a position
it re-read, so the retry can carry another cumulative amount for the same payment. The key's first payment on the
channel answers it (200, nothing charged) when the retry asks for the same amount; another amount under the same key
is refused. A re-send of an accepted voucher that carries other unsigned metadata (reference, key) than was stored is
reported, never silently answered with the first submitter's metadata; a re-send that leaves a field out asserts
nothing about it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from settlement.domain.model import MAX_UINT256, Channel, ChannelStatus, Receipt, Voucher
from settlement.errors import (
    AmountExceedsDepositError,
    AmountOutOfRangeError,
    ChannelClosedError,
    ChannelHeldError,
    ChannelNotFoundError,
    ChannelSuspendedError,
    ExistsWithDifferentMetadataError,
    IdempotencyKeyReusedError,
    IncrementTooSmallError,
    InvalidSignatureError,
    OverpaymentError,
    SpendingCapError,
    StaleVoucherError,
    UnderpaymentError,
)

SIGNATURE_BYTES = 65  # r (32) | s (32) | v (1), as the hub checks it


ANY = "*"  # a cap's payee or payer that stands for every one


class WindowKey(NamedTuple):
    """One payer's spending in one window of one cap."""

    cap_id: int
    payer: str
    start: int  # unix second the window starts at


@dataclass(frozen=True)
class Cap:
    """At most `amount` base units of `token` a payer may spend on `payee`'s channels in each window of `window`
    seconds (windows start at multiples of it since the epoch: UTC hours, UTC days). `payee` ANY: the operator's cap
    over every payee; `payer` ANY: every payer, each on its own count."""

    cap_id: int
    payee: str
    payer: str
    token: str
    amount: int
    window: int

    def key(self, channel: Channel, now: int) -> WindowKey:
        return WindowKey(self.cap_id, channel.payer, now - now % self.window)


@dataclass(frozen=True)
class Rules:
    """The operator's risk rules (docs/security.md#risk-controls): channels held (id -> reason), the least a voucher
    must add, per asset (dust payments that only fill the store), and spending caps (the operator's and payees')."""

    held: Mapping[str, str] = field(default_factory=dict)
    min_increments: Mapping[str, int] = field(default_factory=dict)
    caps: tuple[Cap, ...] = ()
    _by_parties: dict[tuple[str, str, str], list[Cap]] = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self) -> None:
        for cap in self.caps:  # found by (payee, payer, token), each side exact or ANY: four probes, however many caps
            self._by_parties.setdefault((cap.payee, cap.payer, cap.token), []).append(cap)

    def covering(self, channel: Channel) -> list[Cap]:
        """The caps that cover payments on `channel`."""
        if not self.caps:
            return []
        found: list[Cap] = []
        for payee in (channel.payee, ANY):
            for payer in (channel.payer, ANY):
                found += self._by_parties.get((payee, payer, channel.token), ())
        return found

    def windows(self, channel: Channel, now: int) -> list[WindowKey]:
        """The spending windows a payment on `channel` counts in, at unix second `now`."""
        return [cap.key(channel, now) for cap in self.covering(channel)]

    def check_caps(self, channel: Channel, increment: int, spent: Mapping[WindowKey, int], now: int) -> None:
        """Raise SpendingCapError if paying `increment` on `channel` passes a cap, given what each window holds."""
        for cap in self.covering(channel):
            key = cap.key(channel, now)
            already = spent.get(key, 0)
            if already + increment > cap.amount:
                ends = key.start + cap.window
                raise SpendingCapError(
                    f"payer {channel.payer} may spend {cap.amount} of {cap.token} in {cap.window}s windows "
                    f"({'every payee' if cap.payee == ANY else 'on this payee'}); it spent {already} in this one, "
                    f"and this voucher adds {increment}: retry after the window ends",
                    capAmount=str(cap.amount),
                    windowSeconds=cap.window,
                    spent=str(already),
                    windowEnds=ends,
                    retryAfter=max(1, ends - now),
                )


NO_RULES = Rules()


@dataclass(frozen=True)
class Verdict:
    """An accepted voucher: its receipt, and whether it is new (201) or a re-send of an accepted one (200)."""

    receipt: Receipt
    new: bool


def check_signed(voucher: Voucher, signer: bytes | None, payer: bytes) -> None:
    """Rules 2 and 3 of `judge`: an amount a voucher can carry, signed by the channel's payer. They depend on nothing
    that changes (a channel's payer is hashed into its id), so ingest also applies them before the writer: a flood of
    forged vouchers never reaches the group commit that honest payers wait on."""
    if not 0 < voucher.cumulative <= MAX_UINT256:
        raise AmountOutOfRangeError("cumulativeAmount must be above 0 and below 2^256")
    if len(voucher.signature) != SIGNATURE_BYTES:
        raise InvalidSignatureError(
            f"a voucher's signature is {SIGNATURE_BYTES} bytes (r, s, v); this one has {len(voucher.signature)}"
        )
    if signer is None or signer != payer:
        raise InvalidSignatureError(
            f"the signature does not recover to the payer of channel {voucher.channel_id} for this cumulative amount"
        )


def judge(
    channel: Channel | None,
    voucher: Voucher,
    signer: bytes | None,
    *,
    prior: Receipt | None,
    now: datetime,
    close_guard: int,
    keyed: Receipt | None = None,
    rules: Rules = NO_RULES,
    chain_time: int = 0,
) -> Verdict:
    """Accept or refuse `voucher` (raising a VoucherRejectedError subclass with a stable code).

    `signer` is the 20-byte address the signature recovers to (None when it is not a valid signature); `prior` is the
    receipt already stored for the same (channel, cumulative), if any; `keyed` the receipt of the channel's payment
    with the voucher's idempotency key, if any; `close_guard` is how many seconds before a close deadline new vouchers
    stop being accepted, because they could no longer be settled in time; counted from `now` or, where later,
    `chain_time` (the latest block's time seen, unix seconds): the hub judges a deadline by its blocks' times.
    """
    if channel is None:
        raise ChannelNotFoundError(f"channel {voucher.channel_id} does not exist on chain")
    check_signed(voucher, signer, bytes.fromhex(channel.payer[2:]))
    if prior is not None:
        if _differs(voucher.reference, prior.reference) or _differs(voucher.idempotency_key, prior.idempotency_key):
            raise ExistsWithDifferentMetadataError(
                f"this voucher was accepted before with another reference or idempotency key; the payment stands as "
                f"first submitted (reference {prior.reference!r}, idempotency key {prior.idempotency_key!r})",
                receipt=receipt_body(prior),
            )
        return Verdict(prior, new=False)
    if keyed is not None:
        asked = voucher.cumulative - channel.floor
        if asked != keyed.increment:
            raise IdempotencyKeyReusedError(
                f"idempotency key {voucher.idempotency_key!r} already paid {keyed.increment} on this channel; "
                f"this voucher would pay {asked}: use a new key for a new payment",
                receipt=receipt_body(keyed),
            )
        return Verdict(keyed, new=False)  # the same payment, retried from a re-read position: charge nothing
    if channel.suspended_reason is not None:
        raise ChannelSuspendedError(
            f"channel {voucher.channel_id} is suspended: {channel.suspended_reason}", reason=channel.suspended_reason
        )
    held = rules.held.get(channel.channel_id)
    if held is not None:
        raise ChannelHeldError(f"channel {channel.channel_id} is held by the operator: {held}", reason=held)
    _require_open(channel, now, close_guard, chain_time)
    cumulative, floor = voucher.cumulative, channel.floor  # read once: this runs per voucher inside the group commit
    if cumulative <= floor:
        raise StaleVoucherError(
            f"cumulative amount {cumulative} is not above the channel's current {floor}",
            currentCumulativeAmount=str(floor),
        )
    increment = cumulative - floor
    least = rules.min_increments.get(channel.token, 1)
    if increment < least:
        raise IncrementTooSmallError(
            f"this voucher adds {increment}; this service takes at least {least} a payment in this asset",
            minIncrement=str(least),
            currentCumulativeAmount=str(floor),
        )
    if voucher.price is not None and increment != voucher.price:
        error = UnderpaymentError if increment < voucher.price else OverpaymentError
        raise error(
            f"this voucher pays {increment} over the channel's current {floor}; the price is {voucher.price}",
            currentCumulativeAmount=str(floor),
            price=str(voucher.price),
        )
    if cumulative > channel.deposit:
        raise AmountExceedsDepositError(
            f"cumulative amount {cumulative} is above the confirmed deposit {channel.deposit}"
            f" (as of block {channel.as_of_block}); top up the channel or wait for the top-up to confirm",
            deposit=str(channel.deposit),
        )
    receipt = Receipt(
        channel_id=channel.channel_id,
        cumulative=cumulative,
        increment=increment,
        remaining=channel.deposit - cumulative,
        accepted_at=now,
        reference=voucher.reference,
        idempotency_key=voucher.idempotency_key,
        attempt=voucher.attempt,
    )
    return Verdict(receipt, new=True)


def _differs(sent: str | None, stored: str | None) -> bool:
    """A re-send asserts only the metadata it carries: leaving a field out matches whatever is stored."""
    return sent is not None and sent != stored


@functools.lru_cache(maxsize=256)
def _api_time(moment: datetime) -> str:
    """A time as the API's receipts have it (pydantic's form); once per distinct time: a group's receipts share one."""
    return moment.isoformat().replace("+00:00", "Z")


def receipt_body(receipt: Receipt) -> dict[str, str | None]:
    """A receipt as the API shows it (ReceiptOut's fields, in its order), in an error's details and in the voucher
    routes' answers: pydantic-core's `to_json` makes ReceiptOut's own JSON of it without a model per receipt."""
    return {
        "channelId": receipt.channel_id,
        "cumulativeAmount": str(receipt.cumulative),
        "increment": str(receipt.increment),
        "remaining": str(receipt.remaining),
        "acceptedAt": _api_time(receipt.accepted_at),
        "reference": receipt.reference,
        "idempotencyKey": receipt.idempotency_key,
    }


def _require_open(channel: Channel, now: datetime, close_guard: int, chain_time: int = 0) -> None:
    if channel.status == ChannelStatus.CLOSED:
        raise ChannelClosedError(f"channel {channel.channel_id} is closed")
    if channel.stopped_at_us is not None:
        raise ChannelClosedError(
            f"channel {channel.channel_id} was stopped by its payee, to close it with the latest voucher accepted: "
            "it takes no more vouchers; pay on another channel",
            stoppedAt=channel.stopped_at_us // 1_000_000,
        )
    if channel.status == ChannelStatus.CLOSING and channel.close_deadline is not None:
        left = channel.close_deadline - max(int(now.timestamp()), chain_time)
        if left < close_guard:
            raise ChannelClosedError(
                f"channel {channel.channel_id} is closing and its challenge period ends in {max(left, 0)} s,"
                f" too soon to settle a new voucher (the service stops {close_guard} s before the deadline)",
                closeDeadline=channel.close_deadline,
            )
