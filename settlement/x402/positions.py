"""What a payee learnt of each channel from its facilitator's settle answers, so that the next payment on that
channel is verified in the payee's own process instead of by a call to the facilitator.

x402's middleware verifies a payment before the handler and settles it after; the verify is only there so that a
payment that will be refused does not run the handler. Settling is what accepts a payment (durably, at the
facilitator), and a response goes out only once it succeeded, whatever verify said. So a local verify may be
optimistic without risk to anyone's money: it says "valid" only when the voucher is signed by the channel's payer
(as the facilitator last answered), pays exactly the price over the position the facilitator last answered, and fits
the deposit; anything else (a channel it has not seen, a position another process moved, a closing channel it cannot
know of) goes to the facilitator as before. At worst a stale position costs one handler run whose answer is then
withheld (settle refuses it and forgets the channel), exactly what a payment refused at settle costs today.

A channel whose payment was refused at settle is then verified by the facilitator for `doubt` seconds, whatever the
settles between say: a payer can make its own payment pass here and fail there (a payment identifier it used before,
which only the facilitator knows), and with the channel learnt again at its next paid request it had one handler run
free after each one.

One refusal is made here too: a payment on a known channel whose signature is not that channel's payer's (`Forged`),
which the facilitator refuses `invalid_signature` whatever else it holds (a channel's payer is hashed into its id, so
no position going stale changes that); a forger who read channel ids off the chain cost the facilitator a call and
a signature recovery for each payment it sent the payee.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from eth_utils.address import is_address
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

from settlement.domain.model import ChannelId
from settlement.eip712.vouchers import Domain, VoucherVerifier
from settlement.x402.wire import SCHEME, PayloadError, VoucherPayload, answers, base_units, domain_of, same_address

DOUBT_SECONDS = 60.0  # a channel whose payment was refused at settle: verified by the facilitator this long


@dataclass(frozen=True)
class Position:
    """A channel as the facilitator's last successful settle described it."""

    payer: str  # checksummed
    payer_bytes: bytes
    pay_to: str
    asset: str
    domain: Domain  # the hub's, as the requirements the facilitator accepted a payment under named it
    cumulative: int
    deposit: int
    expires: float  # monotonic


@dataclass(frozen=True)
class Forged:
    """A payment refused in the payee's own process: signed by someone else than its channel's payer. A forger who
    read a channel's id off the chain had each such payment verified by the facilitator (a call, a signature
    recovery there), for as many as it sent the payee."""

    payer: str  # the channel's, checksummed
    message: str


class Positions:
    """Channel positions from settle answers, at most `max_channels` (least recently paid out first), each trusted
    for `ttl` seconds after the answer that gave it."""

    def __init__(self, ttl: float = 60.0, max_channels: int = 100_000, doubt: float = DOUBT_SECONDS) -> None:
        self.ttl, self.max_channels, self.doubt = ttl, max_channels, doubt
        self._known: OrderedDict[ChannelId, Position] = OrderedDict()
        self._doubted: OrderedDict[ChannelId, float] = OrderedDict()  # until when (monotonic), soonest first
        self._verifiers: dict[Domain, VoucherVerifier] = {}

    def __len__(self) -> int:
        return len(self._known)

    def vouch(
        self, payload: PaymentPayload, requirements: PaymentRequirements, parsed: VoucherPayload | None = None
    ) -> str | Forged | None:
        """The payer, when this payment is provably what the facilitator would accept now as far as its last answer
        shows; `Forged` when it is provably what the facilitator refuses `invalid_signature` (a channel this payee
        knows, signed by someone else than its payer, whatever the amount and however old what is known of the channel:
        its payer is hashed into its id); None when only the facilitator can tell. `parsed`: its voucher, when the
        caller has read it already."""
        if requirements.scheme != SCHEME or not answers(payload.accepted, requirements):
            return None
        price = base_units(requirements.amount)
        domain = domain_of(requirements)
        try:
            voucher = parsed or VoucherPayload.parse(payload.payload)
        except PayloadError:
            return None
        known = self._known.get(voucher.channel_id)
        if price is None or domain is None or known is None:
            return None
        if not (same_address(known.pay_to, requirements.pay_to) and same_address(known.asset, requirements.asset)):
            return None
        if domain != known.domain:  # requirements that name another hub or chain: only the facilitator can tell
            return None
        signer = self._verifier(domain).recover(bytes.fromhex(voucher.channel_id[2:]), voucher.cumulative,
                                                voucher.signature)  # fmt: skip
        if signer != known.payer_bytes:
            return Forged(known.payer, f"the signature does not recover to the payer of channel {voucher.channel_id}")
        now = time.monotonic()
        if known.expires < now:
            return None
        doubted = self._doubted.get(voucher.channel_id)
        if doubted is not None and doubted > now:
            return None
        if voucher.cumulative != known.cumulative + price or voucher.cumulative > known.deposit:
            return None
        return known.payer

    def learn(self, payload: PaymentPayload, requirements: PaymentRequirements, settled: SettleResponse) -> None:
        """Keep the position a successful settle answered; forget the channel after any refusal, and doubt it."""
        try:
            voucher = VoucherPayload.parse(payload.payload)
        except PayloadError:
            return
        self._known.pop(voucher.channel_id, None)
        if not settled.success:
            self._doubt(voucher.channel_id)
            return
        channel = (settled.extra or {}).get("channel")
        if not settled.payer or not isinstance(channel, dict):
            return
        cumulative, deposit = base_units(channel.get("cumulativeAmount")), base_units(channel.get("deposit"))
        domain = domain_of(requirements)
        if cumulative != voucher.cumulative or deposit is None or domain is None or not is_address(settled.payer):
            return
        self._known[voucher.channel_id] = Position(
            settled.payer,
            bytes.fromhex(settled.payer[2:]),
            requirements.pay_to,
            requirements.asset,
            domain,
            cumulative,
            deposit,
            time.monotonic() + self.ttl,
        )
        while len(self._known) > self.max_channels:
            self._known.popitem(last=False)

    def _doubt(self, channel: ChannelId) -> None:
        """Vouch for no payment on `channel` for `doubt` seconds; what ended its doubt, or is past the bound, goes."""
        now = time.monotonic()
        self._doubted.pop(channel, None)
        self._doubted[channel] = now + self.doubt  # one length for all: the dict stays in the order they end
        while self._doubted:  # the oldest first
            oldest, until = next(iter(self._doubted.items()))
            if until > now and len(self._doubted) <= self.max_channels:
                break
            del self._doubted[oldest]

    def forget(self, payload: PaymentPayload) -> None:
        """Drop what is known of the payment's channel (the facilitator could not answer)."""
        try:
            self._known.pop(VoucherPayload.parse(payload.payload).channel_id, None)
        except PayloadError:
            return

    def _verifier(self, domain: Domain) -> VoucherVerifier:
        found = self._verifiers.get(domain)
        if found is None:
            found = self._verifiers[domain] = VoucherVerifier(domain)
        return found
