"""A paying client: the official x402 httpx client with the `channelhub` scheme registered. The first request to a
payee opens a channel (a deposit of 100 prices); every paid request after that is one voucher, no transaction.

    PAYER_KEY=0x... .venv/bin/python examples/paying_client.py http://127.0.0.1:8402/weather
"""

from __future__ import annotations

import asyncio
import os
import sys

from x402 import x402Client
from x402.http.clients import x402HttpxClient

from settlement.domain.model import ETH
from settlement.sdk import PayerClient
from settlement.x402.client import ChannelHubClientScheme, PaymentIdentifiers

KEY = os.environ.get("PAYER_KEY", "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")  # devnet #1
RPC = os.environ.get("SETTLEMENT_RPC_URL", "http://127.0.0.1:8545")
SERVICE = os.environ.get("SERVICE_URL", "http://127.0.0.1:8000")  # the facilitator, whose hub the payer checks


async def main(url: str, times: int) -> None:
    payer = PayerClient(KEY, rpc_url=RPC, service_url=SERVICE)
    network = f"eip155:{payer.domain.chain_id}"
    x402 = x402Client()
    x402.register(network, ChannelHubClientScheme(payer))
    # A retried payment is answered again, charged once; an app that retries a request itself (after a timeout, an
    # answer lost) makes its attempts one payment inside `with PaymentIdentifiers.one_request(): ...`.
    x402.register_extension(PaymentIdentifiers())
    # x402's spend controls: which assets may be paid at all, and at most how much per request (here 0.001 ETH).
    x402.set_spend_controls(
        {"allowed_assets": [{"network": network, "asset": ETH, "max_amount_per_payment": str(10**15)}]}
    )
    # x402's client asks unpaid first on every request; `httpx.AsyncClient(transport=PayAheadTransport(x402,
    # unanswered=<the scheme>.unanswered))` (settlement.x402.ahead) pays at once on a URL it saw priced: one round
    # trip per paid request, and a channel freed at once when a paid request gets no payment answer (docs/x402.md).
    async with x402HttpxClient(x402) as http:
        for _ in range(times):
            answer = await http.get(url)
            print(answer.status_code, answer.json())
    payer.shutdown()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8402/weather", int(os.environ.get("TIMES", "3")))
    )
