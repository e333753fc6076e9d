"""The FastAPI application: health, readiness and the EIP-712 domain clients sign with."""

from __future__ import annotations

from typing import Any

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from web3 import Web3

from settlement import __version__
from settlement.chain import connect
from settlement.config import Settings
from settlement.deployment import Deployment, hub_contract
from settlement.errors import ChainUnavailableError, SettlementError
from settlement.vouchers import EIP712_DOMAIN_TYPE, VOUCHER_TYPE, read_domain


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: str
    chain_id: int
    block_number: int
    contract: str


class Eip712Info(BaseModel):
    domain: dict[str, Any]
    types: dict[str, list[dict[str, str]]]
    primaryType: str


def create_app(settings: Settings) -> FastAPI:
    """Build the app for one deployment; the deployment record must exist (run `settlement deploy`)."""
    deployment = Deployment.load(settings.deployment_file)
    w3: Web3 = connect(settings.rpc_url, settings.rpc_timeout)
    deployment.check(w3)
    domain = read_domain(hub_contract(w3, deployment))

    app = FastAPI(title="ChannelHub settlement service", version=__version__)

    @app.exception_handler(SettlementError)
    async def settlement_error(_: Request, ex: SettlementError) -> JSONResponse:
        return JSONResponse(status_code=ex.status, content={"code": ex.code, "message": ex.message})

    @app.get("/health", operation_id="health")
    def health() -> Health:
        """The process is alive."""
        return Health(status="ok", version=__version__)

    @app.get("/ready", operation_id="ready")
    def ready() -> Readiness:
        """The chain answers and still holds the deployed hub."""
        try:
            deployment.check(w3)
            block = w3.eth.block_number
        except (requests.RequestException, OSError) as ex:
            raise ChainUnavailableError(f"chain unreachable at {settings.rpc_url}: {ex}") from ex
        return Readiness(status="ready", chain_id=deployment.chain_id, block_number=block, contract=deployment.address)

    @app.get("/v1/eip712", operation_id="getEip712Domain")
    def eip712() -> Eip712Info:
        """The EIP-712 domain and types a payer signs vouchers with."""
        return Eip712Info(
            domain=domain.as_dict(),
            types={"EIP712Domain": EIP712_DOMAIN_TYPE, "Voucher": VOUCHER_TYPE},
            primaryType="Voucher",
        )

    return app
