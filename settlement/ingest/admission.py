"""Per-payer rate limits: how many vouchers a second one payer's key may have judged, over all its channels and all
the clients that carry them (docs/security.md#risk-controls).

Only a voucher whose recovered signer is the channel's payer takes a token: a forged one costs the payer nothing (so
nobody can exhaust an honest payer's rate) and is refused by the ledger anyway. The count is per process; with several
`serve` processes behind a balancer a payer may reach the rate on each.
"""

from __future__ import annotations

import math
import threading
import time

from settlement.errors import PayerRateLimitedError

MAX_PAYERS = 100_000  # buckets kept before the full ones are dropped


class PayerRates:
    """A token bucket per payer: `rate` vouchers a second, `burst` saved (rate 0: no limit)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[bytes, tuple[float, float]] = {}  # payer -> (tokens, when)
        self._lock = threading.Lock()  # the event loop and worker threads both admit

    def admit(self, payer: bytes, now: float | None = None) -> PayerRateLimitedError | None:
        """Take one token for `payer`; the refusal to answer with when there is none."""
        if self.rate <= 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, when = self._buckets.get(payer, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens < 1:
                self._buckets[payer] = (tokens, now)
                wait = max(1, math.ceil((1 - tokens) / self.rate))
                return PayerRateLimitedError(
                    f"payer 0x{payer.hex()} signed more than {self.rate:g} vouchers a second: retry in {wait}s",
                    retryAfter=wait,
                )
            self._buckets[payer] = (tokens - 1, now)
            if len(self._buckets) > MAX_PAYERS:
                self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        full = [p for p, (tokens, when) in self._buckets.items() if tokens + (now - when) * self.rate >= self.burst]
        for payer in full:
            del self._buckets[payer]
        if len(self._buckets) > MAX_PAYERS // 2:
            for payer in sorted(self._buckets, key=lambda p: self._buckets[p][1])[: len(self._buckets) // 2]:
                del self._buckets[payer]
