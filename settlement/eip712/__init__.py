"""Vouchers as EIP-712 typed data: the schema, signing (eth-account) and the fast verifier (libsecp256k1)."""

from settlement.eip712.vouchers import Domain, VoucherVerifier, channel_id, read_domain, sign_voucher

__all__ = [
    "Domain",
    "VoucherVerifier",
    "channel_id",
    "read_domain",
    "sign_voucher",
]
