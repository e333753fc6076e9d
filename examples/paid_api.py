"""A paid API: FastAPI guarded by x402's own middleware, priced per request in wei, paid with ChannelHub vouchers
through a `settlement serve` as the facilitator. Run it against `make run`'s devnet:

    PAY_TO=0x... .venv/bin/python examples/paid_api.py      # then: .venv/bin/python examples/paying_client.py

With the payee's key in PAYEE_KEY (and the chain at RPC_URL), it also takes payers' refund requests
(POST /x402/channelhub/refund: the channel closed at once, the rest of the deposit back to the payer).
"""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI, HTTPException
from x402 import x402ResourceServer
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, declare_payment_identifier_extension
from x402.http import FacilitatorConfig
from x402.http.types import PaymentOption, RouteConfig

from settlement.sdk.payee import PayeeClient
from settlement.x402.fastapi import ChannelHubFacilitatorClient, PaidAnswers, PaymentMiddleware, refund_router
from settlement.x402.server import ChannelHubServerScheme
from settlement.x402.serving import bounded_protocol

FACILITATOR = os.environ.get("FACILITATOR_URL", "http://127.0.0.1:8000/x402")  # our service's facilitator routes
NETWORK = os.environ.get("NETWORK", "eip155:31337")
PAY_TO = os.environ.get("PAY_TO", "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65")  # a devnet account
PRICE = int(os.environ.get("PRICE_WEI", "1000000000"))  # 1 gwei a request (base units of ASSET)
ASSET = os.environ.get("ASSET", "0x0000000000000000000000000000000000000000")  # ETH, or an ERC-20's address
DEPOSIT_MULTIPLE = int(os.environ.get("DEPOSIT_MULTIPLE", "1000"))  # the deposit hint (`minDeposit`), in prices

# x402's resource server, facilitator client and middleware; ours answer 503 when the facilitator is unreachable.
facilitator = ChannelHubFacilitatorClient(FacilitatorConfig(url=FACILITATOR))
server = x402ResourceServer(facilitator)
server.register(
    NETWORK, ChannelHubServerScheme(asset=ASSET, deposit_multiple=DEPOSIT_MULTIPLE, facilitator_url=FACILITATOR)
)
paid = RouteConfig(
    accepts=PaymentOption(scheme="channelhub", pay_to=PAY_TO, price=str(PRICE), network=NETWORK),
    extensions={PAYMENT_IDENTIFIER: declare_payment_identifier_extension()},  # a retried payment is answered again
)

# Its lifespan closes the client's connections when the app stops, and at start keeps what start-up built out of
# the garbage collector's scans (gc.freeze: full collections stalled paid requests under load; docs/x402.md).
# FastAPI reads a request body of any size unless told: a payment is verified before the handler reads the body, so
# one payment (never settled: the answer is an error) could send as much as it liked to a route that reads it. This
# app's bodies are refund requests (under 1 KB): past 64 KiB, 413 before the payment is looked at (by Content-Length)
# or as the body comes (chunked), and nothing charged.
app = FastAPI(title="a paid API", lifespan=facilitator.lifespan, max_body_size=64 * 1024)
# A retried payment (same identifier) gets the answer it bought, kept by the process that served it; an app served by
# several processes (uvicorn --workers) shares them through a file: PAID_ANSWERS=/var/lib/paid-api/answers.sqlite3.
answers = PaidAnswers(path=os.environ.get("PAID_ANSWERS") or None)
routes = {"GET /weather": paid, "GET /reports/*": paid}
app.add_middleware(PaymentMiddleware, routes=routes, server=server, answers=answers)


# Handlers that do not block are `async def`: FastAPI runs a plain `def` on a worker thread, a hand-off that cost
# ~10 % of this app's CPU per paid request at 64 concurrent payers (py-spy; docs/benchmarks.md).
@app.get("/weather")
async def weather() -> dict[str, str]:
    return {"forecast": "sunny"}


@app.get("/reports/{number}")
async def report(number: int) -> dict[str, int]:
    if number > 10:
        raise HTTPException(404, "no such report")  # not found: the payment is not settled, the payer pays nothing
    return {"report": number}


if os.environ.get("PAYEE_KEY"):  # payers may ask for the cooperative refund; the payee sends closeByPayee
    rpc = os.environ.get("RPC_URL", "http://127.0.0.1:8545")
    app.include_router(refund_router(PayeeClient(os.environ["PAYEE_KEY"], rpc, FACILITATOR.removesuffix("/x402"))))


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}  # free


if __name__ == "__main__":
    # What one connection can hold of this app is bounded (settlement.x402.serving): a request head past 16 KiB is a
    # 431, one slower than 10 s a 408, as is a body slower than 10 s and a second for each 500 bytes of it, an answer
    # read by no one for 30 s drops the connection (uvicorn's httptools bounds none of these, and a payment header is
    # the payer's to fill); past 1,000 connections, requests get a 503.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8402")),
        http=bounded_protocol(),
        limit_concurrency=1_000,
        log_level="warning",
    )
