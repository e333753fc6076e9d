"""A payee's FastAPI guard: x402's own middleware (`PaymentMiddlewareASGI`) and facilitator client, with one change
of answer. When the facilitator cannot judge a payment (no answer, a 5xx, a body that is not x402's), x402 answers
500 or 502, or, after the handler ran, a 402 that tells the payer to pay again. Here the payee answers **503** with
`Retry-After` instead: retry later, nothing was charged (the voucher was not accepted, so it pays nothing; the
payer's next payment finds that out from the service).

Needs FastAPI (the payee's app has it); the rest of settlement.x402 does not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from x402.http import HTTPFacilitatorClient
from x402.http.facilitator_client_base import FacilitatorResponseError
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.schemas import SettleResponse, VerifyResponse

from settlement.x402.wire import Reason

RETRY_AFTER_SECONDS = 1
# One holder per request (a dict, so that tasks that copy the context still write into this request's holder).
_failures: ContextVar[dict[str, str] | None] = ContextVar("channelhub_facilitator_failures", default=None)


class ChannelHubFacilitatorClient(HTTPFacilitatorClient):
    """x402's HTTP facilitator client, noting when the facilitator could not judge a payment at all."""

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        try:
            return await super().verify(payload, requirements)
        except Exception as ex:
            raise _unavailable("verify", ex) from ex

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        try:
            return await super().settle(payload, requirements)
        except Exception as ex:
            raise _unavailable("settle", ex) from ex


def _unavailable(operation: str, ex: Exception) -> FacilitatorResponseError:
    holder = _failures.get()
    if holder is not None:
        holder["failure"] = f"the facilitator could not {operation} the payment ({type(ex).__name__}: {ex})"
    return FacilitatorResponseError(f"facilitator {operation} unavailable: {ex}")


class PaymentMiddleware(PaymentMiddlewareASGI):
    """`PaymentMiddlewareASGI`, answering 503 + Retry-After when the facilitator could not judge the payment."""

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        holder: dict[str, str] = {}
        token = _failures.set(holder)
        try:
            response = await super().dispatch(request, call_next)
        finally:
            _failures.reset(token)
        if "failure" in holder:
            return JSONResponse(
                {"error": Reason.UNAVAILABLE, "message": holder["failure"]},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return response
