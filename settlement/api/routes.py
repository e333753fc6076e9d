"""API v1 routes. The voucher routes are `async`: they verify on the event loop and await the group commit without
holding a thread (a thread per waiting request costs GIL hand-offs that cap throughput). The read routes are plain
`def`, run on FastAPI's worker threads, because they block on the store."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from eth_utils.address import is_address, is_checksum_address, to_checksum_address
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from settlement import __version__
from settlement.api.schemas import (
    AssetOut,
    BatchItemOut,
    BatchOut,
    ChannelOut,
    ChannelPage,
    Eip712Info,
    ErrorOut,
    Health,
    PayeeSummaryOut,
    PaymentPage,
    Readiness,
    ReceiptOut,
    VoucherBatchIn,
    VoucherIn,
    documented_body,
    parse_body,
)
from settlement.errors import (
    BatchTooLargeError,
    ChainUnavailableError,
    ChannelNotFoundError,
    MalformedRequestError,
    SettlementError,
)
from settlement.ingest import Outcome
from settlement.ledger import Verdict
from settlement.model import ChannelStatus
from settlement.service import Service
from settlement.store import channels as channel_q
from settlement.vouchers import EIP712_DOMAIN_TYPE, VOUCHER_TYPE


async def get_service(request: Request) -> Service:
    """`async` so FastAPI resolves it on the event loop, not with a hop to a worker thread per request."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
ChannelIdPath = Annotated[str, Path(pattern=r"^0x[0-9a-fA-F]{64}$", description="0x + 64 hex digits")]
ADDRESS_RULE = "0x + 40 hex digits; mixed case must be a correct EIP-55 checksum"
AddressPath = Annotated[str, Path(pattern=r"^0x[0-9a-fA-F]{40}$", description=ADDRESS_RULE)]
AddressQuery = Annotated[str | None, Query(pattern=r"^0x[0-9a-fA-F]{40}$", description=ADDRESS_RULE)]
Limit = Annotated[int, Query(ge=1, le=1000)]

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 404, 409, 413, 415, 503)}

router = APIRouter(responses=ERRORS)


def _address(value: str | None, name: str) -> str | None:
    """Any valid address, checksummed; mixed case must carry a correct EIP-55 checksum."""
    if value is None:
        return None
    digits = value[2:]
    mixed = digits != digits.lower() and digits != digits.upper()
    if not is_address(value) or (mixed and not is_checksum_address(value)):
        raise MalformedRequestError(f"{name} is not a valid address (mixed case must be a correct EIP-55 checksum)")
    return to_checksum_address(value)


def _count(service: Service, outcome: Outcome) -> None:
    if isinstance(outcome, Verdict):
        (service.metrics.vouchers_accepted if outcome.new else service.metrics.vouchers_duplicate).inc()
    else:
        service.metrics.vouchers_rejected.labels(outcome.code).inc()


@router.get("/health", operation_id="health", tags=["ops"])
def health() -> Health:
    """The process is alive (it does not look at the store or the chain; see /ready)."""
    return Health(status="ok", version=__version__)


@router.get("/ready", operation_id="ready", tags=["ops"])
def ready(service: ServiceDep) -> Readiness:
    """The store and the chain answer, the indexer progresses and is within `ready_max_lag` confirmed blocks; else
    503."""
    service.db.ping()
    if service.indexer.failing is not None:
        raise ChainUnavailableError(f"the indexer cannot progress: {service.indexer.failing}")
    head, confirmed = service.indexer.confirmed_heads()
    progress = service.indexer.progress
    indexed = progress.cursor if progress else service.deployment.block_number - 1
    lag = max(confirmed - indexed, 0)
    if lag > service.settings.ready_max_lag:
        raise ChainUnavailableError(f"the indexer is {lag} confirmed blocks behind the chain", indexerLag=lag)
    return Readiness(
        status="ready",
        chainId=service.deployment.chain_id,
        contract=service.deployment.address,
        store=service.db.backend,
        headBlock=head,
        confirmedBlock=confirmed,
        indexedBlock=indexed,
        indexerLag=lag,
    )


@router.get("/metrics", operation_id="metrics", tags=["ops"], response_class=PlainTextResponse)
def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics of this process."""
    progress = service.indexer.progress
    if progress is not None:
        service.metrics.indexer_head.set(progress.head)
        service.metrics.indexer_cursor.set(progress.cursor)
        service.metrics.indexer_lag.set(progress.lag)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/eip712", operation_id="getEip712Domain", tags=["vouchers"])
def eip712(service: ServiceDep) -> Eip712Info:
    """The EIP-712 domain and types a payer signs vouchers with, as the deployed hub reports them."""
    return Eip712Info(
        domain=service.domain.as_dict(),
        types={"EIP712Domain": EIP712_DOMAIN_TYPE, "Voucher": VOUCHER_TYPE},
        primaryType="Voucher",
    )


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


async def accept_voucher(service: Service, body: bytes) -> tuple[int, bytes]:
    """One voucher: (status, JSON) once it is durably stored; raises the SettlementError of a refusal.

    Shared by the route above and the fast path in front of FastAPI (settlement.api.fastpath), which serves it."""
    voucher = parse_body(VoucherIn, body).to_voucher()
    outcome = (await service.ingestor.ingest_async([voucher]))[0]
    _count(service, outcome)
    if isinstance(outcome, SettlementError):
        raise outcome
    return 201 if outcome.new else 200, ReceiptOut.of(outcome.receipt).model_dump_json().encode()


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
        _count(service, outcome)
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
    return _json(200, summary)


def _json(status: int, body: BaseModel) -> Response:
    """Serialised by pydantic-core in one call; FastAPI's response-model pass would validate and encode it again."""
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


@router.get("/v1/channels/{channelId}", operation_id="getChannel", tags=["channels"])
def get_channel(channelId: ChannelIdPath, service: ServiceDep) -> ChannelOut:
    """One channel: the chain's confirmed facts and the latest accepted voucher (looked up on chain if new)."""
    channel = service.ingestor.find_channel(channelId.lower())
    if channel is None:
        raise ChannelNotFoundError(f"channel {channelId.lower()} does not exist on chain")
    return ChannelOut.of(channel)


@router.get("/v1/channels", operation_id="listChannels", tags=["channels"])
def list_channels(
    service: ServiceDep,
    payer: AddressQuery = None,
    payee: AddressQuery = None,
    status: Literal["open", "closing", "closed"] | None = None,
    cursor: Annotated[str | None, Query(pattern=r"^0x[0-9a-f]{64}$")] = None,
    limit: Limit = 100,
) -> ChannelPage:
    """Channels the service knows, in id order; pass `nextCursor` back as `cursor` for the next page."""
    with service.db.read() as conn:
        page = channel_q.list_channels(
            conn,
            payer=_address(payer, "payer"),
            payee=_address(payee, "payee"),
            status=ChannelStatus[status.upper()] if status else None,
            after=cursor,
            limit=limit,
        )
    return ChannelPage(items=[ChannelOut.of(c) for c in page.items], nextCursor=page.next_cursor)


@router.get("/v1/channels/{channelId}/payments", operation_id="listPayments", tags=["channels"])
def list_payments(
    channelId: ChannelIdPath,
    service: ServiceDep,
    cursor: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="the previous page's nextCursor (a payment id)")
    ] = None,
    limit: Limit = 100,
) -> PaymentPage:
    """Every accepted increment of a channel, newest first."""
    channel_id = channelId.lower()
    with service.db.read() as conn:
        if channel_q.get_channel(conn, channel_id) is None:
            raise ChannelNotFoundError(f"the service has no channel {channel_id}")
        page = channel_q.list_payments(conn, channel_id, before=cursor, limit=limit)
    return PaymentPage(items=[ReceiptOut.of(r) for r in page.items], nextCursor=page.next_cursor)


@router.get("/v1/payees/{address}/summary", operation_id="getPayeeSummary", tags=["channels"])
def payee_summary(address: AddressPath, service: ServiceDep) -> PayeeSummaryOut:
    """What a payee was paid, per asset: accepted by the service, settled on chain, and the difference."""
    payee = _address(address, "address")
    assert payee is not None
    with service.db.read() as conn:
        assets = channel_q.payee_summary(conn, payee)
    return PayeeSummaryOut(payee=payee, assets=[AssetOut.of(a) for a in assets])
