"""The bad-input matrix: every class of malformed, forged or out-of-place request gets its 4xx and stable code.

Each case runs against the real app (lifespan, indexer, store) on a real channel of the session hub. A case is a
function that may set the scene (accept a voucher first, close the channel) and returns the answer to check. The
cases share one app and store per backend, each on a channel of its own opened before the app starts: one case's bad
input must not harm the next case's requests either. A case that changes the chain runs on an app of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.api.app import create_app
from settlement.domain.model import MAX_UINT256
from settlement.eip712.vouchers import Domain
from settlement.server.config import Settings
from tests.hub_helpers import Answer, Channel, open_eth_channel, salt_of, send, voucher_signer, wait_until
from tests.signatures import REFUSED_FORMS

# Every case runs on both stores (store_url's parameters): "a 4xx with a stable code" must hold on each, and some
# values are refused by one backend only (PostgreSQL text holds no NUL).

DEPOSIT = 1_000
CHANNEL = "0x" + "ab" * 32


@dataclass
class Scene:
    client: TestClient
    channel: Channel
    sign: Callable[..., bytes]
    domain: Domain
    stranger: LocalAccount
    w3: Web3
    hub: Contract

    @property
    def cid(self) -> str:
        return "0x" + self.channel.id.hex()

    def signature(self, amount: int, signer: LocalAccount | None = None, domain: Domain | None = None) -> bytes:
        return self.sign(signer or self.channel.payer, self.channel.id, amount, domain)

    def voucher(self, amount: int = 100, **fields: Any) -> dict[str, Any]:
        """A valid voucher body for `amount`, with `fields` replacing or adding keys."""
        body: dict[str, Any] = {
            "channelId": self.cid,
            "cumulativeAmount": str(amount),
            "signature": "0x" + self.signature(amount).hex(),
        }
        body.update(fields)
        return {key: value for key, value in body.items() if value is not _DROP}

    def post(self, body: Any) -> Answer:
        return self.client.post("/v1/vouchers", json=body)

    def post_raw(self, content: bytes, content_type: str | None = "application/json") -> Answer:
        headers = {"content-type": content_type} if content_type else {}
        return self.client.post("/v1/vouchers", content=content, headers=headers)

    def accept(self, amount: int) -> None:
        answer = self.post(self.voucher(amount))
        assert answer.status_code == 201, answer.text

    def close(self) -> None:
        send(self.w3, self.hub.functions.closeByPayee(self.channel.id, 0, b""), self.channel.payee)
        deadline = time.monotonic() + 10
        while self.client.get(f"/v1/channels/{self.cid}").json()["status"] != "closed":
            assert time.monotonic() < deadline, "the indexer never saw the close"
            time.sleep(0.05)


_DROP = object()


def _signed_with(form: Callable[[bytes], bytes]) -> Callable[[Scene], Answer]:
    return lambda s: s.post(s.voucher(100, signature="0x" + form(s.signature(100)).hex()))


def _other_domain(s: Scene, **change: Any) -> Answer:
    domain = Domain(**{"chain_id": s.domain.chain_id, "verifying_contract": s.domain.verifying_contract, **change})
    return s.post(s.voucher(100, signature="0x" + s.signature(100, domain=domain).hex()))


def _stale(s: Scene) -> Answer:
    s.accept(500)
    return s.post(s.voucher(400))


def _equal_other_signer(s: Scene) -> Answer:
    s.accept(100)
    return s.post(s.voucher(100, signature="0x" + s.signature(100, signer=s.stranger).hex()))


def _closed(s: Scene) -> Answer:
    s.close()
    return s.post(s.voucher(100))


def _key_reused(s: Scene) -> Answer:
    assert s.post(s.voucher(100, idempotencyKey="pay-1")).status_code == 201
    return s.post(s.voucher(300, idempotencyKey="pay-1"))  # 200 more, where pay-1 paid 100


def _resent_with_other_reference(s: Scene) -> Answer:
    assert s.post(s.voucher(100, reference="order-1")).status_code == 201
    return s.post(s.voucher(100, reference="order-2"))


def _length_beyond_any_integer(s: Scene) -> Answer:
    """A declared length of 5,000 digits (an ASGI server that passes it on): int() refuses more than 4,300."""
    headers = {"content-type": "application/json", "content-length": "9" * 5000}
    return s.client.post("/v1/vouchers", content=json.dumps(s.voucher()).encode(), headers=headers)


def _chunked_huge(s: Scene) -> Answer:
    chunks = (b"x" * 65536 for _ in range(32))
    return s.client.post("/v1/vouchers", content=chunks, headers={"content-type": "application/json"})


Case = tuple[Callable[[Scene], Answer], int, str]

CASES: dict[str, Case] = {
    # the body as a whole
    "malformed-json": (lambda s: s.post_raw(b'{"channelId": '), 400, "malformed_request"),
    "json-null": (lambda s: s.post_raw(b"null"), 400, "malformed_request"),
    "json-array": (lambda s: s.post([s.voucher()]), 400, "malformed_request"),
    "json-string": (lambda s: s.post("0x00"), 400, "malformed_request"),
    "not-utf8": (lambda s: s.post_raw(b'{"channelId": "\xff\xfe"}'), 400, "malformed_request"),
    "content-type-text": (
        lambda s: s.post_raw(json.dumps(s.voucher()).encode(), "text/plain"),
        415,
        "unsupported_media_type",
    ),
    "content-type-form": (
        lambda s: s.post_raw(b"channelId=0x00", "application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
    ),
    "content-type-missing": (
        lambda s: s.post_raw(json.dumps(s.voucher()).encode(), None),
        415,
        "unsupported_media_type",
    ),
    "huge-body": (lambda s: s.post_raw(b" " * 2_000_000 + b"{}"), 413, "payload_too_large"),
    "huge-chunked-body": (_chunked_huge, 413, "payload_too_large"),
    "length-beyond-any-integer": (_length_beyond_any_integer, 413, "payload_too_large"),
    "unknown-field": (lambda s: s.post(s.voucher(payer="0x" + "11" * 20)), 400, "malformed_request"),
    "missing-channel": (lambda s: s.post(s.voucher(channelId=_DROP)), 400, "malformed_request"),
    "missing-amount": (lambda s: s.post(s.voucher(cumulativeAmount=_DROP)), 400, "malformed_request"),
    "missing-signature": (lambda s: s.post(s.voucher(signature=_DROP)), 400, "malformed_request"),
    "reference-too-long": (lambda s: s.post(s.voucher(reference="r" * 257)), 400, "malformed_request"),
    "reference-not-a-string": (lambda s: s.post(s.voucher(reference=7)), 400, "malformed_request"),
    "reference-with-nul": (lambda s: s.post(s.voucher(reference="a\x00b")), 400, "malformed_request"),
    "reference-lone-surrogate": (
        lambda s: s.post_raw(json.dumps(s.voucher()).encode()[:-1] + b', "reference": "\\ud800"}'),
        400,
        "malformed_request",
    ),
    "idempotency-key-too-long": (lambda s: s.post(s.voucher(idempotencyKey="k" * 65)), 400, "malformed_request"),
    "idempotency-key-empty": (lambda s: s.post(s.voucher(idempotencyKey="")), 400, "malformed_request"),
    "idempotency-key-space": (lambda s: s.post(s.voucher(idempotencyKey="a b")), 400, "malformed_request"),
    "idempotency-key-nul": (lambda s: s.post(s.voucher(idempotencyKey="a\x00")), 400, "malformed_request"),
    "idempotency-key-number": (lambda s: s.post(s.voucher(idempotencyKey=7)), 400, "malformed_request"),
    "idempotency-key-reused": (_key_reused, 409, "idempotency_key_reused"),
    "resent-with-another-reference": (_resent_with_other_reference, 409, "exists_with_different_metadata"),
    # hex fields
    "channel-without-0x": (lambda s: s.post(s.voucher(channelId=s.cid[2:])), 400, "malformed_request"),
    "channel-odd-length": (lambda s: s.post(s.voucher(channelId=s.cid[:-1])), 400, "malformed_request"),
    "channel-20-bytes": (lambda s: s.post(s.voucher(channelId=s.cid[:42])), 400, "malformed_request"),
    "channel-not-hex": (lambda s: s.post(s.voucher(channelId="0x" + "zz" * 32)), 400, "malformed_request"),
    "channel-as-number": (lambda s: s.post(s.voucher(channelId=int(s.cid, 16))), 400, "malformed_request"),
    "signature-without-0x": (lambda s: s.post(s.voucher(signature=s.signature(100).hex())), 400, "malformed_request"),
    "signature-odd-length": (
        lambda s: s.post(s.voucher(signature="0x" + s.signature(100).hex()[:-1])),
        400,
        "malformed_request",
    ),
    "signature-empty": (lambda s: s.post(s.voucher(signature="0x")), 400, "invalid_signature"),
    **{f"signature-{p.id}": (_signed_with(cast(Any, p.values[0])), 400, "invalid_signature") for p in REFUSED_FORMS},
    "signature-v-flipped": (_signed_with(lambda sig: sig[:64] + bytes((55 - sig[64],))), 400, "invalid_signature"),
    "signature-r-bit-flipped": (
        _signed_with(lambda sig: sig[:31] + bytes((sig[31] ^ 1,)) + sig[32:]),
        400,
        "invalid_signature",
    ),
    "signed-by-someone-else": (
        lambda s: s.post(s.voucher(100, signature="0x" + s.signature(100, signer=s.stranger).hex())),
        400,
        "invalid_signature",
    ),
    # amounts
    "amount-negative": (lambda s: s.post(s.voucher(cumulativeAmount="-1")), 400, "malformed_request"),
    "amount-float": (lambda s: s.post(s.voucher(cumulativeAmount="1.5")), 400, "malformed_request"),
    "amount-exponent": (lambda s: s.post(s.voucher(cumulativeAmount="1e3")), 400, "malformed_request"),
    "amount-empty": (lambda s: s.post(s.voucher(cumulativeAmount="")), 400, "malformed_request"),
    "amount-hex": (lambda s: s.post(s.voucher(cumulativeAmount="0x64")), 400, "malformed_request"),
    "amount-json-number": (lambda s: s.post(s.voucher(cumulativeAmount=100)), 400, "malformed_request"),
    "amount-json-float": (lambda s: s.post(s.voucher(cumulativeAmount=100.0)), 400, "malformed_request"),
    "amount-zero": (lambda s: s.post(s.voucher(0)), 400, "amount_out_of_range"),
    "amount-2^256": (lambda s: s.post(s.voucher(cumulativeAmount=str(MAX_UINT256 + 1))), 400, "amount_out_of_range"),
    "amount-79-digits": (lambda s: s.post(s.voucher(cumulativeAmount="9" * 79)), 400, "malformed_request"),
    # what the signature binds, and the channel's state
    "wrong-chain-id": (lambda s: _other_domain(s, chain_id=s.domain.chain_id + 1), 400, "invalid_signature"),
    "wrong-contract": (lambda s: _other_domain(s, verifying_contract="0x" + "22" * 20), 400, "invalid_signature"),
    "signed-for-another-amount": (
        lambda s: s.post(s.voucher(100, signature="0x" + s.signature(101).hex())),
        400,
        "invalid_signature",
    ),
    "unknown-channel": (lambda s: s.post(s.voucher(channelId=CHANNEL)), 404, "channel_not_found"),
    "closed-channel": (_closed, 409, "channel_closed"),
    "over-deposit": (lambda s: s.post(s.voucher(DEPOSIT + 1)), 409, "amount_exceeds_deposit"),
    "decreasing": (_stale, 409, "stale_voucher"),
    "equal-with-another-signature": (_equal_other_signer, 400, "invalid_signature"),
    # the batch endpoint
    "batch-over-the-limit": (
        lambda s: s.client.post("/v1/vouchers/batch", json={"vouchers": [s.voucher()] * 11}),
        413,
        "batch_too_large",
    ),
    "batch-not-a-list": (
        lambda s: s.client.post("/v1/vouchers/batch", json={"vouchers": s.voucher()}),
        400,
        "malformed_request",
    ),
    "batch-bare-list": (lambda s: s.client.post("/v1/vouchers/batch", json=[s.voucher()]), 400, "malformed_request"),
    "batch-item-malformed": (
        lambda s: s.client.post("/v1/vouchers/batch", json={"vouchers": [s.voucher(), {"channelId": 1}]}),
        400,
        "malformed_request",
    ),
    # addresses and paths of the read routes
    "address-bad-checksum": (
        lambda s: s.client.get("/v1/channels", params={"payer": "0x" + "aB" * 20}),
        400,
        "malformed_request",
    ),
    "address-too-short": (lambda s: s.client.get("/v1/channels", params={"payee": "0x1234"}), 400, "malformed_request"),
    "address-not-hex": (
        lambda s: s.client.get("/v1/channels", params={"payer": "0x" + "zz" * 20}),
        400,
        "malformed_request",
    ),
    "summary-bad-address": (lambda s: s.client.get("/v1/payees/0x1234/summary"), 400, "malformed_request"),
    "channel-path-short": (lambda s: s.client.get("/v1/channels/0x1234"), 400, "malformed_request"),
    "status-unknown": (lambda s: s.client.get("/v1/channels", params={"status": "weird"}), 400, "malformed_request"),
    "limit-zero": (lambda s: s.client.get("/v1/channels", params={"limit": 0}), 400, "malformed_request"),
    "limit-huge": (lambda s: s.client.get("/v1/channels", params={"limit": 10**6}), 400, "malformed_request"),
    "cursor-garbage": (lambda s: s.client.get("/v1/channels", params={"cursor": "%%%"}), 400, "malformed_request"),
    "payments-unknown-channel": (lambda s: s.client.get(f"/v1/channels/{CHANNEL}/payments"), 404, "channel_not_found"),
    "payments-cursor-2^63": (
        lambda s: s.client.get(f"/v1/channels/{s.cid}/payments", params={"cursor": str(2**63)}),
        400,
        "malformed_request",
    ),
    "payments-cursor-30-digits": (
        lambda s: s.client.get(f"/v1/channels/{s.cid}/payments", params={"cursor": "9" * 30}),
        400,
        "malformed_request",
    ),
    "payments-cursor-zero": (
        lambda s: s.client.get(f"/v1/channels/{s.cid}/payments", params={"cursor": "0"}),
        400,
        "malformed_request",
    ),
    "payments-cursor-negative": (
        lambda s: s.client.get(f"/v1/channels/{s.cid}/payments", params={"cursor": "-1"}),
        400,
        "malformed_request",
    ),
    "unknown-route": (lambda s: s.client.get("/v1/nowhere"), 404, "not_found"),
    "wrong-method-delete": (lambda s: s.client.delete("/v1/vouchers"), 405, "method_not_allowed"),
    "wrong-method-put": (lambda s: s.client.put("/v1/vouchers", json=s.voucher()), 405, "method_not_allowed"),
}


# The cases that change the chain (a close): each runs on its own app, whose indexer never sees the chain reverted.
ON_THEIR_OWN = {"closed-channel"}
MIXED_BATCH = "a batch of mixed validity"


@pytest.fixture(scope="module")
def scenes(
    module_service_settings: Callable[..., Settings],
    accounts: list[LocalAccount],
    w3: Web3,
    session_hub: Contract,
) -> Iterator[dict[str, Scene]]:
    """A scene per shared case, all on one app: the channels are opened first, so the app's start indexes them all
    (and the chain is reverted to where it was once the module is done)."""
    snapshot = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    try:
        names = [case for case in CASES if case not in ON_THEIR_OWN] + [MIXED_BATCH]
        channels = {
            name: open_eth_channel(w3, session_hub, accounts[5], accounts[6].address, DEPOSIT, salt_of(n))
            for n, name in enumerate(names, start=1)
        }
        domain = Domain(chain_id=w3.eth.chain_id, verifying_contract=session_hub.address)
        settings = module_service_settings(batch_max_items=10)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            # every channel indexed before the first case: the indexer catches up on its own thread
            wait_until(lambda: client.get("/ready").json().get("indexerLag") == 0)
            yield {
                name: Scene(client, channel, voucher_signer(domain), domain, accounts[8], w3, session_hub)
                for name, channel in channels.items()
            }
    finally:
        assert w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])["result"] is True


@pytest.fixture
def own_scene(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
    domain: Domain,
    w3: Web3,
    hub: Contract,
) -> Scene:
    # salt 0: the shared scenes' channels (salts 1 and up) may still be open when this runs
    channel = open_channel(accounts[5], accounts[6].address, amount=DEPOSIT, salt=salt_of(0))
    return Scene(api(batch_max_items=10), channel, sign, domain, accounts[8], w3, hub)


@pytest.mark.parametrize("case", [case for case in CASES if case not in ON_THEIR_OWN])
def test_bad_input_gets_a_4xx_with_a_stable_code(scenes: dict[str, Scene], case: str) -> None:
    _check(scenes[case], case)


@pytest.mark.parametrize("case", sorted(ON_THEIR_OWN))
def test_bad_input_that_changes_the_chain_gets_a_4xx_with_a_stable_code(own_scene: Scene, case: str) -> None:
    _check(own_scene, case)


def _check(scene: Scene, case: str) -> None:
    make, status, code = CASES[case]
    answer = make(scene)
    assert (answer.status_code, answer.json().get("code")) == (status, code), answer.text
    assert answer.json()["message"]  # a sentence for the human, next to the code for the program
    # nothing refused changed the channel: it holds exactly what the case accepted before its bad request
    state = scene.client.get(f"/v1/channels/{scene.cid}").json()
    assert state["acceptedCumulativeAmount"] == str(ACCEPTED_BEFORE.get(case, 0))
    payments = scene.client.get(f"/v1/channels/{scene.cid}/payments").json()["items"]
    expected = [str(ACCEPTED_BEFORE[case])] if case in ACCEPTED_BEFORE else []
    assert [p["cumulativeAmount"] for p in payments] == expected


# What a case accepts before its bad request (every other case starts and ends with nothing accepted).
ACCEPTED_BEFORE = {
    "decreasing": 500,
    "equal-with-another-signature": 100,
    "idempotency-key-reused": 100,
    "resent-with-another-reference": 100,
}


def test_a_batch_of_mixed_validity_answers_each_item(scenes: dict[str, Scene]) -> None:
    scene = scenes[MIXED_BATCH]
    stale_first = scene.voucher(300)
    answer = scene.client.post(
        "/v1/vouchers/batch",
        json={
            "vouchers": [
                scene.voucher(100),
                scene.voucher(100, signature="0x" + scene.signature(100, signer=scene.stranger).hex()),
                scene.voucher(DEPOSIT + 1),
                stale_first,
                scene.voucher(200),
                stale_first,
                scene.voucher(cumulativeAmount=str(MAX_UINT256 + 1)),
            ]
        },
    )
    assert answer.status_code == 200, answer.text
    results = [(item["status"], (item["error"] or {}).get("code")) for item in answer.json()["results"]]
    assert results == [
        (201, None),
        (400, "invalid_signature"),
        (409, "amount_exceeds_deposit"),
        (201, None),
        (409, "stale_voucher"),
        (200, None),
        (400, "amount_out_of_range"),
    ]
    assert scene.client.get(f"/v1/channels/{scene.cid}").json()["acceptedCumulativeAmount"] == "300"
