"""Whether the payer's disk is fast enough for its journal to commit on an event loop.

A payment the journal alone can sign is made on the app's event loop (`PayerClient.authorize_now`): one commit, the
disk's flush, costs the loop less than a hand-off to a worker thread and back on a local SSD (the loop waits ~0.1 ms
for the flush there). On a slow disk (a network volume, ~1-10 ms a flush) the same commit holds the loop for the whole
flush, payment after payment, and every other request of the app waits with it: with 3-ms flushes at 100 payments a
second a timer on the payer's loop was 4.4-12.9 ms late at p99 with the commits on it, 1.8-2.5 with them in worker
threads (docs/benchmarks.md, forty-first sitting). `LoopCommits` keeps how long the last commits made on the loop
waited (their time less their own CPU: a slow CPU is no reason to leave the loop, a worker thread would spend the same
CPU under the same GIL) and says when to make payments in worker threads instead.

The disk counts as slow only when every one of the last `seen` commits waited `limit` or more: a disk whose flushes
are slow makes each of them wait, while a busy machine (the loop's thread waiting for a core after its flush) or a
stall of the disk (tens of ms, a few times a minute on a shared machine) slows some: a median of the waits let a fast
disk at 500 payments a second pass for slow, and the payments then made in threads cost the payer 0.17 ms more CPU
each. Only commits on the loop are timed: one in a worker thread waits for the GIL after its flush, up to the
interpreter's switch interval (5 ms) beside a busy loop. While the disk counts as slow, one payment every
`probe_every` seconds is still made on the loop, and one that waits less than `limit` brings the payments back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

LIMIT = 0.001  # seconds: a loop commit that waits this long costs it more than a hand-off to a thread would
SEEN = 16  # commits that must all have waited that long (none decided before that many)
PROBE_EVERY = 1.0  # seconds between the payments still made on the loop while the disk counts as slow


class LoopCommits:
    """How long the last `seen` journal commits made on an event loop waited, and what that says. Thread-safe."""

    def __init__(
        self,
        limit: float = LIMIT,
        seen: int = SEEN,
        probe_every: float = PROBE_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 0 or seen < 1 or probe_every <= 0:
            raise ValueError("a loop commit limit is >= 0 seconds, over >= 1 commits, probed every > 0 seconds")
        self.limit, self.probe_every, self.clock = limit, probe_every, clock
        self._times: deque[float] = deque(maxlen=seen)
        self._slow = False
        self._probe_at = 0.0
        self._lock = threading.Lock()

    def slow(self) -> bool:
        """Whether the next payment should go to a worker thread: the disk counts as slow and no probe is due (a due
        probe is taken by this call: the payment it answers `False` to is made on the loop and timed)."""
        with self._lock:
            if not self._slow:
                return False
            now = self.clock()
            if now < self._probe_at:
                return True
            self._probe_at = now + self.probe_every
            return False

    def took(self, seconds: float) -> None:
        """A commit on the loop waited `seconds` (its time less its own CPU: the disk's flush, mostly)."""
        with self._lock:
            self._times.append(max(0.0, seconds))  # a wait is never below 0 (two clocks' roundings)
            if len(self._times) == self._times.maxlen:
                slow = min(self._times) >= self.limit
                if slow and not self._slow:
                    self._probe_at = self.clock() + self.probe_every
                self._slow = slow
