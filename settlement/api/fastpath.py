"""The hot path in front of FastAPI: `POST /v1/vouchers` and `/v1/vouchers/batch`, x402's `POST /x402/settle`,
`/x402/settle/batch` and `/x402/verify` answered straight from ASGI, and anonymous reads of channel ids this process
does not know refused here when they must be (a flood of made-up ids).

FastAPI declares and documents the operations (and its routes call the same functions), but its routing, dependency
solving and middleware stack cost ~100 µs of the ~310 µs a single-voucher request took on one core
(docs/benchmarks.md); a settle of x402's also held one of the few request threads while its commit ran, which is why
it is served here on the event loop. Everything else goes to FastAPI.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from settlement.api.deps import ADMITTED
from settlement.api.handlers import accept_batch, accept_voucher
from settlement.api.middleware import INTERNAL_ERROR, read_json_body, refuse, respond
from settlement.api.routes_x402 import X402Operations
from settlement.domain.clients import client_of
from settlement.domain.model import ChannelId
from settlement.errors import SettlementError
from settlement.server.service import Service

logger = logging.getLogger(__name__)

PATH = "/v1/vouchers"
BATCH = "/v1/vouchers/batch"
X402_SETTLE = "/x402/settle"
X402_VERIFY = "/x402/verify"
X402_SETTLE_BATCH = "/x402/settle/batch"
CHANNELS = "/v1/channels/"
_CHANNEL = re.compile(r"/v1/channels/0x[0-9a-fA-F]{64}")


def _has_credentials(scope: Scope) -> bool:
    return any(name == b"authorization" for name, _ in scope["headers"])


_INTERNAL = json.dumps(INTERNAL_ERROR).encode()


class FastPath:
    """Serves its routes with the same body rules (415, 413), answers and error codes as the app behind it."""

    def __init__(
        self,
        app: ASGIApp,
        service: Service,
        x402: X402Operations,
        max_bytes: int,
        body_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.service = service
        self.x402 = x402
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.ipv6_prefix = service.settings.client_ipv6_prefix

    @property
    def state(self) -> Any:
        """The wrapped app's state (`state.service`), so callers can treat this as the app."""
        return getattr(self.app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and _CHANNEL.fullmatch(scope["path"]) and not _has_credentials(scope):
            # An anonymous read of a channel id this process does not know: refused here if it must be (a made-up id
            # the chain just denied, or beyond the read budget), at a tenth of what FastAPI's routing costs.
            channel_id = ChannelId(scope["path"][len(CHANNELS) :].lower())
            try:
                self.service.ingestor.admit_unknown(channel_id)
            except SettlementError as ex:
                await refuse(send, ex)
                return
            scope.setdefault("state", {})[ADMITTED] = channel_id
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope["method"] != "POST" or path not in (PATH, BATCH, X402_SETTLE, X402_VERIFY, X402_SETTLE_BATCH):
            await self.app(scope, receive, send)
            return
        body = await read_json_body(scope, receive, send, self.max_bytes, self.body_timeout)
        if body is None:
            return
        try:
            if path == PATH:
                status, payload = await accept_voucher(self.service, body)
            elif path == BATCH:
                status, payload = await accept_batch(self.service, body, client_of(scope, self.ipv6_prefix))
            elif path == X402_SETTLE:
                status, payload = 200, await self.x402.settle(body)
            elif path == X402_VERIFY:
                status, payload = 200, await self.x402.verify(body)
            else:
                status, payload = 200, await self.x402.settle_batch(body, client_of(scope, self.ipv6_prefix))
        except SettlementError as ex:
            await refuse(send, ex)
            return
        except Exception:  # the same answer as the app's handler of last resort
            logger.exception("unhandled error")
            await respond(send, 500, _INTERNAL)
            return
        await respond(send, status, payload)
