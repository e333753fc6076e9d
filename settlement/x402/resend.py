"""A request lost to a kept-alive connection that the payee closed meanwhile: sent once more, on a new connection.

A server may close an idle kept-alive connection at any moment, and uvicorn closes one right after a handler's error
(Starlette answers it with a 500, then raises it on): the client's next request, written on that connection before the
close reached it, is reset unread, and the payer's app saw `httpx.ReadError` for a sound request. Browsers send such a
request again when its method is idempotent (RFC 9110, 9.2.2); httpx does not. `Resending` does, under x402's
transport and ours (`UnansweredWire` puts it under every payer wire of ours), and `ResendingAdapter` does for
requests (under `PayAheadAdapter`):

- once, and only a request written on a connection that was already open (httpcore's `trace` extension says whether
  it opened one for this request; for requests, urllib3's pool counts the connections it opened): a request that
  failed on a new connection failed for another reason;
- only an idempotent method whose body is already in memory;
- a paid request only if its payment carries x402's payment identifier: the payee may have settled the payment and
  lost its answer, and then the same payment sent again is answered again and charged once (docs/x402.md, "A retried
  payment"). Without an identifier the payee would refuse it as replayed, and the payer's transport would pay again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError

from settlement.x402.wire import payment_identifier_in

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
LOST = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)  # the connection ended before an answer
_OPENED = frozenset({"connection.connect_tcp.started", "connection.connect_unix_socket.started"})
_SENT = frozenset({"http11.send_request_headers.started", "http2.send_request_headers.started"})
Tracer = Callable[[str, dict[str, Any]], Awaitable[None]]


class Resending(httpx.AsyncBaseTransport):
    """An httpx transport (`inner`, httpx's own by default) that sends a request lost to a kept-alive connection once
    more (the rules above)."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self._inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in IDEMPOTENT or not _in_memory(request):
            return await self._inner.handle_async_request(request)
        theirs = request.extensions.get("trace")
        seen = _Connection(theirs)
        request.extensions["trace"] = seen.event
        try:
            return await self._inner.handle_async_request(request)
        except LOST:
            if not seen.sent or seen.opened or not _payment_may_be_sent_again(request.headers.get("payment-signature")):
                raise
        finally:
            _restore(request, theirs)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Connection:
    """What httpcore's trace told of one sending: a connection opened for it, the request written."""

    def __init__(self, theirs: Tracer | None) -> None:
        self.opened = self.sent = False
        self._theirs = theirs

    async def event(self, name: str, info: dict[str, Any]) -> None:
        if name in _OPENED:
            self.opened = True
        elif name in _SENT:
            self.sent = True
        if self._theirs is not None:
            await self._theirs(name, info)


def _in_memory(request: httpx.Request) -> bool:
    try:
        return isinstance(request.content, bytes)
    except httpx.RequestNotRead:  # a streamed body: it cannot be sent twice
        return False


class ResendingAdapter(HTTPAdapter):
    """requests' adapter, sending a request lost to a kept-alive connection once more (the rules above)."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if request.method not in IDEMPOTENT or not isinstance(request.body, bytes | str | None):
            return super().send(request, **kwargs)
        pool = self.get_connection_with_tls_context(
            request, kwargs.get("verify", True), kwargs.get("proxies"), kwargs.get("cert")
        )
        opened = pool.num_connections  # another thread's new connection meanwhile: taken for ours, not resent
        try:
            return super().send(request, **kwargs)
        except requests.ConnectionError as ex:
            lost = bool(ex.args) and isinstance(ex.args[0], ProtocolError)  # reset or ended before an answer
            paid = request.headers.get("payment-signature")
            if not lost or pool.num_connections != opened or not _payment_may_be_sent_again(paid):
                raise
        return super().send(request, **kwargs)


def _payment_may_be_sent_again(header: str | bytes | None) -> bool:
    """Not paid, or paid with a payment that carries an identifier (the payee answers it again, charged once)."""
    return header is None or payment_identifier_in(header) is not None


def _restore(request: httpx.Request, theirs: Tracer | None) -> None:
    if theirs is None:
        request.extensions.pop("trace", None)
    else:
        request.extensions["trace"] = theirs
