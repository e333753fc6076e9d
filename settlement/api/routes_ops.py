"""Routes for operators and probes: health, readiness, metrics, and the EIP-712 domain payers sign with."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from settlement import __version__
from settlement.api.auth import OperatorDep
from settlement.api.deps import ERRORS, ServiceDep
from settlement.api.schemas import Eip712Info, Health, Readiness
from settlement.eip712.vouchers import EIP712_DOMAIN_TYPE, VOUCHER_TYPE
from settlement.errors import ChainUnavailableError

router = APIRouter(responses=ERRORS)


@router.get("/health", operation_id="health", tags=["ops"])
def health() -> Health:
    """The process is alive (it does not look at the store or the chain; see /ready)."""
    return Health(status="ok", version=__version__)


@router.get("/ready", operation_id="ready", tags=["ops"])
def ready(service: ServiceDep) -> Readiness:
    """The store and the chain answer, the indexer progresses and is within `ready_max_lag` confirmed blocks; else
    503. The chain's head as read within `ready_chain_max_age` seconds, by the indexer's poll or another check, while
    none of its reads failed: a flood of checks costs the chain's RPC a call a second, not one each."""
    service.db.ping()
    if service.indexer.failing is not None:
        raise ChainUnavailableError(f"the indexer cannot progress: {service.indexer.failing}")
    head, confirmed = service.indexer.recent_heads(service.settings.ready_chain_max_age)
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


# Its errors are JSON like every other route's, though the metrics themselves are text.
_JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for code in (401, 403, 503)
}


@router.get("/metrics", operation_id="metrics", tags=["ops"], response_class=PlainTextResponse, responses=_JSON_ERRORS)
def metrics(service: ServiceDep, _: OperatorDep) -> Response:
    """Prometheus metrics of this process (the operator's: they show the settler's balance and traffic)."""
    service.refresh_metrics()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/eip712", operation_id="getEip712Domain", tags=["vouchers"])
def eip712(service: ServiceDep) -> Eip712Info:
    """The EIP-712 domain and types a payer signs vouchers with, as the deployed hub reports them."""
    return Eip712Info(
        domain=service.domain.as_dict(),
        types={"EIP712Domain": EIP712_DOMAIN_TYPE, "Voucher": VOUCHER_TYPE},
        primaryType="Voucher",
    )
