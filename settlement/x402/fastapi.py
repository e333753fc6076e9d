"""A payee's FastAPI guard: x402's own middleware (`PaymentMiddlewareASGI`) with our facilitator client
(`ChannelHubFacilitatorClient`, settlement.x402.facilitator_client) under it, and one change of answer. When the
facilitator cannot judge a payment (no answer, a 5xx, a body that is not x402's), x402 answers 500 or 502, or, after
the handler ran, a 402 that tells the payer to pay again. Here the payee answers **503** with `Retry-After` instead:
retry later, nothing was charged (the voucher was not accepted, so it pays nothing; the payer's next payment finds
that out from the service). A client over its budget of payments on channels no one knows, or a channel over its
budget of runs its payer hung up on, is answered **429**.

A retry of a paid request is answered as the first one was (`PaidAnswers`, settlement.x402.paid_answers).

And a paid answer is settled only once its handler sent all of it. Starlette's `BaseHTTPMiddleware`, which x402's
middleware is, ends a streamed body quietly when the handler raises partway, and x402 reads the body before it
settles: the payer would be charged for the part, sent as a 200. Here the handler's error is raised instead (the app
answers 500, as for a handler that raises at once) and nothing is settled.

A `HEAD` of a paid `GET` route is paid as the `GET` is: Starlette answers it with the `GET` handler.

A route that declares x402's payment identifier required (`declare_payment_identifier_extension(required=True)`)
answers a payment without one **400** `payment_identifier_required`, as x402's specification says, before anything is
verified: x402's middleware declares it and lets such a payment through.

And only a 2xx answer is settled: x402 settles every answer below 400, so a redirect was charged, and a payer that
followed it paid again where it landed. A redirect (or a 304) is sent as the app gave it, unsettled.

`refund_router` mounts a payee's answers to payers' refund requests (settlement.x402.refunds) as a FastAPI route.

What a payee app imports is here, in one place: this module's names and `ChannelHubFacilitatorClient` and
`PaidAnswers`. Needs FastAPI (the payee's app has it); the SDK and the rest of settlement.x402 do not.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402 import x402ResourceServer
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, is_payment_identifier_required
from x402.http import PaywallConfig
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.http.types import RoutesConfig
from x402.schemas import AbortResult, PaymentPayload, VerifyContext

from settlement.chain.addresses import checksummed
from settlement.domain.clients import client_of
from settlement.errors import RateLimitedError, SettlementError
from settlement.sdk.payee import PayeeClient
from settlement.x402.exchange import EXCHANGE, Exchange
from settlement.x402.facilitator_client import (
    IPV6_PREFIX,
    PROXY_WARNING_SECONDS,
    ChannelHubFacilitatorClient,
    warn_untrusted_proxy,
)
from settlement.x402.paid_answers import PaidAnswers
from settlement.x402.refunds import MAX_TTL, REFUND_PATH, RefundDesk
from settlement.x402.seldom import Seldom
from settlement.x402.wire import SCHEME, Reason, payment_identifier

__all__ = ["ChannelHubFacilitatorClient", "PaidAnswers", "PaymentMiddleware", "refund_router"]

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
IDENTIFIER_REQUIRED = "this route requires x402's payment identifier (16-128 of A-Z, a-z, 0-9, _ and -)"
REFUNDS_WAITING = 32  # refund requests waiting for the one being made, at most; past that, 429 at once


class _NotSettled(Exception):
    """Not an error: a paid request's answer that is neither a 2xx nor an error (a redirect, a 304), carried out of
    x402's dispatch. x402 settles every answer below 400 and lets an exception from the handler through uncharged;
    so the answer passes it this way and is sent as the app gave it, and nothing is settled. (x402's
    `on_verified_payment_canceled` hooks see it as `handler_threw`, with this exception, which carries the status.)"""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class PaymentMiddleware(PaymentMiddlewareASGI):
    """`PaymentMiddlewareASGI`, answering 503 + Retry-After when the facilitator could not judge the payment, and
    a retry of a payment with an identifier as the payment was answered (`answers`)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: RoutesConfig,
        server: x402ResourceServer,
        paywall_config: PaywallConfig | None = None,
        answers: PaidAnswers | None = None,
    ) -> None:
        _check_pay_to(routes)
        if _requires_identifier(routes):  # a hook for each payment otherwise: 3-4 µs on a slow machine
            server.on_before_verify(_identifier_required)
        super().__init__(_watched(app), _head_paid_as_get(routes), server, paywall_config)
        self.answers = answers if answers is not None else PaidAnswers()

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        paying = self.answers.key_of(request)
        if paying is None:
            return await self._paid(request, call_next)
        return await self.answers.answer(paying.key, lambda: self._paid(request, call_next), paying.header)

    async def _paid(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        exchange = Exchange(request)
        token = EXCHANGE.set(exchange)
        try:
            paying = "payment-signature" in request.headers or "x-payment" in request.headers  # x402's two headers
            response = await super().dispatch(request, _whole(call_next, exchange) if paying else call_next)
        except _NotSettled as unsettled:
            return unsettled.response
        except ClientDisconnect:
            # The handler read a body whose client went away (or whose time ran out: settlement.x402.serving), and
            # nothing was settled. There is no one to answer, and uvicorn logged each such request as the app's
            # error, a traceback of ~80 lines: one for each connection a client gives up on purpose.
            logger.debug("%s %s: the client went away before its request's body came", request.method, request.url.path)
            return Response(status_code=400)  # sent to no one (the connection is gone)
        finally:
            exchange.end()
            EXCHANGE.reset(token)
        if exchange.limited is not None:
            return JSONResponse(
                {"error": RateLimitedError.code, "message": exchange.limited.message},
                status_code=RateLimitedError.status,
                headers={"Retry-After": str(exchange.limited.wait)},
            )
        if exchange.unidentified:
            return JSONResponse(
                {"error": Reason.IDENTIFIER_REQUIRED, "message": IDENTIFIER_REQUIRED},
                status_code=400,
            )
        if exchange.failure is not None:
            return JSONResponse(
                {"error": Reason.UNAVAILABLE, "message": exchange.failure},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return response


def _identifier_required(context: VerifyContext) -> AbortResult | None:
    """x402's hook before a payment is verified: a payment without a valid payment identifier, on a route that
    declares it required, is not verified (the answer is a 400: `PaymentMiddleware`)."""
    declared = (context.declared_extensions or {}).get(PAYMENT_IDENTIFIER)
    if declared is None or not is_payment_identifier_required(declared):
        return None
    payment = context.payment_payload
    if isinstance(payment, PaymentPayload) and payment_identifier(payment) is not None:
        return None
    exchange = EXCHANGE.get()
    if exchange is not None:
        exchange.unidentified = True
    return AbortResult(reason=Reason.IDENTIFIER_REQUIRED, message=IDENTIFIER_REQUIRED)


def _check_pay_to(routes: RoutesConfig) -> None:
    """Refuse, at start, a route of our scheme whose `payTo` is no address by the EIP-55 rule (a typo in mixed case):
    x402 takes any text, and payers either locked deposits for the address the typo spells (before they checked it)
    or refuse every payment, with nothing said at the payee."""
    for config in _configs(routes):
        accepts = config.get("accepts", []) if isinstance(config, dict) else getattr(config, "accepts", [])
        for option in accepts if isinstance(accepts, list) else [accepts]:
            if isinstance(option, dict):
                scheme, pay_to = option.get("scheme"), option.get("payTo", option.get("pay_to"))
            else:
                scheme, pay_to = getattr(option, "scheme", None), getattr(option, "pay_to", None)
            if scheme == SCHEME and isinstance(pay_to, str):
                checksummed(pay_to, "a paid route's payTo")


def _requires_identifier(routes: RoutesConfig) -> bool:
    """Whether a route declares x402's payment identifier required (else no payment is looked at for it)."""
    for config in _configs(routes):
        extensions = config.get("extensions") if isinstance(config, dict) else getattr(config, "extensions", None)
        if isinstance(extensions, dict) and is_payment_identifier_required(extensions.get(PAYMENT_IDENTIFIER)):
            return True
    return False


def _configs(routes: RoutesConfig) -> list[Any]:
    """Each route's config: x402 takes one config for every route, or a config per route pattern."""
    return [routes] if not isinstance(routes, dict) or "accepts" in routes else list(routes.values())


def _head_paid_as_get(routes: RoutesConfig) -> RoutesConfig:
    """`routes` with each paid `GET` route paid for `HEAD` too (unless `routes` names that itself). x402 matches a
    request's method exactly, and Starlette serves a `HEAD` with the `GET` handler (its `Route`, `StaticFiles`, a
    FastAPI route that lists both): a `HEAD` ran a paid handler free, its side effects and all, and told its answer's
    headers (the paid body's length, its digest). A FastAPI `GET` route answers `HEAD` 405, now after the 402: a
    payment for it is not settled (not a 2xx), nothing charged."""
    if not isinstance(routes, dict) or "accepts" in routes:  # one config for every method already
        return routes
    paid = dict(routes)
    for pattern, config in routes.items():
        parts = pattern.split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "GET":
            paid.setdefault(f"HEAD {parts[1]}", config)
    return paid


def _watched(app: ASGIApp) -> ASGIApp:
    """`app`, noting in the request's `Exchange` when its answer's last part is sent, or the error raised instead."""

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        exchange = EXCHANGE.get()
        if exchange is None:  # not under PaymentMiddleware's dispatch
            await app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.pathsend" or (
                message["type"] == "http.response.body" and not message.get("more_body", False)
            ):
                exchange.sent_whole = True
            await send(message)

        try:
            await app(scope, receive, sending)
        except Exception as ex:
            exchange.failed = ex
            raise

    return watched


def _whole(
    call_next: Callable[[Request], Awaitable[Response]], exchange: Exchange
) -> Callable[[Request], Awaitable[Response]]:
    """`call_next`, whose answer's body raises at its end if the app did not send all of it (`_watched`), and whose
    answer is not settled unless it is a 2xx (x402 settles a redirect: `_NotSettled`)."""

    async def whole_body(request: Request) -> Response:
        response = await call_next(request)
        if not 200 <= response.status_code < 300 and response.status_code < 400:
            raise _NotSettled(response)
        body = getattr(response, "body_iterator", None)
        if body is not None:
            response.body_iterator = _checked(body, exchange)  # type: ignore[attr-defined]
        return response

    return whole_body


async def _checked(body: AsyncIterator[Any], exchange: Exchange) -> AsyncIterator[Any]:
    async for part in body:
        yield part
    if not exchange.sent_whole:
        if exchange.failed is not None:
            raise exchange.failed
        raise SettlementError("the paid route's answer ended before its last part: not settled")


def refund_router(
    payee: PayeeClient,
    *,
    path: str = REFUND_PATH,
    max_ttl: int = MAX_TTL,
    max_waiting: int = REFUNDS_WAITING,
    ipv6_prefix: int = IPV6_PREFIX,
) -> APIRouter:
    """The payee's route that turns a payer's signed refund request into `closeByPayee` (settlement.x402.refunds).

    Refunds are made one at a time, and a request waits for the one before it (its close mined: seconds, minutes in
    a fee spike). It waits on the event loop, for a limiter of its own: waiting on the app's worker threads, a flood
    of requests held every one of them (40), and every plain `def` route of the app waited with them. At most
    `max_waiting` requests wait; past that one is answered 429 `rate_limited` at once, as is a client over its share
    (`RefundDesk.admit`, by its address as uvicorn gives it, an IPv6 one by its network of `ipv6_prefix` bits: behind
    a proxy, uvicorn `--forwarded-allow-ips`; a client refused behind a proxy uvicorn does not trust is logged)."""
    desk = RefundDesk(payee, max_ttl=max_ttl)
    one_at_a_time = anyio.CapacityLimiter(1)
    proxy_log = Seldom(PROXY_WARNING_SECONDS)
    router = APIRouter()

    @router.post(path, summary="Close a channel now at its payer's request (closeByPayee)")
    async def refund(request: Request) -> JSONResponse:
        body = await request.body()
        client = client_of(request.scope, ipv6_prefix)
        refused = desk.admit(client)
        if refused is not None:
            warn_untrusted_proxy(request, client, "refund requests over its share", proxy_log)
            return JSONResponse(refused.body, status_code=refused.status)
        if one_at_a_time.statistics().tasks_waiting >= max_waiting:
            busy = RateLimitedError("refund requests are waiting for the ones before them: retry later", retryAfter=1)
            return JSONResponse(busy.body(), status_code=busy.status)
        answer = await anyio.to_thread.run_sync(desk.answer, body, limiter=one_at_a_time)
        return JSONResponse(answer.body, status_code=answer.status)

    return router
