"""Refund requests a payer signs (EIP-712) to ask a payee for the cooperative refund of a channel: only the payee can
close a channel at once (`closeByPayee`), so the payer asks and proves it is the channel's payer.

    domain  = {name: "ChannelHub Refund Requests", version: "1", chainId, verifyingContract: <the hub>}
    RefundRequest(bytes32 channelId, uint64 expires)

A domain of its own: a refund request is never a voucher or a receipt. `expires` (unix seconds) bounds how long a
captured request could be replayed; once the channel is closed a replay changes nothing.
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

from settlement.eip712.vouchers import EIP712_DOMAIN_TYPE, Domain

REFUND_DOMAIN_NAME = "ChannelHub Refund Requests"
REFUND_REQUEST_TYPE = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "expires", "type": "uint64"},
]


def refund_domain(hub: Domain) -> Domain:
    return Domain(chain_id=hub.chain_id, verifying_contract=hub.verifying_contract, name=REFUND_DOMAIN_NAME)


def refund_typed_data(hub: Domain, channel_id: bytes, expires: int) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, "RefundRequest": REFUND_REQUEST_TYPE},
        "primaryType": "RefundRequest",
        "domain": refund_domain(hub).as_dict(),
        "message": {"channelId": channel_id, "expires": expires},
    }


def sign_refund_request(account: LocalAccount, hub: Domain, channel_id: bytes, expires: int) -> bytes:
    message = encode_typed_data(full_message=refund_typed_data(hub, channel_id, expires))
    return bytes(account.sign_message(message).signature)


def refund_requester(hub: Domain, channel_id: bytes, expires: int, signature: bytes) -> str | None:
    """The checksummed address that signed this request, or None for a signature that recovers no one."""
    message = encode_typed_data(full_message=refund_typed_data(hub, channel_id, expires))
    try:
        return str(Account.recover_message(message, signature=signature))
    except Exception:  # eth-account raises several types for a malformed signature; all mean "no one"
        return None
