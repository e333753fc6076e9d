"""Token buckets: how much of something (requests, vouchers, look-ups) a client, a payer or the whole process may
spend a second, with a burst saved up. One arithmetic for every rate the service enforces."""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable


class Buckets:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved, a new key starting full (rate 0: no
    limit). At most `max_keys` are kept: full ones are dropped first (a key idle for burst/rate seconds is full
    anyway), then the oldest half. Safe from several threads."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens, when): its level (below zero, a debt: `charge`) and the time it was counted at. A plain
        # pair, not a NamedTuple: one is made for every request the rate guard takes (~190 ns against ~6).
        self._buckets: dict[Hashable, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: Hashable, now: float) -> int | None:
        """Take one token for `key`: None if there was one, else the whole seconds until there is."""
        if self.rate <= 0:
            return None
        with self._lock:
            tokens = self._level(key, now)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return self._wait(tokens)
            self._set(key, tokens - 1, now)
        return None

    def due(self, key: Hashable, now: float, held: int = 0) -> int | None:
        """None if `key` has a token now beside the `held` ones (none is taken), else the whole seconds until it has:
        for spending that is known only after the work (`charge`), so that a key in debt is refused before any more of
        it; `held`: tokens the caller counts as spent by work still under way."""
        if self.rate <= 0:
            return None
        with self._lock:
            tokens = self._level(key, now) - held
        return None if tokens >= 1 else self._wait(tokens)

    def charge(self, key: Hashable, amount: int, now: float) -> None:
        """Take `amount` tokens for `key`, below zero if it has fewer: a debt it pays back at `rate`."""
        if self.rate <= 0 or amount <= 0:
            return
        with self._lock:
            self._set(key, self._level(key, now) - amount, now)

    def _level(self, key: Hashable, now: float) -> float:
        """The tokens `key` has at `now` (under the lock): a new key is full."""
        tokens, when = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.rate)

    def _wait(self, tokens: float) -> int:
        """Whole seconds until a level of `tokens` (below 1) reaches one token."""
        return max(1, math.ceil((1 - tokens) / self.rate))

    def _set(self, key: Hashable, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, when) in self._buckets.items() if tokens + (now - when) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) > self.max_keys // 2:
            counted = {key: when for key, (_tokens, when) in self._buckets.items()}
            for key in sorted(counted, key=counted.__getitem__)[: len(counted) // 2]:
                del self._buckets[key]


class TokenBucket:
    """One bucket for the whole process (chain look-ups, reads of unknown channel ids)."""

    def __init__(self, rate: float, burst: float) -> None:
        self._one = Buckets(rate, burst, max_keys=1)

    def take(self, now: float) -> bool:
        return self._one.take(None, now) is None
