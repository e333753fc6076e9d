"""Routes that take vouchers. They are `async`: they verify on the event loop and await the group commit without
holding a thread (a thread per waiting request costs GIL hand-offs that cap throughput)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from settlement.api.deps import ERRORS, client_of_request
from settlement.api.handlers import accept_batch, accept_voucher
from settlement.api.schemas import BatchOut, ReceiptOut, VoucherBatchIn, VoucherIn, documented_body

router = APIRouter(responses=ERRORS)


@router.post(
    "/v1/vouchers",
    operation_id="submitVoucher",
    tags=["vouchers"],
    status_code=201,
    response_model=ReceiptOut,
    responses={200: {"model": ReceiptOut, "description": "already accepted: the same receipt again"}},
    openapi_extra=documented_body(VoucherIn),
)
async def submit_voucher(request: Request) -> Response:
    """Accept a voucher once it is durably stored (201); a re-sent voucher gets its receipt again (200)."""
    status, payload = await accept_voucher(request.app.state.service, await request.body())
    return Response(payload, status_code=status, media_type="application/json")


@router.post(
    "/v1/vouchers/batch",
    operation_id="submitVoucherBatch",
    tags=["vouchers"],
    response_model=BatchOut,
    openapi_extra=documented_body(VoucherBatchIn),
)
async def submit_batch(request: Request) -> Response:
    """Many vouchers in one request; each gets its own result and valid ones are accepted whatever the others do."""
    status, payload = await accept_batch(request.app.state.service, await request.body(), client_of_request(request))
    return Response(payload, status_code=status, media_type="application/json")
