"""The packed `settleBatch` argument: what the hub parses in assembly instead of ABI-decoding nested arrays.

    batch = group*
    group = payee (20 bytes) | token (20) | count (2, big-endian, 1..65,535) | entry * count
    entry = payer (20) | salt (32) | cumulativeAmount (13, big-endian) | r (32) | vs (32)     -> 129 bytes

The hub derives each channel id from (payer, payee, token, salt), so an entry names its channel without carrying
the id, and the recovered signer must equal the payer. Amounts are 104 bits wide like the hub's deposits: a larger
amount could never settle, so it is refused here rather than sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eth_utils.address import to_canonical_address

from settlement.eip712.vouchers import to_compact

GROUP_HEADER_BYTES = 42
ENTRY_BYTES = 129
AMOUNT_BYTES = 13
MAX_GROUP_ENTRIES = 2**16 - 1
MAX_AMOUNT = 2 ** (8 * AMOUNT_BYTES) - 1


@dataclass(frozen=True)
class SettleEntry:
    """One voucher to settle: the channel by its payer and salt (payee and token are the group's)."""

    payer: str
    salt: bytes
    cumulative: int
    signature: bytes  # 65 bytes, v = 27/28


def group_header(payee: str, token: str, count: int) -> bytes:
    if not 0 < count <= MAX_GROUP_ENTRIES:
        raise ValueError(f"a group holds 1..{MAX_GROUP_ENTRIES} entries, not {count}")
    return to_canonical_address(payee) + to_canonical_address(token) + count.to_bytes(2, "big")


def packed_entry(payer: str, salt: bytes, cumulative: int, r: bytes, vs: bytes) -> bytes:
    """One entry from its fields, the signature already in compact form (r, vs)."""
    if not 0 <= cumulative <= MAX_AMOUNT:
        raise ValueError(f"cumulative amount {cumulative} does not fit the hub's {8 * AMOUNT_BYTES} bits")
    if len(salt) != 32 or len(r) != 32 or len(vs) != 32:
        raise ValueError("salt, r and vs are 32 bytes each")
    return to_canonical_address(payer) + salt + cumulative.to_bytes(AMOUNT_BYTES, "big") + r + vs


def encode_batch(groups: Iterable[tuple[str, str, list[SettleEntry]]]) -> bytes:
    """`settleBatch` data for (payee, token, entries) groups; a group over 65,535 entries is split in several."""
    out = bytearray()
    for payee, token, entries in groups:
        for start in range(0, len(entries), MAX_GROUP_ENTRIES):
            chunk = entries[start : start + MAX_GROUP_ENTRIES]
            out += group_header(payee, token, len(chunk))
            for e in chunk:
                out += packed_entry(e.payer, e.salt, e.cumulative, *to_compact(e.signature))
    return bytes(out)


SETTLED_RECORD_BYTES = 32 + AMOUNT_BYTES


def decode_settlements(data: bytes) -> list[tuple[str, int]]:
    """(channel id as 0x hex, new cumulative amount) for each record of a `ChannelsSettled` event's `settlements`."""
    if len(data) % SETTLED_RECORD_BYTES:
        raise ValueError(f"settlements of {len(data)} bytes: not whole {SETTLED_RECORD_BYTES}-byte records")
    return [
        ("0x" + data[at : at + 32].hex(), int.from_bytes(data[at + 32 : at + SETTLED_RECORD_BYTES], "big"))
        for at in range(0, len(data), SETTLED_RECORD_BYTES)
    ]
