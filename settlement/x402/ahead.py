"""Paying on the first request: an httpx transport around x402's own (`x402AsyncTransport`) that remembers the
requirements a payee's 402 named for a URL and pays the next request to that URL at once, instead of sending it
unpaid, reading the 402 and sending it again. One round trip to the payee per paid request instead of two.

    async with httpx.AsyncClient(transport=PayAheadTransport(x402)) as http:
        await http.get(url)   # first time: x402's flow (402, then paid); from then on: paid at once

Nothing about what a payment buys changes: the voucher is made by the registered schemes (with x402's policies,
spend controls and extensions) from the requirements the payee itself sent for that URL, and concluded by x402's
payment-response hooks as x402's transport concludes it. When the payee answers the early payment with a 402 (its
price changed, the route is no longer priced alike, the position was stale), the payment was not accepted, the
requirements are forgotten and the request goes through x402's own flow; so an early payment can cost a round trip,
never a second charge. Requirements are kept `ttl` seconds, for at most `max_routes` URLs (oldest first out).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import httpx
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402AsyncTransport
from x402.schemas import PaymentRequired


class PayAheadTransport(httpx.AsyncBaseTransport):
    """x402's httpx transport, paying ahead on URLs whose requirements it saw in the last `ttl` seconds."""

    def __init__(
        self,
        client: x402Client,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        ttl: float = 300.0,
        max_routes: int = 1024,
    ) -> None:
        self._client = client
        self._http = x402HTTPClient(client)
        self._wire = _Learning(transport or httpx.AsyncHTTPTransport(), self._learn)
        self._x402 = x402AsyncTransport(self._http, self._wire)
        self.ttl, self.max_routes = ttl, max_routes
        self._routes: OrderedDict[str, tuple[PaymentRequired, float]] = OrderedDict()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()  # sent twice when the early payment is refused
        required = self._required(request)
        if required is None:
            return await self._x402.handle_async_request(request)
        try:
            payload = await self._client.create_payment_payload(required)
        except Exception:  # the schemes or the policies refuse these requirements now: x402's flow says why
            self._forget(request)
            return await self._x402.handle_async_request(request)
        headers = dict(request.headers) | self._http.encode_payment_signature_header(payload)
        paying = httpx.Request(request.method, request.url, headers=headers, content=request.content,
                               extensions=dict(request.extensions))  # fmt: skip
        answer = await self._wire.handle_async_request(paying)
        result = await self._http.process_payment_result(payload, answer.headers.get, answer.status_code)
        if answer.status_code != 402 and not result.recovered:
            if result.settle_response is None:  # answered without being paid: not a priced route any more
                self._forget(request)
            return answer
        await answer.aclose()
        self._forget(request)
        return await self._x402.handle_async_request(request)

    async def aclose(self) -> None:
        await self._x402.aclose()

    def _required(self, request: httpx.Request) -> PaymentRequired | None:
        found = self._routes.get(_route(request))
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def _learn(self, request: httpx.Request, response: httpx.Response) -> None:
        try:
            required = self._http.get_payment_required_response(response.headers.get, None)
        except ValueError:
            return
        if not isinstance(required, PaymentRequired):  # x402 v1: its flow only
            return
        key = _route(request)
        self._routes.pop(key, None)
        self._routes[key] = (required, time.monotonic() + self.ttl)
        while len(self._routes) > self.max_routes:
            self._routes.popitem(last=False)

    def _forget(self, request: httpx.Request) -> None:
        self._routes.pop(_route(request), None)


class _Learning(httpx.AsyncBaseTransport):
    """The wire, telling every 402 that names requirements to `learn`."""

    def __init__(self, inner: httpx.AsyncBaseTransport, learn: Callable[[httpx.Request, httpx.Response], None]) -> None:
        self._inner, self._learn = inner, learn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if response.status_code == 402 and "payment-required" in response.headers:
            self._learn(request, response)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _route(request: httpx.Request) -> str:
    return f"{request.method} {request.url}"
