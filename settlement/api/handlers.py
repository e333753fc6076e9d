"""The voucher operations themselves, shared by the FastAPI routes and the ASGI fast path in front of them."""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel

from settlement.api.schemas import ReceiptOut, VoucherIn, parse_body
from settlement.domain.ledger import Verdict
from settlement.errors import SettlementError
from settlement.ingest.pipeline import Outcome
from settlement.server.service import Service


def count(service: Service, outcome: Outcome) -> None:
    if isinstance(outcome, Verdict):
        (service.metrics.vouchers_accepted if outcome.new else service.metrics.vouchers_duplicate).inc()
    else:
        service.metrics.vouchers_rejected.labels(outcome.code).inc()


async def accept_voucher(service: Service, body: bytes) -> tuple[int, bytes]:
    """One voucher: (status, JSON) once it is durably stored; raises the SettlementError of a refusal.

    Shared by the route above and the fast path in front of FastAPI (settlement.api.fastpath), which serves it."""
    voucher = parse_body(VoucherIn, body).to_voucher()
    outcome = (await service.ingestor.ingest_async([voucher]))[0]
    count(service, outcome)
    if isinstance(outcome, SettlementError):
        raise outcome
    return 201 if outcome.new else 200, ReceiptOut.of(outcome.receipt).model_dump_json().encode()


def json_response(status: int, body: BaseModel) -> Response:
    """Serialised by pydantic-core in one call; FastAPI's response-model pass would validate and encode it again."""
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")
