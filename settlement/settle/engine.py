"""The settlement engine: batches the latest vouchers into settleBatch transactions, exactly once in effect.

Every batch is an intent first: its entries and its nonce are committed to the store before a transaction exists.
Then the signed transaction (hash and raw bytes) is committed, and only then broadcast. Whatever the engine was doing
when it stopped, the next `tick` finds the open intent and moves it on from what the store and the chain say:

    intent, no transaction   -> sign and send it (same nonce: no gap)
    transaction, no receipt  -> broadcast the stored bytes again, or after `bump_after` replace them with the same
                                nonce and higher fees; if the nonce was used by something else, the batch failed
    receipt, too shallow     -> wait for `confirmations`
    receipt, deep enough     -> record each entry's outcome from the receipt's events, not from what was sent

A batch re-sent after all is harmless: the hub skips entries that are not above what is settled. One batch is in
flight at a time, but for a close's settlement that comes due while the batch before it waits for its confirmations
(mined, its nonce used): that one goes out at once, with the next nonce.

Settlement is economic, since every entry costs the operator gas and a payer can make vouchers for free:
- a regular batch (every `settle_interval`) takes an ETH channel only when its gas, at the current fee, is at most
  `settle_fee_share_percent` of the value it settles (an ERC-20 channel: `token_min_settle_amounts`), and waits while
  the settler spent more than `max_spend_per_hour_wei` in the last hour; it reads open channels, ETH's and the
  priced tokens' first (amounts of different assets do not compare), and a token the operator did not price (a payer
  may make its own) joins only while such channels spent less than `max_unpriced_spend_per_hour_wei`;
- the watchtower settles a closing channel at most twice per close: once as soon as it sees the close, and once
  more when ingest stops taking its vouchers (`close_guard_seconds` before the deadline) if value arrived since.
  A payer that streams 1-wei vouchers after its close request therefore buys no extra batches;
- an entry the hub skipped is never sent again for the same amount; entries the chain had already settled (the payer
  front-ran the batch with its own settlement) are counted, and ALERT front_run fires on a batch with several.
Alerts (log + metric) fire when a close deadline comes near or passes. All timing reads one injected clock, and what
must survive a failover (the last batch, alert throttles, the nonce grace) is kept in the store.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, IntEnum
from fractions import Fraction

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import TransactionNotFound, Web3RPCError
from web3.logs import DISCARD
from web3.types import TxParams, TxReceipt

from settlement.chain.batch_codec import SettleEntry, decode_settlements, encode_batch
from settlement.chain.node import GAS_HEADROOM, Fees, access_list_plan, offered_fees, rpc_errors
from settlement.domain.model import ETH, Channel, ChannelId
from settlement.errors import SettlementError
from settlement.server.config import Settings
from settlement.server.metrics import Metrics
from settlement.store import Database
from settlement.store import channels as channel_q
from settlement.store import settlements as batch_q
from settlement.store.meta import record_engine
from settlement.store.settlements import Batch, CloseWork, Entry, SentTx

logger = logging.getLogger(__name__)


class Outcome(IntEnum):
    """What became of a batch entry: settled, or the hub's VoucherSkipped reason."""

    SETTLED = 0
    UNKNOWN_CHANNEL = 1
    CHANNEL_CLOSED = 2
    CHALLENGE_EXPIRED = 3
    NOT_ABOVE_SETTLED = 4
    EXCEEDS_DEPOSIT = 5
    INVALID_SIGNATURE = 6


class ClosePhase(IntEnum):
    """The two settlements of a close the watchtower makes at most."""

    SEEN = 1  # as soon as the engine sees the close request
    FINAL = 2  # when ingest stops taking the channel's vouchers (close_guard_seconds before the deadline)


class Broadcast(Enum):
    """What a node made of a signed transaction we sent, decided from the chain's state, never from error text (each
    node client words its errors differently)."""

    ACCEPTED = "accepted"
    ALREADY_KNOWN = "already_known"  # the node has it (a re-broadcast)
    NONCE_USED = "nonce_used"  # its nonce is taken: this transaction or a replacement was mined
    REFUSED = "refused"  # none of those: try again on the next tick


SETTLED = Outcome.SETTLED
ALERT_REPEAT_SECONDS = 60.0
UNSETTLED_REPORT_SECONDS = 10.0  # how often the unsettled-value gauge (a sum over every channel) is refreshed
NONCE_USED_GRACE_SECONDS = 15.0  # a batch's nonce used with no receipt of ours this long: another tx took it


@dataclass(frozen=True)
class TickResult:
    """What one tick did: the batch it started (if any) and the batches whose outcome it recorded."""

    started: str | None
    finished: list[str]


class Settler:
    """Runs on one process at a time (see settlement.settle.lease); `tick()` is one step of the engine."""

    def __init__(
        self,
        db: Database,
        w3: Web3,
        hub: Contract,
        account: LocalAccount,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.w3 = w3
        self.hub = hub
        self.account = account
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._started_at = clock()  # the interval counts from here until the store holds a batch
        self._checked_at: float | None = None  # the last regular check that found nothing worth a batch
        self._chain_id: int | None = None
        self._unsettled_at: float | None = None
        self._unsettled_shown: set[str] = set()  # the assets the unsettled-value gauge names now
        self._recorded = False  # its interval and sender, in the store for `settlement status`
        self._claimed: dict[tuple[str, str], float] = {}  # alerts this process claimed in the store, and when
        self._deepening: set[str] = set()  # open batches mined, waiting for their confirmations (as last read)
        # Why the open batch waits, when its gas is more than the settler holds (`low_funds`); None once one is sent.
        self.short_of_funds: str | None = None

    @property
    def sender(self) -> str:
        return str(self.account.address)

    # --- the engine step ---------------------------------------------------------------------------------------

    def tick(self, *, force: bool = False) -> TickResult:
        """Move open batches on; then start a new batch if one is due (or `force`) and none is in flight (a close's
        settlement, also while those in flight are mined and wait for their confirmations).

        A tick that starts nothing reads only open batches and closing channels: the settleable channels (possibly
        hundreds of thousands) are read, LIMITed to one batch, only when a regular batch may start.
        """
        if not self._recorded:
            with self.db.write() as conn:
                record_engine(conn, {"settleInterval": self.settings.settle_interval, "sender": self.sender})
            self._recorded = True
        finished = self.reconcile()
        with self.db.read() as conn:
            in_flight = batch_q.open_batches(conn)
            closing = batch_q.closing_with_work(conn)
            last_batch = batch_q.last_batch_at(conn)
        chain_now = self._watch([w.channel for w in closing])
        self._watch_funds()
        self._report_unsettled()
        phases = {w.channel.channel_id: p for w in closing if (p := self._close_due(w, chain_now)) is not None}
        due_closes = [w.channel for w in closing if w.channel.channel_id in phases]
        if in_flight:
            # A batch mined and waiting for its confirmations holds its nonce no more: a close due meanwhile goes out
            # now with the next one. Held for the wait (12 of mainnet's 12-s blocks: 144 s), a final settlement due
            # `close_guard_seconds` (120) before its deadline missed it, and the payee what was paid since the first.
            if not due_closes or any(b.batch_id not in self._deepening for b in in_flight):
                return TickResult(None, finished)
            return TickResult(self._start(due_closes[: self.settings.batch_max_entries], phases), finished)
        now = self.clock()
        since = max(last_batch.timestamp() if last_batch else self._started_at, self._checked_at or float("-inf"))
        interval_over = now - since >= self.settings.settle_interval
        if not (force or due_closes or interval_over):
            return TickResult(None, finished)
        regular: list[Channel] = []
        if force or interval_over:
            regular = self._regular(force)
        chosen = [*due_closes, *regular][: self.settings.batch_max_entries]
        if not chosen:
            self._checked_at = now
            return TickResult(None, finished)
        return TickResult(self._start(chosen, phases), finished)

    def _close_due(self, work: CloseWork, chain_now: int) -> ClosePhase | None:
        """At most two settlements per close: when the close is first seen, and when ingest stops taking vouchers
        (`close_guard_seconds` before the deadline) if value arrived since. Which were made is read from the batch
        entries, not from clocks: the engine's clock and the chain's may disagree."""
        if work.covered or work.channel.close_deadline is None:
            return None
        final_from = work.channel.close_deadline - self.settings.close_guard_seconds
        if chain_now >= final_from and work.close_phase < ClosePhase.FINAL:
            return ClosePhase.FINAL
        if work.close_phase < ClosePhase.SEEN:
            return ClosePhase.SEEN
        return None

    def _regular(self, force: bool) -> list[Channel]:
        """Open channels worth settling now: all of them (above min_settle_amount) when forced by an operator."""
        if not force:
            spent = self._spent_last_hour()
            if spent >= self.settings.max_spend_per_hour_wei:
                self._alert(
                    "spend_ceiling",
                    f"settler {self.sender} spent {spent} wei on gas in the last hour, at or above "
                    f"SETTLEMENT_MAX_SPEND_PER_HOUR_WEI ({self.settings.max_spend_per_hour_wei}): regular batches "
                    "wait; closing channels still settle",
                )
                return []
        # Open channels only (the watchtower settles closing ones), ETH's and the priced tokens' first: ranked by
        # amount alone, 400 channels of a token a payer made (10^30 units each) took every place of every regular
        # batch, and no other payee's channel was settled until it closed.
        priced = self.settings.priced_assets
        with self.db.read() as conn:
            candidates = batch_q.settleable(conn, limit=self.settings.batch_max_entries, open_only=True, first=priced)
        if not force and any(c.token not in priced for c in candidates) and self._unpriced_spent_up(priced):
            candidates = [c for c in candidates if c.token in priced]
        price = None if force else self._gas_price()
        return [c for c in candidates if self._worth(c, price)]

    def _unpriced_spent_up(self, priced: frozenset[str]) -> bool:
        """Whether the last hour's gas on channels in tokens the operator did not price reached their own ceiling: a
        payer's own token (free to make in any amount) joined every regular batch until the settler's whole hourly
        ceiling was spent, and then no payee's channel was settled before its close."""
        with self.db.read() as conn:
            spent = batch_q.spent_on_others_since(conn, self._now_at(self.clock() - 3600), priced)
        if spent < self.settings.max_unpriced_spend_per_hour_wei:
            return False
        self._alert(
            "unpriced_spend_ceiling",
            f"settler {self.sender} spent {spent} wei on gas in the last hour settling channels in tokens "
            "SETTLEMENT_TOKEN_MIN_SETTLE_AMOUNTS does not name, at or above SETTLEMENT_MAX_UNPRICED_SPEND_PER_HOUR_WEI "
            f"({self.settings.max_unpriced_spend_per_hour_wei}): regular batches leave them out; their closes still "
            "settle",
        )
        return True

    def _worth(self, channel: Channel, gas_price: int | None) -> bool:
        """Is the channel's unsettled value worth one more entry's gas? (`gas_price` None: an operator forces it.)"""
        value = channel.accepted - channel.settled
        if value < self.settings.min_settle_amount:
            return False
        if gas_price is None:
            return True
        if channel.token != ETH:
            return value >= self.settings.token_min_settle_amounts.get(channel.token, self.settings.min_settle_amount)
        share = self.settings.settle_fee_share_percent
        return share == 0 or value * share >= self.settings.settle_gas_per_channel * gas_price * 100

    def _gas_price(self) -> int:
        """What a settlement pays per gas now: the base fee plus our tip."""
        with rpc_errors("reading the base fee"):
            base = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0))
        return base + self._tip()

    def _tip(self) -> int:
        """SETTLEMENT_PRIORITY_FEE_PER_GAS, or the node's suggestion: a fixed tip fits one chain (1 gwei, mainnet's,
        is ~1,000 times an L2's)."""
        if self.settings.priority_fee_per_gas is not None:
            return self.settings.priority_fee_per_gas
        with rpc_errors("reading the suggested tip"):
            return int(self.w3.eth.max_priority_fee)

    def _spent_last_hour(self) -> int:
        with self.db.read() as conn:
            return batch_q.spent_since(conn, self._now_at(self.clock() - 3600))

    def _now_at(self, seconds: float) -> datetime:
        return datetime.fromtimestamp(seconds, UTC)

    def _now(self) -> datetime:
        """The injected clock as a timestamp for the store: one clock for every decision and every record."""
        return self._now_at(self.clock())

    def _report_unsettled(self) -> None:
        """The unsettled-value gauge sums every channel: refreshed every UNSETTLED_REPORT_SECONDS, not every tick.

        ETH and the operator's configured tokens are always named (0 when all is settled: an asset whose value was
        all settled used to keep its last figure for good, the store's sum naming only assets with value left); any
        other asset is named while it has value unsettled, `unsettled_tokens_shown` of them at most (in address
        order): a payer picks its channel's token, and each asset named is a series in every scrape."""
        now = self.clock()
        if self._unsettled_at is not None and now - self._unsettled_at < UNSETTLED_REPORT_SECONDS:
            return
        self._unsettled_at = now
        with self.db.read() as conn:
            unsettled = channel_q.unsettled_by_token(conn)
        always = self.settings.priced_assets
        others = sorted(token for token in unsettled if token not in always)[: self.settings.unsettled_tokens_shown]
        shown = {token: unsettled.get(token, 0) for token in [*always, *others]}
        for gone in self._unsettled_shown - shown.keys():
            self.metrics.unsettled.remove(gone)
        for token, value in shown.items():
            self.metrics.unsettled.labels(token).set(value)
        self._unsettled_shown = set(shown)

    # --- starting a batch --------------------------------------------------------------------------------------

    def _start(self, chosen: list[Channel], phases: dict[ChannelId, ClosePhase] | None = None) -> str | None:
        phases = phases or {}
        entries = [
            Entry(c.channel_id, c.accepted, c.signature or b"", close_phase=phases.get(c.channel_id))
            for c in chosen
            if c.signature
        ]
        while entries:
            plain = self._estimate(self._tx(entries, {c.channel_id: c for c in chosen}))
            if int(plain * GAS_HEADROOM) <= self.settings.batch_gas_limit or len(entries) == 1:
                break
            entries = entries[: len(entries) // 2]  # too much gas for one transaction: settle half now
        if not entries:
            return None
        with rpc_errors("reading the settler's nonce"):
            nonce = self.w3.eth.get_transaction_count(self.account.address, "pending")
        batch_id = uuid.uuid4().hex
        with self.db.write() as conn:
            batch_q.create_batch(conn, batch_id, self.sender, nonce, entries, self._now())
        logger.info("batch %s: %d channels, nonce %d", batch_id, len(entries), nonce)
        with self.db.read() as conn:
            batch = next(b for b in batch_q.open_batches(conn) if b.batch_id == batch_id)
        self._send(batch, previous=None, estimate=plain)
        return batch_id

    def _tx(self, entries: list[Entry], channels: dict[ChannelId, Channel]) -> TxParams:
        groups: dict[tuple[str, str], list[SettleEntry]] = {}
        for entry in entries:
            channel = channels[entry.channel_id]
            groups.setdefault((channel.payee, channel.token), []).append(
                SettleEntry(channel.payer, bytes.fromhex(channel.salt[2:]), entry.cumulative, entry.signature)
            )
        batch = encode_batch((payee, token, g) for (payee, token), g in groups.items())
        return {
            "from": self.account.address,
            "to": self.hub.address,
            "data": self.hub.encode_abi("settleBatch", args=[batch]),
        }

    def _estimate(self, tx: TxParams) -> int:
        with rpc_errors("estimating a settlement's gas"):
            return int(self.w3.eth.estimate_gas(tx))

    # --- sending and re-sending --------------------------------------------------------------------------------

    def _send(self, batch: Batch, previous: SentTx | None, estimate: int | None = None) -> None:
        """Sign a transaction for `batch` (a replacement of `previous` if given), store it, then broadcast it.
        `estimate`: the plain gas estimate just made for the same entries, if any (one node round trip less)."""
        with self.db.read() as conn:
            entries = batch_q.entries_of(conn, batch.batch_id)
            channels = channel_q.lock_channels(conn, [e.channel_id for e in entries])
        request = self._tx(entries, channels)
        with rpc_errors("estimating a settlement's gas"):
            needed, access_list = access_list_plan(self.w3, request, estimate)
        gas = min(int(needed * GAS_HEADROOM), self.settings.batch_gas_limit)
        max_fee, priority = self._fees(previous)
        if previous is not None and (max_fee, priority) == (previous.max_fee, previous.priority_fee):
            self._alert(
                "fee_ceiling", f"batch {batch.batch_id} is at the fee ceiling and still not mined", batch.batch_id
            )
            self._broadcast(batch, previous)
            return
        balance = self._balance()
        if balance < gas * max_fee:
            self.short_of_funds = (
                f"settler {self.sender} holds {balance} wei, batch {batch.batch_id} may need {gas * max_fee}: "
                "top it up; the batch waits"
            )
            self._alert("low_funds", self.short_of_funds, batch.batch_id)
            return
        self.short_of_funds = None
        params: TxParams = {
            **request,
            "nonce": batch.nonce,  # type: ignore[typeddict-item]
            "gas": gas,
            "maxFeePerGas": max_fee,  # type: ignore[typeddict-item]
            "maxPriorityFeePerGas": priority,  # type: ignore[typeddict-item]
            "chainId": self._chain(),
            "type": 2,
        }
        if access_list:
            params["accessList"] = access_list
        signed = self.account.sign_transaction(params)  # type: ignore[arg-type]
        tx = SentTx(
            tx_hash=HexBytes(signed.hash).to_0x_hex(),
            nonce=batch.nonce,
            max_fee=max_fee,
            priority_fee=priority,
            raw=bytes(signed.raw_transaction),
            sent_at=None,
            created_at=self._now(),
        )
        with self.db.write() as conn:
            batch_q.add_tx(conn, batch.batch_id, tx)
        self._broadcast(batch, tx)

    def _broadcast(self, batch: Batch, tx: SentTx) -> Broadcast:
        outcome = self._send_raw(tx)
        if outcome == Broadcast.REFUSED:
            logger.warning("batch %s: the node refused %s; retrying on the next tick", batch.batch_id, tx.tx_hash)
            return outcome
        with self.db.write() as conn:
            batch_q.mark_sent(conn, batch.batch_id, tx.tx_hash, self._now())
        return outcome

    def _send_raw(self, tx: SentTx) -> Broadcast:
        """Send the stored bytes; when the node refuses, ask the chain why instead of parsing its words."""
        try:
            with rpc_errors(f"sending {tx.tx_hash}"):
                self.w3.eth.send_raw_transaction(tx.raw)
            return Broadcast.ACCEPTED
        except SettlementError as ex:
            if not isinstance(ex.__cause__, Web3RPCError):
                raise  # the node did not answer: nothing is known
            refusal = ex.message
        with rpc_errors(f"looking up {tx.tx_hash}"):
            try:
                self.w3.eth.get_transaction(HexBytes(tx.tx_hash))
                return Broadcast.ALREADY_KNOWN
            except TransactionNotFound:
                pass
            if self.w3.eth.get_transaction_count(self.account.address, "latest") > tx.nonce:
                return Broadcast.NONCE_USED
        logger.warning("transaction %s refused: %s", tx.tx_hash, refusal)
        return Broadcast.REFUSED

    def _fees(self, previous: SentTx | None) -> Fees:
        with rpc_errors("reading the base fee"):
            base = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0))
        before = None if previous is None else Fees(previous.max_fee, previous.priority_fee)
        bump = Fraction(100 + self.settings.bump_percent, 100)
        return offered_fees(base, self._tip(), before, bump, self.settings.max_fee_per_gas)

    def _chain(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    # --- finding out what happened -----------------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Move every open batch on from what the chain says; returns the ids of batches that finished."""
        with self.db.read() as conn:
            batches = batch_q.open_batches(conn)
        finished = []
        for batch in batches:
            try:
                if self._advance(batch):
                    finished.append(batch.batch_id)
            except SettlementError as ex:
                logger.warning("batch %s: %s; retrying on the next tick", batch.batch_id, ex.message)
        return finished

    def _advance(self, batch: Batch) -> bool:
        with self.db.read() as conn:
            txs = batch_q.txs_of(conn, batch.batch_id)
        if not txs:
            self._send(batch, previous=None)  # the intent was written, the engine stopped before signing
            return False
        for tx in txs:
            receipt = self._receipt(tx.tx_hash)
            if receipt is not None:
                return self._mined(batch, receipt)
        self._deepening.discard(batch.batch_id)  # not mined (or no more: reorganised out)
        with rpc_errors("reading the settler's nonce"):
            used = self.w3.eth.get_transaction_count(self.account.address, "latest")
        if used > batch.nonce:
            if any(self._receipt(tx.tx_hash) is not None for tx in txs):
                return False  # mined between the two reads: the next tick records it
            # A node can show the nonce as used before it serves the receipt: conclude only if that lasts (the first
            # sighting is in the store, so a failover does not start the grace again).
            with self.db.write() as conn:
                first_seen = batch_q.nonce_used_since(conn, batch.batch_id, self._now()).timestamp()
            if self.clock() - first_seen < NONCE_USED_GRACE_SECONDS:
                return False
            with self.db.write() as conn:
                batch_q.finish_batch(
                    conn, batch.batch_id, status="failed", now=self._now(), error="nonce used by another transaction"
                )
            self.metrics.batches.labels("failed").inc()
            logger.error("batch %s failed: its nonce %d was used by another transaction", batch.batch_id, batch.nonce)
            return True
        if batch.nonce_used_since is not None:
            with self.db.write() as conn:
                batch_q.clear_nonce_used(conn, batch.batch_id)  # it was a node's passing view
        last = txs[-1]
        # Counted from its first broadcast the node took, or, one it refused (its fees under the next block's base
        # fee, a full pool's "underpriced"), from its signing: it must be re-priced too, not sent again for good.
        since = last.sent_at or last.created_at
        if self.clock() - since.timestamp() >= self.settings.bump_after:
            logger.warning(
                "batch %s not mined after %.0fs: replacing it with higher fees",
                batch.batch_id,
                self.settings.bump_after,
            )
            self._send(batch, previous=last)
        else:
            self._broadcast(batch, last)  # harmless if the node has it; needed if it lost it (restart, reorg)
        return False

    def _receipt(self, tx_hash: str) -> TxReceipt | None:
        with rpc_errors(f"reading the receipt of {tx_hash}"):
            try:
                return self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            except TransactionNotFound:
                return None

    def _mined(self, batch: Batch, receipt: TxReceipt) -> bool:
        with rpc_errors("reading the chain head"):
            head = self.w3.eth.block_number
        if receipt["blockNumber"] > head - self.settings.confirmations:
            self._deepening.add(batch.batch_id)
            return False
        self._deepening.discard(batch.batch_id)
        now = self._now()
        tx_hash = HexBytes(receipt["transactionHash"]).to_0x_hex()

        def record(status: str, outcomes: dict[ChannelId, Outcome] | None, error: str | None) -> None:
            with self.db.write() as conn:
                batch_q.finish_batch(
                    conn,
                    batch.batch_id,
                    status=status,
                    now=now,
                    outcomes=outcomes,
                    tx_hash=tx_hash,
                    block_number=receipt["blockNumber"],
                    gas_used=receipt["gasUsed"],
                    gas_price=receipt.get("effectiveGasPrice"),
                    error=error,
                )

        if receipt["status"] != 1:
            record("failed", None, "transaction reverted")
            self.metrics.batches.labels("failed").inc()
            logger.error("batch %s reverted in %s", batch.batch_id, tx_hash)
            return True
        outcomes = self._outcomes(batch, receipt)
        record("confirmed", outcomes, None)
        settled = sum(1 for o in outcomes.values() if o == SETTLED)
        self.metrics.batches.labels("confirmed").inc()
        self._note_skips(batch, outcomes, receipt)
        self.metrics.batch_entries.observe(len(outcomes))
        self.metrics.batch_gas.observe(receipt["gasUsed"])
        with self.db.read() as conn:
            settled_keys = [
                (cid, e.cumulative) for cid, e in self._entries(batch).items() if outcomes.get(cid) == SETTLED
            ]
            accepted = channel_q.receipts_for(conn, settled_keys)
        for receipt_of_voucher in accepted.values():
            self.metrics.settle_latency.observe((now - receipt_of_voucher.accepted_at).total_seconds())
        logger.info(
            "batch %s confirmed in block %d: %d settled, %d skipped, %d gas",
            batch.batch_id,
            receipt["blockNumber"],
            settled,
            len(outcomes) - settled,
            receipt["gasUsed"],
        )
        return True

    def _note_skips(self, batch: Batch, outcomes: dict[ChannelId, Outcome], receipt: TxReceipt) -> None:
        """Count skipped entries by reason; several the chain had settled already mean someone front-runs us."""
        for outcome in outcomes.values():
            if outcome != Outcome.SETTLED:
                self.metrics.skipped.labels(outcome.name.lower()).inc()
        front_run = sorted(cid for cid, o in outcomes.items() if o == Outcome.NOT_ABOVE_SETTLED)
        if len(front_run) >= self.settings.front_run_alert_skips:
            with self.db.read() as conn:
                payers = sorted({c.payer for c in channel_q.lock_channels(conn, front_run).values()})
            per_entry = receipt["gasUsed"] // max(len(outcomes), 1)
            self._alert(
                "front_run",
                f"batch {batch.batch_id}: {len(front_run)} of {len(outcomes)} entries were already settled on chain "
                f"(~{per_entry} gas each paid for nothing); payers {', '.join(payers)}",
            )

    def _entries(self, batch: Batch) -> dict[ChannelId, Entry]:
        with self.db.read() as conn:
            return {e.channel_id: e for e in batch_q.entries_of(conn, batch.batch_id)}

    def _outcomes(self, batch: Batch, receipt: TxReceipt) -> dict[ChannelId, Outcome]:
        """Each entry's outcome as the hub's events tell it, never as what was sent."""
        entries = self._entries(batch)
        outcomes: dict[ChannelId, Outcome] = {}
        for event in self.hub.events.ChannelsSettled().process_receipt(receipt, errors=DISCARD):
            for cid, cumulative in decode_settlements(event["args"]["settlements"]):
                key = ChannelId(cid)
                if key in entries and entries[key].cumulative == cumulative:
                    outcomes[key] = SETTLED
        for event in self.hub.events.VoucherSkipped().process_receipt(receipt, errors=DISCARD):
            key = ChannelId("0x" + bytes(event["args"]["channelId"]).hex())
            if key in entries and key not in outcomes:
                outcomes[key] = Outcome(int(event["args"]["reason"]))
        return outcomes

    # --- the watchtower ----------------------------------------------------------------------------------------

    def _watch(self, closing: list[Channel]) -> int:
        """Alert on close deadlines; returns the time deadlines count in (the chain's, or ours where later)."""
        self.metrics.closes_pending.set(len(closing))
        if not closing:
            self.metrics.close_seconds_left.set(float("inf"))
            return int(self.clock())
        # The hub enforces deadlines by block timestamps: count from the chain's time, or from ours where it is later.
        with rpc_errors("reading the chain's time"):
            chain_time = int(self.w3.eth.get_block("latest")["timestamp"])
        now = max(int(self.clock()), chain_time)
        nearest = min(c.close_deadline or now for c in closing) - now
        self.metrics.close_seconds_left.set(nearest)
        for channel in closing:
            left = (channel.close_deadline or now) - now
            if left < 0:
                self._alert(
                    "close_deadline_missed",
                    f"channel {channel.channel_id}: the close deadline passed {-left}s ago with "
                    f"{channel.accepted - channel.settled} accepted but unsettled; the payee cannot be paid that",
                    channel.channel_id,
                )
            elif left < self.settings.close_alert_seconds:
                self._alert(
                    "close_deadline_at_risk",
                    f"channel {channel.channel_id}: {left}s to its close deadline and "
                    f"{channel.accepted - channel.settled} still unsettled",
                    channel.channel_id,
                )
        return now

    def _balance(self) -> int:
        with rpc_errors("reading the settler's balance"):
            balance = int(self.w3.eth.get_balance(self.account.address))
        self.metrics.settler_balance.set(balance)
        return balance

    def _watch_funds(self) -> None:
        balance = self._balance()
        if balance < self.settings.low_balance_wei:
            self._alert(
                "low_balance",
                f"settler {self.sender} holds {balance} wei, under SETTLEMENT_LOW_BALANCE_WEI "
                f"({self.settings.low_balance_wei}): top it up before batches stall",
            )

    def _alert(self, kind: str, message: str, subject: str = "") -> None:
        """Log at CRITICAL and count; the same alert repeats at most once a minute (the engine ticks every second),
        in whichever process leads the engine (the throttle is in the store). This process's own last claim is
        checked first: a throttled alert costs no write transaction, which would queue behind the ingest writer."""
        key, now = (kind, subject), self.clock()
        if now - self._claimed.get(key, float("-inf")) < ALERT_REPEAT_SECONDS:
            return
        with self.db.write() as conn:
            if not batch_q.claim_alert(conn, kind, subject, self._now(), int(ALERT_REPEAT_SECONDS * 1_000_000)):
                return
        self._claimed[key] = now
        self.metrics.alerts.labels(kind).inc()
        logger.critical("ALERT %s: %s", kind, message)
