"""The voucher operations themselves, shared by the FastAPI routes and the ASGI fast path in front of them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json

from settlement.api.schemas import VoucherBatchIn, VoucherIn, parse_body
from settlement.domain.ledger import Verdict, receipt_body
from settlement.errors import BatchTooLargeError, InvalidSignatureError, SettlementError
from settlement.ingest.pipeline import Outcome
from settlement.server.service import Service


def count(service: Service, outcomes: Sequence[Outcome]) -> tuple[int, int]:
    """The outcomes in the voucher counters (one increment per counter and request, not per voucher); returns how
    many were accepted and how many were already accepted before."""
    new = duplicates = 0
    refused: Counter[str] = Counter()
    for outcome in outcomes:
        if isinstance(outcome, Verdict):
            if outcome.new:
                new += 1
            else:
                duplicates += 1
        else:
            refused[outcome.code] += 1
    metrics = service.metrics
    if new:
        metrics.vouchers_accepted.inc(new)
    if duplicates:
        metrics.vouchers_duplicate.inc(duplicates)
    for code, times in refused.items():
        metrics.vouchers_rejected.labels(code).inc(times)
    return new, duplicates


async def accept_voucher(service: Service, body: bytes) -> tuple[int, bytes]:
    """One voucher: (status, JSON) once it is durably stored; raises the SettlementError of a refusal.

    Shared by the route above and the fast path in front of FastAPI (settlement.api.fastpath), which serves it."""
    voucher = parse_body(VoucherIn, body).to_voucher()
    outcome = (await service.ingestor.ingest_async([voucher]))[0]
    count(service, [outcome])
    if isinstance(outcome, SettlementError):
        raise outcome
    return 201 if outcome.new else 200, to_json(receipt_body(outcome.receipt))


async def accept_batch(service: Service, body: bytes, client: str) -> tuple[int, bytes]:
    """Many vouchers: (200, BatchOut's JSON) once the accepted ones are durably stored, each with its own result.
    `client` pays for the batch's forged vouchers (`Service.forgeries`), and is refused while it owes.

    The answer is made of plain values, serialised by pydantic-core in one call to exactly what BatchOut's model
    gives (tests/test_ingest_api.py): a model per item was a fifth of the event loop's time per voucher."""
    service.forgeries.admit(client)
    vouchers = parse_body(VoucherBatchIn, body).vouchers
    limit = service.settings.batch_max_items
    if len(vouchers) > limit:
        raise BatchTooLargeError(f"a batch holds at most {limit} vouchers, got {len(vouchers)}", maxItems=limit)
    outcomes = await service.ingestor.ingest_async([v.to_voucher() for v in vouchers])
    service.forgeries.charge(client, sum(isinstance(o, InvalidSignatureError) for o in outcomes))
    accepted, duplicates = count(service, outcomes)
    results: list[dict[str, Any]] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Verdict):
            status = 201 if outcome.new else 200
            results.append({"index": index, "status": status, "receipt": receipt_body(outcome.receipt), "error": None})
        else:
            results.append({"index": index, "status": outcome.status, "receipt": None, "error": outcome.body()})
    rejected = len(outcomes) - accepted - duplicates
    return 200, to_json({"accepted": accepted, "duplicates": duplicates, "rejected": rejected, "results": results})
