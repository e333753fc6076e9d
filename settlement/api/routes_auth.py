"""Sign-in with the account's own key (EIP-4361 style) and who a credential speaks for. Public: a payer or a payee
needs nothing from the operator to read its own data."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import Field, StringConstraints

from settlement.api.auth import CallerDep
from settlement.api.deps import ERRORS, ServiceDep, checked_address
from settlement.api.middleware import named_host
from settlement.api.schemas import Address, StrictModel
from settlement.errors import HostNotAllowedError

router = APIRouter(prefix="/v1/auth", responses=ERRORS, tags=["auth"])
Signature = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{130}$")]


class ChallengeIn(StrictModel):
    address: Address = Field(description="the account that will sign in")


class ChallengeOut(StrictModel):
    message: str = Field(description="the EIP-4361 message to sign with personal_sign (EIP-191), unchanged")
    expiresAt: int = Field(description="unix seconds: sign and redeem it before then")


class TokenIn(StrictModel):
    message: Annotated[str, StringConstraints(max_length=2048)]
    signature: Signature = Field(description="the account's personal_sign of the message, 0x + 130 hex digits")


class TokenOut(StrictModel):
    token: str
    tokenType: str = "Bearer"
    account: str
    expiresAt: int = Field(description="unix seconds; sign in again after")


class WhoAmIOut(StrictModel):
    role: str = Field(description="operator, payee, payer, or account (signed in: its channels as payer and payee)")
    account: str | None
    via: str = Field(description="the API key's id, `sign-in`, or `open` when access control is off")


@router.post("/challenge", operation_id="signInChallenge")
def challenge(body: ChallengeIn, request: Request, service: ServiceDep) -> ChallengeOut:
    """A message for the account to sign; stateless (HMAC-bound to this service), valid a few minutes.

    It names the request's host, which must be one SETTLEMENT_ALLOWED_HOSTS lists by name. `*` lets any host reach
    the API, and a challenge was made for any: a look-alike site got one naming itself from the service, had a
    payee sign it there (a wallet checks that a sign-in names the site asking for it: it did), and redeemed it here
    as that payee (its payments read, its channels stopped, a webhook of its own added)."""
    address = checked_address(body.address, "address")
    assert address is not None
    host = request.headers.get("host", "")
    if not named_host(host, service.settings.allowed_hosts):
        raise HostNotAllowedError(
            f"sign-in challenges name a host SETTLEMENT_ALLOWED_HOSTS lists by name; {host[:100]!r} is not listed "
            "(`*` lets any host reach the API, not sign in under its name)"
        )
    challenge = service.signin.challenge(address, host, f"{request.url.scheme}://{host}", int(time.time()))
    return ChallengeOut(message=challenge.message, expiresAt=challenge.expires)


@router.post("/token", operation_id="signInToken")
def token(body: TokenIn, service: ServiceDep) -> TokenOut:
    """A bearer token for the account that signed a challenge of this service (401 invalid_credentials if not)."""
    issued = service.signin.redeem(body.message, body.signature, int(time.time()))
    return TokenOut(token=issued.token, account=issued.account, expiresAt=issued.expires)


@router.get("/whoami", operation_id="whoAmI")
def whoami(who: CallerDep) -> WhoAmIOut:
    """Who the request's credential speaks for."""
    return WhoAmIOut(role=who.role.value, account=who.account, via=who.via)
