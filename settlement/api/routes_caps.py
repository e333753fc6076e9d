"""Spending caps (docs/security.md#spending-caps): a payee caps what each payer may spend on its channels per window;
the operator caps a payer over every payee, or any pair. A cap reaches ingest in every process on the store within a
quarter of a second; a voucher past it gets 409 `spending_cap_reached` with Retry-After (the window's end)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import Field

from settlement.api.auth import CallerDep, OperatorDep
from settlement.api.deps import ERRORS, AddressPath, ServiceDep, checked_address, refuse_unless_admitted
from settlement.api.schemas import AmountStr, StrictModel
from settlement.domain.ledger import ANY, Cap
from settlement.domain.model import ETH, MAX_UINT256
from settlement.errors import CapLimitError, CapsFullError, ForbiddenError, MalformedRequestError, NotFoundError
from settlement.server.access import Caller
from settlement.store import caps as caps_q
from settlement.store.standing import Admission, Limits

payee_router = APIRouter(prefix="/v1/payees/{address}/caps", responses=ERRORS, tags=["risk"])
operator_router = APIRouter(prefix="/v1/risk/caps", responses=ERRORS, tags=["risk"])

MAX_WINDOW = 366 * 86_400
AddressOrAny = Annotated[str, Field(pattern=r"^(0x[0-9a-fA-F]{40}|\*)$", description='an address, or "*": every one')]
TokenAddress = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]
CapId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class CapIn(StrictModel):
    payer: AddressOrAny = Field(default=ANY, description='the payer capped, or "*": each payer on its own count')
    token: Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")] = Field(
        default=ETH, description="the asset (ETH: 0x0…0)"
    )
    amount: AmountStr = Field(description="the most a payer may spend in one window, base units (decimal string)")
    windowSeconds: int = Field(
        ge=1, le=MAX_WINDOW, description="the window; windows start at its multiples since the epoch (3600: UTC hours)"
    )


class OperatorCapIn(CapIn):
    payee: AddressOrAny = Field(default=ANY, description='the payee whose channels it covers, or "*": every payee')


class CapOut(StrictModel):
    capId: int
    payee: str
    payer: str
    token: str
    amount: str
    windowSeconds: int

    @classmethod
    def of(cls, cap: Cap) -> CapOut:
        return cls(
            capId=cap.cap_id,
            payee=cap.payee,
            payer=cap.payer,
            token=cap.token,
            amount=str(cap.amount),
            windowSeconds=cap.window,
        )


def _party(value: str, name: str) -> str:
    if value == ANY:
        return ANY
    address = checked_address(value, name)
    assert address is not None
    return address


def _amount(value: str) -> int:
    amount = int(value)
    if not 0 < amount <= MAX_UINT256:
        raise MalformedRequestError("amount must be above 0 and below 2^256")
    return amount


def _own(address: str, who: Caller) -> str:
    payee = _party(address, "address")
    if not (who.is_operator or who.is_payee(payee)):
        raise ForbiddenError("a payee's spending caps are that payee's and the operator's only")
    return payee


def _set(service: ServiceDep, payee: str, body: CapIn, who: Caller) -> CapOut:
    token = _party(body.token, "token")
    settings = service.settings
    limits = Limits(settings.caps_per_payee, settings.caps_max, settings.caps_without_channels)
    with service.db.write() as conn:
        cap = caps_q.set_cap(
            conn,
            payee,
            _party(body.payer, "payer"),
            token,
            _amount(body.amount),
            body.windowSeconds,
            time.time_ns() // 1000,
            limits,
            vouched=who.is_vouched_for,
        )
    if isinstance(cap, Admission):
        over = CapLimitError(
            f"{payee} has {limits.per_payee} spending caps already: change or remove one", maxCaps=limits.per_payee
        )
        refuse_unless_admitted(cap, limits, things="spending caps", setting="CAPS", payee_full=over, full=CapsFullError)
        raise AssertionError(cap)  # a cap is made whenever there was room
    return CapOut.of(cap)


@payee_router.get("", operation_id="listPayeeCaps")
def list_payee_caps(address: AddressPath, service: ServiceDep, who: CallerDep) -> list[CapOut]:
    """The caps this payee set on what payers may spend on its channels."""
    payee = _own(address, who)
    with service.db.read() as conn:
        return [CapOut.of(cap) for cap in caps_q.caps(conn, payee)]


@payee_router.put("", operation_id="setPayeeCap")
def set_payee_cap(address: AddressPath, body: CapIn, service: ServiceDep, who: CallerDep) -> CapOut:
    """Cap what a payer (or each payer) may spend on this payee's channels in each window; setting it again for the
    same payer, asset and window changes its amount. At most SETTLEMENT_CAPS_PER_PAYEE a payee (409 `cap_limit`),
    SETTLEMENT_CAPS_MAX in all, of which payees of no channel at this service hold SETTLEMENT_CAPS_WITHOUT_CHANNELS
    together (503 `caps_full`)."""
    return _set(service, _own(address, who), body, who)


@payee_router.delete("/{capId}", operation_id="removePayeeCap", status_code=204)
def remove_payee_cap(address: AddressPath, capId: CapId, service: ServiceDep, who: CallerDep) -> Response:
    payee = _own(address, who)
    with service.db.write() as conn:
        if not caps_q.remove_cap(conn, capId, payee):
            raise NotFoundError(f"payee {payee} has no cap {capId}")
    return Response(status_code=204)


@operator_router.get("", operation_id="listCaps")
def list_caps(service: ServiceDep, _: OperatorDep) -> list[CapOut]:
    """Every spending cap: the operator's and every payee's."""
    with service.db.read() as conn:
        return [CapOut.of(cap) for cap in caps_q.caps(conn)]


@operator_router.put("", operation_id="setCap")
def set_cap(body: OperatorCapIn, service: ServiceDep, who: OperatorDep) -> CapOut:
    """Cap a payer over every payee (`payee` "*"), or any payee and payer pair."""
    return _set(service, _party(body.payee, "payee"), body, who)


@operator_router.delete("/{capId}", operation_id="removeCap", status_code=204)
def remove_cap(capId: CapId, service: ServiceDep, _: OperatorDep) -> Response:
    with service.db.write() as conn:
        if not caps_q.remove_cap(conn, capId):
            raise NotFoundError(f"there is no cap {capId}")
    return Response(status_code=204)
