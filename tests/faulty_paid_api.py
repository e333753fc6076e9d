"""examples/paid_api.py with more paid routes that fail the ways a payee's own code can: a handler that raises, a
streamed answer whose body breaks after its first chunk, a handler slower than its payer waits (SLOW_SECONDS), a
route that has moved (a redirect, as Starlette's router also answers a paid URL with a trailing slash), and a 304.
And paid routes whose handlers count their runs (their side effect; one answers HEAD too; one requires x402's
payment identifier), with a free route that tells the count.
None is the response the payer paid for, so none may be charged (tests/test_x402_e2e.py runs it as it runs the
example). And a paid route that reads its request's body, served with a body bound of 1 s (10 by default) so that
the tests of slow bodies take seconds. With SETTLE_ONE_BY_ONE set, its facilitator client settles each payment
with one `/settle` (`batch_settles=False`); UNSEEN_BUDGET ("rate burst") sets its budget of a client's payments
on channels the facilitator does not know. And a free route that is a plain `def` (`/plain`), run on the app's
worker threads."""

from __future__ import annotations

import asyncio
import os
import runpy
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import RedirectResponse, StreamingResponse
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, declare_payment_identifier_extension
from x402.http.types import RouteConfig

from settlement.x402.serving import bounded_protocol
from settlement.x402.unseen import UnseenBudget

example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "paid_api.py"))
app: FastAPI = example["app"]
if os.environ.get("SETTLE_ONE_BY_ONE"):
    example["facilitator"].batch_settles = False
if unseen := os.environ.get("UNSEEN_BUDGET"):  # "rate burst": a client's payments on channels no one knows
    rate, burst = (float(part) for part in unseen.split())
    example["facilitator"].unseen = UnseenBudget(rate, burst)


@app.get("/reports/broken/raise")  # priced by the example's "GET /reports/*"
async def raising() -> dict[str, str]:
    raise RuntimeError("a bug in the payee's handler")


@app.get("/reports/broken/stream")
async def breaking() -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"report": '
        raise RuntimeError("the report's source went away mid-answer")

    return StreamingResponse(body(), media_type="application/json")


@app.get("/reports/broken/slow")
async def slow() -> dict[str, str]:
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "2")))
    return {"report": "late"}


@app.get("/reports/broken/moved")
async def moved() -> RedirectResponse:
    return RedirectResponse("/reports/3", status_code=307)


@app.get("/reports/broken/unchanged")
async def unchanged() -> Response:
    return Response(status_code=304)  # as to a conditional GET whose copy is current


@app.get("/reports/uploaded/size")  # a body with a GET, as the example prices GETs
async def uploaded(request: Request, think: float = 0.0) -> dict[str, int]:
    await asyncio.sleep(think)  # the handler's own work before it reads the body
    return {"bytes": len(await request.body())}


RUNS: Counter[str] = Counter()  # each counted handler's runs, by name
# Paid as the example's routes are, and only with a payment identifier (an order: placed once, whatever the retries).
example["routes"]["GET /orders/*"] = RouteConfig(
    accepts=example["paid"].accepts,
    extensions={PAYMENT_IDENTIFIER: declare_payment_identifier_extension(required=True)},
)


@app.get("/orders/{name}")
async def order(name: str) -> dict[str, int]:
    RUNS[name] += 1
    return {"runs": RUNS[name]}


@app.get("/reports/counted/{name}")  # a handler with a side effect (an SMS sent, an order placed), then its answer
async def counted(name: str, think: float = 0.0) -> dict[str, int]:
    RUNS[name] += 1
    await asyncio.sleep(think)
    return {"runs": RUNS[name]}


@app.api_route("/reports/headed/{name}", methods=["GET", "HEAD"])  # as Starlette's own routes answer HEAD
async def headed(name: str) -> dict[str, int]:
    RUNS[name] += 1
    return {"runs": RUNS[name]}


@app.get("/runs/{name}")  # free: how many times a counted handler ran
async def runs(name: str) -> dict[str, int]:
    return {"runs": RUNS[name]}


@app.get("/plain")  # free, and a plain `def`: FastAPI runs it on the app's worker threads, as it runs any such route
def plain() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/echo")  # free: a payee app's own WebSocket outlives the protocol's body bound
async def echo(socket: WebSocket) -> None:
    await socket.accept()
    while True:
        await socket.send_text(await socket.receive_text())


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        http=bounded_protocol(body_timeout=1.0),
        limit_concurrency=1_000,
        log_level="warning",
    )
