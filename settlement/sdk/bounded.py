"""The SDK's own HTTP client for a service: every answer bounded in size and in time.

httpx reads a whole answer into memory before it returns, and its timeouts are per read: a service (or a proxy on the
way) answering a body that never ends fills the app's memory, and one sending a byte every few seconds holds the
app's call for good. The answers a service owes the SDK are small (a receipt, a channel, a listing of at most a
thousand channels: under a megabyte), so an answer past `MAX_ANSWER_BYTES`, or not read whole within its deadline, is
the service's word the SDK cannot take (UntrustedServiceError): a payment whose answer it was stays pending in the
journal, as for any answer that is not a receipt, and is asked again. An app that brings its own client (`http=`)
keeps its own rules.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx

from settlement.errors import UntrustedServiceError

MAX_ANSWER_BYTES = 8 * 2**20
ANSWER_DEADLINE_FACTOR = 6  # an answer is read whole within this many times the client's timeout


def bounded_client(base_url: str, timeout: float) -> httpx.Client:
    """An httpx client for `base_url` whose answers are cut at MAX_ANSWER_BYTES or at `timeout` x
    ANSWER_DEADLINE_FACTOR seconds from the request's start, whichever comes first."""
    transport = BoundedTransport(httpx.HTTPTransport(), MAX_ANSWER_BYTES, timeout * ANSWER_DEADLINE_FACTOR)
    return httpx.Client(base_url=base_url, timeout=timeout, transport=transport)


class BoundedTransport(httpx.BaseTransport):
    """`inner`, each answer's body cut at `max_bytes` and at `deadline` seconds from its request's start."""

    def __init__(self, inner: httpx.BaseTransport, max_bytes: int, deadline: float) -> None:
        self._inner, self.max_bytes, self.deadline = inner, max_bytes, deadline

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ends = time.monotonic() + self.deadline
        response = self._inner.handle_request(request)
        what = f"{request.method} {request.url.path}"
        if time.monotonic() > ends:  # headers sent a byte at a time: each read within the timeout, the whole not
            response.close()
            raise UntrustedServiceError(f"the service's answer to {what} took more than {self.deadline:g}s")
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
        for chunk in self._inner:
            read += len(chunk)
            if read > self._max:
                self.close()
                raise UntrustedServiceError(f"the service's answer to {self._what} is larger than {self._max} bytes")
            if time.monotonic() > self._ends:
                self.close()
                raise UntrustedServiceError(f"the service's answer to {self._what} took more than {self._deadline:g}s")
            yield chunk

    def close(self) -> None:
        self._inner.close()
