"""Who is asking: the `Authorization: Bearer` credential of a request, as the route's `Caller` (docs/security.md).

Routes that read a party's data depend on `CallerDep` and check the caller against what they read; operators' routes
depend on `OperatorDep`. With SETTLEMENT_ACCESS_CONTROL=false (a devnet only) every caller is the operator.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from settlement.errors import AuthenticationRequiredError, ForbiddenError, InvalidCredentialsError
from settlement.server.access import Caller, identify
from settlement.server.api_keys import Role
from settlement.server.service import Service

OPEN = Caller(Role.OPERATOR, None, "open")  # what every caller is when access control is off
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="an API key (`settlement keys create`) or a sign-in token (`POST /v1/auth/token`)",
)


def caller(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """Plain `def`: a live API key is read from the store (so that a revoked key stops at once)."""
    service: Service = request.app.state.service
    if not service.settings.access_control:
        return OPEN
    if credentials is None:
        if request.headers.get("authorization"):
            raise InvalidCredentialsError("send credentials as `Authorization: Bearer <API key or sign-in token>`")
        raise AuthenticationRequiredError(
            "this route needs credentials: an API key, or a token from signing in with your account "
            "(POST /v1/auth/challenge, then POST /v1/auth/token)"
        )
    return identify(service.keys, service.signin, credentials.credentials, int(time.time()))


def operator(who: Annotated[Caller, Depends(caller)]) -> Caller:
    if not who.is_operator:
        raise ForbiddenError("this route is the operator's")
    return who


CallerDep = Annotated[Caller, Depends(caller)]
OperatorDep = Annotated[Caller, Depends(operator)]


def require_party(who: Caller, payer: str, payee: str, what: str) -> None:
    if not who.may_read_channel(payer, payee):
        raise ForbiddenError(f"{what} is read by its payer, its payee and the operator only")
