"""One paid request as the payee's guard sees it: `PaymentMiddleware` (settlement.x402.fastapi) makes it, and the
facilitator client under x402's middleware (settlement.x402.facilitator_client) writes into it what x402's own
interfaces cannot carry back (the facilitator could not judge the payment; the client is over its budget; the payment
lacks the identifier its route requires), so that the middleware answers 503, 429 or 400 instead of x402's 402, 500 or
502."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.requests import Request

from settlement.domain.model import ChannelId

Voucher = tuple[ChannelId, int]  # a voucher as the facilitator keys it: its channel and cumulative amount


@dataclass(frozen=True)
class Limited:
    """A payment refused for a budget: the payee's 429, with Retry-After."""

    wait: int  # seconds
    message: str


@dataclass
class Exchange:
    """One request through `PaymentMiddleware`, as the parts under it saw it: one object per request, so that tasks
    that copy the context (the app's, under Starlette's `call_next`) still write into this request's."""

    request: Request
    failure: str | None = None  # the facilitator could not judge the payment: the answer is a 503
    limited: Limited | None = None  # or the client or the channel is over a budget: a 429
    unidentified: bool = False  # or the route requires a payment identifier and the payment has none: a 400
    sent_whole: bool = False  # the app sent its answer's last part
    failed: Exception | None = None  # or raised this instead
    claimed: Voucher | None = None  # the voucher this request's verify claimed, until the request ends
    ending: list[Callable[[], None]] = field(default_factory=list)  # called once the request is answered

    def end(self) -> None:
        """The request is answered (or failed): what its parts held for it is let go."""
        for let_go in self.ending:
            let_go()
        self.ending.clear()


EXCHANGE: ContextVar[Exchange | None] = ContextVar("channelhub_exchange", default=None)
