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
flight at a time. The watchtower part: a closing channel with unsettled vouchers makes the next tick settle at once,
and alerts (log + metric) fire when its deadline comes near or passes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import TransactionNotFound
from web3.logs import DISCARD
from web3.types import TxParams, TxReceipt

from settlement.batch_encoding import SettleEntry, decode_settlements, encode_batch
from settlement.chain import GAS_HEADROOM, access_list_plan, rpc_errors
from settlement.config import Settings
from settlement.errors import ChainError, SettlementError
from settlement.metrics import Metrics
from settlement.model import Channel, ChannelStatus, utcnow
from settlement.store import Database
from settlement.store import channels as channel_q
from settlement.store import settlements as batch_q
from settlement.store.settlements import Batch, Entry, SentTx

logger = logging.getLogger(__name__)

SETTLED = 0  # entry outcome; 1..6 are the hub's VoucherSkipped reasons
ALERT_REPEAT_SECONDS = 60.0
UNSETTLED_REPORT_SECONDS = 10.0  # how often the unsettled-value gauge (a sum over every channel) is refreshed
NONCE_USED_GRACE_SECONDS = 15.0  # a batch's nonce used with no receipt of ours this long: another tx took it


@dataclass(frozen=True)
class TickResult:
    """What one tick did: the batch it started (if any) and the batches whose outcome it recorded."""

    started: str | None
    finished: list[str]


class Settler:
    """Runs on one process at a time (see settlement.lease); `tick()` is one step of the engine."""

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
        self._last_batch_at = clock()
        self._chain_id: int | None = None
        self._alerted: dict[tuple[str, str], float] = {}
        self._nonce_used_since: dict[str, float] = {}
        self._unsettled_at: float | None = None

    @property
    def sender(self) -> str:
        return str(self.account.address)

    # --- the engine step ---------------------------------------------------------------------------------------

    def tick(self, *, force: bool = False) -> TickResult:
        """Move open batches on; then start a new batch if one is due (or `force`) and none is in flight.

        A tick that starts nothing reads only open batches and closing channels: the settleable channels (possibly
        hundreds of thousands) are read, LIMITed to one batch, only when a batch may start.
        """
        finished = self.reconcile()
        with self.db.read() as conn:
            in_flight = batch_q.open_batches(conn)
            closing = batch_q.closing_with_work(conn)
        self._watch(closing)
        self._watch_funds()
        self._report_unsettled()
        if in_flight:
            return TickResult(None, finished)
        interval_over = self.clock() - self._last_batch_at >= self.settings.settle_interval
        if not (force or closing or interval_over):
            return TickResult(None, finished)
        with self.db.read() as conn:
            candidates = batch_q.settleable(conn, limit=self.settings.batch_max_entries)
        urgent = any(c.status == ChannelStatus.CLOSING for c in candidates)
        if not (force or urgent or interval_over):
            return TickResult(None, finished)
        chosen = self._choose(candidates)
        if not chosen:
            self._last_batch_at = self.clock()
            return TickResult(None, finished)
        return TickResult(self._start(chosen), finished)

    def _report_unsettled(self) -> None:
        """The unsettled-value gauge sums every channel: refreshed every UNSETTLED_REPORT_SECONDS, not every tick."""
        now = self.clock()
        if self._unsettled_at is not None and now - self._unsettled_at < UNSETTLED_REPORT_SECONDS:
            return
        self._unsettled_at = now
        with self.db.read() as conn:
            unsettled = channel_q.unsettled_by_token(conn)
        for token, value in unsettled.items():
            self.metrics.unsettled.labels(token).set(value)

    def _choose(self, candidates: list[Channel]) -> list[Channel]:
        """Closing channels first (nearest deadline first), then the largest unsettled amounts."""
        closing = sorted(
            (c for c in candidates if c.status == ChannelStatus.CLOSING), key=lambda c: c.close_deadline or 0
        )
        regular = sorted(
            (
                c
                for c in candidates
                if c.status == ChannelStatus.OPEN and c.accepted - c.settled >= self.settings.min_settle_amount
            ),
            key=lambda c: c.settled - c.accepted,
        )
        return [*closing, *regular][: self.settings.batch_max_entries]

    # --- starting a batch --------------------------------------------------------------------------------------

    def _start(self, chosen: list[Channel]) -> str | None:
        entries = [Entry(c.channel_id, c.accepted, c.signature or b"") for c in chosen if c.signature]
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
            batch_q.create_batch(conn, batch_id, self.sender, nonce, entries, utcnow())
        self._last_batch_at = self.clock()
        logger.info("batch %s: %d channels, nonce %d", batch_id, len(entries), nonce)
        with self.db.read() as conn:
            batch = next(b for b in batch_q.open_batches(conn) if b.batch_id == batch_id)
        self._send(batch, previous=None, estimate=plain)
        return batch_id

    def _tx(self, entries: list[Entry], channels: dict[str, Channel]) -> TxParams:
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
            self._alert(
                "low_funds",
                f"settler {self.sender} holds {balance} wei, batch {batch.batch_id} may need {gas * max_fee}: "
                "top it up; the batch waits",
                batch.batch_id,
            )
            return
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
            created_at=utcnow(),
        )
        with self.db.write() as conn:
            batch_q.add_tx(conn, batch.batch_id, tx)
        self._broadcast(batch, tx)

    def _broadcast(self, batch: Batch, tx: SentTx) -> None:
        try:
            with rpc_errors(f"sending batch {batch.batch_id}"):
                self.w3.eth.send_raw_transaction(tx.raw)
        except ChainError as ex:
            text = str(ex).lower()
            if not any(known in text for known in ("already known", "already imported", "nonce too low")):
                logger.warning("batch %s: %s; retrying on the next tick", batch.batch_id, ex.message)
                return
        with self.db.write() as conn:
            batch_q.mark_sent(conn, batch.batch_id, tx.tx_hash, utcnow())

    def _fees(self, previous: SentTx | None) -> tuple[int, int]:
        cap = self.settings.max_fee_per_gas
        if previous is None:
            with rpc_errors("reading the base fee"):
                base = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0))
            priority = min(self.settings.priority_fee_per_gas, cap)
            return min(2 * base + priority, cap), priority
        factor = 100 + self.settings.bump_percent
        priority = min(max(previous.priority_fee * factor // 100, previous.priority_fee + 1), cap)
        return min(max(previous.max_fee * factor // 100, previous.max_fee + 1), cap), priority

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
                self._nonce_used_since.pop(batch.batch_id, None)  # it was ours after all
                return self._mined(batch, receipt)
        with rpc_errors("reading the settler's nonce"):
            used = self.w3.eth.get_transaction_count(self.account.address, "latest")
        if used > batch.nonce:
            if any(self._receipt(tx.tx_hash) is not None for tx in txs):
                return False  # mined between the two reads: the next tick records it
            # A node can show the nonce as used before it serves the receipt: conclude only if that lasts.
            first_seen = self._nonce_used_since.setdefault(batch.batch_id, self.clock())
            if self.clock() - first_seen < NONCE_USED_GRACE_SECONDS:
                return False
            del self._nonce_used_since[batch.batch_id]
            with self.db.write() as conn:
                batch_q.finish_batch(
                    conn, batch.batch_id, status="failed", now=utcnow(), error="nonce used by another transaction"
                )
            self.metrics.batches.labels("failed").inc()
            logger.error("batch %s failed: its nonce %d was used by another transaction", batch.batch_id, batch.nonce)
            return True
        last = txs[-1]
        if last.sent_at is not None and (utcnow() - last.sent_at).total_seconds() >= self.settings.bump_after:
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
            return False
        now = utcnow()
        tx_hash = HexBytes(receipt["transactionHash"]).to_0x_hex()

        def record(status: str, outcomes: dict[str, int] | None, error: str | None) -> None:
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

    def _entries(self, batch: Batch) -> dict[str, Entry]:
        with self.db.read() as conn:
            return {e.channel_id: e for e in batch_q.entries_of(conn, batch.batch_id)}

    def _outcomes(self, batch: Batch, receipt: TxReceipt) -> dict[str, int]:
        """Each entry's outcome as the hub's events tell it, never as what was sent."""
        entries = self._entries(batch)
        outcomes: dict[str, int] = {}
        for event in self.hub.events.ChannelsSettled().process_receipt(receipt, errors=DISCARD):
            for key, cumulative in decode_settlements(event["args"]["settlements"]):
                if key in entries and entries[key].cumulative == cumulative:
                    outcomes[key] = SETTLED
        for event in self.hub.events.VoucherSkipped().process_receipt(receipt, errors=DISCARD):
            key = "0x" + bytes(event["args"]["channelId"]).hex()
            if key in entries and key not in outcomes:
                outcomes[key] = int(event["args"]["reason"])
        return outcomes

    # --- the watchtower ----------------------------------------------------------------------------------------

    def _watch(self, closing: list[Channel]) -> None:
        self.metrics.closes_pending.set(len(closing))
        if not closing:
            self.metrics.close_seconds_left.set(float("inf"))
            return
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
        """Log at CRITICAL and count; the same alert repeats at most once a minute (the engine ticks every second)."""
        key = (kind, subject)
        now = self.clock()
        if now - self._alerted.get(key, float("-inf")) < ALERT_REPEAT_SECONDS:
            return
        self._alerted[key] = now
        self.metrics.alerts.labels(kind).inc()
        logger.critical("ALERT %s: %s", kind, message)
