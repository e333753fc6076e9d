"""Per-payer rate limits: how many vouchers a second one payer's key may have judged, over all its channels and all
the clients that carry them (docs/security.md#risk-controls).

Only a voucher whose recovered signer is the channel's payer takes a token: a forged one costs the payer nothing (so
nobody can exhaust an honest payer's rate) and is refused by the ledger anyway. The count is per process; with several
`serve` processes behind a balancer a payer may reach the rate on each.
"""

from __future__ import annotations

import time

from settlement.domain.buckets import Buckets
from settlement.errors import PayerRateLimitedError


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
