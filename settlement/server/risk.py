"""Payment-behaviour monitoring and the operator's risk rules (docs/security.md#risk-controls).

Every second: the channels the operator holds and the least increments are handed to ingest (so a hold takes effect
within a second in every process on the store). Every `risk_window_seconds`: what this process's ingest accepted and
refused per payer in the window is checked against the operator's limits and the payer's previous window; and one
process (a lease) reads the new chain events for payers opening many channels and closes requested while vouchers
stream. What it finds becomes a risk event: stored, counted (`settlement_risk_events_total{kind}`), logged as an
ALERT, listed at `GET /v1/risk/events`.

Kinds: `burst` (a payer's vouchers in a window over SETTLEMENT_RISK_PAYER_VOUCHERS_PER_WINDOW, or over
SETTLEMENT_RISK_BURST_FACTOR times its previous window), `dust` (refusals for a too small increment),
`repeated_refusals` (one payer refused for one reason SETTLEMENT_RISK_REFUSALS_PER_WINDOW times), `channel_spread`
(one payer opening SETTLEMENT_RISK_NEW_CHANNELS_PER_WINDOW channels), `close_while_streaming` (a close requested on
a channel paid within the window), `channel_held` (the operator held a channel).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import NamedTuple

from eth_utils.address import to_checksum_address

from settlement.domain.ledger import Cap, Rules
from settlement.domain.model import ChainPosition, HubEvent, RiskKind
from settlement.errors import IncrementTooSmallError
from settlement.ingest.pipeline import Ingestor
from settlement.server.config import Settings
from settlement.server.metrics import Metrics
from settlement.settle.lease import Lease
from settlement.store import Database
from settlement.store.caps import caps, prune_windows
from settlement.store.caps import generation as caps_generation
from settlement.store.payee_events import last_chain_position
from settlement.store.risk import RiskFinding, chain_events_since, holds, last_payment_at, record

logger = logging.getLogger(__name__)
BURST_FLOOR = 1_000  # vouchers in a window below which no rise counts as a burst
PRUNE_EVERY_SECONDS = 3_600.0  # ended spend windows are removed hourly
CHAIN_EVENTS_PER_TICK = 1_000  # openings and close requests read at one tick, at most


class Opening(NamedTuple):
    """A channel opening the monitor saw within the window."""

    at_us: int
    payer: str


class RiskMonitor:
    def __init__(self, db: Database, settings: Settings, ingestor: Ingestor, metrics: Metrics) -> None:
        self.db = db
        self.settings = settings
        self.ingestor = ingestor
        self.metrics = metrics
        self.lease = Lease(db, "risk-monitor")
        self.min_increments: dict[str, int] = {
            str(to_checksum_address(k)): v for k, v in settings.min_increments.items()
        }
        self._window_started = time.monotonic()
        self._previous: Counter[str] = Counter()
        self._position: ChainPosition | None = None
        self._opened: deque[Opening] = deque()  # channel openings in the window
        self._spread_flagged: dict[str, int] = {}  # payer -> when it was last flagged
        self._next_prune = 0.0
        # What ingest was last handed, and the caps' generation it was read at (settlement.store.caps.generation).
        self._held: dict[str, str] | None = None
        self._caps: tuple[Cap, ...] = ()
        self._caps_generation: str | None = None

    @property
    def position(self) -> ChainPosition | None:
        """The position up to which the chain's events have been looked at; None before the first look."""
        return self._position

    def refresh(self) -> None:
        """Hand ingest the rules as the store has them now (the caps read again only when they changed)."""
        with self.db.read() as conn:
            held = holds(conn)
            generation = caps_generation(conn)
            spending = self._caps
            if generation is None or generation != self._caps_generation:
                spending = tuple(caps(conn))
            if self._position is None:
                self._position = last_chain_position(conn)  # chain events are watched from the first look on
        if (held, spending) != (self._held, self._caps):  # always at the first refresh: `_held` is None
            self.ingestor.rules = Rules(held=held, min_increments=self.min_increments, caps=spending)
        self._held, self._caps, self._caps_generation = held, spending, generation

    def tick(self) -> None:
        self.refresh()
        now_us = time.time_ns() // 1000
        if time.monotonic() - self._window_started >= self.settings.risk_window_seconds:
            self._window_started = time.monotonic()
            self._report(self._from_ingest(now_us))
        if self.lease.acquire():
            self._report(self._from_chain(now_us))
            if time.monotonic() >= self._next_prune:  # spend windows a day past their end count for nothing
                self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
                with self.db.write() as conn:
                    prune_windows(conn, now_us // 1_000_000 - 86_400)

    def close(self) -> None:
        self.lease.release()

    def _from_ingest(self, now_us: int) -> list[RiskFinding]:
        counts = self.ingestor.take_counts()
        window = self.settings.risk_window_seconds
        events: list[RiskFinding] = []
        accepted: Counter[str] = Counter()
        for (payer, code), count in sorted(counts.items()):
            if not code:
                accepted[payer] += count
            elif count >= self.settings.risk_refusals_per_window:
                kind = RiskKind.DUST if code == IncrementTooSmallError.code else RiskKind.REPEATED_REFUSALS
                detail = {"code": code, "count": count, "windowSeconds": window}
                events.append(RiskFinding(now_us, kind, payer, None, detail))
        for payer, count in sorted(accepted.items()):
            before = self._previous.get(payer, 0)
            over = count >= self.settings.risk_payer_vouchers_per_window
            rise = before > 0 and count >= BURST_FLOOR and count >= self.settings.risk_burst_factor * before
            if over or rise:
                detail = {"count": count, "previousCount": before, "windowSeconds": window}
                events.append(RiskFinding(now_us, RiskKind.BURST, payer, None, detail))
        self._previous = accepted
        return events

    def _from_chain(self, now_us: int) -> list[RiskFinding]:
        with self.db.read() as conn:
            if self._position is None:
                self._position = last_chain_position(conn)  # from now on
                return []
            until = last_chain_position(conn)
            found = chain_events_since(conn, self._position, until, limit=CHAIN_EVENTS_PER_TICK)
            window_us = int(self.settings.risk_window_seconds * 1_000_000)
            events: list[RiskFinding] = []
            for seen in found:
                self._position = seen.position
                if seen.event == HubEvent.CHANNEL_OPENED:
                    events.extend(self._opening(now_us, to_checksum_address(str(seen.args["payer"])), window_us))
                elif seen.channel_id is not None:
                    last = last_payment_at(conn, seen.channel_id)
                    if last is not None and now_us - last <= window_us:
                        since = round((now_us - last) / 1e6, 3)
                        detail = {"secondsSinceLastPayment": since, "block": seen.position.block}
                        events.append(
                            RiskFinding(now_us, RiskKind.CLOSE_WHILE_STREAMING, None, seen.channel_id, detail)
                        )
            if len(found) < CHAIN_EVENTS_PER_TICK:  # it looked past every event up to `until` (deposits, settlements
                self._position = max(self._position, until)  # ...): the next tick starts there, not behind them
        return events

    def _opening(self, now_us: int, payer: str, window_us: int) -> list[RiskFinding]:
        self._opened.append(Opening(now_us, payer))
        while self._opened and self._opened[0].at_us < now_us - window_us:
            self._opened.popleft()
        count = sum(1 for opening in self._opened if opening.payer == payer)
        if (
            count < self.settings.risk_new_channels_per_window
            or now_us - self._spread_flagged.get(payer, 0) < window_us
        ):
            return []
        self._spread_flagged[payer] = now_us
        detail = {"count": count, "windowSeconds": self.settings.risk_window_seconds}
        return [RiskFinding(now_us, RiskKind.CHANNEL_SPREAD, payer, None, detail)]

    def _report(self, events: list[RiskFinding]) -> None:
        if not events:
            return
        with self.db.write() as conn:
            record(conn, events)
        for found in events:
            self.metrics.risk_events.labels(found.kind.value).inc()
            logger.critical("ALERT risk %s: %s %s", found.kind.value, found.payer or found.channel_id, found.detail)
