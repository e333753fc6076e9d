"""Whether the payer's disk is fast enough for its journal to commit on an event loop.

A payment the journal alone can sign is made on the app's event loop (`PayerClient.authorize_now`): one commit, the
disk's flush, costs the loop less than a hand-off to a worker thread and back on a local SSD (~0.3-0.6 ms with the
signature). On a slow disk (a network volume, ~1-10 ms a flush) the same commit holds the loop for the whole flush,
payment after payment, and every other request of the app waits with it: with 3-ms flushes at 100 payments a second
a timer on the payer's loop was 4.4-12.9 ms late at p99 with the commits on it, 1.8-2.5 with them in worker threads
(docs/benchmarks.md, forty-first sitting). `LoopCommits` times the commits made on the loop and says when to make
payments in worker threads instead.

Only commits on the loop are timed: one in a worker thread waits for the GIL after its flush, beside a busy loop up
to the interpreter's switch interval (5 ms), and would make a fast disk look slow for good. So while the disk is
counted slow, one payment every `probe_every` seconds is still made on the loop, to see it get fast again. The median
of the last `seen` commits decides, not one: a single stall of the disk (tens of ms, a few times a minute on a shared
machine) is over before payments could go elsewhere, and the median is not moved by it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

LIMIT = 0.0015  # seconds: a median loop commit this long or longer holds the loop more than a hand-off would cost
SEEN = 16  # commits the median is taken over (none decided before that many)
PROBE_EVERY = 1.0  # seconds between the payments still made on the loop while the disk is counted slow


class LoopCommits:
    """The last `seen` durations of the journal's commits made on an event loop, and what they say. Thread-safe."""

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
        """Whether the next payment should go to a worker thread: the disk is counted slow and no probe is due (a
        due probe is taken by this call: the payment it answers `False` to is made on the loop and timed)."""
        with self._lock:
            if not self._slow:
                return False
            now = self.clock()
            if now < self._probe_at:
                return True
            self._probe_at = now + self.probe_every
            return False

    def took(self, seconds: float) -> None:
        """A commit on the loop took `seconds` (its flush and its signature)."""
        with self._lock:
            self._times.append(seconds)
            if len(self._times) == self._times.maxlen:
                slow = statistics.median(self._times) >= self.limit
                if slow and not self._slow:
                    self._probe_at = self.clock() + self.probe_every
                self._slow = slow
