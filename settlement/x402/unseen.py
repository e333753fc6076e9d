"""A payee's budget of each client's payments on channels the facilitator does not know (made-up channel ids cost
nothing to make, and each was a verify at the facilitator, which paces a connection's refusals).

What such a payment costs is known only from the facilitator's answer, so a payment on a channel the payee has not
seen holds one of its client's tokens while its verify is in flight, and gives it back if the facilitator knew the
channel. A client's payments sent at once therefore reach the facilitator at most a bucket's worth at a time: one
that finds no token free waits while the client's others are in flight (each may give its token back), and is refused
(`OverBudget`) once none is and the bucket is empty. Charged only after each answer, a wave sent at once passed whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from settlement.domain.buckets import Buckets


class OverBudget(Exception):
    """A client over its budget of payments on unknown channels (or over another budget: `why`): retry in `wait`
    seconds."""

    def __init__(self, wait: int, why: str | None = None) -> None:
        super().__init__(wait)
        self.wait, self.why = wait, why


@dataclass
class _Client:
    """One client's verifies in flight, and the payments waiting for one of them to end."""

    in_flight: int = 0
    waiting: list[asyncio.Future[None]] = field(default_factory=list)


class UnseenBudget:
    """`rate` payments on unknown channels a second per client, bursts of `burst` (rate 0: no limit). Used on one
    event loop (the payee app's): no step between a check and what it decides awaits."""

    def __init__(self, rate: float, burst: float) -> None:
        self.buckets = Buckets(rate, burst)
        self._clients: dict[str, _Client] = {}

    @asynccontextmanager
    async def spend(self, client: str) -> AsyncIterator[Callable[[], None]]:
        """Hold one of `client`'s tokens while the block sends its verify, raising `OverBudget` first if the client
        has none and nothing in flight; the block calls what this yields when the facilitator did not know the
        channel (the token is spent), else the token is given back as the block ends."""
        if self.buckets.rate <= 0:
            yield lambda: None
            return
        while True:
            state = self._clients.setdefault(client, _Client())
            wait = self.buckets.due(client, time.monotonic(), held=state.in_flight)
            if wait is None:
                break
            if not state.in_flight:
                self._forget_idle(client, state)
                raise OverBudget(wait)
            ended = asyncio.get_running_loop().create_future()
            state.waiting.append(ended)
            try:
                await ended
            finally:
                if ended in state.waiting:  # cancelled while it waited
                    state.waiting.remove(ended)
        state.in_flight += 1
        try:
            yield lambda: self.buckets.charge(client, 1, time.monotonic())
        finally:
            state.in_flight -= 1
            woken, state.waiting = state.waiting, []
            for ended in woken:
                if not ended.done():
                    ended.set_result(None)
            self._forget_idle(client, state)

    def _forget_idle(self, client: str, state: _Client) -> None:
        """A client with nothing in flight and no one waiting is kept by its bucket alone (a woken payment looks its
        client up again)."""
        if not state.in_flight and not state.waiting and self._clients.get(client) is state:
            del self._clients[client]
