"""The fast verifier agrees with eth-account, and refuses exactly the signatures ChannelHub refuses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from coincurve import PublicKey
from eth_account import Account
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from settlement.domain.model import MAX_UINT256
from settlement.eip712.receipts import ReceiptSigner, SignedFields, receipt_domain, receipt_signer, sign_receipt
from settlement.eip712.refunds import refund_requester, sign_refund_request
from settlement.eip712.vouchers import (
    SECP256K1_N,
    Domain,
    VoucherSigner,
    VoucherVerifier,
    recover_reference,
    sign_voucher,
    to_compact,
)
from tests.signatures import REFUSED_FORMS

DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
KEY = Account.from_key("0x" + "42" * 32)
CID = b"\x07" * 32


@settings(max_examples=60, deadline=None)
@given(
    key=st.integers(min_value=1, max_value=SECP256K1_N - 1),
    cid=st.binary(min_size=32, max_size=32),
    amount=st.integers(min_value=0, max_value=MAX_UINT256),
    chain_id=st.integers(min_value=1, max_value=2**64),
)
def test_fast_path_recovers_what_eth_account_recovers(key: int, cid: bytes, amount: int, chain_id: int) -> None:
    account = Account.from_key(key.to_bytes(32, "big"))
    domain = Domain(chain_id=chain_id, verifying_contract=DOMAIN.verifying_contract)
    signature = sign_voucher(account, domain, cid, amount)
    fast = VoucherVerifier(domain).recover(cid, amount, signature)
    assert fast is not None
    assert "0x" + fast.hex() == recover_reference(domain, cid, amount, signature).lower() == account.address.lower()


def test_each_signed_field_changes_the_signer() -> None:
    signature = sign_voucher(KEY, DOMAIN, CID, 100)
    verifier = VoucherVerifier(DOMAIN)
    payer = bytes.fromhex(KEY.address[2:])
    assert verifier.recover(CID, 100, signature) == payer
    assert verifier.recover(CID, 101, signature) != payer
    assert verifier.recover(b"\x08" * 32, 100, signature) != payer
    other_chain = VoucherVerifier(Domain(chain_id=1, verifying_contract=DOMAIN.verifying_contract))
    assert other_chain.recover(CID, 100, signature) != payer
    other_hub = VoucherVerifier(Domain(chain_id=31337, verifying_contract="0x" + "11" * 20))
    assert other_hub.recover(CID, 100, signature) != payer


@pytest.mark.parametrize("mutate", REFUSED_FORMS)
def test_refuses_what_the_hub_refuses(mutate: Callable[[bytes], bytes]) -> None:
    signature = mutate(sign_voucher(KEY, DOMAIN, CID, 100))
    assert VoucherVerifier(DOMAIN).recover(CID, 100, signature) is None


def test_refuses_out_of_range_inputs() -> None:
    signature = sign_voucher(KEY, DOMAIN, CID, 100)
    verifier = VoucherVerifier(DOMAIN)
    assert verifier.recover(CID[:31], 100, signature) is None
    assert verifier.recover(CID, -1, signature) is None
    assert verifier.recover(CID, 2**256, signature) is None


HALF_N = SECP256K1_N // 2


@pytest.mark.parametrize(
    ("r", "s", "in_range"),
    [
        (0, 1, False),
        (1, 1, True),
        (SECP256K1_N - 2, 1, True),  # the largest r below n that is an x-coordinate on the curve
        (SECP256K1_N, 1, False),
        (2**256 - 1, 1, False),
        (1, 0, False),
        (1, HALF_N, True),
        (1, HALF_N + 1, False),
        (1, 2**256 - 1, False),
    ],
)
def test_r_and_s_compared_as_bytes_bound_where_the_hub_bounds_them(r: int, s: int, in_range: bool) -> None:
    """recover_encoded compares r and s as 32-byte strings: at each bound it refuses exactly what the hub's integer
    checks refuse (0 < r < n, 0 < s <= n / 2), and in range it gives what libsecp256k1 gives."""
    verifier = VoucherVerifier(DOMAIN)
    rs = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    found = verifier.recover_encoded(CID + (100).to_bytes(32, "big"), rs + b"\x1b")
    if not in_range:
        assert found is None
    else:  # coincurve's own wrapper as the reference (each r here is an x-coordinate on the curve: 1, n - 2)
        key = PublicKey.from_signature_and_message(rs + b"\x00", verifier.digest(CID, 100), hasher=None)
        assert found == keccak(key.format(compressed=False)[1:])[-20:]


def test_compact_form_round_trip() -> None:
    signature = sign_voucher(KEY, DOMAIN, CID, 100)
    r, vs = to_compact(signature)
    assert r == signature[:32]
    assert int.from_bytes(vs, "big") >> 255 == signature[64] - 27
    assert (int.from_bytes(vs, "big") & ((1 << 255) - 1)).to_bytes(32, "big") == signature[32:64]
    with pytest.raises(ValueError, match="65-byte"):
        to_compact(signature[:64] + b"\x01")


@settings(max_examples=40, deadline=None)
@given(
    key=st.integers(min_value=1, max_value=SECP256K1_N - 1),
    cid=st.binary(min_size=32, max_size=32),
    cumulative=st.integers(min_value=0, max_value=MAX_UINT256),
    increment=st.integers(min_value=0, max_value=MAX_UINT256),
    accepted_at=st.integers(min_value=0, max_value=2**64 - 1),
    payment_id=st.text(max_size=80),
)
def test_the_facilitators_receipt_signer_signs_what_eth_account_signs(
    key: int, cid: bytes, cumulative: int, increment: int, accepted_at: int, payment_id: str
) -> None:
    account = Account.from_key(key.to_bytes(32, "big"))
    domain = receipt_domain(DOMAIN)
    fields = SignedFields(cid, cumulative, increment, accepted_at, payment_id)
    signature = ReceiptSigner(account, domain).sign(fields)
    assert signature == sign_receipt(account, domain, fields)
    assert receipt_signer(domain, fields, signature) == account.address


def test_the_receipt_signer_refuses_fields_a_receipt_cannot_carry() -> None:
    signer = ReceiptSigner(KEY, receipt_domain(DOMAIN))
    for fields in (SignedFields(b"\x07" * 31, 1, 1, 0), SignedFields(CID, 1, 1, 2**64), SignedFields(CID, 1, 1, -1)):
        with pytest.raises(ValueError):
            signer.sign(fields)


@settings(max_examples=60, deadline=None)
@given(
    key=st.integers(min_value=1, max_value=SECP256K1_N - 1),
    cid=st.binary(min_size=32, max_size=32),
    amount=st.integers(min_value=0, max_value=MAX_UINT256),
)
def test_the_payers_voucher_signer_signs_what_eth_account_signs(key: int, cid: bytes, amount: int) -> None:
    account = Account.from_key(key.to_bytes(32, "big"))
    signature = VoucherSigner(account, DOMAIN).sign(cid, amount)
    assert signature == sign_voucher(account, DOMAIN, cid, amount)
    assert VoucherVerifier(DOMAIN).recover(cid, amount, signature) == bytes.fromhex(account.address[2:])


def test_the_voucher_signer_refuses_what_a_voucher_cannot_carry() -> None:
    signer = VoucherSigner(KEY, DOMAIN)
    for cid, amount in ((b"\x07" * 31, 1), (CID, -1), (CID, MAX_UINT256 + 1)):
        with pytest.raises(ValueError):
            signer.sign(cid, amount)


def test_each_signed_field_of_a_refund_request_changes_its_signer() -> None:
    """A refund request binds the channel, its expiry, the chain and the hub; it is never a voucher's signature."""
    signature = sign_refund_request(KEY, DOMAIN, CID, 1_000)
    assert refund_requester(DOMAIN, CID, 1_000, signature) == KEY.address
    assert refund_requester(DOMAIN, CID, 1_001, signature) != KEY.address
    assert refund_requester(DOMAIN, b"\x08" * 32, 1_000, signature) != KEY.address
    assert refund_requester(Domain(1, DOMAIN.verifying_contract), CID, 1_000, signature) != KEY.address
    assert refund_requester(Domain(31337, "0x" + "11" * 20), CID, 1_000, signature) != KEY.address
    voucher = sign_voucher(KEY, DOMAIN, CID, 1_000)  # the same numbers signed as a voucher ask for nothing
    assert refund_requester(DOMAIN, CID, 1_000, voucher) != KEY.address
    assert refund_requester(DOMAIN, CID, 1_000, b"\x01" * 65) != KEY.address
    assert refund_requester(DOMAIN, CID, 1_000, signature[:64]) is None  # not a signature at all
