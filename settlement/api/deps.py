"""What every route depends on: the running service, and the typed path and query parameters with their rules."""

from __future__ import annotations

from typing import Annotated, Any

from eth_utils.address import to_checksum_address
from fastapi import Depends, Path, Query, Request

from settlement.api.schemas import ErrorOut
from settlement.chain.addresses import ADDRESS_RULE, is_typed_address
from settlement.domain.clients import client_of
from settlement.errors import MalformedRequestError, SettlementError
from settlement.server.service import Service
from settlement.store.standing import Admission, Limits


async def get_service(request: Request) -> Service:
    """`async` so FastAPI resolves it on the event loop, not with a hop to a worker thread per request."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def client_of_request(request: Request) -> str:
    """The client a route's budgets (forged vouchers in batches) count against, as the rate limit counts it."""
    service: Service = request.app.state.service
    return client_of(request.scope, service.settings.client_ipv6_prefix)


ChannelIdPath = Annotated[str, Path(pattern=r"^0x[0-9a-fA-F]{64}$", description="0x + 64 hex digits")]
AddressPath = Annotated[str, Path(pattern=r"^0x[0-9a-fA-F]{40}$", description=ADDRESS_RULE)]
AddressQuery = Annotated[str | None, Query(pattern=r"^0x[0-9a-fA-F]{40}$", description=ADDRESS_RULE)]
Limit = Annotated[int, Query(ge=1, le=1000)]
ADMITTED = "admitted_channel"  # request.state: the channel id the fast path admitted (its read budget taken once)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 415, 421, 503)
}


def checked_address(value: str | None, name: str) -> str | None:
    """Any valid address, checksummed; mixed case must carry a correct EIP-55 checksum."""
    if value is None:
        return None
    if not is_typed_address(value):
        raise MalformedRequestError(f"{name} is not a valid address (mixed case must be a correct EIP-55 checksum)")
    return to_checksum_address(value)


def refuse_unless_admitted(
    admission: Admission,
    limits: Limits,
    *,
    things: str,
    setting: str,
    payee_full: SettlementError,
    full: type[SettlementError],
) -> None:
    """Raise the refusal of a payee's new webhook or cap that did not fit (settlement.store.standing): `payee_full`,
    or `full` naming the bound in all or the share of payees of no channel (`SETTLEMENT_<setting>_MAX`, `..._WITHOUT_
    CHANNELS`)."""
    if admission is Admission.PAYEE_FULL:
        raise payee_full
    if admission is Admission.ALL_FULL:
        raise full(f"this service holds {limits.total} {things}, its most (SETTLEMENT_{setting}_MAX)")
    if admission is Admission.NO_CHANNEL_FULL:
        raise full(
            f"payees of no channel at this service hold {limits.without_channels} {things}, their most "
            f"(SETTLEMENT_{setting}_WITHOUT_CHANNELS); a payee of a channel is not held back by them"
        )
