"""The voucher ingest pipeline: find the payer, recover the signer, then judge and commit in groups.

Signature recovery runs on the caller's thread (pure CPU, no lock held); a request with many vouchers has them
recovered off the event loop instead (`recovery`: a worker process, or threads), and the event loop stays free for
other requests meanwhile. Judging and writing run on one writer
thread per process that takes every voucher waiting in its queue, judges them in one transaction that holds the
channels' row locks, and commits once: one fsync for the whole group. A caller's future resolves only after that
commit, so a receipt is never handed out for a voucher that is not durable. With several processes on PostgreSQL the
row locks (taken in channel id order) serialize writers per channel; with SQLite, BEGIN IMMEDIATE does.

On PostgreSQL the writer keeps its own copies of the channels it wrote: a group on those is judged against them and
written by one statement that requires each row at the copy's version (else it is rolled back and written the locked
way), and while that statement runs the writer judges the next group (`_write_loop`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from settlement.domain.buckets import TokenBucket
from settlement.domain.ledger import NO_RULES, Rules, Verdict, WindowKey, check_signed, judge
from settlement.domain.model import Address, Channel, ChannelId, Receipt, Voucher, utcnow
from settlement.domain.shards import UNSHARDED, Shard
from settlement.eip712.vouchers import VoucherVerifier
from settlement.errors import (
    ChannelMovedError,
    ChannelNotFoundError,
    RequestError,
    SettlementError,
    StoreError,
    StoreUnavailableError,
    UnknownChannelsBusyError,
    WrongShardError,
)
from settlement.indexer.follower import Indexer
from settlement.ingest.admission import PayerRates
from settlement.ingest.recovery import Recovery
from settlement.server.metrics import Metrics
from settlement.store import Database
from settlement.store import caps as caps_q
from settlement.store import channels as channel_q

logger = logging.getLogger(__name__)

Outcome = Verdict | SettlementError
PARALLEL_RECOVERY_MIN = 16  # below this a hand-off to a thread or a worker costs more than it saves
HELD_MAX = 100_000  # channels the writer keeps in memory (~0.9 KB each; SETTLEMENT_HELD_CHANNELS)
ADMITTED_SECONDS = 1.0  # how long an unknown id's admitted read also admits its repeats
ADMITTED_MAX = 1_000  # admitted ids remembered before the stale ones are dropped (the budget bounds how many are fresh)
AHEAD_WAIT_MIN = 64  # vouchers in flight from which the writer waits a moment for the next group's jobs
AHEAD_WAIT = 0.0005  # seconds: a fraction of such a group's statement (~20 us a voucher), nothing at low load


@dataclass(frozen=True)
class _Job:
    vouchers: Sequence[Voucher]
    signers: Sequence[bytes | None]
    future: Future[list[Outcome]]


# The place of a voucher whose channel another transaction held, until a later turn judges it (never returned).
_DEFERRED = StoreError("the voucher's channel was held by another transaction")


@dataclass(frozen=True)
class _Judged:
    outcomes: list[Outcome]
    written: set[ChannelId]  # channels whose row the group rewrote (its version raised)
    seen: Counter[tuple[str, str]]  # (payer, refusal code or "" for accepted), for the risk monitor


@dataclass(frozen=True)
class _Ahead:
    """A group judged in memory against the writer's copies of its channels (or against a group still committing),
    with nothing read from the store: written by one statement that requires each row at the copy's version."""

    jobs: list[_Job]
    judged: _Judged
    accepted: list[tuple[Receipt, bytes]]
    channels: dict[ChannelId, Channel]  # each channel as the group leaves it
    versions: dict[ChannelId, int]  # the rows' versions the group was judged against
    numbers: dict[ChannelId, int]
    started: float
    overlapped: bool  # judged against a group still being written


@dataclass(frozen=True)
class _Flight:
    """A judged group whose statements are sent; `finish` reads their outcome and commits (or raises)."""

    ahead: _Ahead
    finish: Callable[[], None]


class Ingestor:
    """Accepts vouchers for one hub. Call `start()` before submitting and `stop()` to drain and finish."""

    def __init__(
        self,
        db: Database,
        verifier: VoucherVerifier,
        indexer: Indexer,
        metrics: Metrics,
        *,
        close_guard: int,
        group_max: int = 1024,
        recovery_threads: int = 2,
        recovery_processes: int = 0,
        payer_rates: PayerRates | None = None,
        unknown_reads_per_second: float = 50.0,
        held_max: int = HELD_MAX,
        shard: Shard = UNSHARDED,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.clock = clock  # the time every judgement reads (close guard, spending windows, accepted_at)
        self._writes = db.writer_connection()  # the writer thread's own, kept between its groups
        self.verifier = verifier
        self.indexer = indexer
        self.metrics = metrics
        self.close_guard = close_guard
        self.rules = NO_RULES  # the operator's risk rules; replaced whole by the service when they change
        self._counts: Counter[tuple[str, str]] = Counter()  # (payer, refusal code or "" for accepted) since taken
        self._counts_lock = threading.Lock()
        self.group_max = group_max
        self._payers: dict[str, bytes] = {}  # a channel's payer never changes: it is hashed into the id
        self._payer_names: dict[bytes, str] = {}  # a payer's checksummed address, for the risk monitor's counts
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.recovery = Recovery(verifier, threads=recovery_threads, processes=recovery_processes)
        self.payer_rates = payer_rates or PayerRates(0, 1)
        self._unknown_reads = TokenBucket(unknown_reads_per_second, 2 * unknown_reads_per_second)
        # Ids whose store read was admitted lately (when): the budget counts distinct ids, not requests. Until the
        # first read ends (the payer is then held, or the chain's "absent" remembered) the repeats read too.
        self._admitted: dict[ChannelId, float] = {}
        # The channels this writer wrote or read last, as stored then (the writer thread's own): judged against
        # without reading the row again while the stored version is still theirs.
        self._held: dict[ChannelId, channel_q.VersionedChannel] = {}
        self.held_max = held_max
        self.shard = shard

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self.recovery.start()
            self._thread = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish every voucher already queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._writes.close()
        self.recovery.stop()

    # --- the caller's side -------------------------------------------------------------------------------------

    def resolve_payer(self, channel_id: ChannelId) -> bytes:
        """The channel's payer, from memory, the store, or the chain (blocking I/O; raises if there is none)."""
        payer = self._payers.get(channel_id)
        if payer is not None:
            return payer
        self.admit_unknown(channel_id)
        return self._resolve(channel_id)

    def admit_unknown(self, channel_id: ChannelId) -> None:
        """Decide without I/O (on the event loop, before any thread) whether a channel id this process does not hold
        in memory may be read from the store (and the chain): an id the chain was just found not to have is 404 at
        once, and reads beyond the budget are 503 `unknown_channels_busy`; the budget counts distinct ids (a new
        channel's concurrent first payments share one admission). A flood of made-up ids then costs the store, the
        chain and the GIL a bounded amount, and payers whose channels are known never wait behind it."""
        if channel_id in self._payers:
            return
        if self.indexer.known_absent(channel_id):
            raise ChannelNotFoundError(f"channel {channel_id} does not exist on chain")
        now = time.monotonic()
        if self._admitted.get(channel_id, -ADMITTED_SECONDS) > now - ADMITTED_SECONDS:
            return  # this id's read was admitted a moment ago: its repeats (a new channel's first payments) ride on it
        if not self._unknown_reads.take(now):
            raise UnknownChannelsBusyError(
                f"too many channel ids this service does not hold in memory are being asked for right now; retry "
                f"channel {channel_id} in a second",
                retryAfter=1,
            )
        if len(self._admitted) >= ADMITTED_MAX:  # mostly fresh (a budget this high): start afresh, not scan each time
            fresh = {cid: at for cid, at in self._admitted.items() if at > now - ADMITTED_SECONDS}
            self._admitted = fresh if len(fresh) < ADMITTED_MAX // 2 else {}
        self._admitted[channel_id] = now

    def remember(self, channel: Channel) -> None:
        """Hold a channel's payer in memory (it never changes: it is hashed into the id)."""
        self._remember(channel.channel_id, channel.payer)

    def _remember(self, channel_id: ChannelId, address: str) -> None:
        payer = bytes.fromhex(address[2:])
        self._payer_names.setdefault(payer, address)
        self._payers[channel_id] = payer

    def warm(self, limit: int) -> int:
        """Hold the payers of up to `limit` stored channels that are not closed (at start: after a restart their
        vouchers need no store read, so a flood of made-up ids cannot keep known payers waiting)."""
        with self.db.read() as conn:
            rows = channel_q.open_payers(conn, limit)
        for channel_id, payer in rows:
            self._remember(channel_id, payer)
        return len(rows)

    def admit_channel(self, channel_id: ChannelId) -> Channel:
        """The channel, admitted as a voucher's channel is (`admit_unknown`), read from the store or the chain, and
        its payer held (blocking I/O; raises ChannelNotFoundError when there is none)."""
        self.admit_unknown(channel_id)
        return self.load_channel(channel_id)

    def _resolve(self, channel_id: ChannelId) -> bytes:
        """An admitted channel id's payer, from the store or the chain (blocking I/O)."""
        self.load_channel(channel_id)
        return self._payers[channel_id]

    def load_channel(self, channel_id: ChannelId) -> Channel:
        """The channel from the store or the chain, its payer held and its shard checked (blocking I/O): what a
        voucher's channel and a read of one both need. Raises ChannelNotFoundError or WrongShardError."""
        channel = self.find_channel(channel_id)
        if channel is None:
            raise ChannelNotFoundError(f"channel {channel_id} does not exist on chain")
        self.remember(channel)  # another shard's too: its next vouchers are refused from memory
        self._check_shard(channel_id, self._payers[channel_id])
        return channel

    def find_channel(self, channel_id: ChannelId) -> Channel | None:
        """The channel from the store, else from the chain's confirmed state (then stored)."""
        with self.db.read() as conn:
            channel = channel_q.get_channel(conn, channel_id)
        return channel if channel is not None else self.indexer.lookup(channel_id)

    def preview(self, voucher: Voucher) -> Verdict:
        """Judge `voucher` as `ingest` would against what is committed now, without storing anything (x402's
        verify). Raises the refusal; a later `ingest` judges again under the channel's lock, so a preview promises
        nothing."""
        self._check_shard(voucher.channel_id, self.resolve_payer(voucher.channel_id))
        signer = self.recover(voucher)
        with self.db.read() as conn:
            channel = channel_q.get_channel(conn, voucher.channel_id)
            stale = channel is not None and voucher.cumulative <= channel.floor
            prior = channel_q.receipts_for(conn, [voucher.key]).get(voucher.key) if stale else None
            key = None if voucher.idempotency_key is None else (voucher.channel_id, voucher.idempotency_key)
            keyed = None if key is None else channel_q.receipts_by_key(conn, [key]).get(key)
            now, rules = self.clock(), self.rules
            verdict = judge(
                channel,
                voucher,
                signer,
                prior=prior,
                keyed=keyed,
                now=now,
                close_guard=self.close_guard,
                chain_time=self._chain_time(),
                rules=rules,
            )
            if verdict.new and channel is not None and rules.caps:
                windows = caps_q.read_windows(conn, rules.windows(channel, _unix(now)))
                rules.check_caps(channel, verdict.receipt.increment, windows, _unix(now))
        return verdict

    def _check_shard(self, channel_id: ChannelId, payer: bytes) -> None:
        """Raise WrongShardError for a channel whose (held) payer another shard's service takes: the payer hashed
        once, naming the owner (not at all unsharded)."""
        if self.shard.count == 1:
            return  # runs per voucher: an unsharded deployment owns every payer
        name = Address(self._payer_names[payer])
        owner = self.shard.owner(name)
        if owner != self.shard.index:
            raise WrongShardError(
                f"channel {channel_id} is paid by {name}, whose vouchers shard {owner} of {self.shard.count} takes; "
                f"this service is shard {self.shard.index}",
                shard=owner,
                shards=self.shard.count,
            )

    def _chain_time(self) -> int:
        """The latest block's time the indexer read (0 before any, or without an indexer: a store-only ingestor)."""
        indexer: Indexer | None = self.indexer
        return 0 if indexer is None else indexer.block_time

    def take_counts(self) -> Counter[tuple[str, str]]:
        """What was accepted ("") and refused (by code) per payer since the last call (the risk monitor's window)."""
        with self._counts_lock:
            taken, self._counts = self._counts, Counter()
        return taken

    def recover(self, voucher: Voucher) -> bytes | None:
        (signer,) = self.recovery.here([voucher])
        return signer

    def submit(self, vouchers: Sequence[Voucher], signers: Sequence[bytes | None]) -> Future[list[Outcome]]:
        """Queue recovered vouchers for judging; the future resolves after the group's commit."""
        future: Future[list[Outcome]] = Future()
        if self._thread is None:
            future.set_exception(StoreError("the ingest writer is not running"))
        else:
            self._queue.put(_Job(vouchers, signers, future))
        return future

    def ingest(self, vouchers: Sequence[Voucher]) -> list[Outcome]:
        """Resolve payers, recover signers, queue, and wait for the group commit: one outcome per voucher, in order.

        Blocking (store reads, chain lookups for unknown channels, the commit): call it from a worker thread.
        """
        refused: dict[int, Outcome] = {}
        for i, voucher in enumerate(vouchers):
            try:
                self.resolve_payer(voucher.channel_id)
            except SettlementError as ex:
                refused[i] = ex.detached()
        pending = [i for i in range(len(vouchers)) if i not in refused]
        todo = [vouchers[i] for i in pending]
        pending, todo, signers = self._admit(pending, todo, self.recovery.here(todo), refused)
        results = self.submit(todo, signers).result() if todo else []
        return _in_order(len(vouchers), refused, pending, results)

    async def ingest_async(self, vouchers: Sequence[Voucher]) -> list[Outcome]:
        """`ingest` for the event loop: payers come from memory (else a worker thread looks them up), signers are
        recovered inline (~46 µs each) or, for many vouchers, by a worker process or threads (`recovery`), and the
        caller awaits the group commit without holding a thread."""
        refused: dict[int, Outcome] = {}
        for i, voucher in enumerate(vouchers):
            if voucher.channel_id not in self._payers:
                try:
                    self.admit_unknown(voucher.channel_id)
                    await asyncio.to_thread(self._resolve, voucher.channel_id)
                except SettlementError as ex:
                    refused[i] = ex.detached()
        pending = [i for i in range(len(vouchers)) if i not in refused]
        todo = [vouchers[i] for i in pending]
        if not todo:
            return _in_order(len(vouchers), refused, pending, [])
        if len(todo) < PARALLEL_RECOVERY_MIN or self._thread is None:
            signers = self.recovery.here(todo)
        else:
            recovered = await self.recovery.recover(todo)
            signers = recovered.signers
            self.metrics.signers_recovered.labels(recovered.by).inc(len(todo))
        pending, todo, signers = self._admit(pending, todo, signers, refused)
        results = await asyncio.wrap_future(self.submit(todo, signers)) if todo else []
        return _in_order(len(vouchers), refused, pending, results)

    def _admit(
        self, pending: list[int], todo: list[Voucher], signers: list[bytes | None], refused: dict[int, Outcome]
    ) -> tuple[list[int], list[Voucher], list[bytes | None]]:
        """Before the writer, with nothing but memory: the ledger's rules on the signed content (`check_signed`), then
        the per-payer rate for vouchers their payer signed. Refusals go into `refused` (and the risk monitor's
        counts); the rest go on to be judged and committed."""
        kept: list[int] = []
        seen: Counter[tuple[str, str]] = Counter()
        for j, (voucher, signer) in enumerate(zip(todo, signers, strict=True)):
            payer = self._payers[voucher.channel_id]
            error: SettlementError | None = None
            try:
                self._check_shard(voucher.channel_id, payer)
                check_signed(voucher, signer, payer)
            except RequestError as ex:
                error = ex.detached()
                seen[(self._payer_names[payer], ex.code)] += 1
            if error is None and self.payer_rates.rate > 0:
                error = self.payer_rates.admit(payer)
            if error is None:
                kept.append(j)
            else:
                refused[pending[j]] = error
        if seen:
            with self._counts_lock:
                self._counts.update(seen)
        if len(kept) == len(todo):
            return pending, todo, signers
        return [pending[j] for j in kept], [todo[j] for j in kept], [signers[j] for j in kept]

    # --- the writer's side -------------------------------------------------------------------------------------

    @staticmethod
    def _lock_spending(
        conn: Connection, rules: Rules, channels: dict[ChannelId, Channel], now: datetime
    ) -> tuple[dict[WindowKey, int], dict[WindowKey, int]]:
        """The spend windows this group's channels count in, locked (nothing to do without caps: the common case)."""
        if not rules.caps:
            return {}, {}
        unix = _unix(now)
        ends = {cap.cap_id: cap.window for cap in rules.caps}
        keys = [(key, key.start + ends[key.cap_id]) for c in channels.values() for key in rules.windows(c, unix)]
        spent = caps_q.lock_windows(conn, keys)
        return spent, dict(spent)

    @staticmethod
    def _spend(rules: Rules, channel: Channel, increment: int, spent: dict[WindowKey, int], now: datetime) -> None:
        """Count an accepted increment in the payer's windows, or raise SpendingCapError (nothing counted)."""
        unix = _unix(now)
        rules.check_caps(channel, increment, spent, unix)
        for key in rules.windows(channel, unix):
            spent[key] = spent.get(key, 0) + increment

    def _write_loop(self) -> None:
        """Take groups and commit them. On PostgreSQL a group judged in memory (`_judge_ahead`) has its statements
        sent, and the next group is judged against its outcome while the database runs them: the writer's Python and
        the database's work overlap instead of taking turns. Each group is answered after its own commit."""
        flight: _Flight | None = None
        stopping = False
        while not stopping or flight is not None:
            jobs: list[_Job] = []
            if not stopping:
                jobs, stopping = self._take(flight)
            ahead = self._judge_ahead(jobs, flight) if jobs else None
            if flight is not None:
                landed = self._land(flight)
                if jobs and (ahead is None or not landed):  # judged against a group not written as judged
                    ahead = self._judge_ahead(jobs, None)
                flight = None
            if ahead is not None:
                flight = self._send(ahead)
            elif jobs:
                self._commit_group(jobs)

    def _take(self, flight: _Flight | None) -> tuple[list[_Job], bool]:
        """The next group (the jobs queued, up to `group_max` vouchers) and whether the writer is to stop. With no
        group in flight it waits for the first job, and, where groups can go ahead, takes only half the jobs queued:
        the other half is judged while these are written. With one in flight it takes what is queued, after a short
        wait for a large flight (callers answered by the last commit are sending their next requests)."""
        try:
            if flight is None:
                first = self._queue.get()
            elif len(flight.ahead.judged.outcomes) >= AHEAD_WAIT_MIN:
                first = self._queue.get(timeout=AHEAD_WAIT)
            else:
                first = self._queue.get_nowait()
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        jobs, size = [first], len(first.vouchers)
        most = self._queue.qsize() + 1
        if flight is None and self._ahead_allowed() and all(v.idempotency_key is None for v in first.vouchers):
            most = (most + 1) // 2
        while size < self.group_max and len(jobs) < most:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            size += len(job.vouchers)
        return jobs, False

    def _ahead_allowed(self) -> bool:
        """Groups are judged in memory only on PostgreSQL (SQLite has one writer: nothing to overlap with); a group
        with a channel a spending cap covers is not (`_capped`)."""
        return not self.db.is_sqlite

    def _copies(
        self, vouchers: Sequence[Voucher], flight: _Flight | None
    ) -> tuple[dict[ChannelId, Channel], dict[ChannelId, int], dict[ChannelId, int]] | None:
        """The group's channels as the writer holds them (each as the flight leaves it, for a channel of the group in
        flight), with their rows' versions and numbers; None if one is not held or is shared with another process's
        writer (`_hold`)."""
        held = self._held
        channels: dict[ChannelId, Channel] = {}
        versions: dict[ChannelId, int] = {}
        numbers: dict[ChannelId, int] = {}
        before = flight.ahead if flight is not None else None
        for voucher in vouchers:
            channel_id = voucher.channel_id
            if channel_id in channels:
                continue
            if before is not None and channel_id in before.channels:
                channels[channel_id] = before.channels[channel_id]
                versions[channel_id] = before.versions[channel_id] + (channel_id in before.judged.written)
                numbers[channel_id] = before.numbers[channel_id]
                continue
            copy = held.get(channel_id)
            if copy is None or copy.shared:
                return None
            channels[channel_id] = copy.channel
            versions[channel_id] = copy.version
            numbers[channel_id] = copy.number
        return channels, versions, numbers

    def _judge_ahead(self, jobs: list[_Job], flight: _Flight | None) -> _Ahead | None:
        """The group judged in memory, when nothing of it needs the store: every channel held (as `flight` leaves it,
        if in flight), no voucher at or below its channel's position (a re-send is answered from its stored receipt)
        and no idempotency key (looked up in the store). None otherwise: the group is committed the usual way."""
        if not self._ahead_allowed():
            return None
        started, rules = time.perf_counter(), self.rules
        vouchers = [v for job in jobs for v in job.vouchers]
        if any(v.idempotency_key is not None for v in vouchers):
            return None
        copies = self._copies(vouchers, flight)
        if copies is None:
            return None
        channels, versions, numbers = copies
        if any(v.cumulative <= channels[v.channel_id].floor for v in vouchers) or _capped(rules, channels):
            return None
        signers = [s for job in jobs for s in job.signers]
        try:
            outcomes, accepted, seen = self._judge(vouchers, signers, channels, {}, {}, self.clock(), rules, {})
        except Exception:  # a bug: the usual way isolates what fails
            logger.exception("a group of %d vouchers could not be judged in memory", len(vouchers))
            return None
        paid = {receipt.channel_id for receipt, _ in accepted}
        judged = _Judged(outcomes, paid, seen)
        return _Ahead(jobs, judged, accepted, channels, versions, numbers, started, flight is not None)

    def _send(self, ahead: _Ahead) -> _Flight:
        """Send the judged group's statements; the flight's `finish` reads their outcome and commits."""
        return _Flight(ahead, _started(self._write_ahead(ahead)))

    def _write_ahead(self, ahead: _Ahead) -> Generator[None, None, None]:
        with self._writes.write() as conn:
            yield from channel_q.record_payments_in_steps(conn, ahead.accepted, ahead.numbers, ahead.versions)

    def _land(self, flight: _Flight) -> bool:
        """Wait for the flight's commit and answer its vouchers; if it was not written as judged (a channel moved,
        the store refused it), commit the group again the usual way. Whether it landed as judged."""
        ahead = flight.ahead
        try:
            flight.finish()
        except ChannelMovedError:  # rolled back: nothing of it was written; lock its channels first this time
            self.metrics.group_writes.labels("moved").inc()
            self._lock_first(ahead.channels)
            self._commit_group(ahead.jobs)
            return False
        except StoreUnavailableError as ex:
            count = len(ahead.judged.outcomes)
            logger.error("group of %d vouchers not stored: %s", count, ex.message)
            self._forget([v for job in ahead.jobs for v in job.vouchers])
            self._answer(ahead.jobs, [ex] * count, ahead.started)
            return False
        except Exception:  # the store refused it: the usual way isolates the voucher at fault
            self._forget([v for job in ahead.jobs for v in job.vouchers])
            self._commit_group(ahead.jobs)
            return False
        how = "ahead" if ahead.overlapped else "held"
        self._committed(ahead.judged, ahead.channels, ahead.versions, ahead.numbers, set(), how)
        self._answer(ahead.jobs, ahead.judged.outcomes, ahead.started)
        return True

    def _lock_first(self, channels: dict[ChannelId, Channel]) -> None:
        """Mark the held copies of these channels `shared`: the next write locks and reads their rows first (and
        holds them unshared again if they had not moved)."""
        for channel_id in channels:
            copy = self._held.get(channel_id)
            if copy is not None:
                self._held[channel_id] = copy._replace(shared=True)

    def _answer(self, jobs: list[_Job], outcomes: list[Outcome], started: float) -> None:
        at = 0
        for job in jobs:
            if not job.future.done():  # a caller gone (its future cancelled) is not answered
                job.future.set_result(outcomes[at : at + len(job.vouchers)])
            at += len(job.vouchers)
        self.metrics.group_size.observe(at)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _commit_group(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        vouchers = [v for job in jobs for v in job.vouchers]
        signers = [s for job in jobs for s in job.signers]
        waiting: list[tuple[_Job, int, int]] = []
        at = 0
        for job in jobs:
            waiting.append((job, at, at + len(job.vouchers)))
            at += len(job.vouchers)
        for outcomes, todo in self._commit_in_turns(vouchers, signers):
            left = set(todo)
            still = []
            for job, begin, end in waiting:  # a job is answered as soon as its last voucher is committed
                if left and any(i in left for i in range(begin, end)):
                    still.append((job, begin, end))
                elif not job.future.done():
                    job.future.set_result(outcomes[begin:end])
            waiting = still
        self.metrics.group_size.observe(len(vouchers))
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _commit_in_turns(
        self, vouchers: list[Voucher], signers: list[bytes | None]
    ) -> Iterator[tuple[list[Outcome], list[int]]]:
        """Commit what the group can lock at once; then, for the channels another process's transaction held, wait
        for one of them (holding nothing else), take what else is free, commit, and so on. After each turn: the
        outcomes so far and the vouchers still to judge.

        Server processes that share channels (a client's retries, a payer pipelining through a round-robin
        balancer) used to queue: a group waited for another's row while holding its own, so groups from several
        processes waited behind each other's commits in a chain. Now a group never holds rows while it waits for a
        channel, so a wait for another process's group lasts at most that group's commit. A channel's vouchers are
        all judged in one transaction, in the order they came.
        """
        part, busy = self._commit_isolating(vouchers, signers, None)
        if not busy:  # the common case: the whole group in one turn
            yield part, []
            return
        outcomes: list[Outcome] = [_DEFERRED] * len(vouchers)
        todo = list(range(len(vouchers)))
        while True:
            judged, left = iter(part), []
            for i in todo:
                if vouchers[i].channel_id in busy:
                    left.append(i)
                else:
                    outcomes[i] = next(judged)
            self.metrics.vouchers_deferred.inc(len(left))
            yield outcomes, left
            if not left:
                return
            todo = left
            part, busy = self._commit_isolating([vouchers[i] for i in todo], [signers[i] for i in todo], min(busy))

    def _commit_isolating(
        self, vouchers: list[Voucher], signers: list[bytes | None], first: ChannelId | None, *, skip_busy: bool = True
    ) -> tuple[list[Outcome], set[ChannelId]]:
        """Commit the part; if the store refuses it, commit its halves apart, down to the voucher at fault.

        One client's voucher that a store cannot take (a bug, a value one backend refuses) must never fail the
        honest vouchers that happened to share its group. Halving keeps the vouchers' order (a channel's vouchers are
        judged in the order they came) and costs a few extra commits per culprit, only on this failure path; the
        halves wait for every row they need (nothing is left busy), so a channel's vouchers cannot be split
        between turns. An unavailable store fails the whole part at once: every half would fail the same way.
        """
        try:
            return self._write_part(vouchers, signers, first=first, skip_busy=skip_busy)
        except StoreUnavailableError as ex:
            logger.error("group of %d vouchers not stored: %s", len(vouchers), ex.message)
            return [ex] * len(vouchers), set()
        except Exception as ex:  # the store refused it, or a bug: isolate the culprit, keep the writer alive
            if len(vouchers) == 1:
                logger.exception("voucher %s/%s not stored", vouchers[0].channel_id, vouchers[0].cumulative)
                reason = ex.code if isinstance(ex, SettlementError) else type(ex).__name__
                return [StoreError(f"the voucher was not stored: the store refused it ({reason})")], set()
        half = len(vouchers) // 2
        head, _ = self._commit_isolating(vouchers[:half], signers[:half], None, skip_busy=False)
        tail, _ = self._commit_isolating(vouchers[half:], signers[half:], None, skip_busy=False)
        return head + tail, set()

    def _write_part(
        self, vouchers: list[Voucher], signers: list[bytes | None], *, first: ChannelId | None, skip_busy: bool
    ) -> tuple[list[Outcome], set[ChannelId]]:
        """One transaction: wait for `first`'s row if given, lock the part's other channels (with `skip_busy`,
        those another transaction does not hold), judge and commit their vouchers. Returns the outcomes of the
        vouchers it judged (those of busy channels left out), in order, and the busy channels.

        On PostgreSQL a part whose channels the writer all holds is first written against its copies, with no lock
        statement before (`_write_held`); only if a channel moved or was busy is it written again this way."""
        if first is None and skip_busy and not self.db.is_sqlite:
            written = self._write_held(vouchers, signers)
            if written is not None:
                return written
        try:
            with self._writes.write() as conn:
                wanted = {v.channel_id for v in vouchers}
                stamps = {}
                if first is not None:
                    stamps = channel_q.lock_versions(conn, [first]).stamps
                    wanted.discard(first)
                locked = channel_q.lock_versions(conn, wanted, skip_busy=skip_busy)
                stamps |= locked.stamps
                busy = locked.busy
                if busy:
                    kept = [i for i, v in enumerate(vouchers) if v.channel_id not in busy]
                    vouchers, signers = [vouchers[i] for i in kept], [signers[i] for i in kept]
                channels, versions, moved = self._read_group(conn, stamps)
                numbers = {channel_id: stamp.number for channel_id, stamp in stamps.items()}
                judged = self._judge_group(conn, vouchers, signers, channels, numbers)
        except BaseException:
            self._forget(vouchers)
            raise
        self._committed(judged, channels, versions, numbers, moved, "locked")
        return judged.outcomes, busy

    def _write_held(
        self, vouchers: list[Voucher], signers: list[bytes | None]
    ) -> tuple[list[Outcome], set[ChannelId]] | None:
        """The part judged against the writer's own copies of its channels and written in one statement that locks
        each row only at the version the copy has (PostgreSQL): the group's lock statement and its round trip saved
        (~13 % of the writer's CPU). Not for a channel a spending cap covers (`_capped`): its windows are locked after
        its row, as every writer takes them. None, with nothing written, when a channel is not held or is shared with
        another process's writer (`_hold`), or moved since (that writer, the indexer), or another transaction holds
        its row."""
        rules = self.rules
        copies = self._copies(vouchers, None)
        if copies is None:
            return None
        channels, versions, numbers = copies
        if _capped(rules, channels):
            return None
        try:
            with self._writes.write() as conn:
                judged = self._judge_group(conn, vouchers, signers, channels, numbers, held=versions, rules=rules)
        except ChannelMovedError:  # rolled back: nothing of the part was written
            self.metrics.group_writes.labels("moved").inc()
            return None
        except BaseException:
            self._forget(vouchers)
            raise
        self._committed(judged, channels, versions, numbers, set(), "held")  # every copy was current
        return judged.outcomes, set()

    def _committed(
        self,
        judged: _Judged,
        channels: dict[ChannelId, Channel],
        versions: dict[ChannelId, int],
        numbers: dict[ChannelId, int],
        moved: set[ChannelId],
        how: str,
    ) -> None:
        """After a group's commit, whichever way it was written: hold its channels, count what was judged."""
        self._hold(channels, versions, numbers, judged.written, moved)
        with self._counts_lock:
            self._counts.update(judged.seen)
        self.metrics.group_writes.labels(how).inc()

    def _forget(self, vouchers: list[Voucher]) -> None:
        """After a failed transaction what the store holds now is not known: read it again next time."""
        for voucher in vouchers:
            self._held.pop(voucher.channel_id, None)

    def _read_group(
        self, conn: Connection, stamps: dict[ChannelId, channel_q.RowStamp]
    ) -> tuple[dict[ChannelId, Channel], dict[ChannelId, int], set[ChannelId]]:
        """The group's channels, row-locked (`stamps`): the writer's own copy of each while the stored row's
        version and the channel's latest accepted amount are the ones it holds, else the stored channel (another
        process accepted a voucher, the indexer saw the chain move). Also the channels whose copy had moved."""
        versions = {channel_id: stamp.version for channel_id, stamp in stamps.items()}
        channels: dict[ChannelId, Channel] = {}
        moved: set[ChannelId] = set()
        for channel_id, stamp in stamps.items():
            held = self._held.get(channel_id)
            if held is None:
                continue
            if held.version == stamp.version and held.channel.accepted == stamp.accepted:
                channels[channel_id] = held.channel
            else:
                moved.add(channel_id)
        if len(channels) < len(versions):
            for channel_id, stored in channel_q.read_versioned(conn, versions.keys() - channels.keys()).items():
                channels[channel_id] = stored.channel
                versions[channel_id] = stored.version
        return channels, versions, moved

    def _hold(
        self,
        channels: dict[ChannelId, Channel],
        versions: dict[ChannelId, int],
        numbers: dict[ChannelId, int],
        written: set[ChannelId],
        moved: set[ChannelId],
    ) -> None:
        """After the commit: keep the group's channels as stored now (the rows the group rewrote have their
        versions raised; on SQLite none is rewritten: the group's payments moved their latest vouchers). A channel
        whose copy had moved is kept as `shared`: another process writes it too, so a write against the copy would
        likely be rolled back; it is locked first until this writer finds its copy current again."""
        held = self._held
        for channel_id, channel in channels.items():
            held.pop(channel_id, None)  # re-inserted last: the oldest entries are the least recently used
            version = versions[channel_id] + (channel_id in written)
            held[channel_id] = channel_q.VersionedChannel(channel, version, numbers[channel_id], channel_id in moved)
        if len(held) > self.held_max:
            for channel_id in list(itertools.islice(held, len(held) - self.held_max * 3 // 4)):
                del held[channel_id]

    def _judge_group(
        self,
        conn: Connection,
        vouchers: list[Voucher],
        signers: list[bytes | None],
        channels: dict[ChannelId, Channel],
        numbers: dict[ChannelId, int],
        *,
        held: dict[ChannelId, int] | None = None,
        rules: Rules | None = None,
    ) -> _Judged:
        """Judge the group's vouchers in order against its locked channels (moving each channel's position in
        `channels` as its vouchers are accepted) and write what was accepted. With `held` (the versions of the
        writer's copies the channels are, not locked), the write checks that each channel is still at that version
        (ChannelMovedError if not)."""
        known = [
            (v.channel_id, v.cumulative)
            for v in vouchers
            if (c := channels.get(v.channel_id)) is not None and v.cumulative <= c.floor
        ]
        priors = channel_q.receipts_for(conn, known)
        keyed = channel_q.receipts_by_key(
            conn, [(v.channel_id, v.idempotency_key) for v in vouchers if v.idempotency_key is not None]
        )
        now = self.clock()
        rules = self.rules if rules is None else rules
        spent, before = self._lock_spending(conn, rules, channels, now)
        outcomes, accepted, seen = self._judge(vouchers, signers, channels, priors, keyed, now, rules, spent)
        written = self._write_judged(conn, accepted, numbers, held)
        caps_q.save_windows(conn, {key: total for key, total in spent.items() if total != before[key]})
        return _Judged(outcomes, written, seen)

    @staticmethod
    def _write_judged(
        conn: Connection,
        accepted: list[tuple[Receipt, bytes]],
        numbers: dict[ChannelId, int],
        held: dict[ChannelId, int] | None,
    ) -> set[ChannelId]:
        """Store the accepted payments; with `held` (the versions the group was judged against, no row locked
        before), raise ChannelMovedError unless every channel of the group is still at its version."""
        if held is None:
            return channel_q.record_payments(conn, accepted, numbers)
        return channel_q.run_steps(channel_q.record_payments_in_steps(conn, accepted, numbers, held))

    def _judge(
        self,
        vouchers: list[Voucher],
        signers: list[bytes | None],
        channels: dict[ChannelId, Channel],
        priors: dict[tuple[ChannelId, int], Receipt],
        keyed: dict[tuple[ChannelId, str], Receipt],
        now: datetime,
        rules: Rules,
        spent: dict[WindowKey, int],
    ) -> tuple[list[Outcome], list[tuple[Receipt, bytes]], Counter[tuple[str, str]]]:
        """The ledger's verdict on each voucher in order, moving each channel's position in `channels` as its
        vouchers are accepted: the outcomes, the accepted payments and what was seen per payer. Nothing is read."""
        outcomes: list[Outcome] = []
        accepted: list[tuple[Receipt, bytes]] = []
        seen: Counter[tuple[str, str]] = Counter()
        chain_time = self._chain_time()  # the hub's clock as last seen: close deadlines are its
        for voucher, signer in zip(vouchers, signers, strict=True):
            channel = channels.get(voucher.channel_id)
            key = None if voucher.idempotency_key is None else (voucher.channel_id, voucher.idempotency_key)
            try:
                verdict = judge(
                    channel,
                    voucher,
                    signer,
                    prior=priors.get(voucher.key),
                    keyed=None if key is None else keyed.get(key),
                    now=now,
                    close_guard=self.close_guard,
                    chain_time=chain_time,
                    rules=rules,
                )
            except RequestError as ex:
                outcomes.append(ex.detached())
                if channel is not None:
                    seen[(channel.payer, ex.code)] += 1
                continue
            if verdict.new and channel is not None and rules.caps:
                try:
                    self._spend(rules, channel, verdict.receipt.increment, spent, now)
                except RequestError as ex:
                    outcomes.append(ex.detached())
                    seen[(channel.payer, ex.code)] += 1
                    continue
            if verdict.new and channel is not None:
                seen[(channel.payer, "")] += 1
                accepted.append((verdict.receipt, voucher.signature))
                priors[voucher.key] = verdict.receipt
                if key is not None:
                    keyed[key] = verdict.receipt
                channels[voucher.channel_id] = channel.with_voucher(voucher.cumulative, voucher.signature)
            outcomes.append(verdict)
        return outcomes, accepted, seen


def _started(steps: Generator[None, None, None]) -> Callable[[], None]:
    """Run `steps` to its first yield; the function returned runs the rest (and raises what either part raised)."""
    try:
        next(steps)
    except Exception as ex:  # raised again by `finish`, where a flight's failures are handled
        failed = ex

        def fail() -> None:
            raise failed

        return fail

    def finish() -> None:
        for _ in steps:
            raise RuntimeError("the write's steps yielded more than once")

    return finish


def _unix(now: datetime) -> int:
    return int(now.timestamp())


def _in_order(count: int, refused: dict[int, Outcome], pending: list[int], results: list[Outcome]) -> list[Outcome]:
    outcomes = dict(refused)
    outcomes.update(zip(pending, results, strict=True))
    return [outcomes[i] for i in range(count)]


def _capped(rules: Rules, channels: Mapping[ChannelId, Channel]) -> bool:
    """Whether a spending cap covers one of the channels: its spend windows are then locked and read in the group's
    transaction. Only theirs: anyone may set a cap on its own payee address, and any cap used to take the
    PostgreSQL writer's in-memory judging and lock-free writes from every group (docs/security.md)."""
    return bool(rules.caps) and any(rules.covering(channel) for channel in channels.values())
