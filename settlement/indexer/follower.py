"""Chain events -> channel state in the store, counting only confirmed blocks.

The indexer reads ChannelHub's logs up to `head - confirmations`, applies them to the channels table and advances a
persisted cursor in the same transaction, so a restart neither misses nor re-applies an event. A reorganisation
shallower than the confirmation depth never reaches it (it only reads confirmed blocks). A deeper one shows up as a
recorded block hash the chain no longer has: the indexer then rewinds to the last block it still agrees with,
re-reads every channel the lost blocks touched, suspends those channels (no voucher is accepted for them until an
operator resumes them) and logs at CRITICAL.

Every channel row carries the chain position its facts are current to, (block, log index); an event at or before it
is already reflected and is skipped. Events are ordered by (block, log index), never by block alone: on a real chain
several events of one channel share a block (two top-ups; a settlement and a close request; `closeByPayee` with a
final voucher emits two in one transaction), and each is applied. A channel read straight from the chain's state at
block B (`lookup`, for a voucher that arrives before the indexer reached the channel's opening) stands at the end of
B, so the indexer applies none of B's events to it twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from eth_bloom.bloom import BloomFilter
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import BlockNotFound
from web3.types import BlockData, FilterParams, LogReceipt, RPCEndpoint

from settlement.chain.batch_codec import decode_settlements
from settlement.chain.node import rpc_errors
from settlement.domain.buckets import TokenBucket
from settlement.domain.model import (
    END_OF_BLOCK,
    Address,
    BlockRef,
    Channel,
    ChannelId,
    ChannelStatus,
    ChannelViewField,
    HubEvent,
    utcnow,
)
from settlement.domain.shards import UNSHARDED, Shard
from settlement.errors import (
    ChainError,
    ChainMismatchError,
    ChainUnavailableError,
    ChannelNotFoundError,
    ChannelUnconfirmedError,
    LookupBudgetError,
    SettlementError,
)
from settlement.store import Database
from settlement.store import chainlog as log_q
from settlement.store import channels as channel_q
from settlement.store.chainlog import ChainEvent, Cursor

logger = logging.getLogger(__name__)

ABSENT_MAX = 100_000  # remembered unknown ids before the expired ones are dropped: a flood cannot grow it unbounded
SPAN_REGROWTH = 64  # reads taken in a row at a narrowed span before it is tried twice as wide
VERIFY_BLOCKS = 64  # blocks within this many of the head: a node behind a provider's balancer may not have them yet


CHANNEL_EVENTS = frozenset(HubEvent)


class Heads(NamedTuple):
    head: int
    confirmed: int  # the highest block `confirmations` deep (not below the start block's parent)


class _HeadsRead(NamedTuple):
    at: float  # monotonic seconds
    heads: Heads


@dataclass(frozen=True)
class Progress:
    """Where the indexer stands, for /ready and metrics."""

    head: int
    confirmed: int
    cursor: int

    @property
    def lag(self) -> int:
        """Confirmed blocks not yet applied."""
        return max(self.confirmed - self.cursor, 0)


def apply_event(channel: Channel | None, event: ChainEvent) -> Channel | None:
    """The channel after `event` (pure). ChannelsSettled is applied per channel by the caller."""
    args = event.args
    block, log = event.position
    if event.event == HubEvent.CHANNEL_OPENED:
        return Channel(
            channel_id=ChannelId(event.channel_id or ""),
            payer=args["payer"],
            payee=args["payee"],
            token=args["token"],
            salt=args["salt"],
            deposit=int(args["deposit"]),
            settled=0,
            status=ChannelStatus.OPEN,
            close_deadline=None,
            as_of_block=block,
            as_of_log=log,
        )
    if channel is None:
        return None
    at = replace(channel, as_of_block=block, as_of_log=log)
    if event.event == HubEvent.CHANNEL_TOPPED_UP:
        return replace(at, deposit=int(args["deposit"]))
    if event.event == HubEvent.CLOSE_REQUESTED:
        return replace(at, status=ChannelStatus.CLOSING, close_deadline=int(args["deadline"]))
    if event.event == HubEvent.CHANNEL_CLOSED:
        return replace(at, status=ChannelStatus.CLOSED, settled=int(args["settled"]))
    return channel


class Indexer:
    """Follows one hub. `poll` does one step; `run` polls until stopped. Safe to run in several processes at once."""

    def __init__(
        self,
        db: Database,
        w3: Web3,
        hub: Contract,
        *,
        start_block: int,
        confirmations: int,
        anchor: BlockRef | None = None,
        batch_blocks: int = 2_000,
        verify_blocks: int = VERIFY_BLOCKS,
        reorg_window: int = 256,
        absent_ttl: float = 2.0,
        lookups_per_second: float = 100.0,
        shard: Shard = UNSHARDED,
    ) -> None:
        self.db = db
        self.shard = shard  # a sharded deployment's store holds only the channels of the payers its shard takes
        self.w3 = w3
        self.hub = hub
        self.start_block = start_block
        self.confirmations = confirmations
        self.batch_blocks = batch_blocks
        self.span = batch_blocks  # blocks an eth_getLogs call asks for: narrower after the RPC refused a range
        self._taken = 0  # reads taken in a row at this span
        self.verify_blocks = verify_blocks  # blocks this near the head are checked against their headers' blooms
        self._partial = False  # a node behind left blocks out of the last poll's logs (said once in the log)
        self.reorg_window = reorg_window
        self.anchor = anchor
        self.failing: str | None = None  # why the last poll of `run` failed; None while it progresses
        self._heads: _HeadsRead | None = None  # the last read that succeeded
        self._heads_lock = threading.Lock()
        self._events = {HexBytes(event.topic): event for event in hub.all_events()}
        self._opened_topic = HexBytes(hub.events.ChannelOpened.topic)
        self.progress: Progress | None = None
        self._behind = False  # the node lacked the block at the cursor at the last poll (said once in the log)
        # Channel ids the chain said do not exist, until when (monotonic): a repeated unknown id costs no RPC call.
        # Short-lived: a payer may open the channel a moment later, and its first voucher must not wait long.
        self.absent_ttl = absent_ttl
        self._absent: dict[ChannelId, float] = {}
        self._lookups = TokenBucket(rate=lookups_per_second, burst=max(1.0, 2 * lookups_per_second))
        # `channel(bytes32)`'s selector: the existence probe sends it raw (see _exists_at_latest)
        self._channel_selector = hub.functions.channel(bytes(32))._encode_transaction_data()[:10]
        self._absent_lock = threading.Lock()
        # Told of each channel this indexer stores (ingest keeps its payer in memory: a new channel's first voucher
        # then costs no store read, even while made-up ids are refused).
        self.opened: Callable[[Channel], None] | None = None
        # The latest time of a block read (unix seconds; the head's, read each poll): the hub judges close deadlines
        # by its blocks' times, which can run ahead of this machine's clock (a sequencer's stamps, a devnet's moved
        # clock): ingest's close guard counts from the later of the two.
        self.block_time = 0
        with db.write() as conn:
            log_q.ensure_cursor(conn, start_block, utcnow())

    # --- reading the chain -------------------------------------------------------------------------------------

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """`rpc_errors`; a read that fails also drops the heads `recent_heads` would reuse (the chain may be down)."""
        try:
            with rpc_errors(what):
                yield
        except SettlementError:
            self._heads = None
            raise

    def recent_heads(self, max_age: float) -> Heads:
        """`confirmed_heads` as read at most `max_age` seconds ago (by a poll, a look-up, an earlier call) and since no
        read of this indexer failed; else read now, once for every caller waiting. For /ready, which anyone may ask:
        a flood of it cost the chain's RPC a call a request (a paid provider's quota, shared with the indexer and the
        engine, which must settle closing channels in time)."""
        with self._heads_lock:
            read = self._heads
            if read is not None and time.monotonic() - read.at <= max_age:
                return read.heads
            return self.confirmed_heads()

    def confirmed_heads(self) -> Heads:
        """The head and the highest confirmed block. The head is read as a block, not as a number (one call either
        way), for its time: the engine's final settle counts from the head's time, and so must ingest's close guard;
        the confirmed block's time was up to `confirmations` blocks behind."""
        with self._reading("reading the chain head"):
            block = self.w3.eth.get_block("latest")
        head = int(block["number"])
        self._saw_time(block.get("timestamp"))
        confirmed = max(head - self.confirmations, self.start_block - 1)
        heads = Heads(head, confirmed)
        self._heads = _HeadsRead(time.monotonic(), heads)
        return heads

    def check_anchor(self) -> None:
        """Raise ChainMismatchError when the chain no longer has the hub's deployment block (a restarted devnet)."""
        if self.anchor is not None and self._block_hash(self.anchor.number) != self.anchor.hash:
            raise ChainMismatchError(
                f"the chain no longer has the hub's deployment block {self.anchor.number} ({self.anchor.hash}): it "
                "was restarted or replaced; the store belongs to the old chain. Stop the service and point it at a "
                "new database and deployment"
            )

    def _block_hash(self, number: int) -> str | None:
        block = self._block(number)
        block_hash = None if block is None else block.get("hash")
        return None if block_hash is None else HexBytes(block_hash).to_0x_hex()

    def _block(self, number: int) -> BlockData | None:
        """Block `number`'s header, or None where the node has no such block (yet)."""
        with self._reading(f"reading block {number}"):
            try:
                block = self.w3.eth.get_block(number)
            except (ValueError, BlockNotFound):
                return None
        self._saw_time(block.get("timestamp"))
        return block

    def _saw_time(self, stamp: object) -> None:
        if isinstance(stamp, int) and stamp > self.block_time:
            self.block_time = stamp

    def _logs(self, from_block: int, to_block: int, topics: list[Any] | None = None) -> list[ChainEvent]:
        """The hub's logs of blocks from..to, read `span` blocks at a time. A range the RPC refuses (providers cap
        `eth_getLogs` by blocks or by results: 10,000 logs, 500 to 10,000 blocks) is read again in halves, and the
        span stays halved; it doubles back after `SPAN_REGROWTH` reads in a row are taken. A refusal of one block's
        logs is raised. Before, the indexer asked for the same refused range forever: no event applied after it."""
        events: list[ChainEvent] = []
        start = from_block
        while start <= to_block:
            end = min(to_block, start + self.span - 1)
            params: FilterParams = {"address": self.hub.address, "fromBlock": start, "toBlock": end}
            if topics:
                params["topics"] = topics
            try:
                with self._reading(f"reading hub logs {start}..{end}"):
                    logs = self.w3.eth.get_logs(params)
            except ChainUnavailableError:
                raise
            except ChainError as ex:
                if end == start:
                    raise
                self.span, self._taken = max(1, (end - start + 1) // 2), 0
                logger.warning("indexer: %s; reading %d blocks at a time", ex.message, self.span)
                continue
            events += self._decoded(logs)
            start = end + 1
            self._taken += 1
            if self._taken >= SPAN_REGROWTH and self.span < self.batch_blocks:
                self.span, self._taken = min(self.batch_blocks, 2 * self.span), 0
        return events

    def _whole(
        self, first: int, last: int, head: int, events: list[ChainEvent]
    ) -> tuple[list[ChainEvent], str | None] | None:
        """The hub's events of blocks first..last, those `eth_getLogs` left out added, and block `last`'s hash; None
        while a node without some of those blocks answers.
        A provider's balancer may send the call to a node behind the others, and geth (providers after it) answers a
        range past its head with the logs of the blocks it has and no error: a payer's close request in the others
        was never applied (its channel open in the store, its deadline unwatched). So each block within
        `verify_blocks` of the head is checked against its header's bloom filter: one that may hold the hub's logs
        and has none in the answer is read by its hash, which a node without the block refuses (a block further from
        the head is on every node a balancer keeps)."""
        near = max(first, head - self.verify_blocks + 1)
        if near > last:
            return events, self._block_hash(last)
        found = {event.block_number for event in events}
        hub = bytes(HexBytes(self.hub.address))
        more: list[ChainEvent] = []
        last_hash = None
        for number in range(near, last + 1):
            block = self._block(number)
            if block is None:
                self._left_out(number)
                return None
            block_hash = HexBytes(block["hash"])
            last_hash = block_hash.to_0x_hex()
            if number in found or hub not in BloomFilter(int.from_bytes(bytes(block["logsBloom"]), "big")):
                continue
            try:
                with self._reading(f"reading hub logs of block {number}"):
                    logs = self.w3.eth.get_logs({"address": self.hub.address, "blockHash": block_hash})
            except ChainUnavailableError:
                raise
            except ChainError:
                self._left_out(number)
                return None
            more += self._decoded(logs)
        self._partial = False
        return sorted(events + more, key=lambda event: event.position), last_hash

    def _left_out(self, number: int) -> None:
        if not self._partial:
            logger.warning(
                "the chain's node left block %d out of the hub's logs (it is behind the others): waiting for it", number
            )
        self._partial = True

    def _decoded(self, logs: Sequence[LogReceipt]) -> list[ChainEvent]:
        """The hub's events among `logs` (a log of no event the hub declares is left out)."""
        return [event for event in (self._decode(log) for log in logs) if event is not None]

    def _decode(self, log: LogReceipt) -> ChainEvent | None:
        event = self._events.get(HexBytes(log["topics"][0])) if log["topics"] else None
        if event is None:
            return None
        data = event.process_log(log)
        args = {k: _plain(v) for k, v in data["args"].items()}
        channel_id = args.get("channelId")
        return ChainEvent(
            block_number=int(log["blockNumber"]),
            log_index=int(log["logIndex"]),
            block_hash=HexBytes(log["blockHash"]).to_0x_hex(),
            tx_hash=HexBytes(log["transactionHash"]).to_0x_hex(),
            event=event.event_name,
            channel_id=ChannelId(channel_id) if isinstance(channel_id, str) else None,
            args=args,
        )

    def read_channel(self, channel_id: ChannelId, block: int, salt: str | None = None) -> Channel | None:
        """The channel as the chain has it at `block`, or None if it does not exist there.

        The hub's state has no salt; it is in the ChannelOpened log. Callers that have the channel stored pass its
        salt. Otherwise the channel is one the indexer has not reached, so its opening is after the indexer's cursor:
        only those blocks are searched (never the whole chain from the deployment, which grows without bound and
        which providers that cap `eth_getLogs` ranges refuse).
        """
        if block < self.start_block:
            return None  # the hub was not deployed yet
        with self._reading(f"reading channel {channel_id}"):
            state = self.hub.functions.channel(bytes.fromhex(channel_id[2:])).call(block_identifier=block)
        payer, payee, token, deposit, settled, deadline, status = state
        if ChannelStatus(status) == ChannelStatus.NONE:
            return None
        payer = Address(to_checksum_address(payer))
        if salt is None:  # another shard's channel is never stored: its salt is not needed, nor searched
            salt = self._opening_salt(channel_id, block) if self.shard.owns(payer) else ""
        return Channel(
            channel_id=channel_id,
            payer=payer,
            payee=Address(to_checksum_address(payee)),
            token=Address(to_checksum_address(token)),
            salt=salt,
            deposit=deposit,
            settled=settled,
            status=ChannelStatus(status),
            close_deadline=deadline or None,
            as_of_block=block,
            as_of_log=END_OF_BLOCK,
        )

    def _opening_salt(self, channel_id: ChannelId, block: int) -> str:
        """The salt from the channel's ChannelOpened log, searched from the indexer's cursor up to `block`."""
        with self.db.read() as conn:
            # The cursor first, then the channel: the indexer stores a channel and moves its cursor past the opening
            # in one transaction, so either the channel is stored now or its opening is after this cursor.
            cursor = log_q.get_cursor(conn)
            stored = channel_q.get_channel(conn, channel_id)
        if stored is not None:
            return stored.salt
        first = max(self.start_block, cursor.block_number + 1 if cursor else self.start_block)
        # Newest first, a span at a time: a voucher for a fresh channel comes soon after its opening.
        to_block = block
        while to_block >= first:
            from_block = max(first, to_block - self.span + 1)
            opened = self._logs(from_block, to_block, [self._opened_topic, channel_id])
            if opened:
                return str(opened[0].args["salt"])
            to_block = from_block - 1
        # The state says it exists, so its opening is in these blocks: a node whose logs are behind its state answered
        # (a provider's balancer sends calls to several). Not a fault of ours nor of the payer: retry shortly.
        raise ChainUnavailableError(
            f"channel {channel_id} is on chain at block {block}, but the chain's RPC has no ChannelOpened log for it "
            f"in blocks {first}..{block} yet (its logs behind its state: a provider's balancer); retry in a second",
            retryAfter=1,
        )

    # --- one channel, on demand --------------------------------------------------------------------------------

    def known_absent(self, channel_id: ChannelId) -> bool:
        """Whether the chain was found moments ago not to have this channel (no I/O: the event loop asks)."""
        with self._absent_lock:
            return self._absent.get(channel_id, 0.0) > time.monotonic()

    def lookup(self, channel_id: ChannelId) -> Channel | None:
        """Find a channel the store does not know yet on chain (confirmed state) and store it.

        Returns None if no such channel exists; raises ChannelUnconfirmedError if it exists only in blocks that are
        not confirmed yet, and ChainUnavailableError if the chain cannot be asked (never a misleading "not found").
        """
        now = time.monotonic()
        with self._absent_lock:
            if self._absent.get(channel_id, 0.0) > now:
                return None  # asked moments ago: still absent, and asking again would only cost the chain
            if len(self._absent) > ABSENT_MAX:
                self._absent = {cid: until for cid, until in self._absent.items() if until > now}
        if not self._lookups.take(now):
            raise LookupBudgetError(
                f"too many channel ids this service has not seen are being looked up on chain right now; retry "
                f"channel {channel_id} in a second",
                retryAfter=1,
            )
        if not self._exists_at_latest(channel_id):
            with self._absent_lock:
                self._absent[channel_id] = time.monotonic() + self.absent_ttl
            return None
        confirmed = self.confirmed_heads().confirmed
        channel = self.read_channel(channel_id, confirmed)
        if channel is None:
            raise ChannelUnconfirmedError(
                f"channel {channel_id} is opened but not yet {self.confirmations} blocks deep; retry shortly"
            )
        if not self.shard.owns(channel.payer):
            return channel  # another shard's: its payer is known (the voucher is refused as such), nothing is stored
        with self.db.write() as conn:
            channel_q.insert_channel(conn, channel, utcnow())
            return channel_q.get_channel(conn, channel_id)

    def _exists_at_latest(self, channel_id: ChannelId) -> bool:
        """Whether the hub has the channel at the latest block: ONE raw eth_call, read by position (the view is a
        static tuple of words; its status is word STATUS). A made-up id, what a flood sends, costs the chain this
        call and nothing more; web3's contract call would add ~5 ms of CPU to each."""
        call = {"to": self.hub.address, "data": self._channel_selector + channel_id[2:]}
        with self._reading(f"reading channel {channel_id}"):
            answer = self.w3.provider.make_request(RPCEndpoint("eth_call"), [call, "latest"])
        if "error" in answer:
            raise ChainError(f"reading channel {channel_id}: the chain's RPC refused ({answer['error']})")
        words = HexBytes(answer["result"])
        status = words[32 * ChannelViewField.STATUS : 32 * (ChannelViewField.STATUS + 1)]
        return len(status) == 32 and ChannelStatus(int.from_bytes(status, "big")) != ChannelStatus.NONE

    def resume(self, channel_id: ChannelId) -> Channel:
        """Lift a suspension after an operator checked the channel: re-read its confirmed state, clear the flag."""
        head, confirmed = self.confirmed_heads()
        with self.db.read() as conn:
            known = channel_q.get_channel(conn, channel_id)
            cursor = log_q.get_cursor(conn)
        if cursor is not None and confirmed < cursor.block_number:
            # A node behind the indexer (a fallback RPC): its state is older than what was applied, and saved it
            # undid every event since (a close request read back as open: no watch on its deadline).
            raise ChainUnavailableError(
                f"the chain's node is at block {head} (confirmed {confirmed}), behind block {cursor.block_number} "
                "the indexer applied: resume once it has caught up"
            )
        fresh = None if known is None else self.read_channel(channel_id, confirmed, known.salt)
        with self.db.write() as conn:
            stored = channel_q.lock_channels(conn, [channel_id]).get(channel_id)
            if stored is None or fresh is None:
                raise ChannelNotFoundError(f"channel {channel_id} is not in the store or no longer on chain")
            channel_q.save_chain_state(conn, replace(fresh, suspended_reason=None), utcnow())
            resumed = channel_q.get_channel(conn, channel_id)
        assert resumed is not None
        logger.warning("channel %s resumed by an operator at block %d", channel_id, confirmed)
        return resumed

    # --- following the chain -----------------------------------------------------------------------------------

    def poll(self) -> int:
        """Apply the next range of confirmed blocks; returns how many blocks the cursor advanced."""
        head, confirmed = self.confirmed_heads()
        with self.db.read() as conn:
            cursor = log_q.get_cursor(conn)
        assert cursor is not None  # created in __init__
        if cursor.block_hash is not None:
            found = self._block_hash(cursor.block_number)
            if found != cursor.block_hash:
                self.check_anchor()  # a replaced chain is not a reorganisation: nothing here can be rewound to
                if found is not None:  # another block in its place
                    self._rewind(cursor, confirmed)
                elif not self._behind:
                    # This node has no such block yet: it is behind what was applied (a fallback RPC, another node
                    # behind the provider's balancer), not reorganised. It was taken for a reorganisation deeper
                    # than the confirmations: every channel touched since the last block it had was suspended.
                    logger.warning(
                        "the chain's node is at block %d, behind block %d the indexer applied: waiting for it",
                        head,
                        cursor.block_number,
                    )
                self._behind = found is None
                self.progress = Progress(head, confirmed, cursor.block_number)
                return 0
        self._behind = False
        if confirmed <= cursor.block_number:
            self.progress = Progress(head, confirmed, cursor.block_number)
            return 0
        to_block = min(confirmed, cursor.block_number + self.span)
        events = self._logs(cursor.block_number + 1, to_block)
        whole = self._whole(cursor.block_number + 1, to_block, head, events)
        if whole is None:  # a node behind left blocks out of the answer: waited for
            self.progress = Progress(head, confirmed, cursor.block_number)
            return 0
        events, to_hash = whole
        advanced = self._apply(cursor, Cursor(to_block, to_hash), events)
        self.progress = Progress(head, confirmed, to_block if advanced else cursor.block_number)
        return to_block - cursor.block_number if advanced else 0

    def _apply(self, seen: Cursor, new: Cursor, events: list[ChainEvent]) -> bool:
        now = utcnow()
        touched = {e.channel_id for e in events if e.channel_id} | {
            cid for e in events if e.event == HubEvent.CHANNELS_SETTLED for cid, _ in _settlements(e)
        }
        with self.db.write() as conn:
            current = log_q.get_cursor(conn, lock=True)
            if current != seen:
                return False  # another process applied this range first
            stored = channel_q.lock_channels(conn, touched)
            states: dict[ChannelId, Channel | None] = dict(stored)
            for event in events:
                for cid, updated in self._transitions(states, event):
                    states[cid] = updated
            log_q.record_events(conn, events)
            for cid, after in sorted(states.items()):
                before = stored.get(cid)
                if after is None or after == before or (before is None and not self.shard.owns(after.payer)):
                    continue
                if before is None:
                    channel_q.insert_channel(conn, after, now)
                else:
                    channel_q.save_chain_state(conn, after, now)
            log_q.set_cursor(conn, new, now)
            log_q.prune_blocks(conn, new.block_number - self.reorg_window)
        if self.opened is not None:
            for cid, after in states.items():
                if after is not None and stored.get(cid) is None and self.shard.owns(after.payer):
                    self.opened(after)
        return True

    def _transitions(
        self, states: dict[ChannelId, Channel | None], event: ChainEvent
    ) -> list[tuple[ChannelId, Channel]]:
        if event.event == HubEvent.CHANNELS_SETTLED:
            out = []
            for cid, cumulative in _settlements(event):
                channel = states.get(cid)
                if channel is not None and event.position > channel.position:
                    block, log = event.position
                    out.append((cid, replace(channel, settled=int(cumulative), as_of_block=block, as_of_log=log)))
            return out
        if event.event not in CHANNEL_EVENTS or event.channel_id is None:
            return []
        channel = states.get(event.channel_id)
        if channel is not None and event.position <= channel.position:
            return []  # already reflected (applied, or read from the chain at the end of this block or later)
        if channel is not None and event.event == HubEvent.CHANNEL_OPENED:
            return []
        updated = apply_event(channel, event)
        if updated is None:
            if self.shard.count == 1:  # sharded: another shard's channel, which this store does not hold
                logger.error("%s for channel %s that the store does not know; skipped", event.event, event.channel_id)
            return []
        return [(event.channel_id, updated)]

    def _rewind(self, cursor: Cursor, confirmed: int) -> None:
        """A block the indexer applied is gone: a reorg deeper than the confirmation depth."""
        with self.db.read() as conn:
            recorded = log_q.recent_blocks(conn, self.reorg_window)
        safe = Cursor(self.start_block - 1, None)
        for block in recorded:
            if block.block_number < cursor.block_number and self._block_hash(block.block_number) == block.block_hash:
                safe = block
                break
        reason = (
            f"chain reorganisation deeper than {self.confirmations} confirmations: blocks "
            f"{safe.block_number + 1}..{cursor.block_number} were replaced"
        )
        with self.db.read() as conn:
            affected = log_q.channels_touched_after(conn, safe.block_number)
            salts = {cid: c.salt for cid, c in channel_q.lock_channels(conn, affected).items()}
        fresh = {cid: self.read_channel(cid, confirmed, salts.get(cid)) for cid in affected}
        now = utcnow()
        with self.db.write() as conn:
            if log_q.get_cursor(conn, lock=True) != cursor:
                return  # another process handled it
            stored = channel_q.lock_channels(conn, affected)
            for cid, channel in stored.items():
                chain = fresh.get(cid)
                if chain is None:
                    chain = replace(channel, deposit=0, settled=0, status=ChannelStatus.CLOSED, close_deadline=None)
                at = replace(chain, as_of_block=confirmed, as_of_log=END_OF_BLOCK)
                channel_q.save_chain_state(conn, replace(at, suspended_reason=reason), now)
            log_q.forget_after(conn, safe.block_number)
            log_q.set_cursor(conn, safe, now)
        logger.critical(
            "%s; %d channel(s) suspended until an operator resumes them: %s", reason, len(affected), affected
        )

    def catch_up(self) -> None:
        """Poll until every confirmed block is applied (for one-shot commands, benchmarks and tests).

        A poll that advances nothing does not mean caught up: another indexer on the same store (a thread of this
        service, another process) may have applied that range first, with more still to come.
        """
        while True:
            if self.poll():
                continue
            progress = self.progress
            if progress is None or progress.cursor >= progress.confirmed:
                return

    def run(self, stop: threading.Event, interval: float) -> None:
        """Poll until `stop` is set; errors are logged and retried with backoff, never fatal."""
        delay = interval
        while not stop.is_set():
            try:
                advanced = self.poll()
                delay = interval
                self.failing = None
            except SettlementError as ex:
                log = logger.critical if isinstance(ex, ChainMismatchError) else logger.warning
                log("indexer: %s (retrying in %.1fs)", ex.message, delay)
                self.failing = f"[{ex.code}] {ex.message}"
                advanced = 0
                delay = min(delay * 2, 30.0)
            except Exception as ex:
                logger.exception("indexer step failed (retrying in %.1fs)", delay)
                self.failing = f"[internal_error] {type(ex).__name__}"
                advanced = 0
                delay = min(delay * 2, 30.0)
            if not advanced:
                stop.wait(delay)


def _settlements(event: ChainEvent) -> list[tuple[ChannelId, int]]:
    return [
        (ChannelId(cid), amount) for cid, amount in decode_settlements(bytes.fromhex(event.args["settlements"][2:]))
    ]


def _plain(value: Any) -> Any:
    """Event args as JSON-able values: bytes as 0x hex, lists element-wise."""
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
