"""A retry of a paid request is answered as the first one was: a payment that carries x402's payment identifier
(`payment-identifier` extension) and bought a response gets that same response again for `PaidAnswers.ttl` seconds,
charged nothing more (the facilitator would refuse the voucher as replayed). Concurrent retries of one payment wait
for the first. An app served by several processes shares those answers through a file (`PaidAnswers(path=)`,
settlement.x402.kept). A payment without an identifier that is sent again gets a 402 (`voucher_replayed`), as before.
`PaymentMiddleware` (settlement.x402.fastapi) asks it before x402's middleware runs.

A retry is the same identifier on the same route with the same credentials, whatever its payload: x402's documents
have a client keep one identifier per logical request and send it again with a payment made afresh (for this scheme a
new voucher, signed from the payer's position after the first). Such a copy gets the kept answer when the payer of
the first signed it for the same requirements (it is not settled: the first payment paid for the answer); any other
payload under a kept identifier is x402's "same id, different payload": **409** `idempotency_key_reused`, nothing
settled, the answer not given.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from x402.http.utils import decode_payment_response_header

from settlement.eip712.vouchers import VoucherVerifier
from settlement.errors import IdempotencyKeyReusedError
from settlement.x402.kept import CLAIM_SECONDS, KeptAnswer, SharedAnswers
from settlement.x402.seldom import FAILURE_LOG_SECONDS, Seldom
from settlement.x402.wire import PayloadError, VoucherPayload, domain_of, payment_identifier_in, payment_in

logger = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 0.02  # how often a retry waiting for another process's answer to its payment looks again


class Paying(NamedTuple):
    """A paid request whose payment carries an identifier."""

    key: str  # its route, its credentials and its payment's identifier, hashed
    header: str  # its PAYMENT-SIGNATURE


@dataclass(frozen=True)
class _Answer:
    kept: KeptAnswer
    expires: float  # time.monotonic()


class PaidAnswers:
    """Responses bought by payments that carry an identifier, by the identifier, route and credentials: what a retry
    of that payment is answered. Bounded by `max_bytes` in all (oldest first out) and `max_body` each (a
    larger response is not kept: its retry gets the 402 of a replayed voucher).

    `vary` names the request headers that carry who is asking (as HTTP's Vary does for a cache): a kept answer is
    given again only to a copy that carries the same ones. The answer is given before the app runs, so without them a
    payment header seen where it should not be (a log, a shared proxy) had the app's own sign-in skipped: its holder
    was given the response bought for the signed-in user, that user's data included.

    `path`: a file the app's processes on this host share their answers through (settlement.x402.kept), for an app
    served by several (`uvicorn --workers`): without it, a retry that reached another process than its payment's was
    a replayed voucher there, a 402 for an answer paid and never received."""

    def __init__(
        self,
        ttl: float = 600.0,
        max_bytes: int = 64 * 2**20,
        max_body: int = 2**20,
        vary: tuple[str, ...] = ("authorization", "cookie"),
        path: str | Path | None = None,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> None:
        self.ttl, self.max_bytes, self.max_body = ttl, max_bytes, max_body
        self.vary = tuple(name.lower() for name in vary)
        self.shared = None if path is None else SharedAnswers(path, claim_seconds)
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._bytes = 0
        self._in_flight: dict[str, asyncio.Event] = {}
        self._file_log = Seldom(FAILURE_LOG_SECONDS)  # a failure of the shared file, said in the log

    def key_of(self, request: Request) -> Paying | None:
        """The payment's key, or None when the request carries no payment with a valid identifier."""
        header = request.headers.get("payment-signature")
        if not header or len(header) > 16384:
            return None
        identifier = payment_identifier_in(header)
        if identifier is None:  # no identifier, or not x402's (the middleware answers it)
            return None
        asking = "\n".join(f"{name}: {value}" for name in self.vary for value in request.headers.getlist(name))
        route = f"{request.method} {request.url.path}?{request.url.query}\n{identifier}\n{asking}"
        return Paying(hashlib.sha256(route.encode()).hexdigest(), header)

    def get(self, key: str) -> KeptAnswer | None:
        answer = self._answers.get(key)
        if answer is None or answer.expires < time.monotonic():
            return None
        return answer.kept

    def keep(self, key: str, response: Response, paid_with: str = "") -> KeptAnswer | None:
        """Keep `response`, bought with the payment header `paid_with`, in this process if it is a paid answer that
        may be kept; what was kept."""
        body = getattr(response, "body", None)
        if not isinstance(body, bytes) or len(body) > self.max_body or response.status_code >= 400:
            return None
        if "payment-response" not in response.headers:  # not a paid answer (no settlement happened)
            return None
        kept = KeptAnswer(response.status_code, list(response.raw_headers), body, paid_with)
        self._drop(key)
        self._answers[key] = _Answer(kept, time.monotonic() + self.ttl)
        self._bytes += len(body)
        now = time.monotonic()
        while self._answers and (self._bytes > self.max_bytes or next(iter(self._answers.values())).expires < now):
            self._drop(next(iter(self._answers)))
        return kept

    def _drop(self, key: str) -> None:
        gone = self._answers.pop(key, None)
        if gone is not None:
            self._bytes -= len(gone.kept.body)

    async def answer(self, key: str, pay: Callable[[], Awaitable[Response]], header: str = "") -> Response:
        """The kept answer of this payment, else pay (one at a time per payment: a concurrent retry waits; with
        `shared`, one at a time in all the app's processes). `header`: this copy's payment header."""
        while (running := self._in_flight.get(key)) is not None:
            await running.wait()
        kept = self.get(key)
        if kept is not None:
            return _again(kept, header)
        done = self._in_flight[key] = asyncio.Event()
        claimed = False
        try:
            if self.shared is not None:
                claimed = True  # released below whatever happens: a claim taken before the file failed too
                try:
                    elsewhere = await self._claimed(self.shared, key)
                except sqlite3.Error as ex:  # the file failed: this process answers as if it had none
                    self._file_failed("read", ex)
                else:
                    if elsewhere is not None:
                        return _again(elsewhere, header)
            response = await pay()
            kept_here = self.keep(key, response, header)
            if claimed and self.shared is not None and kept_here is not None:
                try:
                    await asyncio.to_thread(self.shared.keep, key, kept_here, self.ttl, self.max_bytes)  # releases
                    claimed = False
                except sqlite3.Error as ex:  # the paid answer goes out all the same (kept in this process)
                    self._file_failed("write", ex)
            return response
        finally:
            if claimed and self.shared is not None:  # not kept (an answer not to keep, an error, cancelled; none)
                try:
                    self.shared.release(key)
                except sqlite3.Error as ex:  # the claim runs out on its own
                    self._file_failed("write", ex)
            del self._in_flight[key]
            done.set()

    def _file_failed(self, what: str, ex: sqlite3.Error) -> None:
        """A failure of the shared file, logged once in `FAILURE_LOG_SECONDS`: the paid request goes on without it (a
        retry at another process is then a replay there, as without the file), never fails for it."""
        if self._file_log.due():
            logger.warning("could not %s the paid answers shared by this app's processes: %s", what, ex)

    async def _claimed(self, shared: SharedAnswers, key: str) -> KeptAnswer | None:
        """The answer another process kept of this payment (waiting while one is answering it), or None once this
        process holds the payment's claim and no process kept an answer; a claim it holds either way is released by
        `answer`. The file is read and claimed on the event loop (tens of microseconds, never a flush): a claim made
        on a thread for a request cancelled meanwhile was held by no one until it ran out, and every copy of the
        payment waited for it."""
        while True:
            kept = shared.get(key)
            if kept is None and shared.claim(key):
                kept = shared.get(key)  # kept by another as it released its claim
                if kept is None:
                    return None
            if kept is not None:
                return kept
            await asyncio.sleep(CLAIM_POLL_SECONDS)


def _again(kept: KeptAnswer, header: str) -> Response:
    """The kept answer for a copy of its payment; 409 for another payment under its identifier."""
    if header == kept.paid_with or _paid_again(kept, header):
        return _response(kept)
    reused = IdempotencyKeyReusedError(
        "this payment identifier bought an answer with another payment: a new payment needs a new identifier"
    )
    return JSONResponse({"error": reused.code, "message": reused.message}, status_code=reused.status)


def _paid_again(kept: KeptAnswer, header: str) -> bool:
    """Whether `header` is a payment made afresh for the same requirements by the payer of the payment that bought
    `kept`: its voucher (on any of the payer's channels) recovers to that payer in the domain the first named."""
    first, again = payment_in(kept.paid_with), payment_in(header)
    if first is None or again is None or again.accepted != first.accepted:
        return False
    domain = domain_of(first.accepted)
    settled = next((value for name, value in kept.headers if name.lower() == b"payment-response"), None)
    try:
        voucher = VoucherPayload.parse(again.payload)
        payer = None if settled is None else decode_payment_response_header(settled.decode("latin-1")).payer
    except (PayloadError, ValueError):
        return False
    if domain is None or not payer:
        return False
    signer = VoucherVerifier(domain).recover(bytes.fromhex(voucher.channel_id[2:]), voucher.cumulative,
                                             voucher.signature)  # fmt: skip
    return signer is not None and signer.hex() == payer.lower().removeprefix("0x")


def _response(kept: KeptAnswer) -> Response:
    response = Response(content=kept.body, status_code=kept.status)
    response.raw_headers = list(kept.headers)
    return response
