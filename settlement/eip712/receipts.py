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

from coincurve import PrivateKey
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from settlement.eip712.vouchers import EIP712_DOMAIN_TYPE, Domain, keccak256, sign_digest

RECEIPT_DOMAIN_NAME = "ChannelHub Receipts"
_RECEIPT_TYPEHASH = keccak(
    b"Receipt(bytes32 channelId,uint256 cumulativeAmount,uint256 increment,uint64 acceptedAt,string paymentId)"
)
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


class ReceiptSigner:
    """Signs receipts of one domain with one key, as the facilitator does on every payment: the domain separator
    hashed once and the digest signed by libsecp256k1 through coincurve (~0.1 ms, against ~0.55 ms through
    eth-account's typed-data encoder). RFC 6979 makes the signature the one `sign_receipt` gives, byte for byte."""

    def __init__(self, account: LocalAccount, domain: Domain) -> None:
        self.address = str(account.address)
        self._key = PrivateKey(bytes(account.key))
        self._prefix = b"\x19\x01" + domain.separator()

    def digest(self, fields: SignedFields) -> bytes:
        if len(fields.channel_id) != 32 or not 0 <= fields.accepted_at < 2**64:
            raise ValueError("a receipt covers a 32-byte channel id and a uint64 time")
        struct = keccak256(
            _RECEIPT_TYPEHASH
            + fields.channel_id
            + fields.cumulative.to_bytes(32, "big")
            + fields.increment.to_bytes(32, "big")
            + fields.accepted_at.to_bytes(32, "big")
            + keccak256(fields.payment_id.encode())
        )
        return keccak256(self._prefix + struct)

    def sign(self, fields: SignedFields) -> bytes:
        return sign_digest(self._key, self.digest(fields))


def receipt_signer(domain: Domain, fields: SignedFields, signature: bytes) -> str:
    """The address that signed these fields (checksummed); compare it with the facilitator's listed signer."""
    return str(
        Account.recover_message(encode_typed_data(full_message=receipt_typed_data(domain, fields)), signature=signature)
    )
