"""A log line at most once in so long, for what may happen at every request: one line each would bury a payee's log."""

from __future__ import annotations

import time

FAILURE_LOG_SECONDS = 10.0  # a failure that recurs (the facilitator's, the shared file's) is logged once in this long


class Seldom:
    """`due()` is true at most once in `seconds`: a log line for what may happen at every request. One event loop."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            return False
        self._last = now
        return True
