"""Which settle got each recent voucher accepted, so that a payee's `resend` buys only what its own first send did.

A payee sends a settle again, marked `resend`, when the first send's answer was lost (settlement.x402.fastapi): the
facilitator then answers a payment accepted before as accepted, since that first send may be what got it accepted.
But a voucher replayed to a payee served by several processes (or to one process, its two requests settled one after
the other) is settled twice: the second settle is refused as a replay, and if that answer is lost, its resend was
answered accepted too, and the voucher bought two responses. So each settle of the payee carries an `attempt`, its
own id, kept for its resend; the facilitator keeps, for the vouchers accepted lately, the attempt that got each
accepted, and answers a resend of another attempt as the replay it is.

Kept in memory, the last GENERATION to twice as many acceptances (a resend follows its lost answer within the payee's
timeout), each `serve` process its own: a resend the memory does not cover (a restart of the facilitator meanwhile,
that many settles since, or a resend that reached another process than the first send) is answered as before,
accepted. Keys and attempts are kept as their hashes (64 bits, this process's seed): 12 MB for the
100,000 acceptances of two full generations (0.3 µs an acceptance), where the strings took 33 MB."""

from __future__ import annotations

from settlement.domain.model import ChannelId

GENERATION = 50_000  # acceptances a generation holds; the older of two generations is dropped whole


class SettleAttempts:
    """The attempt that got each recent voucher accepted. Used from the event loop only."""

    def __init__(self, generation: int = GENERATION) -> None:
        self.generation = generation
        self._current: dict[int, int] = {}
        self._previous: dict[int, int] = {}

    def accepted(self, channel_id: ChannelId, cumulative: int, attempt: str) -> None:
        """The voucher was accepted by the settle of `attempt`."""
        if len(self._current) >= self.generation:
            self._previous, self._current = self._current, {}
        self._current[hash((channel_id, cumulative))] = hash(attempt)

    def another(self, channel_id: ChannelId, cumulative: int, attempt: str | None) -> bool:
        """Whether the voucher is known to have been accepted by another attempt than `attempt` (None: a settle that
        names none, judged as before)."""
        if attempt is None:
            return False
        key = hash((channel_id, cumulative))
        found = self._current.get(key)
        if found is None:
            found = self._previous.get(key)
        return found is not None and found != hash(attempt)
