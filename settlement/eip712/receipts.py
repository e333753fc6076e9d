"""Receipts the facilitator signs (EIP-712), so that a payee or an auditor can check offline, from the receipt
alone, that the service accepted a payment: which channel, up to which cumulative amount, how much this payment
added, when, and under which payment identifier.

    domain  = {name: "ChannelHub Receipts", version: "1", chainId, verifyingContract: <the hub>}
    Receipt(bytes32 channelId, uint256 cumulativeAmount, uint256 increment, uint64 acceptedAt, string paymentId)

`acceptedAt` is unix seconds; `paymentId` is the payment's idempotency key (the x402 payment identifier), or "" for
none. The signer is the facilitator's, as `GET /x402/supported` lists it under `signers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

from settlement.eip712.vouchers import EIP712_DOMAIN_TYPE, Domain

RECEIPT_DOMAIN_NAME = "ChannelHub Receipts"
RECEIPT_TYPE = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "increment", "type": "uint256"},
    {"name": "acceptedAt", "type": "uint64"},
    {"name": "paymentId", "type": "string"},
]


@dataclass(frozen=True)
class SignedFields:
    """What a receipt's signature covers."""

    channel_id: bytes
    cumulative: int
    increment: int
    accepted_at: int
    payment_id: str = ""


def receipt_domain(hub: Domain) -> Domain:
    """Receipts of one hub: its chain and address, under a name of their own (a receipt is never a voucher)."""
    return Domain(chain_id=hub.chain_id, verifying_contract=hub.verifying_contract, name=RECEIPT_DOMAIN_NAME)


def receipt_typed_data(domain: Domain, fields: SignedFields) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, "Receipt": RECEIPT_TYPE},
        "primaryType": "Receipt",
        "domain": domain.as_dict(),
        "message": {
            "channelId": fields.channel_id,
            "cumulativeAmount": fields.cumulative,
            "increment": fields.increment,
            "acceptedAt": fields.accepted_at,
            "paymentId": fields.payment_id,
        },
    }


def sign_receipt(account: LocalAccount, domain: Domain, fields: SignedFields) -> bytes:
    return bytes(account.sign_message(encode_typed_data(full_message=receipt_typed_data(domain, fields))).signature)


def receipt_signer(domain: Domain, fields: SignedFields, signature: bytes) -> str:
    """The address that signed these fields (checksummed); compare it with the facilitator's listed signer."""
    return str(
        Account.recover_message(encode_typed_data(full_message=receipt_typed_data(domain, fields)), signature=signature)
    )
