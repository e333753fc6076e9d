"""Paying on the first request: an httpx transport around x402's own (`x402AsyncTransport`), and a requests adapter
around x402's own (`x402HTTPAdapter`), that remember the requirements a payee's 402 named for a URL and pay the next
request to that URL at once, instead of sending it unpaid, reading the 402 and sending it again. One round trip to the
payee per paid request instead of two.

    async with httpx.AsyncClient(transport=PayAheadTransport(x402)) as http:
        await http.get(url)   # first time: x402's flow (402, then paid); from then on: paid at once

    session = requests.Session()
    session.mount("http://", PayAheadAdapter(x402_sync)); session.mount("https://", PayAheadAdapter(x402_sync))

Nothing about what a payment buys changes: the voucher is made by the registered schemes (with x402's policies,
spend controls and extensions) from the requirements the payee itself sent for that URL, and concluded by x402's
payment-response hooks as x402's transport concludes it. When the payee answers the early payment with a 402 (its
price changed, the route is no longer priced alike, the position was stale), the payment was not accepted, the
requirements are forgotten and the request goes through x402's own flow; so an early payment can cost a round trip,
never a second charge. Requirements are kept `ttl` seconds, for at most `max_routes` URLs (oldest first out).

A paid request answered with neither a payment answer nor a 402 x402 can read (a handler's 404, a payee that could
not reach its facilitator), or not answered at all (a dropped connection, a timeout), runs no x402 hook;
`unanswered=scheme.unanswered` hands it to our scheme, which frees its channel at once instead of after
`lane_timeout` (settlement.x402.unanswered, settlement.x402.client).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx
import requests
from x402 import x402Client, x402ClientSync
from x402.http import x402HTTPClient, x402HTTPClientSync
from x402.http.clients.httpx import x402AsyncTransport
from x402.http.clients.requests import x402HTTPAdapter
from x402.schemas import PaymentRequired

from settlement.x402.resend import ResendingAdapter
from settlement.x402.unanswered import Unanswered, UnansweredWire, tell_unanswered, telling_if_unanswered


class _Learned(NamedTuple):
    required: PaymentRequired  # the route's last 402
    until: float  # monotonic seconds: when it is stale


class _Routes:
    """The requirements each URL's last 402 named, for `ttl` seconds, at most `max_routes` URLs (oldest first out).
    A lock: a requests session may be shared by threads."""

    def __init__(self, http: x402HTTPClient | x402HTTPClientSync, ttl: float, max_routes: int) -> None:
        self._http, self.ttl, self.max_routes = http, ttl, max_routes
        self._routes: OrderedDict[str, _Learned] = OrderedDict()
        self._lock = threading.Lock()

    def required(self, route: str) -> PaymentRequired | None:
        with self._lock:
            found = self._routes.get(route)
        if found is None or found.until < time.monotonic():
            return None
        return found.required

    def learn(self, route: str, header: Callable[[str], str | None]) -> None:
        try:
            required = self._http.get_payment_required_response(header, None)
        except ValueError:
            return
        if not isinstance(required, PaymentRequired):  # x402 v1: its flow only
            return
        with self._lock:
            self._routes.pop(route, None)
            self._routes[route] = _Learned(required, time.monotonic() + self.ttl)
            while len(self._routes) > self.max_routes:
                self._routes.popitem(last=False)

    def forget(self, route: str) -> None:
        with self._lock:
            self._routes.pop(route, None)


class PayAheadTransport(httpx.AsyncBaseTransport):
    """x402's httpx transport, paying ahead on URLs whose requirements it saw in the last `ttl` seconds."""

    def __init__(
        self,
        client: x402Client,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        ttl: float = 300.0,
        max_routes: int = 1024,
        unanswered: Unanswered | None = None,
    ) -> None:
        self._client = client
        self._http = x402HTTPClient(client)
        self._routes = _Routes(self._http, ttl, max_routes)
        self._wire = _Learning(transport or httpx.AsyncHTTPTransport(), self._routes, unanswered)
        self._x402 = x402AsyncTransport(self._http, self._wire)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()  # sent twice when the early payment is refused
        route = _route(request.method, str(request.url))
        required = self._routes.required(route)
        if required is None:
            return await self._x402.handle_async_request(request)
        try:
            payload = await self._client.create_payment_payload(required)
        except Exception:  # the schemes or the policies refuse these requirements now: x402's flow says why
            self._routes.forget(route)
            return await self._x402.handle_async_request(request)
        headers = dict(request.headers) | self._http.encode_payment_signature_header(payload)
        paying = httpx.Request(request.method, request.url, headers=headers, content=request.content,
                               extensions=dict(request.extensions))  # fmt: skip
        answer = await self._wire.handle_async_request(paying)
        result = await self._http.process_payment_result(payload, answer.headers.get, answer.status_code)
        if answer.status_code != 402 and not result.recovered:
            if result.settle_response is None:  # answered without being paid: not a priced route any more
                self._routes.forget(route)
            return answer
        await answer.aclose()
        self._routes.forget(route)
        return await self._x402.handle_async_request(request)

    async def aclose(self) -> None:
        await self._x402.aclose()


class _Learning(httpx.AsyncBaseTransport):
    """The wire, telling the routes of every 402 that names requirements (under it, `UnansweredWire` tells
    `unanswered` of every paid request answered with neither a payment answer nor a 402 x402 can read)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, routes: _Routes, unanswered: Unanswered | None = None) -> None:
        self._inner, self._routes = UnansweredWire(unanswered, inner), routes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if response.status_code == 402 and "payment-required" in response.headers:
            self._routes.learn(_route(request.method, str(request.url)), response.headers.get)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _TellingWire(ResendingAdapter):
    """requests' wire under x402's adapter (x402's paid retries reach it through `super().send`): a paid request that
    got no answer at all (the connection dropped, a timeout) is told to `unanswered`, as `build_response` tells one
    answered with neither a payment answer nor a 402 x402 can read."""

    _unanswered: Unanswered | None = None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        with telling_if_unanswered(self._unanswered, request.headers.get("payment-signature")):
            return super().send(request, **kwargs)


class PayAheadAdapter(x402HTTPAdapter, _TellingWire):
    """x402's requests adapter, paying ahead on URLs whose requirements it saw in the last `ttl` seconds: the same
    rules as `PayAheadTransport`, for x402's sync client (`x402ClientSync`). Mount it on a `requests.Session`."""

    def __init__(
        self,
        client: x402ClientSync,
        *,
        ttl: float = 300.0,
        max_routes: int = 1024,
        unanswered: Unanswered | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(client, **kwargs)
        self._payer = client
        self._routes = _Routes(self._http_client, ttl, max_routes)
        self._unanswered = unanswered

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        route = _route(request.method or "GET", request.url or "")
        required = self._routes.required(route)
        if required is None:
            return super().send(request, **kwargs)
        try:
            payload = self._payer.create_payment_payload(required)
        except Exception:  # the schemes or the policies refuse these requirements now: x402's flow says why
            self._routes.forget(route)
            return super().send(request, **kwargs)
        paying = request.copy()
        paying.headers.update(self._http_client.encode_payment_signature_header(payload))
        answer = _TellingWire.send(self, paying, **kwargs)  # the wire itself: x402's flow is for the fallback
        result = self._http_client.process_payment_result(payload, answer.headers.get, answer.status_code)
        if answer.status_code != 402 and not result.recovered:
            if result.settle_response is None:  # answered without being paid: not a priced route any more
                self._routes.forget(route)
            return answer
        answer.close()
        self._routes.forget(route)
        return super().send(request, **kwargs)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        """Every answer off the wire passes here, x402's own 402s included: learn the requirements they name, and
        tell `unanswered` of a paid request answered with neither a payment answer nor a 402 x402 can read."""
        response = super().build_response(req, resp)
        if response.status_code == 402 and "payment-required" in response.headers:
            self._routes.learn(_route(req.method or "GET", req.url or ""), response.headers.get)
        tell_unanswered(self._unanswered, response.status_code, response.headers, req.headers.get("payment-signature"))
        return response


def _route(method: str, url: str) -> str:
    return f"{method} {url}"
