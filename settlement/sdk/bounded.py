"""The SDK's own HTTP client for a service: every answer bounded in size and in time.

httpx reads a whole answer into memory before it returns, and its timeouts are per read: a service (or a proxy on the
way) answering a body that never ends fills the app's memory, and one sending a byte every few seconds, of its body
or of its headers (up to h11's 100 KB of them), holds the app's call for good. Every read and write of the SDK's
connections is therefore given at most what is left of its request's deadline (`_Deadlined`). The answers a service
owes the SDK are small (a receipt, a channel, a listing of at most a thousand channels: under a megabyte), so an
answer past `MAX_ANSWER_BYTES`, or not read whole within its deadline, is the service's word the SDK cannot take
(UntrustedServiceError): a payment whose answer it was stays pending in the journal, as for any answer that is not a
receipt, and is asked again. An app that brings its own client (`http=`) keeps its own rules.

The bound is on the body as the app reads it, so every request asks for it plain (`Accept-Encoding: identity`) and an
answer encoded anyway (gzip, deflate, br) is refused before its body is read (`refused_encoding`): httpx counts and
cuts the bytes as they come, then decompresses them, and 2 MB of gzip from a hostile service held 2 GB in the payer's
memory past an 8-MB bound.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import typing
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar

import httpcore
import httpx

from settlement.errors import UntrustedServiceError

MAX_ANSWER_BYTES = 8 * 2**20
ANSWER_DEADLINE_FACTOR = 6  # an answer is read whole within this many times the client's timeout
# The SDK's pool keeps httpx's default limits (httpx.HTTPTransport's own).
POOL_CONNECTIONS, POOL_KEEPALIVE, POOL_KEEPALIVE_SECONDS = 100, 20, 5.0

PLAIN = "identity"  # the one content coding an answer may have: its size as sent is its size as read

# When the request this thread is making must be over (time.monotonic()); set by BoundedTransport for each request.
_ENDS: ContextVar[float | None] = ContextVar("settlement_sdk_request_ends", default=None)


def bounded_client(base_url: str, timeout: float) -> httpx.Client:
    """An httpx client for `base_url` whose answers are cut at MAX_ANSWER_BYTES or at `timeout` x
    ANSWER_DEADLINE_FACTOR seconds from the request's start, whichever comes first."""
    transport = BoundedTransport(MAX_ANSWER_BYTES, timeout * ANSWER_DEADLINE_FACTOR)
    return httpx.Client(base_url=base_url, timeout=timeout, transport=transport)


class BoundedTransport(httpx.BaseTransport):
    """httpx's own transport, each request's reads and writes (its answer's headers and body) within `deadline`
    seconds of its start, and each answer's body cut at `max_bytes`. httpx takes no network backend, so its pool is
    replaced by httpcore's with one (`_Deadlined`, httpcore's public API) and httpx's default limits."""

    def __init__(self, max_bytes: int, deadline: float) -> None:
        self.max_bytes, self.deadline = max_bytes, deadline
        self._inner = httpx.HTTPTransport()
        self._inner._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=POOL_CONNECTIONS,
            max_keepalive_connections=POOL_KEEPALIVE,
            keepalive_expiry=POOL_KEEPALIVE_SECONDS,
            network_backend=_Deadlined(httpcore.SyncBackend()),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ends = time.monotonic() + self.deadline
        _ENDS.set(ends)  # for this request's reads and writes, its body's included (read after this returns)
        what = f"{request.method} {request.url.path}"
        request.headers["Accept-Encoding"] = PLAIN
        try:
            response = self._inner.handle_request(request)
        except httpx.TimeoutException:
            if time.monotonic() < ends:
                raise
            raise _late(what, self.deadline) from None
        if (refusal := refused_encoding(response.headers, f"the service's answer to {what}")) is not None:
            response.close()
            raise UntrustedServiceError(refusal)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _Bounded(response.stream, self.max_bytes, ends, what, self.deadline)
        return response

    def close(self) -> None:
        self._inner.close()


class _Bounded(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, max_bytes: int, ends: float, what: str, deadline: float) -> None:
        self._inner, self._max, self._ends, self._what, self._deadline = inner, max_bytes, ends, what, deadline

    def __iter__(self) -> Iterator[bytes]:
        read = 0
        chunks = iter(self._inner)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except httpx.TimeoutException:  # a read past the deadline (`_left`), or a read timeout before it
                if time.monotonic() < self._ends:
                    raise
                self.close()
                raise _late(self._what, self._deadline) from None
            read += len(chunk)
            if read > self._max:
                self.close()
                raise _too_large(self._what, self._max)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class BoundedAsyncTransport(httpx.AsyncBaseTransport):
    """`inner` (an async transport: httpx-aiohttp's) under `BoundedTransport`'s rules: asked plain, each answer read
    whole within `deadline` seconds of its request's start and cut at `max_bytes`."""

    def __init__(self, inner: httpx.AsyncBaseTransport, max_bytes: int, deadline: float) -> None:
        self.inner, self.max_bytes, self.deadline = inner, max_bytes, deadline

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ends = asyncio.get_running_loop().time() + self.deadline
        what = f"{request.method} {request.url.path}"
        request.headers["Accept-Encoding"] = PLAIN
        try:
            async with asyncio.timeout_at(ends):
                response = await self.inner.handle_async_request(request)
        except TimeoutError:
            raise _late(what, self.deadline) from None
        if (refusal := refused_encoding(response.headers, f"the service's answer to {what}")) is not None:
            await response.aclose()
            raise UntrustedServiceError(refusal)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _BoundedAsync(response.stream, self.max_bytes, ends, what, self.deadline)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _BoundedAsync(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, max_bytes: int, ends: float, what: str, deadline: float) -> None:
        self._inner, self._max, self._ends, self._what, self._deadline = inner, max_bytes, ends, what, deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        chunks = aiter(self._inner)
        while True:
            try:
                async with asyncio.timeout_at(self._ends):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await self.aclose()
                raise _late(self._what, self._deadline) from None
            read += len(chunk)
            if read > self._max:
                await self.aclose()
                raise _too_large(self._what, self._max)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def refused_encoding(headers: Mapping[str, str], answer: str) -> str | None:
    """Why an answer whose body is encoded (gzip, deflate, br: not asked for) cannot be taken, or None when plain.
    Decompressed, its size is not what was counted of it: 2 MB of gzip is 2 GB of zeros."""
    coding = headers.get("content-encoding", PLAIN).strip().lower()
    if coding in ("", PLAIN):
        return None
    return f"{answer} is encoded ({coding[:40]!r}), not plain as asked: its size when decoded is not bounded"


def _too_large(what: str, max_bytes: int) -> UntrustedServiceError:
    return UntrustedServiceError(f"the service's answer to {what} is larger than {max_bytes} bytes")


def _late(what: str, deadline: float) -> UntrustedServiceError:
    return UntrustedServiceError(f"the service's answer to {what} took more than {deadline:g}s")


class _Deadlined(httpcore.NetworkBackend):
    """`inner`'s connections, each read and write given at most what is left of the current request's deadline."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlinedStream(
            self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options)
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlinedStream(
            self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout), socket_options)
        )

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlinedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlinedStream(
            self._inner.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout))
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


def _left(timeout: float | None, late: type[httpcore.TimeoutException]) -> float | None:
    """`timeout`, or less: what is left until this thread's request must be over; `late` once nothing is."""
    ends = _ENDS.get()
    if ends is None:
        return timeout
    left = ends - time.monotonic()
    if left <= 0:
        raise late("the request's deadline passed")
    return left if timeout is None else min(timeout, left)
