"""API v1: one router per resource, composed here in the order they are documented (their routes are copied, so
this router lists every operation itself)."""

from __future__ import annotations

from fastapi import APIRouter

from settlement.api import (
    routes_auth,
    routes_caps,
    routes_channels,
    routes_ops,
    routes_payees,
    routes_risk,
    routes_vouchers,
    routes_x402,
)

router = APIRouter()
for part in (
    routes_ops.router,
    routes_auth.router,
    routes_vouchers.router,
    routes_channels.router,
    routes_payees.router,
    routes_risk.router,
    routes_caps.payee_router,
    routes_caps.operator_router,
    routes_x402.router,
):
    router.routes.extend(part.routes)
