"""The FastAPI application: error mapping, the body guard, the v1 routes, and the service's lifecycle."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from settlement import __version__
from settlement.api.facilitator import ChannelHubFacilitator
from settlement.api.fastpath import FastPath
from settlement.api.middleware import INTERNAL_ERROR, BodyGuard, HostGuard, RateGuard, RefusalTarpit, retry_after
from settlement.api.routes import router
from settlement.api.routes_x402 import X402Operations
from settlement.api.schemas import shape_error
from settlement.errors import MalformedRequestError, MethodNotAllowedError, NotFoundError, SettlementError
from settlement.recursion import bounded_recursion
from settlement.server.config import Settings
from settlement.server.service import Service

logger = logging.getLogger(__name__)

DOCS_ASSETS = "/docs-assets"  # where /docs loads Swagger UI's script and style from


def create_app(settings: Settings, service: Service | None = None) -> RefusalTarpit:
    """Build the app for one deployment (run `settlement deploy` first); the lifespan starts and stops the service.

    What it returns is FastAPI behind the fast path of single vouchers and x402 payments (settlement.api.fastpath)."""
    running = service or Service.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running.start()
        gc.freeze()  # what start-up built lives as long as the process: keep it out of every collection's scan
        # Blocking work of requests (store reads, look-ups of unknown channels) runs on a few threads, not 40: each
        # thread that holds the GIL delays the event loop and the ingest writer, which every paying request needs.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(settings.request_threads, thread_name_prefix="request")
        )
        try:
            with bounded_recursion():  # a deeply nested body is a 400, not a segfault (settlement.recursion)
                yield
        finally:
            running.stop()

    # /docs serves Swagger UI's assets from a package (fastapi-offline), not a CDN: it works offline and air-gapped.
    app = FastAPIOffline(
        title="ChannelHub settlement service",
        version=__version__,
        lifespan=lifespan,
        redoc_url=None,
        static_url=DOCS_ASSETS,
    )
    app.state.service = running
    app.state.x402 = x402 = X402Operations(ChannelHubFacilitator(running))
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout_seconds)
    app.include_router(router)

    @app.exception_handler(SettlementError)
    async def settlement_error(_: Request, ex: SettlementError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="settlement"'} if ex.status == 401 else {}
        if (wait := retry_after(ex)) is not None:
            headers["Retry-After"] = wait
        return JSONResponse(status_code=ex.status, content=ex.body(), headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, ex: RequestValidationError) -> JSONResponse:
        error = shape_error(ex.errors())
        return JSONResponse(status_code=error.status, content=error.body())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, ex: HTTPException) -> JSONResponse:
        if ex.status_code == 404:
            error: SettlementError = NotFoundError(f"no route {request.url.path}")
        elif ex.status_code == 405:
            error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
        elif ex.status_code == 400:  # e.g. a body that is not UTF-8: Starlette refuses it before validation
            error = MalformedRequestError(f"the request body could not be read: {ex.detail}")
        else:
            return JSONResponse(
                status_code=ex.status_code, content={"code": f"http_{ex.status_code}", "message": ex.detail}
            )
        return JSONResponse(status_code=error.status, content=error.body())

    @app.exception_handler(Exception)
    async def unexpected(_: Request, ex: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(status_code=500, content=INTERNAL_ERROR)

    fast = FastPath(app, running, x402, settings.max_body_bytes, settings.body_timeout_seconds)
    guarded = HostGuard(fast, settings.allowed_hosts)
    limited = RateGuard(
        guarded, settings.client_requests_per_second, settings.client_burst, settings.client_ipv6_prefix
    )
    return RefusalTarpit(
        limited,
        settings.connection_refusals_per_second,
        settings.connection_refusal_burst,
        running.metrics.refusals_delayed.inc,
    )
