"""The operator's risk routes: risk events (what the monitor saw) and channel holds (docs/security.md#risk-controls).
A hold reaches ingest in every process on the store within a quarter of a second."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import Field

from settlement.api.auth import OperatorDep
from settlement.api.deps import ERRORS, ChannelIdPath, Limit, ServiceDep
from settlement.api.schemas import StrictModel
from settlement.domain.model import RiskKind
from settlement.errors import NotFoundError
from settlement.store.risk import RiskFinding, events_after, hold, holds, record, release

router = APIRouter(prefix="/v1/risk", responses=ERRORS, tags=["risk"])


class RiskEventOut(StrictModel):
    id: int
    at: int = Field(description="unix microseconds")
    kind: str
    payer: str | None
    channelId: str | None
    detail: dict[str, Any]


class RiskEventPage(StrictModel):
    items: list[RiskEventOut]
    nextCursor: int | None


class HoldIn(StrictModel):
    reason: str = Field(min_length=1, max_length=500, pattern=r"^[^\x00]*$")


class HoldOut(StrictModel):
    channelId: str
    reason: str


@router.get("/events", operation_id="listRiskEvents")
def risk_events(
    service: ServiceDep,
    _: OperatorDep,
    kind: Annotated[RiskKind | None, Query(description="only events of this kind")] = None,
    cursor: Annotated[int, Query(ge=0, le=2**63 - 1, description="the previous page's nextCursor")] = 0,
    limit: Limit = 100,
) -> RiskEventPage:
    """Risk events in the order they were recorded."""
    with service.db.read() as conn:
        found = events_after(conn, cursor, limit, kind)
    items = [RiskEventOut(id=e.event_id, at=e.at_us, kind=e.kind, payer=e.payer, channelId=e.channel_id,
                          detail=e.detail) for e in found]  # fmt: skip
    return RiskEventPage(items=items, nextCursor=items[-1].id if len(items) == limit else None)


@router.get("/holds", operation_id="listHolds")
def list_holds(service: ServiceDep, _: OperatorDep) -> list[HoldOut]:
    """The channels the operator holds."""
    with service.db.read() as conn:
        return [HoldOut(channelId=cid, reason=reason) for cid, reason in sorted(holds(conn).items())]


@router.put("/holds/{channelId}", operation_id="holdChannel")
def hold_channel(channelId: ChannelIdPath, body: HoldIn, service: ServiceDep, _: OperatorDep) -> HoldOut:
    """Hold a channel: its vouchers get 409 channel_held until released (accepted ones stay, and still settle)."""
    channel_id = channelId.lower()
    now_us = time.time_ns() // 1000
    with service.db.write() as conn:
        hold(conn, channel_id, body.reason, now_us)
        record(conn, [RiskFinding(now_us, RiskKind.CHANNEL_HELD, None, channel_id, {"reason": body.reason})])
    return HoldOut(channelId=channel_id, reason=body.reason)


@router.delete("/holds/{channelId}", operation_id="releaseChannel", status_code=204)
def release_channel(channelId: ChannelIdPath, service: ServiceDep, _: OperatorDep) -> Response:
    """Release a held channel."""
    with service.db.write() as conn:
        if not release(conn, channelId.lower()):
            raise NotFoundError(f"channel {channelId.lower()} is not held")
    return Response(status_code=204)
