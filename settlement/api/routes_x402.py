"""The x402 facilitator routes (`/x402/supported`, `/x402/verify`, `/x402/settle`): what the official `x402`
package's HTTP facilitator client calls, with `http://<service>/x402` as the facilitator's URL.

Refusals are 200 answers with `isValid: false` / `success: false` and a stable reason, as x402 expects; a body that
is not x402 v2's shape is a 400 (`malformed_request`); the store or the chain being down is a 503 with our error
body, which a payee's middleware must not take for a refused payment.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from x402 import x402FacilitatorSync
from x402.schemas import (
    PaymentPayload,
    PaymentRequirements,
    SchemeNotFoundError,
    SettleResponse,
    VerifyResponse,
)

from settlement.api.deps import ERRORS, ServiceDep
from settlement.x402.wire import Reason

router = APIRouter(prefix="/x402", responses=ERRORS, tags=["x402"])


class X402Request(BaseModel):
    """x402 v2's body of /verify and /settle (the facilitator client sends both alike)."""

    x402Version: Literal[2]
    paymentPayload: PaymentPayload
    paymentRequirements: PaymentRequirements


def facilitator(request: Request) -> x402FacilitatorSync:
    """The app's x402 facilitator (create_app makes it, while the chain answers)."""
    found: x402FacilitatorSync = request.app.state.x402_facilitator
    return found


@router.get("/supported", operation_id="x402Supported")
def supported(request: Request, service: ServiceDep) -> dict[str, Any]:
    """The schemes and networks this facilitator serves, with what a payee's requirements must carry."""
    answer: dict[str, Any] = facilitator(request).get_supported().model_dump(by_alias=True, exclude_none=True)
    return answer


@router.post("/verify", operation_id="x402Verify")
def verify(request: Request, service: ServiceDep, parsed: X402Request) -> dict[str, Any]:
    """Would this payment be accepted now? Judged as ingest judges it; nothing is stored."""
    try:
        result = facilitator(request).verify(parsed.paymentPayload, parsed.paymentRequirements)
    except SchemeNotFoundError as ex:
        result = VerifyResponse(is_valid=False, invalid_reason=Reason.UNSUPPORTED, invalid_message=str(ex))
    return result.model_dump(by_alias=True, exclude_none=True)


@router.post("/settle", operation_id="x402Settle")
def settle(request: Request, service: ServiceDep, parsed: X402Request) -> dict[str, Any]:
    """Accept the payment durably (answered after the commit) with its receipt; on-chain settlement is batched."""
    try:
        result = facilitator(request).settle(parsed.paymentPayload, parsed.paymentRequirements)
    except SchemeNotFoundError as ex:
        result = SettleResponse(
            success=False,
            error_reason=Reason.UNSUPPORTED,
            error_message=str(ex),
            transaction="",
            network=parsed.paymentRequirements.network,
        )
    return result.model_dump(by_alias=True, exclude_none=True)
