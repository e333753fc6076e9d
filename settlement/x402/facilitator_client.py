"""The payee's facilitator client: x402's own (`HTTPFacilitatorClient`), with one change of answer. When the
facilitator cannot judge a payment (no answer, a 5xx, a body that is not x402's), it says so in the request's
`Exchange`, and `PaymentMiddleware` (settlement.x402.fastapi) answers **503** with `Retry-After` instead of x402's 500,
502 or 402: retry later, nothing was charged. A settle (a batch, or one `/settle`) whose answer was lost after it
reached the facilitator (the connection gone, a proxy's 502 in its place, a body that is not the answer) is sent once
more as a `resend`, which the facilitator answers with a payment the first send got accepted as accepted: the payer
gets what it paid for, not a 503 for a voucher the service holds.

It verifies in this process a payment on a channel whose position the facilitator's last settle answered
(settlement.x402.positions): one facilitator call per paid request instead of two; and it sends the settles of
payments in flight at once together (`POST /settle/batch`, our service's addition to x402's routes), each request
still answered only once its own payment is committed. A payment of our scheme is sent to `/verify` and `/settle` as
the batch writes it, so every call judges one payment alike; one that cannot be written (a lone surrogate in a string)
or is larger than `max_payment_bytes` is refused unsent (`invalid_payload`), never a 503.

A payment on a channel this payee has not seen is verified by the facilitator within a budget per client address
(`unseen_per_client`, settlement.x402.unseen): a client whose payments name channels the facilitator does not know
(made-up ids are free, and each was a verify) is answered 429 `rate_limited`, unsent, until its budget refills; each
holds a token while its verify is in flight, so that a wave sent at once cannot pass whole.

A payer that went away before its answer was ready (its client timed out, the connection closed while the
handler ran) is not charged: the settle is not sent. (One that goes away while the settle is on its way may still be.)
Its voucher is then free again, so a payer could have a handler run for nothing as often as it liked by hanging up
before each answer: such runs are counted per channel (`abandoned_per_channel`, bursts of `abandoned_burst`), and a
channel past them is answered 429 `rate_limited` before the handler, until its budget refills.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from pydantic_core import PydanticSerializationError, from_json, to_json
from starlette.requests import Request
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.facilitator_client_base import FacilitatorResponseError
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse, SupportedResponse, VerifyResponse

from settlement.domain.buckets import Buckets
from settlement.domain.clients import client_of, untrusted_proxy
from settlement.domain.redaction import scrubbed_start, text_start
from settlement.errors import ChannelNotFoundError, InvalidSignatureError, UnknownChannelsBusyError
from settlement.recursion import bounded_recursion
from settlement.sdk.bounded import (
    ANSWER_DEADLINE_FACTOR,
    MAX_ANSWER_BYTES,
    PLAIN,
    BoundedAsyncTransport,
    BoundedTransport,
    refused_encoding,
)
from settlement.x402.exchange import EXCHANGE, Limited, Voucher
from settlement.x402.positions import Forged, Positions
from settlement.x402.seldom import FAILURE_LOG_SECONDS, Seldom
from settlement.x402.unseen import OverBudget, UnseenBudget
from settlement.x402.wire import CONNECTION_GONE, SCHEME, SETTLE_ATTEMPT, PayloadError, Reason, VoucherPayload

logger = logging.getLogger(__name__)
_Answered = TypeVar("_Answered", VerifyResponse, SettleResponse)
_Sent = TypeVar("_Sent")

SETTLE_BATCH_MAX = 100  # settles in one POST /settle/batch (the service takes up to its batch_max_items, 1,000)
# Bytes of settles in one batch (the service takes bodies of up to SETTLEMENT_MAX_BODY_BYTES, 1 MiB): a payer's payment
# carries what it likes in `extensions` and `accepted.extra` (up to the payee server's header limit: 16 KiB under
# uvicorn's h11, none under its httptools, which it takes when installed), and a batch of such payments was refused
# whole (413), every other payer's in it with them.
SETTLE_BATCH_BYTES = 256 * 1024
# Bytes of one payment as sent to the facilitator, beyond which it is refused (`invalid_payload`) and not sent: ours
# are ~1.4 KB; a 1.5 MB header under httptools was the service's 413, which the payee answered 503, and the payer
# retried a payment that could never pass. Below the service's SETTLEMENT_MAX_BODY_BYTES, or such a payment is a 503.
MAX_PAYMENT_BYTES = 64 * 1024
# One batch in flight: the settles that come while it is out wait for its answer and go together. With two, a settle
# that came while one was out went at once, in a batch of its own: at 500 paid/s on two cores the facilitator spent
# 0.08-0.15 ms more CPU a paid request (0.83-0.93 against 0.73-0.81 ms), the machine 85-87 % busy against 81-86 %,
# and the p99 was higher in 8 of 10 alternated pairs; at 400/s 0.04-0.07 ms more CPU, a p50 0.1-0.3 ms lower and the
# p99 a wash; no difference at 200-300/s (docs/benchmarks.md, thirty-seventh sitting).
BATCHES_IN_FLIGHT = 1
KEEPALIVE_SECONDS = 2.0  # below the service's keep-alive timeout
# A client's payments on channel ids the facilitator does not know (it answered `channel_not_found`, or 503
# `unknown_channels_busy` past its read budget), a second beyond a burst: further payments of that client on channels
# this payee has not seen are answered 429 here, unsent (0: no limit). Channel ids are cheap to make up, and each one
# was a verify at the facilitator, which paces a connection's refusals: a flood of them held the payee's connections
# to it, and every new payer's first payment waited behind the flood.
UNSEEN_PER_CLIENT = 5.0
UNSEEN_BURST = 20.0
IPV6_PREFIX = 64  # an IPv6 client is counted by its network of this many bits (a host holds a /64)
OVER_BUDGET = "this client's payments named more channels the facilitator does not know than this payee allows"
# Handler runs a channel's payer left before their answers were ready (not charged), a second beyond a burst: past
# them, that channel's payments are answered 429 before the handler (0: no limit). An honest client whose timeout is
# shorter than the handler meets it after a few; one hanging up on purpose had every run free.
ABANDONED_PER_CHANNEL = 1 / 60
ABANDONED_BURST = 3.0
ABANDONED = "this channel's payer left before its answers were ready more often than this payee allows"
SUPPORTED_WAIT = 1.0  # seconds the event loop waits for a /supported begun (x402 asks it synchronously)
SUPPORTED_TIMEOUT = 5.0  # seconds a /supported request may take on its own thread (x402's default: 90)
SUPPORTED_RETRY = 0.25  # seconds between a failed /supported and the next, while paid requests ask
SUPPORTED_IDLE = 10.0  # seconds without a paid request asking after which a failed /supported is not fetched again
# Seconds after which an answered /supported is fetched again (on a thread; the last answer used meanwhile): what the
# payee learns from it (whether its facilitator keeps settle attempts) follows the facilitator's upgrades.
SUPPORTED_REFRESH = 300.0
BAD_GATEWAY = 502  # a proxy's answer when the facilitator behind it dropped the request, whether it did the work or not
CONNECT_TIMEOUT = 3.0  # seconds to reach the facilitator: a request not sent yet charges nothing, so fail it early
FAILURE_SHOWN_MAX = 240  # characters of the facilitator's failure a payer's 503 quotes (the payee's log has it whole)
FAILURE_LOGGED_MAX = 4_000  # characters of it the payee's log keeps (its length too)
FAILURE_BODY_MAX = 3_000  # characters of a facilitator's answer body its failure quotes (its length in bytes too)
ERROR_CODE_READ_MAX = 64 * 1024  # an error answer read for our service's code up to this (ours < 1 KB; 8 MB: 65 ms)
PROXY_WARNING_SECONDS = 600.0  # a payee behind a proxy it does not trust is told so in its log once in this long
# The collector's young generation is scanned after this many more new objects than freed ones (Python's default: 700).
# A paid request's objects are freed by reference counting: at 500 paid/s the default scanned the young objects ~45
# times a second (and the older ones every 10th and 100th time, up to ~4 ms each) to find 0.3-0.5 objects of cyclic
# garbage a request, 2-4.5 % of the app's CPU; with 20,000, no scan in a 5-s run (docs/benchmarks.md, 39th sitting).
GC_YOUNG_THRESHOLD = 20_000


class AnswerUnreadError(ValueError):
    """A settle's answer that came but cannot be read: a gateway's 502 in its place (the facilitator behind it closed
    or reset the connection, maybe after its commit) or a body that is not the answer (mangled on the way). The
    payments may have been accepted, as when the answer is lost: the settle is sent again as a `resend`."""


class FacilitatorStatusError(ValueError):
    """The facilitator's answer to a call that is not a 200 (nor a gateway's 502 for a settle): its text as x402's
    client writes it, and its stable code when the body is our service's error."""

    def __init__(self, text: str, content: bytes) -> None:
        super().__init__(text)
        try:
            body = from_json(content) if len(content) <= ERROR_CODE_READ_MAX else None
        except ValueError:
            body = None
        code = body.get("code") if isinstance(body, dict) else None
        self.code = code if isinstance(code, str) else None


def warn_untrusted_proxy(request: Request, client: str, refused: str, log: Seldom) -> None:
    """Say in the log (when `log` is due: once in `PROXY_WARNING_SECONDS`) that `client`, `refused` something by a
    budget kept per client, sent an X-Forwarded-For that uvicorn did not apply (`untrusted_proxy`): behind a proxy
    uvicorn does not trust, every client of the proxy shares the one budget of its address."""
    if not untrusted_proxy(request.scope, request.headers.get("x-forwarded-for")) or not log.due():
        return
    logger.warning(
        "client %s is refused %s, and its requests carry X-Forwarded-For that uvicorn did not apply: behind a proxy, "
        "run uvicorn with --forwarded-allow-ips=<the proxy's address>, or every client behind the proxy shares this "
        "budget (docs/x402.md)",
        client,
        refused,
    )


class ChannelHubFacilitatorClient(HTTPFacilitatorClient):
    """x402's HTTP facilitator client, noting when the facilitator could not judge a payment at all, and verifying
    in this process a payment on a channel whose position the facilitator's last settle answered (`Positions`:
    one facilitator call per paid request instead of two), and settling the payments in flight at once in batches
    (`batch_settles=False`: one `/settle` each). `local_verify=False` asks the facilitator every time. A payment that
    cannot be sent (no JSON can carry it, or larger than `max_payment_bytes`) is refused, `invalid_payload`, unsent.
    The facilitator's `/supported` is fetched again every `supported_refresh` seconds."""

    def __init__(
        self,
        config: FacilitatorConfig | dict[str, Any] | None = None,
        *,
        local_verify: bool = True,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        batch_settles: bool = True,
        batches_in_flight: int = BATCHES_IN_FLIGHT,
        batch_bytes: int = SETTLE_BATCH_BYTES,
        max_payment_bytes: int = MAX_PAYMENT_BYTES,
        gc_young_threshold: int | None = GC_YOUNG_THRESHOLD,
        unseen_per_client: float = UNSEEN_PER_CLIENT,
        unseen_burst: float = UNSEEN_BURST,
        abandoned_per_channel: float = ABANDONED_PER_CHANNEL,
        abandoned_burst: float = ABANDONED_BURST,
        ipv6_prefix: int = IPV6_PREFIX,
        supported_refresh: float = SUPPORTED_REFRESH,
    ) -> None:
        config = config or FacilitatorConfig()
        self.gc_young_threshold = gc_young_threshold
        self.own_client: httpx.AsyncClient | None = None
        self._pool: _Pool | None = None  # under own_client: verifies are posted through its session
        self._settle_pool: _Pool | None = None  # and settles through a pool of their own
        if isinstance(config, FacilitatorConfig) and config.http_client is None:
            # An idle connection is dropped here before the service closes it (SETTLEMENT_KEEP_ALIVE_SECONDS, 5 s):
            # with both at 5 s, a burst after a lull could send on a connection the service was closing (a
            # ReadError, answered 503 to a payer who did nothing wrong; seen under `make bench-x402`).
            # aiohttp's pool and C parser under httpx's API (httpx-aiohttp): the payee's busiest work was httpx's own
            # pool and parser sending the settle (py-spy: 57 % of the payee app at 16 concurrent payers).
            # A facilitator host that is down (its packets dropped) held each paid request for x402's whole timeout
            # (90 s by default) before the 503; a connection not made yet is a payment not sent, so that fails in
            # CONNECT_TIMEOUT. An answer keeps the whole timeout: a settle cut short may have been committed.
            # x402's own calls through it (a payment of x402 v1, or of another scheme) are bounded as ours are.
            limits = httpx.Limits(keepalive_expiry=keepalive_seconds)
            transport = AiohttpTransport(limits=limits)
            timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, CONNECT_TIMEOUT))
            whole = config.timeout * ANSWER_DEADLINE_FACTOR
            bounded = BoundedAsyncTransport(transport, MAX_ANSWER_BYTES, whole)
            client = httpx.AsyncClient(timeout=timeout, follow_redirects=True, transport=bounded)
            config = replace(config, http_client=client)
            self.own_client = client
            posted = aiohttp.ClientTimeout(  # as httpx-aiohttp maps httpx's for x402's calls, and a whole one
                connect=timeout.pool, sock_connect=timeout.connect, sock_read=timeout.read, total=whole
            )
            self._pool = _Pool(transport, posted)
            # Settles on connections of their own: a payment on a channel id no one opened (a flood of them is cheap
            # to make) is a verify the facilitator answers 503 `unknown_channels_busy` past its read budget, and it
            # paces a connection's refusals; such verifies held every connection of a shared pool, and each known
            # payer's settle waited for one of them to be answered (tests/test_x402_e2e.py).
            self._settle_pool = _Pool(AiohttpTransport(limits=limits), posted)
        super().__init__(config)
        self.positions = Positions() if local_verify else None
        self.batch_settles = batch_settles
        self.batches_in_flight = batches_in_flight
        self.batch_bytes = batch_bytes
        self.max_payment_bytes = max_payment_bytes
        self.unseen = UnseenBudget(unseen_per_client, unseen_burst)  # by client: payments on channels no one knows
        self.abandoned = Buckets(abandoned_per_channel, abandoned_burst)  # by channel: runs its payer hung up on
        self.ipv6_prefix = ipv6_prefix
        self._proxy_log = Seldom(PROXY_WARNING_SECONDS)  # an unapplied X-Forwarded-For, said in the log
        self._queued: list[_Queued] = []
        self._claimed: set[Voucher] = set()  # vouchers paying for a request now (`_claim`), or settling
        self._senders: set[asyncio.Task[None]] = set()  # held: the event loop keeps only weak references to tasks
        self._supported = _Supported(super().get_supported, refresh=supported_refresh)

    def get_supported(self) -> SupportedResponse:
        """x402's `/supported`, asked on a thread (`_Supported`): a fetch waited for a second at most in all
        (`SUPPORTED_WAIT`), and not at all after one that failed only after longer. x402's middleware asks it on the
        event loop, at start and at each paid route's request until it has an answer: with the facilitator down that
        was a 500 for every paid route (not even the 402), and with one that never answers, the whole app, free routes
        too, stood still for x402's 90-second timeout. Now the payment middleware answers 503 at once (Retry-After)
        until the facilitator answers."""
        try:
            return self._supported.get(SUPPORTED_WAIT)
        except Exception as ex:
            raise _unavailable("judge", ex) from ex

    def _get_sync_client(self) -> httpx.Client:
        """x402's client for `/supported` (its only synchronous call), with a timeout of its own, and its answer
        bounded as the SDK's are (settlement.sdk.bounded): at most `MAX_ANSWER_BYTES`, read whole within
        `ANSWER_DEADLINE_FACTOR` times the timeout."""
        timeout = min(self._timeout, SUPPORTED_TIMEOUT)
        return httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            follow_redirects=True,
            transport=BoundedTransport(MAX_ANSWER_BYTES, timeout * ANSWER_DEADLINE_FACTOR),
        )

    async def aclose(self) -> None:
        if self.own_client is not None:
            await self.own_client.aclose()
        if self._settle_pool is not None:
            await self._settle_pool.transport.aclose()
        await super().aclose()

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        """The app's lifespan (`FastAPI(lifespan=facilitator.lifespan)`): the client's connections are closed on the
        app's own event loop when it stops (aiohttp warns of a pool left open at exit).

        At start it also moves what start-up built (FastAPI, x402, pydantic's schemas: most of the app's objects,
        alive as long as the process) out of the garbage collector's scans (`gc.freeze`), as our service does: a
        full collection walked them all, a 45-75 ms stall of every request in flight every few seconds under load,
        which was most of the paid p99 at 300 paid/s (docs/benchmarks.md). And while the app runs, the young
        generation is scanned after `gc_young_threshold` new objects, not Python's 700 (never sooner than the app set
        itself, nor turned on where it turned them off; None: left alone); its setting is put back when it stops.
        So is the recursion limit, lowered while the app runs to the interpreter's default (`bounded_recursion`): x402
        reads a payment header with `json.loads`, and py_ecc (imported with eth_account) had raised the limit past
        the stack, so that 200 KB of `[` in one header (a server that bounds no request head) crashed the app."""
        gc.collect()
        gc.freeze()
        before = gc.get_threshold()
        if self.gc_young_threshold is not None and 0 < before[0] < self.gc_young_threshold:  # 0: collections off
            gc.set_threshold(self.gc_young_threshold, *before[1:])
        try:
            with bounded_recursion():
                yield
        finally:
            gc.set_threshold(*before)
        await self.aclose()

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        """Vouched for here (`Positions`), or the facilitator's `/verify` of the payment written as its settle will be
        (`_part`): one that cannot be sent is refused here, vouched for or not (a payment vouched for whose settle could
        not be sent ran the handler for nothing, its answer withheld), as is a voucher another request pays with
        (`_claim`)."""
        try:
            if not (isinstance(payload, PaymentPayload) and isinstance(requirements, PaymentRequirements)):
                return await super().verify(payload, requirements)
            voucher = _voucher_of(payload) if payload.accepted.scheme == SCHEME else None
            key = None if voucher is None else (voucher.channel_id, voucher.cumulative)
            if not self._claim(key):
                message = "this voucher is paying for another request: a new payment needs a new voucher"
                return VerifyResponse(is_valid=False, invalid_reason=Reason.VOUCHER_REPLAYED, invalid_message=message)
            if key is not None and (wait := self.abandoned.due(key[0], time.monotonic())) is not None:
                raise OverBudget(wait, ABANDONED)
            part = _part(payload, requirements, self.max_payment_bytes)  # also before vouching: its settle must go
            if isinstance(part, str):
                return VerifyResponse(is_valid=False, invalid_reason=Reason.INVALID_PAYLOAD, invalid_message=part)
            payer = None if self.positions is None else self.positions.vouch(payload, requirements, voucher)
            if isinstance(payer, Forged):
                reason = InvalidSignatureError.code
                return VerifyResponse(
                    is_valid=False, invalid_reason=reason, invalid_message=payer.message, payer=payer.payer
                )
            if payer is not None:
                return VerifyResponse(is_valid=True, payer=payer)
            return await self._verified(part)
        except OverBudget as over:
            raise _limited(over.wait, over.why or OVER_BUDGET) from None
        except Exception as ex:
            raise _unavailable("verify", ex) from ex

    def _claim(self, key: Voucher | None) -> bool:
        """Whether this request may pay with its voucher: not while another request of this process pays with it, from
        that one's verify until it is answered. x402 verifies a payment before the handler and settles it after, so one
        header sent for many requests at once (or its voucher under many payment identifiers) verified for each, and
        the handler ran for each: one charged, the others refused at settle, their answers withheld, but a handler's
        side effect (an SMS sent, an order placed, a model run) is the payee's cost. Only under `PaymentMiddleware`
        (settlement.x402.fastapi), which says when a request ends; else a voucher is held from its settle to its
        answer, as before."""
        exchange = EXCHANGE.get()
        if exchange is None or key is None or exchange.claimed == key:
            return True
        if key in self._claimed:
            return False
        self._claimed.add(key)
        exchange.claimed = key
        exchange.ending.append(partial(self._claimed.discard, key))
        return True

    async def _verified(self, part: bytes) -> VerifyResponse:
        """The facilitator's `/verify` of a payment on a channel this payee has not seen, within its client's budget
        (`unseen`): each holds a token while in flight, spent if the facilitator does not know the channel, and a
        client in debt is refused here, unsent. Only unseen channels spend it: a payer whose channel the payee knows
        verifies locally."""
        exchange = EXCHANGE.get()
        client = "" if exchange is None else client_of(exchange.request.scope, self.ipv6_prefix)
        if exchange is None or not client:
            return await self._sent("verify", part, VerifyResponse)
        try:
            async with self.unseen.spend(client) as unknown:
                try:
                    verified = await self._sent("verify", part, VerifyResponse)
                except FacilitatorStatusError as failed:
                    if failed.code == UnknownChannelsBusyError.code:
                        unknown()
                    raise
                if verified.invalid_reason == ChannelNotFoundError.code:
                    unknown()
                return verified
        except OverBudget:
            self._proxy_unseen(exchange.request, client)
            raise

    def _proxy_unseen(self, request: Request, client: str) -> None:
        """A refused client behind a proxy uvicorn does not trust: every client behind it shares one budget, and one
        flood has all new payers refused."""
        warn_untrusted_proxy(
            request, client, "for its payments on channels the facilitator does not know", self._proxy_log
        )

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        exchange = EXCHANGE.get()
        if exchange is not None and await _gone(exchange.request):  # charged for nothing it gets
            if exchange.claimed is not None:  # a run its payer hung up on: counted against its channel
                self.abandoned.charge(exchange.claimed[0], 1, time.monotonic())
            raise FacilitatorResponseError("the payer went away before its answer was ready: not settled")
        ours = isinstance(payload, PaymentPayload) and isinstance(requirements, PaymentRequirements)
        try:
            if not ours:
                settled = await super().settle(payload, requirements)
            elif isinstance(part := _part(payload, requirements, self.max_payment_bytes), str):
                settled = _refused(part, requirements.network)
            elif payload.accepted.scheme == SCHEME:
                settled = await self._settle_ours(payload, requirements, self._with_attempt(part))
            else:
                settled = await self._sent("settle", part, SettleResponse)
        except Exception as ex:
            if self.positions is not None and isinstance(payload, PaymentPayload):
                self.positions.forget(payload)
            raise _unavailable("settle", ex) from ex
        if self.positions is not None and ours:
            self.positions.learn(payload, requirements, settled)
        return settled

    def _with_attempt(self, part: bytes) -> bytes:
        """The settle's part with its `attempt` (`_attempted`), unless the facilitator's `/supported` answered without
        `SETTLE_ATTEMPT`: one older than the attempt ignores it, but reads a batch too deep for pydantic-core (a
        payer's `extensions` nested past 200 levels) by its two x402 keys alone, and refused the whole batch, every
        other payer's payment in it a 503. Not read yet (the settle of an app that calls this client itself): sent. The
        answer is fetched again every `SUPPORTED_REFRESH` seconds (`_Supported.current`)."""
        supported = self._supported.current()
        if supported is not None and SETTLE_ATTEMPT not in supported.extensions:
            return part
        return _attempted(part)

    async def _settle_ours(
        self, payload: PaymentPayload, requirements: PaymentRequirements, part: bytes
    ) -> SettleResponse:
        """A payment of our scheme, settled in a batch (`_settle_batched`) or alone (`_settle_alone`); `part` is its
        part of a batch body (`_part`, with its attempt: `_with_attempt`), made before: a payment that cannot be sent
        is refused alone. One voucher is settled for one request at a time: the same voucher for two requests at once
        (a replay) is refused at once, unsent. The facilitator would accept one and refuse the other as a replay, also
        when the other's answer is lost and it is sent again (`resend`): it answers a resend accepted only for the
        attempt that got the voucher accepted, which also covers a replay settled after the first, or by another
        process."""
        key = _voucher_key(payload)
        exchange = EXCHANGE.get()
        held = key is not None and (exchange is None or exchange.claimed != key)  # not claimed by its verify (`_claim`)
        if held and key in self._claimed:
            message = "this voucher is being settled for another request: a new payment needs a new voucher"
            return _refused(message, requirements.network, Reason.VOUCHER_REPLAYED)
        if held and key is not None:
            self._claimed.add(key)
        try:
            if self.batch_settles:
                return await self._settle_batched(payload, requirements, part)
            return await self._settle_alone(part)
        finally:
            if held and key is not None:
                self._claimed.discard(key)

    async def _settle_batched(
        self, payload: PaymentPayload, requirements: PaymentRequirements, part: bytes
    ) -> SettleResponse:
        """Queued, and sent with the settles queued beside it in one `POST /settle/batch`: at most
        `batches_in_flight` batches are in flight, and a settle that finds fewer goes at once (no wait to fill)."""
        future: asyncio.Future[SettleResponse] = asyncio.get_running_loop().create_future()
        self._queued.append(_Queued(payload, requirements, future, part))
        if len(self._senders) < self.batches_in_flight:
            self._senders.add(asyncio.create_task(self._send_queued()))
        return await future

    async def _settle_alone(self, part: bytes, resend: bool = False) -> SettleResponse:
        """One `POST /settle` (`_once_more_if_lost`); `resend`: sent as one from the start."""
        return await _once_more_if_lost(partial(self._sent, "settle", part, SettleResponse), resend)

    async def _send_queued(self) -> None:
        """Send what is queued until nothing is. A sender leaves the set in the step that finds the queue empty (no
        await between): a settle queued after that step starts a new sender, never waits for one that is ending."""
        try:
            await self._send_while_queued()
        finally:
            self._senders.discard(asyncio.current_task())

    async def _send_while_queued(self) -> None:
        while self._queued:
            taken, size = 0, 0
            for queued in self._queued[:SETTLE_BATCH_MAX]:
                if taken and size + len(queued.part) > self.batch_bytes:  # the first always: a large one goes alone
                    break
                taken, size = taken + 1, size + len(queued.part)
            batch, self._queued = self._queued[:taken], self._queued[taken:]
            try:
                answers = await _once_more_if_lost(partial(self._post_batch, batch))
            except asyncio.CancelledError:  # the app stopping: no request waits for an answer that will not come
                for queued in batch:
                    if not queued.future.done():
                        queued.future.set_exception(FacilitatorResponseError("the settle batch was cancelled"))
                raise
            except Exception as ex:  # the whole batch unjudged: each payment's request answers 503
                answers = [ex] * len(batch)
            for queued, answer in zip(batch, answers, strict=True):
                if queued.future.done():  # its request went away meanwhile
                    continue
                if isinstance(answer, SettleResponse):
                    queued.future.set_result(answer)
                else:
                    queued.future.set_exception(FacilitatorResponseError(f"{type(answer).__name__}: {answer}"))

    async def _post_batch(self, batch: list[_Queued], resend: bool) -> list[SettleResponse | Exception]:
        opening = b'{"x402Version":2,"resend":true,"settlements":[' if resend else b'{"x402Version":2,"settlements":['
        body = opening + b",".join(q.part for q in batch) + b"]}"
        status, content = await self._post(f"{self._url}/settle/batch", body, self._get_settle_headers(), settle=True)
        if status in (404, 405):  # a facilitator without the batch route: one settle per payment
            self.batch_settles = False
            found = await asyncio.gather(*(self._settle_alone(q.part, resend) for q in batch), return_exceptions=True)
            return [a if isinstance(a, SettleResponse | Exception) else RuntimeError(str(a)) for a in found]
        if status != 200:
            text = f"facilitator settle batch failed ({status}): {text_start(content, 300)}"
            raise _status_failure(text, status, content, settle=True)
        try:
            read = from_json(content)
        except ValueError as ex:
            raise AnswerUnreadError(f"the facilitator's settle batch answer is not JSON: {ex}") from None
        answers = read.get("settlements") if isinstance(read, dict) else None
        if not isinstance(answers, list) or len(answers) != len(batch):
            raise AnswerUnreadError("the facilitator's settle batch answer does not list one answer per payment")
        return [_batch_answer(answer) for answer in answers]

    async def _sent(self, operation: str, part: bytes, answer: type[_Answered], resend: bool = False) -> _Answered:
        """x402's `/verify` or `/settle` of one payment, its body the payment's part of a settle batch: the bytes a
        batch sends of it, so that one payment is written one way whichever call judges it (x402's own client writes
        its body again, with the standard library's encoder: a NaN, or a lone surrogate in a key, which pydantic-core
        writes, failed to encode there, a 503 for a payment that could never be sent). Raises, as x402's client does,
        for any answer but a 200 with x402's answer in it (our service sends no extension responses beside it). A
        `resend` is a settle sent again after its answer was lost (our facilitator's addition to x402's body)."""
        settle = operation == "settle"
        headers = self._get_settle_headers() if settle else self._get_verify_headers()
        opening = b'{"x402Version":2,"resend":true,' if resend else b'{"x402Version":2,'
        status, content = await self._post(f"{self._url}/{operation}", opening + part[1:], headers, settle)
        if status != 200:
            text = f"Facilitator {operation} failed ({status}): {text_start(content, FAILURE_BODY_MAX)}"
            raise _status_failure(text, status, content, settle)
        try:
            return answer.model_validate_json(content)
        except ValueError as ex:
            if not settle:
                raise
            raise AnswerUnreadError(f"the facilitator's settle answer is not x402's: {ex}") from None

    async def _post(self, url: str, body: bytes, headers: dict[str, str], settle: bool) -> tuple[int, bytes]:
        """POST `body`; the answer's status and body. Through aiohttp's sessions themselves where this client made the
        pools (a verify through the one x402's own calls use through httpx's API, a settle through its own): httpx's
        layers above the pool were 12 % of the payee app's CPU a paid request at 400 paid/s (py-spy;
        docs/benchmarks.md). There the answer is bounded as the SDK's are (settlement.sdk.bounded): read whole within
        `ANSWER_DEADLINE_FACTOR` times the timeout (aiohttp's timeouts are per read: a body sent a byte at a time held
        the paid request for good), and cut past `MAX_ANSWER_BYTES` (an endless body, from a broken proxy on the way,
        filled the payee's memory; the facilitator's answers are small: 100 settles, ~100 KB), asked plain and
        refused encoded (`refused_encoding`: a gzip-encoded answer of 2 MB was 2 GB read). An app's own httpx client
        is used as given."""
        pool = self._settle_pool if settle else self._pool
        if pool is None:
            response = await self._get_async_client().post(url, headers=headers, content=body)
            return response.status_code, response.content
        transport = pool.transport
        if not isinstance(transport.client, aiohttp.ClientSession):
            transport.client = transport.get_client()  # made as httpx-aiohttp makes it at its first request
        headers["Accept-Encoding"] = PLAIN
        async with transport.client.post(url, headers=headers, data=body, timeout=pool.timeout) as answer:
            if (refusal := refused_encoding(answer.headers, "the facilitator's answer")) is not None:
                raise AnswerUnreadError(refusal)
            too_large = AnswerUnreadError(f"the facilitator's answer is larger than {MAX_ANSWER_BYTES:,} bytes")
            if answer.content_length is not None:  # its length said: read whole, or not at all
                if answer.content_length > MAX_ANSWER_BYTES:
                    raise too_large
                return answer.status, await answer.read()
            content = bytearray()
            async for chunk in answer.content.iter_any():
                content += chunk
                if len(content) > MAX_ANSWER_BYTES:
                    raise too_large
            return answer.status, bytes(content)


class _Supported:
    """The facilitator's `/supported`, fetched on a thread of its own and kept once answered. A request waits for the
    fetch in flight (beginning one if none runs) until that fetch has run `get`'s `wait` (on the event loop that
    asks), unless the last fetch failed only after longer than that (a host that does not answer: the next would
    not either): then it answers at once with that failure. After a failure the thread fetches again every `retry`
    seconds for as long as requests keep asking (within `idle` seconds), and at once when one asks. Before, each
    request after a failed fetch began the next and waited for it: with the facilitator's host down (each fetch a
    connect timeout long), the payee's event loop, free routes too, stood still a second in every three."""

    def __init__(
        self,
        fetch: Callable[[], SupportedResponse],
        retry: float = SUPPORTED_RETRY,
        idle: float = SUPPORTED_IDLE,
        refresh: float = SUPPORTED_REFRESH,
    ) -> None:
        self._fetch, self._retry, self._idle, self._refresh = fetch, retry, idle, refresh
        self._changed = threading.Condition()
        self._answer: SupportedResponse | None = None
        self._answered_at = 0.0  # when the answer came, or a fetch of a newer one last failed (time.monotonic)
        self._refreshing = False  # a fetch of a newer answer runs
        self._error: Exception | None = None  # the last fetch's
        self._took = 0.0  # seconds the last fetch took
        self._ended = 0  # fetches ended
        self._fetching = False  # a fetch runs, or the thread is about to begin one
        self._began = 0.0  # when it began (time.monotonic)
        self._running = False  # the thread runs (fetching, or waiting to fetch again)
        self._asked = 0.0  # when a request last asked

    def current(self) -> SupportedResponse | None:
        """The answer, if the facilitator gave one, never waited for. One `refresh` seconds old is fetched again on a
        thread, and used until a newer one comes (a fetch that fails keeps it for another `refresh` seconds): a payee
        that runs for weeks learns of its facilitator's upgrade, or of its going back to an older version."""
        answer = self._answer
        if answer is not None and not self._refreshing and time.monotonic() - self._answered_at >= self._refresh:
            with self._changed:
                if not self._refreshing:
                    self._refreshing = True
                    threading.Thread(target=self._fetch_newer, name="x402-supported", daemon=True).start()
        return answer

    def _fetch_newer(self) -> None:
        try:
            newer: SupportedResponse | None = self._fetch()
        except Exception as ex:
            newer = None
            _, logged = _failure_of(ex)  # as the facilitator's other failures are logged
            logger.info("the facilitator's /supported could not be fetched again (the last answer stands): %s", logged)
        with self._changed:
            if newer is not None:
                self._answer = newer
            self._answered_at = time.monotonic()
            self._refreshing = False

    def get(self, wait: float) -> SupportedResponse:
        """The answer; else the fetch in flight waited for until it has run `wait` seconds; else at once the last
        fetch's error."""
        with self._changed:
            if self._answer is not None:
                return self._answer
            now = self._asked = time.monotonic()
            if not self._fetching:
                self._fetching, self._began = True, now
                if not self._running:
                    self._running = True
                    threading.Thread(target=self._run, name="x402-supported", daemon=True).start()
                self._changed.notify_all()
            left = self._began + wait - now
            if left > 0 and (self._error is None or self._took <= wait):
                ended = self._ended + 1  # the fetch in flight
                if not self._changed.wait_for(lambda: self._ended >= ended, left):
                    raise TimeoutError(f"the facilitator did not answer /supported in {wait} s")
                if self._answer is not None:
                    return self._answer
            if self._error is None:
                raise TimeoutError("the facilitator has not answered /supported yet")
            raise self._error

    def _run(self) -> None:
        """Fetches until answered, or until no request has asked for `idle` seconds after a failure."""
        while True:
            try:
                answer, error = self._fetch(), None
            except Exception as ex:
                answer, error = None, ex
            with self._changed:
                self._answer, self._error = answer, error
                self._answered_at = time.monotonic()
                self._took = time.monotonic() - self._began
                self._ended += 1
                self._fetching = False
                self._changed.notify_all()
                if answer is None:
                    asked = self._changed.wait_for(lambda: self._fetching, self._retry)
                    if asked or time.monotonic() - self._asked <= self._idle:
                        if not asked:
                            self._fetching, self._began = True, time.monotonic()
                        continue
                self._running = False
                return


@dataclass(frozen=True)
class _Pool:
    """The pool a facilitator client made for itself (httpx-aiohttp's transport under its httpx client), and the
    timeout its settle batches are posted with through the pool's aiohttp session."""

    transport: AiohttpTransport
    timeout: aiohttp.ClientTimeout


@dataclass(frozen=True)
class _Queued:
    payload: PaymentPayload
    requirements: PaymentRequirements
    future: asyncio.Future[SettleResponse]
    part: bytes  # its settlement in the batch body (JSON)


def _part(payload: PaymentPayload, requirements: PaymentRequirements, limit: int) -> bytes | str:
    """x402's settle body for the payment (its part of a settle batch), made by pydantic-core in one call: 4 µs,
    against 39 through model_dump, x402's JSON round trip (`_build_request_body`) and the standard library's encoder.
    Or why it is not sent: a string no JSON can carry, or more than `limit` bytes (`MAX_PAYMENT_BYTES`)."""
    try:
        part = to_json(
            {"paymentPayload": payload, "paymentRequirements": requirements}, by_alias=True, exclude_none=True
        )
    except PydanticSerializationError as ex:  # a lone surrogate in a string: in a batch, it failed the whole batch
        return f"the payment cannot be sent to the facilitator: {ex}"
    if len(part) > limit:
        return f"the payment is {len(part):,} bytes: this payee sends its facilitator payments of {limit:,} at most"
    return part


async def _gone(request: Request) -> bool:
    """Whether the request's client went away: told by settlement.x402.serving's protocol at no cost
    (`CONNECTION_GONE`), else Starlette's probe of the request's receive (25-40 µs)."""
    told = request.scope.get("extensions", {}).get(CONNECTION_GONE)
    if told is not None:
        return bool(told["gone"]())
    return await request.is_disconnected()


def _attempted(part: bytes) -> bytes:
    """The settle's part with its `attempt`, an id of its own that its resend carries too: the facilitator stores it
    with the payment it gets accepted and answers a resend accepted only for that attempt (settlement.api.facilitator).
    Random, so that the processes of one payee (forked or not) never share one."""
    return part[:-1] + b',"attempt":"' + os.urandom(12).hex().encode() + b'"}'


def _refused(message: str, network: str, reason: str = Reason.INVALID_PAYLOAD) -> SettleResponse:
    """A settle refused before it was sent (`_part`, `_voucher_key`): the payer is charged nothing."""
    return SettleResponse(success=False, error_reason=reason, error_message=message, transaction="", network=network)


def _voucher_of(payload: PaymentPayload) -> VoucherPayload | None:
    """The voucher a payment of our scheme carries; None for a payload that is not one (the facilitator refuses it)."""
    try:
        return VoucherPayload.parse(payload.payload)
    except PayloadError:
        return None


def _voucher_key(payload: PaymentPayload) -> Voucher | None:
    """The voucher as the facilitator keys it (channel, cumulative amount)."""
    voucher = _voucher_of(payload)
    return None if voucher is None else (voucher.channel_id, voucher.cumulative)


def _status_failure(text: str, status: int, content: bytes, settle: bool) -> ValueError:
    """The error of a facilitator's answer that is not a 200: for a settle, a gateway's 502 may follow a commit
    (`AnswerUnreadError`: sent again as a resend); else the facilitator's own refusal, with its code."""
    return AnswerUnreadError(text) if settle and status == BAD_GATEWAY else FacilitatorStatusError(text, content)


async def _once_more_if_lost(send: Callable[[bool], Awaitable[_Sent]], resend: bool = False) -> _Sent:
    """`send(False)`, then `send(True)` once more, as a `resend`, when its answer was lost after it may have reached
    the facilitator (`_answer_lost`): the facilitator judges its payments afresh and answers one the first send got
    accepted as accepted. Else the payer was charged (the service holds its voucher) for a 503. With `resend`, only
    `send(True)`."""
    if not resend:
        try:
            return await send(False)
        except Exception as ex:
            if not _answer_lost(ex):
                raise
    return await send(True)


def _answer_lost(ex: Exception) -> bool:
    """Whether a settle may have reached the facilitator and its answer was lost on the way (the connection reset or
    closed after the request was written, a gateway's 502 in its place, an answer that cannot be read), rather than
    never sent (no connection), refused, or not answered in time."""
    if isinstance(ex, AnswerUnreadError):
        return True
    if isinstance(ex, aiohttp.ClientConnectorError):  # no connection: nothing was sent
        return False
    return isinstance(
        ex, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError
    ) or isinstance(ex, httpx.RemoteProtocolError | httpx.ReadError)


def _batch_answer(answer: Any) -> SettleResponse | Exception:
    """One payment's answer in a batch: x402's settle answer, or the facilitator's error for it (a 503: unjudged)."""
    if isinstance(answer, dict) and "status" in answer:
        return ValueError(f"facilitator settle failed ({answer['status']}): {answer.get('error')}")
    try:
        return SettleResponse.model_validate(answer)
    except Exception as ex:
        return ValueError(f"the facilitator's settle answer is not x402's: {ex}")


def _limited(wait: int, why: str) -> FacilitatorResponseError:
    """The error x402 answers when a client or a channel is over a budget (`why`); the payee's answer is a 429."""
    limited = Limited(wait, f"{why}: retry in {wait}s")
    exchange = EXCHANGE.get()
    if exchange is not None:
        exchange.limited = limited
    return FacilitatorResponseError(limited.message)


def _failure_of(ex: Exception) -> tuple[str, str]:
    """A facilitator's failure as a payer may be shown the start of it (its first `FAILURE_LOGGED_MAX` characters,
    URLs written as `shown_url` writes them), and as the payee's log keeps it (that, and its length when longer)."""
    text = f"{type(ex).__name__}: {ex}"
    failure = scrubbed_start(text, FAILURE_LOGGED_MAX)
    return failure, failure if len(text) <= FAILURE_LOGGED_MAX else f"{failure}… ({len(text):,} characters in all)"


def _unavailable(operation: str, ex: Exception) -> FacilitatorResponseError:
    """The error x402 answers (a 502, a 503 under `PaymentMiddleware`) when the facilitator could not judge a payment.

    The facilitator's failure is its text, and x402's client quotes the facilitator's whole answer body in it (`…
    failed (502): <body>`): a proxy's HTML page, or a hosted facilitator's error naming its own URL, key and all, went
    whole into the payer's 503. Ours quotes the body's first `FAILURE_BODY_MAX` characters and its length in bytes
    (`_sent`: decoding an 8-MB page of non-ASCII text took 13.5 ms of the payee's loop a paid request). A payer is
    shown the start of it, without URLs; the payee's log has its first `FAILURE_LOGGED_MAX` characters (URLs written as
    `shown_url` writes them) and its length, once in `FAILURE_LOG_SECONDS` with the count. Cut before its URLs are
    scrubbed: a 100-KB error page took 2.1 ms of the payee's CPU to scrub for each paid request of an outage, and its
    whole was a 100-KB line in the log every 10 s."""
    failure, logged = _failure_of(ex)
    _failures.note(operation, logged)
    shown = failure if len(failure) <= FAILURE_SHOWN_MAX else failure[:FAILURE_SHOWN_MAX] + "…"
    exchange = EXCHANGE.get()
    if exchange is not None:
        exchange.failure = f"the facilitator could not {operation} the payment ({shown})"
    return FacilitatorResponseError(f"facilitator {operation} unavailable ({shown})")


class _FailureLog:
    """The facilitator's failures, logged once in `FAILURE_LOG_SECONDS` with their count: an outage fails every paid
    request, hundreds a second, and one line each would bury the payee's log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = 0
        self._next = 0.0

    def note(self, operation: str, failure: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._since += 1
            if now < self._next:
                return
            count, self._since, self._next = self._since, 0, now + FAILURE_LOG_SECONDS
        logger.warning(
            "the facilitator could not judge %d payment(s) since the last such line; the last could not %s: %s",
            count,
            operation,
            failure,
        )


_failures = _FailureLog()
