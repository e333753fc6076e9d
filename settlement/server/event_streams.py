"""A process's live streams of payee events (`GET /v1/payees/{address}/events`): how many it serves, and one read of
the feed's front a tick for all of them.

Each stream used to read the store twice a tick (the horizon, then its payee's feed) whether or not anything had
happened, without a bound on their number: 300 idle streams of one signed-in account (a fresh key, no money) took a
whole core of the service and made an honest read ~20x slower (docs/payee-events.md). Now:
- one task reads the feed's front (the payment horizon and the last chain event) every `interval` while any stream
  is open, and a stream reads its payee's feed only when the front moved since its last read: an idle stream costs
  the store nothing;
- a process serves at most `most` streams (beyond: 503 `streams_full`) and an account at most `per_account` of them
  (429 `stream_limit`), so streams cannot take the connections and the store reads every other client needs;
- payees of no channel in the store (fresh keys, free to make) share `without_channels` of them (503 `streams_full`),
  so that a few dozen such keys do not take every stream a payee with channels could have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from settlement.errors import StreamLimitError, StreamsFullError
from settlement.server.payee_events import Front, Horizon, read_front
from settlement.store import Database

logger = logging.getLogger(__name__)


class EventStreams:
    """Admission of a process's live streams, and the front they wait on."""

    def __init__(
        self, db: Database, horizon: Horizon, interval: float, most: int, per_account: int, without_channels: int
    ) -> None:
        self.db = db
        self.horizon = horizon
        self.interval = interval
        self.most = most
        self.per_account = per_account
        self.without_channels = without_channels
        self.open = 0
        self._strangers = 0  # streams of payees of no channel in the store
        self._accounts: Counter[str] = Counter()
        self._front: Front | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def check(self, account: str | None) -> None:
        """Refuse at once what `admit` would refuse whoever asks, before the payee's standing is read."""
        self.admit(account, without_channels=False)()

    def admit(self, account: str | None, *, without_channels: bool) -> Callable[[], None]:
        """Take one of the process's streams for `account` (None: the operator, bound by the process's limit only),
        or refuse at once when none is left (`without_channels`: for a payee of no channel in the store, which takes
        one of their share); returns what gives it back (once, however often it is called)."""
        if account is not None and self._accounts[account] >= self.per_account:
            raise StreamLimitError(
                f"{account} holds {self.per_account} live streams of this process already "
                "(SETTLEMENT_EVENT_STREAMS_PER_ACCOUNT): close one first",
                maxStreams=self.per_account,
            )
        if self.open >= self.most:
            raise StreamsFullError(
                f"this process serves {self.most} live streams already (SETTLEMENT_EVENT_STREAMS_MAX): retry later, "
                "or receive the events by webhook",
                retryAfter=5,
            )
        if without_channels and self._strangers >= self.without_channels:
            raise StreamsFullError(
                f"this process serves {self.without_channels} live streams to payees of no channel at this service "
                "already (SETTLEMENT_EVENT_STREAMS_WITHOUT_CHANNELS): a payee of a channel is not held back by them",
                retryAfter=5,
            )
        self.open += 1
        self._strangers += without_channels
        if account is not None:
            self._accounts[account] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            self._strangers -= without_channels
            if account is not None:
                self._accounts[account] -= 1
                if not self._accounts[account]:
                    del self._accounts[account]

        return release

    async def moved(self, seen: Front | None, timeout: float) -> Front | None:
        """The front once it differs from `seen` (at once if it does already); None if it did not within `timeout`
        seconds. Every payment and chain event the front covers was visible to the store when it was read."""
        self._watching()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._front is None or self._front == seen:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), left)
        return self._front

    def _watching(self) -> None:
        """Start the front's reader on this event loop if it is not running (it ends when no stream is open)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (an app served again): the old loop's event and task are not ours
            self._loop, self._moved, self._task, self._front = loop, asyncio.Event(), None, None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._watch(), name="payee-event-front")

    async def _watch(self) -> None:
        while self.open:
            try:
                front = await run_in_threadpool(self._read)
            except Exception:  # the store is down or busy: the streams wait, the next tick reads again
                logger.warning("reading the payee events' front failed; retrying", exc_info=True)
            else:
                if front != self._front:
                    self._front = front
                    self._moved.set()
                    self._moved = asyncio.Event()
            await asyncio.sleep(self.interval)
        self._front = None  # read afresh when a stream opens again

    def _read(self) -> Front:
        return read_front(self.db, self.horizon)
