"""The HTTP protocol `settlement serve` runs: uvicorn's own httptools protocol with a bound on a request's head, and
a record per connection in each request's scope (what the connection spent: settlement.api.middleware.RefusalTarpit).

httptools takes a request head of any size (a 10 MB header line is served), so a client could hold megabytes per
connection with heads it never finishes. This protocol counts the bytes of a head that is not complete yet and
answers 431 and closes once they pass the limit; with uvicorn's connection cap, what clients can hold is bounded.
"""

from __future__ import annotations

from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from settlement.api.middleware import CONNECTION, RefusalTarpit
from settlement.server.config import Settings

_TOO_LARGE = b"request head too large"


class BoundedHeadProtocol(HttpToolsProtocol):
    max_head_bytes = 16_384

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._connection: dict[str, Any] = {}  # lives as long as the connection (settlement.api.middleware)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._in_head = 0, True
        self.scope[CONNECTION] = self._connection  # type: ignore[literal-required]

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


def bounded_head_protocol(max_head_bytes: int) -> type[BoundedHeadProtocol]:
    """The protocol class for uvicorn's `http=`, with this process's limit."""
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {"max_head_bytes": max_head_bytes})


def server_config(
    api: RefusalTarpit, settings: Settings, host: str, port: int, log_level: str = "info", access_log: bool = False
) -> uvicorn.Config:
    """How `settlement serve` serves the app: the transport limits bound what one client can hold of this process
    (docs/api.md)."""
    return uvicorn.Config(
        api,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_seconds,
        http=bounded_head_protocol(settings.max_header_bytes),
        # X-Forwarded-For names the client only when a trusted proxy sends it (uvicorn's own default trusts any
        # 127.0.0.1 peer, so anything local could pose as any client).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )
