"""The hot path in front of FastAPI: `POST /v1/vouchers` answered straight from ASGI, and anonymous reads of channel
ids this process does not know refused here when they must be (a flood of made-up ids).

FastAPI declares and documents the operation (and its route calls the same `accept_voucher`), but its routing,
dependency solving and middleware stack cost ~100 µs of the ~310 µs a single-voucher request took on one core
(docs/benchmarks.md); the single-voucher endpoint is where that shows. Everything else, the batch endpoint included,
goes to FastAPI.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from settlement.api.deps import ADMITTED
from settlement.api.handlers import accept_voucher
from settlement.api.middleware import INTERNAL_ERROR, read_json_body, refuse, respond
from settlement.domain.model import ChannelId
from settlement.errors import SettlementError
from settlement.server.service import Service

logger = logging.getLogger(__name__)

PATH = "/v1/vouchers"
CHANNELS = "/v1/channels/"
_CHANNEL = re.compile(r"/v1/channels/0x[0-9a-fA-F]{64}")


def _has_credentials(scope: Scope) -> bool:
    return any(name == b"authorization" for name, _ in scope["headers"])


_INTERNAL = json.dumps(INTERNAL_ERROR).encode()


class VoucherFastPath:
    """Serves `POST /v1/vouchers` with the same body rules (415, 413), answers and error codes as the app behind it."""

    def __init__(self, app: ASGIApp, service: Service, max_bytes: int, body_timeout: float = 10.0) -> None:
        self.app = app
        self.service = service
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

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
        if scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await read_json_body(scope, receive, send, self.max_bytes, self.body_timeout)
        if body is None:
            return
        try:
            status, payload = await accept_voucher(self.service, body)
        except SettlementError as ex:
            await refuse(send, ex)
            return
        except Exception:  # the same answer as the app's handler of last resort
            logger.exception("unhandled error")
            await respond(send, 500, _INTERNAL)
            return
        await respond(send, status, payload)
