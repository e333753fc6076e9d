"""The `channelhub` scheme on x402 v2: what travels in its headers, shared by the payer's, the payee's and the
facilitator's plug-ins.

A payment is a voucher on the payer's channel to `payTo` in `asset`: `payload = {"channelId", "cumulativeAmount",
"signature"}`, where the cumulative amount is the channel's position plus exactly the price (`amount`). The
requirements' `extra` names the hub and its EIP-712 domain, so a payer needs nothing else to pay (docs/x402.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

from eth_utils.address import is_address, to_checksum_address
from x402.extensions.payment_identifier import PAYMENT_ID_PATTERN, extract_payment_identifier, is_valid_payment_id
from x402.http.utils import decode_payment_signature_header
from x402.schemas import PaymentPayload, PaymentRequirements

from settlement.chain.addresses import is_typed_address
from settlement.domain.model import ChannelId, hex32_of, signature_of, uint256_of
from settlement.eip712.vouchers import Domain

SCHEME = "channelhub"
# The ASGI scope extension through which settlement.x402.serving's protocol tells the payee's facilitator client
# whether a request's client went away: `{"gone": <callable, true once the connection is gone>}`
# (settlement.x402.facilitator_client: a payer gone is not charged).
CONNECTION_GONE = "channelhub.connection_gone"
# The extension a facilitator lists in `/supported` when it stores each settle's `attempt` (settlement.api.facilitator):
# a payee sends attempts only to a facilitator that lists it, or whose `/supported` it has not read yet.
SETTLE_ATTEMPT = "channelhub-settle-attempt"
NETWORK_PREFIX = "eip155:"
# Matched whole (`fullmatch`): `$` would also match before a final newline, which `int` and `bytes.fromhex` skip, so
# "0x…\n" passed as a channel id no other layer spells that way (a paid voucher sent again so went to the chain).
_CHAIN_ID = re.compile(r"[1-9][0-9]{0,31}")  # ASCII: str.isdigit took "²" (then int() raised) and other scripts' digits


class Reason(StrEnum):
    """Why a payment is refused: `invalidReason` / `errorReason` of the facilitator's answers, and what a payee's 402
    carries. Stable; the ledger's own codes (invalid_signature, stale_voucher, ...) pass through as they are."""

    INVALID_PAYLOAD = "invalid_payload"  # not the scheme's payload: fields missing, not hex, not a number
    UNSUPPORTED = "unsupported_scheme_or_network"  # another scheme, or a network this facilitator does not serve
    REQUIREMENTS_MISMATCH = "requirements_mismatch"  # the payment answers other requirements than the payee's
    WRONG_PAY_TO = "wrong_pay_to"  # the channel pays someone else
    WRONG_ASSET = "wrong_asset"  # the channel is in another asset
    VOUCHER_REPLAYED = "voucher_replayed"  # this voucher already bought a response
    UNAVAILABLE = "facilitator_unavailable"  # the store or the chain does not answer: retry later
    IDENTIFIER_REQUIRED = "payment_identifier_required"  # the route requires x402's payment identifier: the payee's 400


def network_of(chain_id: int) -> str:
    """CAIP-2: `eip155:<chainId>`."""
    return f"{NETWORK_PREFIX}{chain_id}"


def chain_id_of(network: str) -> int | None:
    """The chain id of an `eip155:<chainId>` network in its one form (CAIP-2: at most 32 characters); else None."""
    digits = network.removeprefix(NETWORK_PREFIX)
    return int(digits) if network.startswith(NETWORK_PREFIX) and _CHAIN_ID.fullmatch(digits) else None


def domain_of(requirements: PaymentRequirements) -> Domain | None:
    """The hub's EIP-712 domain, as the payee's own requirements name it (from its facilitator's /supported)."""
    extra = requirements.extra or {}
    hub, name, version = extra.get("hub"), extra.get("name"), extra.get("version")
    if not (isinstance(hub, str) and isinstance(name, str) and isinstance(version, str)):
        return None
    return _named_domain(requirements.network, hub, name, version)


@lru_cache(maxsize=64)
def _named_domain(network: str, hub: str, name: str, version: str) -> Domain | None:
    """A payee names one or a few domains, once per paid request and per settle: checked once each (the address
    check was most of the time)."""
    chain_id = chain_id_of(network)
    if chain_id is None or not is_address(hub):
        return None
    return Domain(chain_id, hub, name, version)


def answers(accepted: PaymentRequirements, requirements: PaymentRequirements) -> bool:
    """A payment made for `accepted` answers exactly these requirements: the same scheme, network, price, asset and
    payee (the addresses in any valid case)."""
    return (
        (accepted.scheme, accepted.network, accepted.amount)
        == (requirements.scheme, requirements.network, requirements.amount)
        and same_address(accepted.asset, requirements.asset)
        and same_address(accepted.pay_to, requirements.pay_to)
    )


def same_address(a: str, b: str) -> bool:
    """Both are valid addresses (a mixed-case one must carry its checksum) and name the same account."""
    first = _canonical(a)
    return first is not None and first == _canonical(b)


@lru_cache(maxsize=4096)
def _canonical(address: str) -> str | None:
    """Checksumming costs a keccak (~20 µs); a facilitator compares the same few addresses on every payment."""
    return to_checksum_address(address) if is_typed_address(address) else None


class PayloadError(ValueError):
    """A payload that is not the scheme's, with the reason to answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reason = Reason.INVALID_PAYLOAD


@dataclass(frozen=True)
class VoucherPayload:
    """The scheme's payload: one signed voucher."""

    channel_id: ChannelId
    cumulative: int
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "channelId": self.channel_id,
            "cumulativeAmount": str(self.cumulative),
            "signature": "0x" + self.signature.hex(),
        }

    @classmethod
    def parse(cls, payload: object) -> VoucherPayload:
        """Strict: exactly the three fields, each in its one form (lower or mixed-case hex, a decimal string)."""
        if not isinstance(payload, dict) or set(payload) != {"channelId", "cumulativeAmount", "signature"}:
            raise PayloadError("the payload must be {channelId, cumulativeAmount, signature}")
        channel_id, cumulative, signature = payload["channelId"], payload["cumulativeAmount"], payload["signature"]
        channel = hex32_of(channel_id)
        if channel is None:
            raise PayloadError("channelId must be 0x + 64 hex digits")
        amount = base_units(cumulative)
        if amount is None:
            raise PayloadError("cumulativeAmount must be a decimal string of base units, above 0 and below 2^256")
        raw = signature_of(signature)
        if raw is None:
            raise PayloadError("signature must be 0x + 130 hex digits (r, s, v)")
        return cls(ChannelId(channel), amount, raw)


def base_units(value: object) -> int | None:
    """An amount of base units in its one form (a string of ASCII decimal digits, above 0, no leading zero, below
    2^256): the requirements' price, a payee's deposit hint, a facilitator's position. None for anything else: a
    payee's or a facilitator's text is never handed to `int` as it is (a sign, "²", 5,000 digits)."""
    found = uint256_of(value)
    return found if found else None


def payment_in(header: object) -> PaymentPayload | None:
    """The x402 v2 payment a `PAYMENT-SIGNATURE` header carries; None for anything else (no header, not x402's, v1)."""
    if not isinstance(header, str):
        return None
    try:
        payload = decode_payment_signature_header(header)
    except Exception:  # not a header x402 could read
        return None
    return payload if isinstance(payload, PaymentPayload) else None


def payment_identifier_in(header: object) -> str | None:
    """The valid x402 payment identifier of the payment a `PAYMENT-SIGNATURE` header carries, if any."""
    payment = payment_in(header)
    return None if payment is None else payment_identifier(payment)


def is_payment_id(text: str) -> bool:
    """Whether `text` is a payment identifier by the extension's rules (16-128 of `[a-zA-Z0-9_-]`), matched whole."""
    return is_valid_payment_id(text) and PAYMENT_ID_PATTERN.fullmatch(text) is not None


def payment_identifier(payment: PaymentPayload) -> str | None:
    """The payment's x402 payment identifier if it is valid by the extension's rules, x402's pattern matched whole:
    x402 matches it with `match` and `$`, which also takes a final newline ("…abc\n" was a key of its own)."""
    found = extract_payment_identifier(payment, validate=True)
    return found if found is not None and is_payment_id(found) else None
