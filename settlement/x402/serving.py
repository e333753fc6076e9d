"""Serving a payee app with uvicorn: a bound on each request's head.

uvicorn's httptools protocol (the one it takes when httptools is installed, as `uvicorn[standard]` and
`fastapi[standard]` install it) buffers a request head of any size, and a payment header is the payer's to fill:
four connections each sending a header line of 100 MB that never ended held ~380 MB of a plain uvicorn app. This
protocol counts the bytes of a head that is not complete yet and answers 431 and closes the connection once they pass
the limit, so that a connection holds at most that much of the app (and with uvicorn's `limit_concurrency`, requests
past it are a 503):

    uvicorn.run(app, host=..., port=..., http=bounded_head_protocol(), limit_concurrency=1_000)

uvicorn's other protocol, h11, bounds a head at 16 KiB by itself (a 400 past it). `settlement serve` runs this
protocol too, with a record per connection of its own (settlement.api.transport).
"""

from __future__ import annotations

from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# A paid request's head: ~1.4 KB of PAYMENT-SIGNATURE (ours) and the app's own headers. 16 KiB, as h11's own bound and
# `settlement serve`'s default (SETTLEMENT_MAX_HEADER_BYTES).
MAX_HEAD_BYTES = 16 * 1024
_TOO_LARGE = b"request head too large"


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers 431 and closes a connection whose request head passes
    `max_head_bytes`, whether it came whole or is still coming."""

    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._in_head = 0, True

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:  # a whole head that came in one piece: refused all the same
            self._head_bytes = size
            raise httptools.HttpParserError("request head too large")  # uvicorn answers it (send_400_response)
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)  # the parser took this chunk and the head is still not complete
        if self._head_bytes > self.max_head_bytes:
            self.send_400_response("")

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes <= self.max_head_bytes:
            super().send_400_response(msg)
            return
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\nconnection: close\r\n"
            b"content-length: " + str(len(_TOO_LARGE)).encode() + b"\r\n\r\n" + _TOO_LARGE
        )
        self.transport.close()


def bounded_head_protocol(max_head_bytes: int = MAX_HEAD_BYTES) -> type[BoundedHeadProtocol]:
    """The protocol class for uvicorn's `http=`, with this limit."""
    if max_head_bytes < 1024:
        raise ValueError("a request head bound below 1 KiB refuses ordinary requests")
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {"max_head_bytes": max_head_bytes})
