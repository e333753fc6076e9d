"""Vouchers: the EIP-712 schema, signing (eth-account) and a fast verifier (precomputed domain + coincurve).

eth-account, eth-abi and eth-utils are imported where they are used, not with the module: a signature recovery
worker imports this module for the verifier alone (coincurve and keccak), and with them it took 1.1 s of CPU to start
(py_ecc's BLS tables through eth-keyfile, web3) against ~0.15 s without.

A voucher says "channel `channelId` has paid `cumulativeAmount` in total so far". The verifier accepts exactly what
ChannelHub accepts: 65-byte signatures, v of 27 or 28, s in the lower half of the curve order, a non-zero signer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coincurve import PrivateKey
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT
from sha3 import keccak_256

from settlement.domain.model import MAX_UINT256

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3.contract import Contract


def keccak256(data: bytes) -> bytes:
    """keccak-256 through safe-pysha3's C code directly: for what is hashed per voucher or per receipt."""
    return bytes(keccak_256(data).digest())


VOUCHER_TYPE = [
    {"name": "channelId", "type": "bytes32"},
    {"name": "cumulativeAmount", "type": "uint256"},
]
EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
DOMAIN_NAME = "ChannelHub"
DOMAIN_VERSION = "1"

_VOUCHER_TYPEHASH = keccak256(b"Voucher(bytes32 channelId,uint256 cumulativeAmount)")
_DOMAIN_TYPEHASH = keccak256(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N = SECP256K1_N // 2
_ZERO_WORD, _N_WORD, _HALF_N_WORD = bytes(32), SECP256K1_N.to_bytes(32, "big"), _HALF_N.to_bytes(32, "big")


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain of one deployed hub."""

    chain_id: int
    verifying_contract: str
    name: str = DOMAIN_NAME
    version: str = DOMAIN_VERSION

    def as_dict(self) -> dict[str, Any]:
        from eth_utils.address import to_checksum_address

        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }

    def separator(self) -> bytes:
        return keccak256(
            _DOMAIN_TYPEHASH
            + keccak256(self.name.encode())
            + keccak256(self.version.encode())
            + self.chain_id.to_bytes(32, "big")
            + bytes(12)
            + bytes.fromhex(self.verifying_contract.removeprefix("0x"))
        )


def channel_id(payer: str, payee: str, token: str, salt: bytes) -> bytes:
    """The id ChannelHub gives a channel: keccak256(abi.encode(payer, payee, token, salt)); token 0x0 = ETH."""
    from eth_abi.abi import encode

    return keccak256(encode(["address", "address", "address", "bytes32"], [payer, payee, token, salt]))


def typed_data(domain: Domain, channel_id: bytes, cumulative_amount: int) -> dict[str, Any]:
    """The full EIP-712 message, as wallets and eth-account take it."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, "Voucher": VOUCHER_TYPE},
        "primaryType": "Voucher",
        "domain": domain.as_dict(),
        "message": {"channelId": channel_id, "cumulativeAmount": cumulative_amount},
    }


def sign_voucher(account: LocalAccount, domain: Domain, channel_id: bytes, cumulative_amount: int) -> bytes:
    """The payer's 65-byte signature (r || s || v, v in {27, 28})."""
    from eth_account.messages import encode_typed_data

    signable = encode_typed_data(full_message=typed_data(domain, channel_id, cumulative_amount))
    return bytes(account.sign_message(signable).signature)


class VoucherSigner:
    """Signs vouchers of one domain with one key, as a payer does on every payment: the digest as VoucherVerifier
    computes it (domain hashed once), signed by libsecp256k1 through coincurve (~0.06 ms, against ~0.54 ms through
    eth-account's typed-data encoder). RFC 6979 makes the signature `sign_voucher`'s, byte for byte."""

    def __init__(self, account: LocalAccount, domain: Domain) -> None:
        self._key = PrivateKey(bytes(account.key))
        self._digest = VoucherVerifier(domain).digest

    def sign(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        if len(channel_id) != 32 or not 0 <= cumulative_amount <= MAX_UINT256:
            raise ValueError("a voucher is a 32-byte channel id and an amount in [0, 2^256)")
        return sign_digest(self._key, self._digest(channel_id, cumulative_amount))


def sign_digest(key: PrivateKey, digest: bytes) -> bytes:
    """r || s || v (v in {27, 28}, s in the lower half: libsecp256k1 normalises it) over a 32-byte digest."""
    signature = key.sign_recoverable(digest, hasher=None)
    return signature[:64] + bytes([signature[64] + 27])


def recover_reference(domain: Domain, channel_id: bytes, cumulative_amount: int, signature: bytes) -> str:
    """Signer by eth-account: slow, but the reference the fast path is tested against."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    signable = encode_typed_data(full_message=typed_data(domain, channel_id, cumulative_amount))
    return str(Account.recover_message(signable, signature=signature))


def encode_voucher(channel_id: bytes, cumulative_amount: int) -> bytes | None:
    """A voucher's EIP-712 encoded data (channel id || amount, 64 bytes), or None where no voucher the hub accepts has
    these fields (a channel id not of 32 bytes, an amount outside [0, 2^256))."""
    if len(channel_id) != 32 or not 0 <= cumulative_amount <= MAX_UINT256:
        return None
    return channel_id + cumulative_amount.to_bytes(32, "big")


class VoucherVerifier:
    """Recovers voucher signers for one domain: the hot path of ingest.

    The domain separator is hashed once; hashing calls safe-pysha3's C keccak directly (0.75 µs a call, against
    4.6 µs for pycryptodome's and more through eth-utils) and the signer comes back as 20 raw bytes, because
    checksumming an address costs ~20 µs, half of the recovery itself (~40 µs in libsecp256k1).
    """

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self._prefix = b"\x19\x01" + domain.separator()

    def digest(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        """The EIP-712 digest; equals ChannelHub.hashVoucher."""
        return self._digest_of(channel_id + cumulative_amount.to_bytes(32, "big"))

    def _digest_of(self, encoded: bytes) -> bytes:
        return keccak256(self._prefix + keccak256(_VOUCHER_TYPEHASH + encoded))

    def recover(self, channel_id: bytes, cumulative_amount: int, signature: bytes) -> bytes | None:
        """The signer's 20-byte address, or None where ChannelHub would reject the voucher's signature."""
        encoded = encode_voucher(channel_id, cumulative_amount)
        return None if encoded is None else self.recover_encoded(encoded, signature)

    def recover_encoded(self, encoded: bytes, signature: bytes) -> bytes | None:
        """`recover` for a voucher given as its EIP-712 encoded data (`encode_voucher`), as a recovery worker receives
        it: no integer is made of it. r and s are compared as 32-byte big-endian strings, which order as their values
        do."""
        if len(encoded) != 64 or len(signature) != 65 or signature[64] not in (27, 28):
            return None
        r, s = signature[:32], signature[32:64]
        if not _ZERO_WORD < r < _N_WORD or not _ZERO_WORD < s <= _HALF_N_WORD:
            return None
        digest = self._digest_of(encoded)
        return _recover_address(digest, signature[:64], signature[64] - 27)


def _recover_address(digest: bytes, rs: bytes, recovery_id: int) -> bytes | None:
    """libsecp256k1's recovery through coincurve's cffi binding, without the wrapper objects (~3 µs a call)."""
    ctx = GLOBAL_CONTEXT.ctx
    sig = ffi.new("secp256k1_ecdsa_recoverable_signature *")
    if not lib.secp256k1_ecdsa_recoverable_signature_parse_compact(ctx, sig, rs, recovery_id):
        return None
    pubkey = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ecdsa_recover(ctx, pubkey, sig, digest):
        return None
    out = ffi.new("unsigned char[65]")
    size = ffi.new("size_t *", 65)
    lib.secp256k1_ec_pubkey_serialize(ctx, out, size, pubkey, lib.SECP256K1_EC_UNCOMPRESSED)
    return keccak256(bytes(ffi.buffer(out, 65))[1:])[-20:]


def read_domain(hub: Contract) -> Domain:
    """The domain as the deployed hub reports it (ERC-5267), so clients sign for exactly what the chain checks."""
    _fields, name, version, chain_id, verifying_contract, _salt, _extensions = hub.functions.eip712Domain().call()
    return Domain(chain_id=chain_id, verifying_contract=verifying_contract, name=name, version=version)


def to_compact(signature: bytes) -> tuple[bytes, bytes]:
    """(r, vs) of a 65-byte signature in the EIP-2098 form settleBatch takes: vs = s | (v - 27) << 255."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise ValueError("expected a 65-byte signature with v = 27 or 28")
    vs = int.from_bytes(signature[32:64], "big") | ((signature[64] - 27) << 255)
    return signature[:32], vs.to_bytes(32, "big")
