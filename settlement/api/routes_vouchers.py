"""Routes that take vouchers. They are `async`: they verify on the event loop and await the group commit without
holding a thread (a thread per waiting request costs GIL hand-offs that cap throughput)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from settlement.api.deps import ERRORS
from settlement.api.handlers import accept_voucher, count, json_response
from settlement.api.schemas import (
    BatchItemOut,
    BatchOut,
    ErrorOut,
    ReceiptOut,
    VoucherBatchIn,
    VoucherIn,
    documented_body,
    parse_body,
)
from settlement.domain.ledger import Verdict
from settlement.errors import BatchTooLargeError
from settlement.server.service import Service

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
    service: Service = request.app.state.service
    body = parse_body(VoucherBatchIn, await request.body())
    limit = service.settings.batch_max_items
    if len(body.vouchers) > limit:
        raise BatchTooLargeError(f"a batch holds at most {limit} vouchers, got {len(body.vouchers)}", maxItems=limit)
    outcomes = await service.ingestor.ingest_async([v.to_voucher() for v in body.vouchers])
    results = []
    for index, outcome in enumerate(outcomes):
        count(service, outcome)
        if isinstance(outcome, Verdict):
            status = 201 if outcome.new else 200
            results.append(BatchItemOut(index=index, status=status, receipt=ReceiptOut.of(outcome.receipt)))
        else:
            results.append(
                BatchItemOut(index=index, status=outcome.status, error=ErrorOut.model_validate(outcome.body()))
            )
    summary = BatchOut(
        accepted=sum(r.status == 201 for r in results),
        duplicates=sum(r.status == 200 for r in results),
        rejected=sum(r.status >= 400 for r in results),
        results=results,
    )
    return json_response(200, summary)
