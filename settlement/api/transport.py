"""The HTTP protocol `settlement serve` runs: uvicorn's own httptools protocol with a bound on a request's head (the
one a payee app serves with, settlement.x402.serving), and a record per connection in each request's scope (what the
connection spent: settlement.api.middleware.RefusalTarpit).

httptools takes a request head of any size (a 10 MB header line is served) and for any time, so a client could hold
megabytes per connection with heads it never finishes, or hold the connection cap with connections that send nothing
(every other client's requests then a 503), or with a body that keeps coming a byte at a time after its answer: past
the size limit the head is answered 431, past the time limit 408, and the connection closed, as is one whose body is
still coming that long after its answer, and one whose client reads none of its answer for the write timeout is
dropped; with uvicorn's connection cap, what clients can hold is bounded.
"""

from __future__ import annotations

from typing import Any

import uvicorn

from settlement.api.middleware import CONNECTION, RefusalTarpit
from settlement.server.config import Settings
from settlement.x402.serving import BoundedProtocol


class ServiceProtocol(BoundedProtocol):
    """The payee apps' bounded protocol, and what each connection spent, for the tarpit that paces refusals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection: dict[str, Any] = {}  # lives as long as the connection (settlement.api.middleware)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[CONNECTION] = self._connection  # type: ignore[literal-required]


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
        http=ServiceProtocol.with_limits(
            settings.max_header_bytes,
            settings.head_timeout_seconds,
            settings.write_timeout_seconds,
            body_timeout=None,  # the service reads every body with its own bound and answer (BodyGuard, FastPath)
        ),
        # X-Forwarded-For names the client only when a trusted proxy sends it (uvicorn's own default trusts any
        # 127.0.0.1 peer, so anything local could pose as any client).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )
