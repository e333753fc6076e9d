"""A payee's events: its webhooks (made, listed, deleted) and its live stream (Server-Sent Events, resumable with
`Last-Event-ID`). That payee's and the operator's only. docs/payee-events.md has the events and the delivery rules."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from settlement.api.auth import CallerDep
from settlement.api.deps import ERRORS, AddressPath, ServiceDep, checked_address
from settlement.api.schemas import StrictModel
from settlement.errors import ForbiddenError, MalformedRequestError, NotFoundError, WebhookLimitError
from settlement.server.access import Caller
from settlement.server.payee_events import Position, read_events
from settlement.server.service import Service
from settlement.server.webhooks import check_target, new_secret
from settlement.store.payee_events import (
    WebhookRow,
    add_webhook,
    delete_webhook,
    last_chain_position,
    last_payment_id,
    payee_webhooks,
)

router = APIRouter(prefix="/v1/payees/{address}", responses=ERRORS, tags=["payee events"])
STREAM_POLL_SECONDS = 0.5


class WebhookIn(StrictModel):
    url: str = Field(max_length=2048, description="http(s) URL the events are POSTed to")


class WebhookOut(StrictModel):
    webhookId: str
    url: str
    createdAt: int = Field(description="unix seconds")
    position: str = Field(description="the position its deliveries stand at (payment id.block.log index)")
    failures: int = Field(description="failed attempts in a row (0: delivering)")
    lastError: str | None
    nextAttemptAt: int | None = Field(description="unix seconds of the next attempt after a failure")
    secret: str | None = Field(
        default=None, description="the signing secret (whsec_...): in the answer that made the webhook only"
    )

    @classmethod
    def of(cls, row: WebhookRow, secret: str | None = None) -> WebhookOut:
        return cls(
            webhookId=row.webhook_id,
            url=row.url,
            createdAt=row.created_at_us // 1_000_000,
            position=Position(row.after_payment, row.after_block, row.after_log).token(),
            failures=row.failures,
            lastError=row.last_error,
            nextAttemptAt=row.next_attempt_us // 1_000_000 if row.failures else None,
            secret=secret,
        )


def _payee(address: str, who: Caller) -> str:
    payee = checked_address(address, "address")
    assert payee is not None
    if not (who.is_operator or who.is_payee(payee)):
        raise ForbiddenError("a payee's events and webhooks are that payee's and the operator's only")
    return payee


def _now(service: Service) -> Position:
    with service.db.read() as conn:
        block, log = last_chain_position(conn)
        return Position(last_payment_id(conn), block, log)


@router.post("/webhooks", operation_id="createWebhook", status_code=201)
def create_webhook(address: AddressPath, body: WebhookIn, service: ServiceDep, who: CallerDep) -> WebhookOut:
    """A webhook for the payee's events from now on; the answer carries its signing secret, once."""
    payee = _payee(address, who)
    check_target(body.url, service.private_webhooks)
    start = _now(service)
    now_us = time.time_ns() // 1000
    row = WebhookRow(
        "wh_" + secrets.token_hex(8), payee, body.url, new_secret(), now_us, start.payment, start.block, start.log,
        0, 0, None,
    )  # fmt: skip
    limit = service.settings.webhooks_per_payee
    with service.db.write() as conn:
        if not add_webhook(conn, row, limit):
            raise WebhookLimitError(f"a payee has at most {limit} webhooks")
    return WebhookOut.of(row, row.secret)


@router.get("/webhooks", operation_id="listWebhooks")
def list_webhooks(address: AddressPath, service: ServiceDep, who: CallerDep) -> list[WebhookOut]:
    """The payee's webhooks and where each one's deliveries stand (never their secrets)."""
    payee = _payee(address, who)
    with service.db.read() as conn:
        return [WebhookOut.of(row) for row in payee_webhooks(conn, payee)]


@router.delete("/webhooks/{webhookId}", operation_id="deleteWebhook", status_code=204)
def remove_webhook(
    address: AddressPath,
    webhookId: Annotated[str, Path(pattern=r"^wh_[0-9a-f]{16}$")],
    service: ServiceDep,
    who: CallerDep,
) -> Response:
    """Stop a webhook: nothing more is sent to it."""
    payee = _payee(address, who)
    with service.db.write() as conn:
        if not delete_webhook(conn, payee, webhookId, time.time_ns() // 1000):
            raise NotFoundError(f"the payee has no webhook {webhookId}")
    return Response(status_code=204)


@router.get("/events", operation_id="streamPayeeEvents", response_class=EventSourceResponse)
async def stream_events(
    address: AddressPath,
    request: Request,
    service: ServiceDep,
    who: CallerDep,
    after: Annotated[str | None, Query(max_length=64, description="a position to resume after")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
) -> EventSourceResponse:
    """The payee's events as they happen (text/event-stream); each event's `id` is the position to resume after
    (browsers send it back as `Last-Event-ID`). Without one, from now on."""
    payee = _payee(address, who)
    token = last_event_id or after
    start = Position.parse(token) if token else await run_in_threadpool(_now, service)
    if start is None:
        raise MalformedRequestError("a position is payment.block.log, as an event's id gives it")
    return EventSourceResponse(_events(service, request, payee, start), ping=15)


async def _events(service: Service, request: Request, payee: str, start: Position) -> AsyncIterator[dict[str, Any]]:
    position = start
    assert service.horizon is not None
    while not await request.is_disconnected():
        horizon = await run_in_threadpool(service.horizon.refresh)
        feed = await run_in_threadpool(read_events, service.db, horizon, payee, position)
        for event in feed.events:
            yield {"id": event.position.token(), "event": event.type, "data": json.dumps(event.body())}
        position = feed.position
        if not feed.more:
            await asyncio.sleep(STREAM_POLL_SECONDS)
