"""Per-payer rate limits: how many vouchers a second one payer's key may have judged, over all its channels and all
the clients that carry them (docs/security.md#risk-controls); and per-client budgets of forged vouchers in batches.

Only a voucher whose recovered signer is the channel's payer takes a payer's token: a forged one costs the payer
nothing (so nobody can exhaust an honest payer's rate) and is refused by the ledger anyway; it is the client that sent
it that pays, in its forgery budget. The counts are per process; with several `serve` processes behind a balancer a
payer (a client) may reach the rate on each.
"""

from __future__ import annotations

import time

from settlement.domain.buckets import Buckets
from settlement.errors import PayerRateLimitedError, RateLimitedError


class PayerRates:
    """A token bucket per payer: `rate` vouchers a second, `burst` saved (rate 0: no limit)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self._buckets = Buckets(rate, max(burst, 1.0))

    def admit(self, payer: bytes, now: float | None = None) -> PayerRateLimitedError | None:
        """Take one token for `payer`; the refusal to answer with when there is none."""
        wait = self._buckets.take(payer, time.monotonic() if now is None else now)
        if wait is None:
            return None
        return PayerRateLimitedError(
            f"payer 0x{payer.hex()} signed more than {self.rate:g} vouchers a second: retry in {wait}s",
            retryAfter=wait,
        )


class ForgeryBudgets:
    """Per client: the vouchers of its batches whose signature is not their channel's payer's, `rate` a second,
    `burst` saved (rate 0: no limit). A batch is answered 200 whatever its items' refusals (a payee's settle batches
    carry many payers' payments), so the per-connection refusal pace never slows a client that sends forgeries a
    thousand to a batch, each one a signature recovery. Whether a voucher is forged is known only once recovered: a
    batch is charged after, and a client in debt gets 429 `rate_limited` for its next batch before any recovery.
    An honest client's batches carry no forgery: a payee's middleware verifies each payment before it settles it."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self._buckets = Buckets(rate, max(burst, 1.0))

    def admit(self, client: str, now: float | None = None) -> None:
        """Raise RateLimitedError while `client` owes forgeries."""
        wait = self._buckets.due(client, time.monotonic() if now is None else now)
        if wait is not None:
            raise RateLimitedError(
                f"{client or 'this client'} sent more than {self.rate:g} forged vouchers a second in its batches "
                f"(signatures that are not their channel's payer's): retry in {wait}s",
                retryAfter=wait,
            )

    def charge(self, client: str, forged: int, now: float | None = None) -> None:
        self._buckets.charge(client, forged, time.monotonic() if now is None else now)
