"""`bench.py x402`'s floor: the example app's shape (FastAPI, x402's own `PaymentMiddlewareASGI`, one paid and one
free route) with a scheme that does nothing, its facilitator x402's own `x402Facilitator` in this process. No
signature, no store, no HTTP hop to a facilitator: what is left is what x402's middleware and client cost by
themselves, the part of a paid request no scheme can take away. Run by scripts/bench_x402.py as its own uvicorn
process (PORT, NETWORK, PRICE_WEI from the environment); never a way to take payments.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from typing import Any

import uvicorn
from fastapi import FastAPI
from x402 import x402Facilitator, x402ResourceServer
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, declare_payment_identifier_extension
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.http.types import PaymentOption, RouteConfig
from x402.interfaces import FacilitatorContext, PaymentFlowConfig
from x402.payment_flow import AUTHORIZATION_PAYMENT_FLOW, SDK_DEFAULT_ASSET_TRANSFER_METHOD
from x402.schemas import (
    AssetAmount,
    PaymentPayload,
    PaymentRequirements,
    Price,
    SettleResponse,
    SupportedKind,
    VerifyResponse,
)

SCHEME = "floor"
ETH = "0x0000000000000000000000000000000000000000"
PAYER = "0x000000000000000000000000000000000000f100"


class FloorServerScheme:
    """Prices in base units of ETH, requirements as x402 builds them."""

    scheme = SCHEME
    default_asset_transfer_method = SDK_DEFAULT_ASSET_TRANSFER_METHOD
    payment_flows: Mapping[str, PaymentFlowConfig] = {SDK_DEFAULT_ASSET_TRANSFER_METHOD: AUTHORIZATION_PAYMENT_FLOW}

    def parse_price(self, price: Price, network: str) -> AssetAmount:
        return price if isinstance(price, AssetAmount) else AssetAmount(amount=str(price), asset=ETH)

    def enhance_payment_requirements(
        self, requirements: PaymentRequirements, supported_kind: SupportedKind, extensions: list[str]
    ) -> PaymentRequirements:
        return requirements


class FloorFacilitatorScheme:
    """Every payment valid and settled, at once."""

    scheme = SCHEME
    caip_family = "eip155:*"

    def get_extra(self, network: str) -> dict[str, Any] | None:
        return None

    def get_signers(self, network: str) -> list[str]:
        return []

    def verify(
        self, payload: PaymentPayload, requirements: PaymentRequirements, context: FacilitatorContext | None = None
    ) -> VerifyResponse:
        return VerifyResponse(is_valid=True, payer=PAYER)

    def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, context: FacilitatorContext | None = None
    ) -> SettleResponse:
        return SettleResponse(success=True, transaction="", network=requirements.network, payer=PAYER)


NETWORK = os.environ.get("NETWORK", "eip155:31337")
facilitator = x402Facilitator()
facilitator.register([NETWORK], FloorFacilitatorScheme())
server = x402ResourceServer(facilitator)
server.register(NETWORK, FloorServerScheme())
price = os.environ.get("PRICE_WEI", "1000000000")
paid = RouteConfig(  # with the example app's payment identifier: the client makes one, the middleware reads it
    accepts=PaymentOption(scheme=SCHEME, pay_to=PAYER, price=price, network=NETWORK),
    extensions={PAYMENT_IDENTIFIER: declare_payment_identifier_extension()},
)

app = FastAPI(title="x402's floor")
app.add_middleware(PaymentMiddlewareASGI, routes={"GET /weather": paid}, server=server)


@app.get("/weather")
async def weather() -> dict[str, str]:
    return {"forecast": "sunny"}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    gc.collect()  # start-up's objects out of the collector's scans, as the example app's facilitator client does
    gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8403")), log_level="warning")
