"""A payee's events: its webhooks (made, listed, deleted) and its live stream (Server-Sent Events, resumable with
`Last-Event-ID`). That payee's and the operator's only. docs/payee-events.md has the events and the delivery rules."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from settlement.api.auth import CallerDep
from settlement.api.deps import ERRORS, AddressPath, ServiceDep, checked_address, refuse_unless_admitted
from settlement.api.schemas import ErrorOut, StrictModel
from settlement.errors import (
    ForbiddenError,
    InvalidCredentialsError,
    MalformedRequestError,
    NotFoundError,
    WebhookLimitError,
    WebhooksFullError,
)
from settlement.server.access import Caller, identify
from settlement.server.payee_events import Position, read_events
from settlement.server.service import Service
from settlement.server.webhooks import new_secret
from settlement.store.payee_events import (
    WebhookRow,
    add_webhook,
    delete_webhook,
    last_chain_position,
    last_payment_id,
    payee_webhooks,
)
from settlement.store.standing import Limits, payee_of_a_channel

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/payees/{address}", responses=ERRORS, tags=["payee events"])
CREDENTIAL_RECHECK_SECONDS = 5.0  # a live stream whose API key was revoked or token expired ends within this


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
        return Position(last_payment_id(conn), *last_chain_position(conn))


@router.post("/webhooks", operation_id="createWebhook", status_code=201)
async def create_webhook(address: AddressPath, body: WebhookIn, service: ServiceDep, who: CallerDep) -> WebhookOut:
    """A webhook for the payee's events from now on; the answer carries its signing secret, once. Its host is looked
    up off the request threads (settlement.server.webhooks.HostLookUps). At most SETTLEMENT_WEBHOOKS_PER_PAYEE a payee
    (409), SETTLEMENT_WEBHOOKS_MAX in all, of which payees of no channel at this service hold
    SETTLEMENT_WEBHOOKS_WITHOUT_CHANNELS together (503 `webhooks_full`)."""
    payee = _payee(address, who)
    await service.lookups.check(body.url, service.private_webhooks)
    return await run_in_threadpool(_add_webhook, service, payee, body.url, who.is_vouched_for)


def _add_webhook(service: Service, payee: str, url: str, vouched: bool) -> WebhookOut:
    start = _now(service)
    now_us = time.time_ns() // 1000
    row = WebhookRow(
        "wh_" + secrets.token_hex(8), payee, url, new_secret(), now_us, start.payment, start.block, start.log,
        0, 0, None,
    )  # fmt: skip
    settings = service.settings
    limits = Limits(settings.webhooks_per_payee, settings.webhooks_max, settings.webhooks_without_channels)
    with service.db.write() as conn:
        added = add_webhook(conn, row, limits, vouched=vouched)
    over = WebhookLimitError(f"a payee has at most {limits.per_payee} webhooks")
    refuse_unless_admitted(
        added, limits, things="webhooks", setting="WEBHOOKS", payee_full=over, full=WebhooksFullError
    )
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


@router.get(
    "/events",
    operation_id="streamPayeeEvents",
    response_class=EventSourceResponse,
    responses={429: {"model": ErrorOut, "description": "the account holds its live streams already"}},
)
async def stream_events(
    address: AddressPath,
    request: Request,
    service: ServiceDep,
    who: CallerDep,
    after: Annotated[str | None, Query(max_length=64, description="a position to resume after")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
) -> EventSourceResponse:
    """The payee's events as they happen (text/event-stream); each event's `id` is the position to resume after
    (browsers send it back as `Last-Event-ID`). Without one, from now on. An account holds at most
    SETTLEMENT_EVENT_STREAMS_PER_ACCOUNT streams of a process (429 `stream_limit`), a process serves at most
    SETTLEMENT_EVENT_STREAMS_MAX (503 `streams_full`), of which payees of no channel at this service hold
    SETTLEMENT_EVENT_STREAMS_WITHOUT_CHANNELS together (503 `streams_full`); a stream ends with a `stream.ended` event
    once its credential no longer holds (an API key revoked, a sign-in token expired)."""
    payee = _payee(address, who)
    token = last_event_id or after
    resumed = Position.parse(token) if token else None
    if token and resumed is None:
        raise MalformedRequestError("a position is payment.block.log, as an event's id gives it")
    credential = _credential(request) if service.settings.access_control else None
    streams = service.streams
    assert streams is not None
    account = None if who.is_operator else who.account
    streams.check(account)  # refused before any store read
    known = who.is_vouched_for or await run_in_threadpool(_payee_of_a_channel, service, payee)
    release = streams.admit(account, without_channels=not known)
    try:
        start = resumed if resumed is not None else await run_in_threadpool(_now, service)
        return _HeldStream(_events(service, request, payee, start, credential), release, ping=15)
    except BaseException:
        release()
        raise


def _payee_of_a_channel(service: Service, payee: str) -> bool:
    with service.db.read() as conn:
        return payee_of_a_channel(conn, payee)


class _HeldStream(EventSourceResponse):
    """A live stream that gives its place in the process's count back when it ends, however it ends (a disconnect
    can end it before its generator ever started, which would then never run a `finally`)."""

    def __init__(self, content: AsyncIterator[dict[str, Any]], release: Callable[[], None], ping: int) -> None:
        super().__init__(content, ping=ping)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _credential(request: Request) -> str:
    """The bearer credential the caller was identified by (HTTPBearer's reading of the header)."""
    _, credential = get_authorization_scheme_param(request.headers.get("authorization"))
    return credential


async def _events(
    service: Service, request: Request, payee: str, start: Position, credential: str | None
) -> AsyncIterator[dict[str, Any]]:
    """The payee's feed from `start`, read again each time the process's front moves (settlement.server.
    event_streams), its credential checked again every CREDENTIAL_RECHECK_SECONDS."""
    streams = service.streams
    assert streams is not None
    loop = asyncio.get_running_loop()
    position, seen = start, None
    recheck_at = loop.time() + CREDENTIAL_RECHECK_SECONDS
    while not await request.is_disconnected():
        front = await streams.moved(seen, max(recheck_at - loop.time(), 0.0))
        if front is not None:
            seen = front
            more = True
            while more:
                feed = await run_in_threadpool(read_events, service.db, front.horizon, payee, position)
                for event in feed.events:
                    yield {"id": event.position.token(), "event": event.type, "data": json.dumps(event.body())}
                position, more = feed.position, feed.more
        if credential is not None and loop.time() >= recheck_at:
            ended = await run_in_threadpool(_refused, service, credential)
            if ended is not None:
                yield {"event": "stream.ended", "data": json.dumps(ended.body())}
                return
            recheck_at = loop.time() + CREDENTIAL_RECHECK_SECONDS


def _refused(service: Service, credential: str) -> InvalidCredentialsError | None:
    """Why the stream's credential no longer holds (revoked, expired), or None while it does or cannot be told now
    (the store busy or down: checked again later)."""
    try:
        identify(service.keys, service.signin, credential, int(time.time()))
    except InvalidCredentialsError as ex:
        return ex
    except Exception:
        logger.warning("checking a live stream's credential failed; checking again later", exc_info=True)
    return None
