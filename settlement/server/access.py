"""Who a request speaks for (docs/security.md): anyone, an account signed in with its own key, a key made for a payee
or a payer, or the operator.

Two kinds of credential, both sent as `Authorization: Bearer <credential>`:
- **API keys** (`settlement keys create --role ...`; settlement.server.api_keys): `chk_` + 32 random bytes; the store
  keeps their SHA-256 only, shown once, revocable at once.
- **sign-in tokens**: an account signs an EIP-4361 message this service issued (`POST /v1/auth/challenge`, then
  `POST /v1/auth/token`) and gets a token for `token_ttl` seconds. Messages and tokens are HMAC-SHA256 under one
  secret per store (or SETTLEMENT_SIGNIN_SECRET), so every process on the store accepts them and nothing is stored
  per sign-in. A token cannot be revoked alone: it expires; changing the secret ends them all.

The message is EIP-4361's text; it is made and read here (the `siwe` package pins web3 < 8), and the signature is
checked with eth-account (EIP-191 `personal_sign`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.address import to_checksum_address

from settlement.errors import InvalidCredentialsError
from settlement.server.api_keys import KeyDirectory, Role, looks_like_key

TOKEN_PREFIX = "cht_"
STATEMENT = "Sign in to read your own channels, payments and takings at this ChannelHub settlement service."
_MESSAGE = re.compile(
    r"\A(?P<domain>[^\s]{1,255}) wants you to sign in with your Ethereum account:\n"
    r"(?P<address>0x[0-9a-fA-F]{40})\n\n" + re.escape(STATEMENT) + r"\n\nURI: (?P<uri>[^\s]{1,512})\n"
    r"Version: 1\n"
    r"Chain ID: (?P<chain_id>[1-9][0-9]{0,19})\n"
    r"Nonce: (?P<nonce>[0-9a-f]{32})\n"
    r"Issued At: (?P<issued>[0-9T:\-]{19}Z)\n"
    r"Expiration Time: (?P<expires>[0-9T:\-]{19}Z)\Z"
)
_TOKEN = re.compile(
    r"\A" + TOKEN_PREFIX + r"(?P<address>[0-9a-f]{40})\.(?P<expires>[1-9][0-9]{0,11})\.(?P<mac>[0-9a-f]{64})\Z"
)


@dataclass(frozen=True)
class Caller:
    role: Role
    account: str | None = None  # checksummed; None for the operator
    via: str = ""  # the API key's id, or "sign-in"

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR

    @property
    def is_vouched_for(self) -> bool:
        """The operator, or an API key the operator made for one account: not a fresh key anyone may make."""
        return self.role in (Role.OPERATOR, Role.PAYEE, Role.PAYER)

    def is_payer(self, address: str) -> bool:
        return self.role in (Role.PAYER, Role.ACCOUNT) and self.account == address

    def is_payee(self, address: str) -> bool:
        return self.role in (Role.PAYEE, Role.ACCOUNT) and self.account == address

    def may_read_channel(self, payer: str, payee: str) -> bool:
        return self.is_operator or self.is_payer(payer) or self.is_payee(payee)


def identify(keys: KeyDirectory, signin: SignIn, credential: str, now: int) -> Caller:
    """Who a bearer credential speaks for: a live API key, else a sign-in token."""
    if looks_like_key(credential):
        row = keys.find(credential)
        if row is None:
            raise InvalidCredentialsError("unknown or revoked API key")
        return Caller(Role(row.role), row.account, row.key_id)
    return signin.caller(credential, now)


class Challenge(NamedTuple):
    message: str  # EIP-4361's text, for the account to sign (personal_sign)
    expires: int  # unix seconds: when it stops being accepted


class Token(NamedTuple):
    token: str
    account: str  # checksummed: the account that signed the challenge
    expires: int  # unix seconds


class SignIn:
    """EIP-4361 challenges for one chain, and the tokens a signed challenge buys."""

    def __init__(self, secret: bytes, chain_id: int, challenge_ttl: int, token_ttl: int) -> None:
        self._secret = secret
        self.chain_id = chain_id
        self.challenge_ttl = challenge_ttl
        self.token_ttl = token_ttl

    def challenge(self, address: str, domain: str, uri: str, now: int) -> Challenge:
        account = to_checksum_address(address)
        expires = now + self.challenge_ttl
        issued_text, expires_text = _iso(now), _iso(expires)
        nonce = self._mac("challenge", domain, uri, account, issued_text, expires_text)[:32]
        message = (
            f"{domain} wants you to sign in with your Ethereum account:\n{account}\n\n{STATEMENT}\n\n"
            f"URI: {uri}\nVersion: 1\nChain ID: {self.chain_id}\nNonce: {nonce}\n"
            f"Issued At: {issued_text}\nExpiration Time: {expires_text}"
        )
        return Challenge(message, expires)

    def redeem(self, message: str, signature: str, now: int) -> Token:
        """A token for a challenge of ours, unexpired, signed by the account it names."""
        found = _MESSAGE.match(message)
        if found is None:
            raise InvalidCredentialsError("the message is not a sign-in challenge of this service")
        fields = found.groupdict()
        account = fields["address"]
        if account != to_checksum_address(account) or int(fields["chain_id"]) != self.chain_id:
            raise InvalidCredentialsError("the message is not a sign-in challenge of this service")
        nonce = self._mac("challenge", fields["domain"], fields["uri"], account, fields["issued"], fields["expires"])
        if not hmac.compare_digest(nonce[:32], fields["nonce"]):
            raise InvalidCredentialsError("the message is not a sign-in challenge of this service (was it changed?)")
        if _unix(fields["expires"]) < now:
            raise InvalidCredentialsError("the sign-in challenge expired: ask for a new one")
        try:
            signer = Account.recover_message(encode_defunct(text=message), signature=bytes.fromhex(signature[2:]))
        except Exception as ex:  # eth-account raises several kinds for bytes that are not a signature
            raise InvalidCredentialsError("the signature is not a valid signature of the message") from ex
        if signer != account:
            raise InvalidCredentialsError(f"the message names {account}; it was signed by {signer}")
        expires = now + self.token_ttl
        address = account[2:].lower()
        return Token(f"{TOKEN_PREFIX}{address}.{expires}.{self._mac('token', address, str(expires))}", account, expires)

    def caller(self, token: str, now: int) -> Caller:
        found = _TOKEN.match(token)
        if found is None:
            raise InvalidCredentialsError("not a credential of this service")
        address, expires = found["address"], int(found["expires"])
        if not hmac.compare_digest(self._mac("token", address, str(expires)), found["mac"]):
            raise InvalidCredentialsError("not a credential of this service")
        if expires < now:
            raise InvalidCredentialsError("the sign-in token expired: sign in again")
        return Caller(Role.ACCOUNT, to_checksum_address("0x" + address), "sign-in")

    def _mac(self, *parts: str) -> str:
        text = "\n".join((str(self.chain_id), *parts))
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unix(text: str) -> int:
    try:
        return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError as ex:
        raise InvalidCredentialsError("the message's times are not UTC ISO 8601") from ex
