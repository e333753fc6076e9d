"""65-byte signature forms ChannelHub refuses; the fast verifier must refuse the same ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from settlement.eip712.vouchers import SECP256K1_N

Mutation = Callable[[bytes], bytes]


def malleate(sig: bytes) -> bytes:
    """The malleable twin: s -> n - s with the other parity (high s)."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes((55 - sig[64],))


REFUSED_FORMS = [
    pytest.param(malleate, id="s->n-s"),
    pytest.param(lambda sig: sig[:64] + bytes((sig[64] - 27,)), id="v=0/1"),
    pytest.param(lambda sig: sig[:64] + b"\x1d", id="v=29"),
    pytest.param(lambda sig: sig[:64], id="64-bytes"),
    pytest.param(lambda sig: sig + b"\x00", id="66-bytes"),
    pytest.param(lambda sig: b"\x00" * 65, id="zero-recovers-address0"),
    pytest.param(lambda sig: sig[:32] + b"\x00" * 32 + sig[64:], id="s=0"),
    pytest.param(lambda sig: SECP256K1_N.to_bytes(32, "big") + sig[32:], id="r=n"),
]
