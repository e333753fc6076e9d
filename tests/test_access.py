"""Who may read what (docs/security.md), on the real app and both stores: anyone, an account signed in with its own key,
a payee's or payer's API key, the operator; and the sign-in itself attacked (changed messages, other signers, forged
and expired tokens), keys revoked, and a store off a devnet refused without an operator key."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from hexbytes import HexBytes
from sqlalchemy import event
from sqlalchemy.engine import make_url

from settlement.errors import ConfigError, InvalidCredentialsError, UntrustedServiceError
from settlement.sdk.payer import PayerClient
from settlement.sdk.signin import SignInAuth
from settlement.server.access import SignIn
from settlement.server.api_keys import KeyDirectory, Role, make_key
from settlement.server.config import Settings
from settlement.server.service import check_credentials
from settlement.store import Database
from settlement.store.keys import revoke_key
from tests.hub_helpers import (
    DEEP_JSON,
    Channel,
    EventStream,
    Tampering,
    body,
    free_test_port,
    new_key,
    service_of,
    signed_in,
    wait_until,
    x402_request,
    x402_requirements,
    x402_settle_batch,
    x402_voucher,
)
from tests.servers import ServiceProcess, ServiceThread, forked_cli

PROTECTED = ("channel", "list", "payments", "summary", "metrics")


def revoke(store_url: str, key: str) -> None:
    db = Database(store_url)
    try:
        with db.write() as conn:
            assert revoke_key(conn, key[4:12], time.time_ns() // 1000)
    finally:
        db.dispose()


def test_a_key_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key's id is the 8 characters after its prefix, which an operator passes to `settlement keys revoke`: one
    that began with "-" (1 key in 64) read as an option there ("No such option: -Q"). Such a draw is drawn again."""
    draws = iter(["-QbCQHbV" + "a" * 35, "QbCQHbV-" + "b" * 35])
    monkeypatch.setattr("settlement.server.api_keys.secrets.token_urlsafe", lambda _n: next(draws))
    made = make_key(Role.OPERATOR, None, "test", 0)
    assert (made.secret, made.row.key_id) == ("chk_QbCQHbV-" + "b" * 35, "QbCQHbV-")


def reads(client: TestClient, channel: Channel, credential: str | None) -> dict[str, int]:
    """The status of each protected read about `channel` with this credential."""
    headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
    cid = channel.hex_id
    paths = {
        "channel": f"/v1/channels/{cid}",
        "list": f"/v1/channels?payee={channel.payee}",
        "payments": f"/v1/channels/{cid}/payments",
        "summary": f"/v1/payees/{channel.payee}/summary",
        "metrics": "/metrics",
    }
    return {name: client.get(path, headers=headers).status_code for name, path in paths.items()}


@pytest.fixture
def paid_channel(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    sign: Callable[..., bytes],
    accounts: list[LocalAccount],
) -> Callable[..., tuple[TestClient, Channel]]:
    """Factory: paid_channel(payer_index, payee_index) -> (an app with access control on, a channel with one
    accepted payment)."""

    def make(payer: int = 3, payee: int = 4, **settings: Any) -> tuple[TestClient, Channel]:
        client = api(access_control=True, **settings)
        channel = open_channel(accounts[payer], accounts[payee].address)
        wait_until(
            lambda: (
                client.post("/v1/vouchers", json=body(channel, 5, sign(channel.payer, channel.id, 5))).status_code
                == 201
            )
        )
        return client, channel

    return make


def test_anyone_pays_and_reads_public_facts_but_no_party_data(
    paid_channel: Callable[..., tuple[TestClient, Channel]], sign: Callable[..., bytes]
) -> None:
    client, channel = paid_channel()
    assert client.post("/v1/vouchers", json=body(channel, 9, sign(channel.payer, channel.id, 9))).status_code == 201
    assert [client.get(p).status_code for p in ("/health", "/v1/eip712", "/x402/supported", "/openapi.json")] == [
        200
    ] * 4
    assert reads(client, channel, None) == dict.fromkeys(PROTECTED, 401)
    refused = client.get(f"/v1/payees/{channel.payee}/summary")
    assert (refused.json()["code"], refused.headers["www-authenticate"]) == (
        "authentication_required",
        'Bearer realm="settlement"',
    )
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer chk_" + "A" * 43, "Bearer cht_" + "0" * 40 + ".9.0"):
        answer = client.get("/metrics", headers={"Authorization": header})
        assert (answer.status_code, answer.json()["code"]) == (401, "invalid_credentials"), header


def test_the_x402_facilitator_stays_open_to_payees_with_or_without_credentials(
    paid_channel: Callable[..., tuple[TestClient, Channel]], sign: Callable[..., bytes]
) -> None:
    """A payee's middleware calls /x402/verify, /settle and /settle/batch with no key (x402's facilitator client
    sends none); a header that is not a key changes nothing: what a payment buys is decided by its signed voucher."""
    client, channel = paid_channel()
    service = service_of(client)
    required = x402_requirements(service.deployment.chain_id, channel.payee, 5)
    payments = [x402_request(required, x402_voucher(channel, n, sign)) for n in (10, 15, 20, 25)]
    for headers in ({}, {"Authorization": "Bearer cht_not-a-token"}):
        verified = client.post("/x402/verify", json=payments[0], headers=headers)
        assert (verified.status_code, verified.json()["isValid"]) == (200, True)
    settled = client.post("/x402/settle", json=payments[0])
    assert (settled.status_code, settled.json()["success"]) == (200, True)
    batch = x402_settle_batch(*payments[1:])
    answer = client.post("/x402/settle/batch", json=batch, headers={"Authorization": "Bearer cht_not-a-token"})
    assert answer.status_code == 200
    assert [a["success"] for a in answer.json()["settlements"]] == [True, True, True]
    position = client.get(f"/v1/channels/{channel.hex_id}")
    assert position.status_code == 401  # the channel's state stays the parties' to read


def test_the_operator_reads_everything_until_its_key_is_revoked(
    paid_channel: Callable[..., tuple[TestClient, Channel]], store_url: str
) -> None:
    client, channel = paid_channel()
    key = new_key(store_url, Role.OPERATOR)
    assert reads(client, channel, key) == dict.fromkeys(PROTECTED, 200)
    assert client.get("/v1/channels", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    who = client.get("/v1/auth/whoami", headers={"Authorization": f"Bearer {key}"}).json()
    assert (who["role"], who["account"], who["via"]) == ("operator", None, key[4:12])
    revoke(store_url, key)
    assert reads(client, channel, key) == dict.fromkeys(PROTECTED, 401)


def test_a_payee_key_reads_its_own_channels_and_takings_only(
    paid_channel: Callable[..., tuple[TestClient, Channel]], store_url: str, accounts: list[LocalAccount]
) -> None:
    client, channel = paid_channel(3, 4)
    _, other = paid_channel(5, 6)
    own = new_key(store_url, Role.PAYEE, channel.payee)
    assert reads(client, channel, own) == {"channel": 200, "list": 200, "payments": 200, "summary": 200, "metrics": 403}
    assert reads(client, other, own) == dict.fromkeys(PROTECTED, 403)
    listing = client.get("/v1/channels", headers={"Authorization": f"Bearer {own}"})
    assert (listing.status_code, listing.json()["code"]) == (403, "forbidden")
    as_payer = client.get(f"/v1/channels?payer={channel.payee}", headers={"Authorization": f"Bearer {own}"})
    assert as_payer.status_code == 403  # a payee key does not read as a payer
    payer_key = new_key(store_url, Role.PAYER, channel.payer.address)
    assert reads(client, channel, payer_key) == {
        "channel": 200,
        "list": 403,  # the list names the payee: a payer lists with payer=itself
        "payments": 200,
        "summary": 403,
        "metrics": 403,
    }
    mine = client.get(f"/v1/channels?payer={channel.payer.address}", headers={"Authorization": f"Bearer {payer_key}"})
    assert [c["channelId"] for c in mine.json()["items"]] == [channel.hex_id]


def test_only_its_payee_and_the_operator_stop_a_channel(
    paid_channel: Callable[..., tuple[TestClient, Channel]],
    store_url: str,
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    """A stop ends a channel's payments at the service for good (its payee closes it next): anyone else stopping it
    would cut a payer off its channel, so its payer, another payee, a payee key of another address and an anonymous
    caller are refused and the channel still takes vouchers; its payee (by key or by signing in) and the operator
    may, and only then is a voucher refused."""
    client, channel = paid_channel(3, 4)
    _, other = paid_channel(5, 6)
    url = f"/v1/channels/{channel.hex_id}/stop"
    credentials = {
        "anonymous": None,
        "its payer": signed_in(client, accounts[3])["Authorization"].split()[1],
        "another payee": signed_in(client, accounts[6])["Authorization"].split()[1],
        "another payee's key": new_key(store_url, Role.PAYEE, other.payee),
        "its payer's payee key": new_key(store_url, Role.PAYEE, channel.payer.address),
    }
    for who, credential in credentials.items():
        headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
        answer = client.post(url, json={}, headers=headers)
        assert (answer.status_code, answer.json()["code"]) == ((401, "authentication_required") if credential is None
                                                                 else (403, "forbidden")), who  # fmt: skip
    assert client.post("/v1/vouchers", json=body(channel, 6, sign(channel.payer, channel.id, 6))).status_code == 201
    own = new_key(store_url, Role.PAYEE, channel.payee)
    stopped = client.post(url, json={}, headers={"Authorization": f"Bearer {own}"})
    assert (stopped.status_code, stopped.json()["acceptedCumulativeAmount"]) == (200, "6")
    refused = client.post("/v1/vouchers", json=body(channel, 7, sign(channel.payer, channel.id, 7)))
    assert (refused.status_code, refused.json()["code"]) == (409, "channel_closed")
    token = signed_in(client, accounts[6])  # the other channel's payee, signed in
    assert client.post(f"/v1/channels/{other.hex_id}/stop", json={}, headers=token).status_code == 200
    operator = new_key(store_url, Role.OPERATOR)
    service, third = paid_channel(7, 8)  # through the service it paid: the first spent its unknown-id reads on `other`
    third_stop = service.post(
        f"/v1/channels/0x{third.id.hex()}/stop", json={}, headers={"Authorization": f"Bearer {operator}"}
    )
    assert third_stop.status_code == 200, third_stop.text


def test_a_flood_of_made_up_api_keys_costs_the_store_a_bounded_number_of_reads(
    api: Callable[..., TestClient], store_url: str
) -> None:
    """Each made-up key used to cost a store read. The process holds the live keys' hashes: a key it does not hold
    makes it read them again, at most 5 a second (bursts of 10, the clock stands still here); beyond, 503
    `unknown_keys_busy` with no read. A held key is read each time (revocation stops it at once), so the operator's
    key works through the flood, and a key made during it works once the budget refills."""
    client = api(access_control=True)
    service = service_of(client)
    now = [1_000.0]
    service.keys = KeyDirectory(service.db, 5.0, clock=lambda: now[0])
    statements: list[str] = []
    event.listen(service.db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    def status(key: str) -> tuple[int, str | None]:
        answer = client.get("/v1/channels", headers={"Authorization": f"Bearer {key}"})
        return answer.status_code, None if answer.status_code == 200 else answer.json()["code"]

    def key_reads() -> int:
        return sum("api_keys" in statement for statement in statements)

    operator = new_key(store_url, Role.OPERATOR)
    assert status(operator) == (200, None)  # not held yet: the live hashes are read, then its row
    assert key_reads() == 2
    made_up = [f"chk_{n:043d}" for n in range(30)]
    answers = [status(key) for key in made_up]
    assert answers == [(401, "invalid_credentials")] * 9 + [(503, "unknown_keys_busy")] * 21
    assert key_reads() == 2 + 9
    assert [status(operator) for _ in range(3)] == [(200, None)] * 3
    assert key_reads() == 2 + 9 + 3
    fresh = new_key(store_url, Role.OPERATOR)
    assert status(fresh) == (503, "unknown_keys_busy")
    now[0] += 0.2  # one read refilled
    assert status(fresh) == (200, None)
    revoke(store_url, operator)
    assert status(operator) == (401, "invalid_credentials")  # a held key is read each time: revoked, refused at once
    assert status(operator) == (503, "unknown_keys_busy")  # and let go: it is a key like any made-up one now


def test_an_account_signs_in_with_its_own_key_and_reads_as_payer_and_payee(
    paid_channel: Callable[..., tuple[TestClient, Channel]], accounts: list[LocalAccount]
) -> None:
    client, channel = paid_channel(3, 4)
    _, other = paid_channel(5, 6)
    payee_token = signed_in(client, accounts[4])["Authorization"].split()[1]
    assert reads(client, channel, payee_token) == {
        "channel": 200,
        "list": 200,
        "payments": 200,
        "summary": 200,
        "metrics": 403,
    }
    assert reads(client, other, payee_token) == dict.fromkeys(PROTECTED, 403)
    payer_token = signed_in(client, accounts[3])["Authorization"].split()[1]
    who = client.get("/v1/auth/whoami", headers={"Authorization": f"Bearer {payer_token}"}).json()
    assert (who["role"], who["account"], who["via"]) == ("account", accounts[3].address, "sign-in")
    assert (
        client.get(f"/v1/channels/{channel.hex_id}", headers={"Authorization": f"Bearer {payer_token}"}).status_code
        == 200
    )


def test_a_sign_in_that_does_not_hold_gets_no_token(
    api: Callable[..., TestClient], accounts: list[LocalAccount]
) -> None:
    client = api(access_control=True)
    victim, attacker = accounts[4], accounts[5]
    message = client.post("/v1/auth/challenge", json={"address": victim.address}).json()["message"]

    def redeem(text: str, signer: LocalAccount) -> tuple[int, str]:
        signature = signer.sign_message(encode_defunct(text=text)).signature.to_0x_hex()
        answer = client.post("/v1/auth/token", json={"message": text, "signature": signature})
        return answer.status_code, answer.json().get("code", "")

    assert redeem(message, attacker) == (401, "invalid_credentials")  # the victim's challenge, another signer
    renamed = message.replace(victim.address, attacker.address)
    assert redeem(renamed, attacker) == (401, "invalid_credentials")  # the address changed: the nonce no longer holds
    year = message.rsplit("Expiration Time: ", 1)[1][:4]
    later = message.replace(f"Expiration Time: {year}", "Expiration Time: 2099")
    assert redeem(later, victim) == (401, "invalid_credentials")  # the expiry moved
    assert redeem(message + "\n", victim) == (401, "invalid_credentials")
    assert redeem("I agree", victim) == (401, "invalid_credentials")
    wrong = client.post("/v1/auth/token", json={"message": message, "signature": "0x" + "00" * 65})
    assert (wrong.status_code, wrong.json()["code"]) == (401, "invalid_credentials")
    for bad in ({"message": message}, {"message": message, "signature": "0x12"}, {"address": "0x1234"}):
        path = "/v1/auth/challenge" if "address" in bad else "/v1/auth/token"
        answer = client.post(path, json=bad)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_request")
    assert redeem(message, victim) == (200, "")  # a token, no error code


def test_a_sign_in_challenge_names_only_a_host_the_operator_listed(
    api: Callable[..., TestClient], accounts: list[LocalAccount]
) -> None:
    """With SETTLEMENT_ALLOWED_HOSTS `["*"]` the service made a challenge for whatever Host a request named: a
    look-alike site got one naming itself, had a payee sign it there (a wallet checks that a sign-in names the site
    asking for it: it did), and redeemed it here as that payee (its payments read, its channels stopped). A challenge
    now names a host the list names; `*` names none."""
    payee = accounts[4]

    def challenge(client: TestClient, host: str) -> tuple[int, str]:
        answer = client.post("/v1/auth/challenge", json={"address": payee.address}, headers={"Host": host})
        data = answer.json()
        return answer.status_code, data["code"] if answer.status_code != 200 else data["message"].split(" wants")[0]

    anyone = api(access_control=True, allowed_hosts=["*"])
    assert [challenge(anyone, host) for host in ("evil.example", "testserver", "*")] == [(400, "host_not_allowed")] * 3
    assert anyone.get("/health", headers={"Host": "evil.example"}).status_code == 200  # the API still answers it
    listed = api(access_control=True, allowed_hosts=["*", "API.example.com"])
    assert [challenge(listed, host) for host in ("api.example.com:8443", "evil.example")] == [
        (200, "api.example.com:8443"),
        (400, "host_not_allowed"),
    ]
    message = listed.post(
        "/v1/auth/challenge", json={"address": payee.address}, headers={"Host": "api.example.com"}
    ).json()["message"]
    signature = payee.sign_message(encode_defunct(text=message)).signature.to_0x_hex()
    redeemed = listed.post("/v1/auth/token", json={"message": message, "signature": signature})
    assert (redeemed.status_code, redeemed.json()["account"]) == (200, payee.address)


def test_challenges_and_tokens_expire_and_are_bound_to_their_secret_and_chain() -> None:
    signin = SignIn(b"k" * 32, 31337, challenge_ttl=300, token_ttl=3600)
    account: LocalAccount = Account.create()
    now = 1_900_000_000
    challenge = signin.challenge(account.address, "127.0.0.1:8000", "http://127.0.0.1:8000", now)
    message = challenge.message
    assert challenge.expires == now + 300
    signature = account.sign_message(encode_defunct(text=message)).signature.to_0x_hex()
    with pytest.raises(InvalidCredentialsError, match="expired"):
        signin.redeem(message, signature, now + 301)
    issued = signin.redeem(message, signature, now + 300)
    token = issued.token
    assert (issued.account, issued.expires) == (account.address, now + 3900)
    assert signin.caller(token, now + 3900).account == account.address
    with pytest.raises(InvalidCredentialsError, match="expired"):
        signin.caller(token, now + 3901)
    for other in (SignIn(b"j" * 32, 31337, 300, 3600), SignIn(b"k" * 32, 1, 300, 3600)):
        with pytest.raises(InvalidCredentialsError, match="not a credential"):
            other.caller(token, now)
        with pytest.raises(InvalidCredentialsError, match="not a sign-in"):
            other.redeem(message, signature, now)
    forged = token.replace(account.address[2:].lower(), "00" * 20)
    with pytest.raises(InvalidCredentialsError, match="not a credential"):
        signin.caller(forged, now)


def test_a_live_stream_ends_once_its_key_is_revoked_or_its_token_expires(
    serve_here: Callable[..., ServiceThread],
    accounts: list[LocalAccount],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A revoked key stops at once for every request, but a live stream of payee events, checked when it opened, went
    on delivering the payee's events for good, as did one opened with a sign-in token after the token expired. Now a
    stream checks its credential again every CREDENTIAL_RECHECK_SECONDS and ends with a `stream.ended` event."""
    monkeypatch.setattr("settlement.api.routes_payees.CREDENTIAL_RECHECK_SECONDS", 0.2)
    store = f"sqlite:///{tmp_path / 'streams.db'}"
    payee, other = accounts[4], accounts[5]
    revoked, kept = new_key(store, Role.PAYEE, payee.address), new_key(store, Role.PAYEE, other.address)
    service = serve_here(store, access_control=True, signin_secret="s" * 32)
    now = int(time.time())
    signin = SignIn(b"s" * 32, 31337, challenge_ttl=300, token_ttl=60)  # the service's secret: a token of its own
    message = signin.challenge(payee.address, "127.0.0.1", service.url, now - 58).message
    issued = signin.redeem(message, payee.sign_message(encode_defunct(text=message)).signature.to_0x_hex(), now - 58)
    token = issued.token
    assert issued.expires == now + 2
    url = f"{service.url}/v1/payees/{{}}/events"
    by_key = EventStream(url.format(payee.address), {"Authorization": f"Bearer {revoked}"})
    by_token = EventStream(url.format(payee.address), {"Authorization": f"Bearer {token}"})
    by_live_key = EventStream(url.format(other.address), {"Authorization": f"Bearer {kept}"})
    try:
        assert (by_key.status, by_token.status, by_live_key.status) == (200, 200, 200)
        with pytest.raises(AssertionError, match="no event"):
            by_key.next(timeout=1.0)  # five checks of a live key: the stream goes on
        revoke(store, revoked)
        ended = by_key.next(timeout=5)
        assert ended is not None and (ended.kind, ended.data["code"]) == ("stream.ended", "invalid_credentials")
        assert by_key.next(timeout=5) is None  # and the service hung up
        ended = by_token.next(timeout=10)
        assert ended is not None and (ended.kind, ended.data["code"]) == ("stream.ended", "invalid_credentials")
        assert "expired" in ended.data["message"] and time.time() >= issued.expires
        assert by_token.next(timeout=5) is None
        with pytest.raises(AssertionError, match="no event"):
            by_live_key.next(timeout=0.5)  # another payee's stream, its key live, goes on
    finally:
        for stream in (by_key, by_token, by_live_key):
            stream.close()


def test_the_payer_sdk_signs_in_by_itself_and_signs_nothing_else(
    serve_here: Callable[..., ServiceThread], devnet: Any, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """The app served as `serve` serves it, with access control on: the payer's SDK pays, then reads its own channels
    (signing in when the service answers 401); a challenge that is not a sign-in of this account here is never
    signed."""
    service = serve_here(f"sqlite:///{tmp_path / 'sdk.db'}", access_control=True)
    with PayerClient(
        HexBytes(accounts[3].key).to_0x_hex(), devnet.url, service.url, state_path=tmp_path / "journal.sqlite3"
    ) as payer:
        channel = payer.open_channel(accounts[4].address, 1_000)
        payer.wait_until_known(channel)
        assert payer.pay(channel, 10).cumulative == 10
        found = payer.open_channels(accounts[4].address, "0x" + "00" * 20)
        assert [(c["channelId"], c["acceptedCumulativeAmount"]) for c in found] == [(channel.hex_id, "10")]
        assert httpx.get(f"{service.url}/v1/channels/{channel.hex_id}").status_code == 401
    auth = SignInAuth(accounts[3], "http://127.0.0.1:8000", 31337)
    first = "127.0.0.1:8000 wants you to sign in with your Ethereum account:"
    good = f"{first}\n{accounts[3].address}\n\nx\n\nChain ID: 31337"
    auth._check(good)
    for bad in (
        good.replace("127.0.0.1:8000", "bank.example"),  # another site's sign-in
        good.replace(accounts[3].address, accounts[4].address),
        good.replace("31337", "1"),
        good.replace("31337", "9" * 5000),  # int() of it raised ValueError
        "0x1234",
    ):
        with pytest.raises(UntrustedServiceError):
            auth._check(bad)


def _expiring_at(at: object) -> Callable[[dict[str, Any]], object]:
    """A token answer rewritten to expire at `at`."""
    return lambda data: {**data, "expiresAt": at}


def test_a_sign_in_answer_not_in_the_services_form_is_untrusted(
    serve_here: Callable[..., ServiceThread], devnet: Any, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """The SDK's sign-in read the challenge and the token with `[...]` and `float(str(...))`: a challenge or a token
    answer that was not one raised KeyError, ValueError or JSONDecodeError out of whatever read the app made (and
    "inf" made a token never expire in the SDK's eyes). Each is now the service's word the SDK cannot take."""
    service = serve_here(f"sqlite:///{tmp_path / 'signin.db'}", access_control=True)
    answers: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
        ("/v1/auth/challenge", lambda data: b"<html>", "is not a JSON object"),
        ("/v1/auth/challenge", lambda data: DEEP_JSON, "is not a JSON object"),
        ("/v1/auth/challenge", lambda data: {**data, "message": 7}, "message is not a string"),
        ("/v1/auth/token", lambda data: {k: v for k, v in data.items() if k != "token"}, "token is not a string"),
        ("/v1/auth/token", lambda data: [data], "is not a JSON object"),
    ] + [
        ("/v1/auth/token", _expiring_at(at), "expires at")
        for at in ("inf", "nan", str(int(time.time()) + 60), 1e12, True, None)
    ]
    for path, rewrite, refusal in answers:
        tamper = Tampering()
        tamper.rewrite_post = lambda sent, data, path=path, rewrite=rewrite: rewrite(data) if sent == path else data
        with PayerClient(
            HexBytes(accounts[3].key).to_0x_hex(),
            devnet.url,
            service.url,
            state_path=tmp_path / "journal.sqlite3",
            http=httpx.Client(base_url=service.url, transport=tamper),
        ) as payer:
            with pytest.raises(UntrustedServiceError, match=refusal):
                payer.open_channels(accounts[4].address)
            tamper.rewrite_post = None
            assert payer.open_channels(accounts[4].address) == []  # the service's own answers: signed in


def test_off_a_devnet_a_store_without_an_operator_key_is_refused(store_url: str, tmp_path: Path) -> None:
    db = Database(store_url)
    try:
        db.migrate()
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        with db.write() as conn:
            check_credentials(conn, settings, devnet=True)  # a devnet starts as it is
            with pytest.raises(ConfigError, match="no operator API key"):
                check_credentials(conn, settings, devnet=False)
        new_key(store_url, Role.PAYEE, "0x" + "11" * 20)
        with db.write() as conn, pytest.raises(ConfigError, match="no operator API key"):
            check_credentials(conn, settings, devnet=False)  # a payee's key is not the operator's
        new_key(store_url, Role.OPERATOR)
        with db.write() as conn:
            check_credentials(conn, settings, devnet=False)
            with pytest.raises(ConfigError, match="devnet only"):
                check_credentials(conn, settings.model_copy(update={"access_control": False}), devnet=False)
    finally:
        db.dispose()


def test_keys_from_the_cli_and_a_served_devnet_prints_its_operator_key(
    spawn: Callable[..., ServiceProcess], tmp_path: Path, accounts: list[LocalAccount]
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    scrape = free_test_port()
    service = spawn(store, access_control="true", metrics_port=str(scrape))
    key_file = tmp_path / "operator-key"  # next to the deployment record the service was given
    operator = key_file.read_text().strip()
    assert f"devnet operator API key (also in {key_file}): {operator}" in service.log.read_text()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert httpx.get(f"{service.url}/metrics").status_code == 401
    assert httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {operator}"}).status_code == 200
    # The scraper's own port needs no key (bound to 127.0.0.1 here) and reads the same registry, gauges refreshed.
    scraped = httpx.get(f"http://127.0.0.1:{scrape}/metrics")
    assert scraped.status_code == 200 and "settlement_indexer_cursor_block " in scraped.text
    assert 'settlement_rpc_requests{method="eth_getBlockByNumber"}' in scraped.text

    env = {"SETTLEMENT_DATABASE_URL": store}
    made = forked_cli("keys", "create", "--role", "payee", "--account", accounts[4].address, env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    payee_key = made.stdout.strip()
    assert payee_key.startswith("chk_") and len(payee_key) == 47
    summary = f"{service.url}/v1/payees/{accounts[4].address}/summary"
    assert httpx.get(summary, headers={"Authorization": f"Bearer {payee_key}"}).status_code == 200
    listed = forked_cli("keys", "list", env=env, cwd=tmp_path)
    assert payee_key[4:12] in listed.stdout and payee_key not in listed.stdout
    revoked = forked_cli("keys", "revoke", payee_key[4:12], env=env, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(summary, headers={"Authorization": f"Bearer {payee_key}"}).status_code == 401
    again = forked_cli("keys", "revoke", payee_key[4:12], env=env, cwd=tmp_path)
    assert (again.returncode, "[not_found]" in again.stderr) == (1, True)
    wrong = forked_cli("keys", "create", "--role", "payee", env=env, cwd=tmp_path)
    assert (wrong.returncode, "[config_invalid]" in wrong.stderr) == (1, True)


def test_a_keys_name_is_printed_as_given_and_the_stores_password_never(
    spawn: Callable[..., ServiceProcess], store_url: str, tmp_path: Path
) -> None:
    """The CLI printed a key's name as rich markup: `keys create --name "[/] …"` failed after the key was stored,
    so the key, shown only on that line, was never shown; and `keys list` failed on it from then on. `serve` and
    `keys list` printed the store's URL whole, its password with it, where logs are kept."""
    url = make_url(store_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(password="hunter2")  # trust authentication takes any password: the URL is as an operator's
    with_password = url.render_as_string(hide_password=False)
    shown = url.render_as_string(hide_password=True)
    env = {"SETTLEMENT_DATABASE_URL": with_password}
    name = "[/] ops [bold]red"
    made = forked_cli("keys", "create", "--role", "operator", "--name", name, env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("chk_") and len(key) == 47
    assert f"made operator key {key[4:12]} ({name}); it is shown once, keep it secret:" in made.stderr
    listed = forked_cli("keys", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.endswith(f"store: {shown}\n")
    assert f"│ {name} │" in listed.stdout
    service = spawn(with_password, access_control="true")
    assert f"store: {shown}\n" in service.log.read_text()
    assert "hunter2" not in listed.stdout + service.log.read_text()
