"""Paid requests answered with neither a payment answer nor a 402 x402 can read: a handler's 404 or 500, a payee that
could not reach its facilitator (503), a header a proxy rewrote; and paid requests that got no answer at all: the
connection dropped or reset, a timeout, the caller cancelled. x402's clients run no hook for them (a payment answer or
a 402 is what their hooks read), so our scheme would keep the payment's channel busy for `lane_timeout` and open new
channels meanwhile (a flaky network, or a payee that drops every paid connection, made a payer lock a deposit in up to
`max_lanes` channels). The wire under x402's transport sees every answer with the request that carried the payment,
and hands that payment to `ChannelHubClientScheme.unanswered`, which frees the channel if it still carries that
payment (settlement.x402.client).

    transport = x402_httpx_transport(x402, UnansweredWire(scheme.unanswered))   # x402's own transport, ours under it
    async with httpx.AsyncClient(transport=transport) as http: ...

`PayAheadTransport(..., unanswered=...)` and `PayAheadAdapter(..., unanswered=...)` (settlement.x402.ahead) do the same.

Under it, the wire sends a request lost to a kept-alive connection the payee closed meanwhile once more
(settlement.x402.resend): a request answered on the second sending was answered, and is not told.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import httpx
from x402.http.utils import decode_payment_required_header, decode_payment_response_header
from x402.schemas import PaymentPayload

from settlement.x402.resend import Resending
from settlement.x402.wire import payment_in

Unanswered = Callable[[PaymentPayload], object]


class UnansweredWire(httpx.AsyncBaseTransport):
    """An httpx transport (`inner`, httpx's own by default, under `Resending`) that tells `unanswered` of each paid
    request answered with neither a payment answer nor a 402 x402 can read, or not answered at all. Put it under
    x402's transport (`x402_httpx_transport(x402, wire)`): x402's `x402HttpxClient` builds its transport with no wire
    of the caller's."""

    def __init__(self, unanswered: Unanswered | None, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self._unanswered = unanswered
        self._inner = inner if isinstance(inner, Resending) else Resending(inner)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with telling_if_unanswered(self._unanswered, request.headers.get("payment-signature")):
            response = await self._inner.handle_async_request(request)
        tell_unanswered(
            self._unanswered, response.status_code, response.headers, request.headers.get("payment-signature")
        )
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@contextmanager
def telling_if_unanswered(unanswered: Unanswered | None, sent: object) -> Iterator[None]:
    """Around sending a request that may carry a payment (`sent`: its header): if no answer comes at all (the
    connection dropped or was refused, a timeout, the caller cancelled), hand the payment to `unanswered`; what
    became of it is the service's to tell."""
    try:
        yield
    except BaseException:
        tell_unanswered(unanswered, None, {}, sent)
        raise


def tell_unanswered(
    unanswered: Unanswered | None, status: int | None, answer_headers: Mapping[str, str], sent: object
) -> None:
    """A request that carried a payment (`sent`: its header) and got an answer (`status`, `answer_headers`; None and
    empty: no answer at all) in which x402 reads neither a payment answer nor, in a 402, the payee's requirements:
    hand the payment to `unanswered`. x402 runs no hook for such an answer; one whose header x402 cannot read (a proxy
    rewrote it, a hostile payee) was taken for an answer, and kept the channel busy for `lane_timeout` (~6 µs a paid
    answer to read it here, as x402 reads it)."""
    if unanswered is None or not sent:
        return
    if _readable(answer_headers.get("payment-response"), decode_payment_response_header):
        return
    if status == 402 and _readable(answer_headers.get("payment-required"), decode_payment_required_header):
        return
    payload = payment_in(sent)
    if payload is not None:  # else not a header x402 could read: nothing of ours to free
        unanswered(payload)


def _readable(header: str | None, decode: Callable[[str], object]) -> bool:
    """Whether x402 reads `header` with `decode`, as its clients do (`get_payment_settle_response`,
    `get_payment_required_response`: a header that does not decode is none to them)."""
    if not header:
        return False
    try:
        decode(header)
    except ValueError:
        return False
    return True
