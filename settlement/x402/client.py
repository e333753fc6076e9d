"""The payer's side of `channelhub` for the official `x402` package (`SchemeNetworkClient`): register it on an
`x402Client` (or `x402ClientSync`) and use x402's own httpx or requests transports; a 402 from a payee that
accepts `channelhub` is then paid with a voucher on one of the payer's channels to that payee.

Channels ("lanes"): a channel carries one payment in flight at a time, so that vouchers (cumulative amounts) never
race each other; concurrent requests to one payee use several channels, opened on demand up to `max_lanes`.
Deposits follow a documented policy (`DepositPolicy`): `multiple` prices, at least the payee's `minDeposit` hint
(followed up to `hint_limit` prices), at most `maximum`; a channel that cannot cover the next price is topped up by
the same amount. Both come from the payer's balance in the hub (a refund, earnings) when it holds enough, else from
its wallet.

A channel left because its payee stopped it (`channel_closed`, `stoppedAt`) is followed until its deposit is back
(`_reclaim`: its close requested, then finalized), and no new channel is opened to a payee that has `max_stopped` such
channels not back: a payee must not make the payer lock deposit after deposit.

Safety: the payer pays through the hub its `PayerClient` trusts only (requirements naming another hub or chain are
refused); every voucher is journalled before it leaves (`PayerClient.authorize`, or `authorize_now` on the event
loop), and concluded by the facilitator's receipt, or, refused in the payee's word, by what the service proves of it
(a payee's refusal alone never gives an amount back to the budgets). A refusal that says the position is stale
(another device paid, a response that was never charged) resynchronises from the service and x402's transport retries
with a fresh voucher; no voucher ever pays more than the price over the position the service proves.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar, NamedTuple, TypeVar

from eth_utils.address import to_checksum_address
from pydantic_core import PydanticSerializationError, to_json
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    append_payment_identifier_to_extensions,
    generate_payment_id,
)
from x402.interfaces import PaymentPayloadContext
from x402.schemas import (
    PaymentCreationContext,
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    PaymentResponseContext,
    RecoveredResponseResult,
)

from settlement.chain.addresses import ADDRESS_RULE, is_typed_address
from settlement.chain.node import rpc_errors
from settlement.domain.model import ETH, ChannelId, ChannelStatus, ChannelViewField, hex32_of, uint256_of
from settlement.errors import (
    BudgetExceededError,
    ChainUnavailableError,
    TransactionFailedError,
    UntrustedServiceError,
)
from settlement.sdk.answers import service_amount, service_channel_id, service_int, service_salt
from settlement.sdk.journal import LONGEST_PERIOD, Budget
from settlement.sdk.payer import Authorized, ChannelRef, PayerClient, Reclaim
from settlement.x402.wire import (
    SCHEME,
    PayloadError,
    VoucherPayload,
    base_units,
    is_payment_id,
    network_of,
    same_address,
)

T = TypeVar("T")
_ONE_REQUEST: ContextVar[str | None] = ContextVar("channelhub_one_request", default=None)  # PaymentIdentifiers
PREPARED_KEPT = 1024  # payments made ahead by the hook and not yet handed over (aborted ones fall out oldest first)
# Refusals after which the payer's position is re-read and the payment tried once more.
STALE_REASONS = frozenset({"overpayment", "underpayment", "stale_voucher", "voucher_replayed"})


class Party(NamedTuple):
    """Whom a payment pays, in what: a payer's channels are kept per payee and asset."""

    payee: str  # checksummed
    asset: str  # checksummed token address (ETH: the zero address)


class Prepared(NamedTuple):
    """A payment the hook made ahead, for `create_payment_payload` to hand over (or its refusal, to raise there)."""

    requirements: PaymentRequirements  # the very object it was made for
    made: dict[str, Any] | Exception


@dataclass
class Lane:
    """One channel of the payer to one payee in one asset, and the payment it carries now, if any."""

    channel: ChannelRef
    deposit: int
    busy_since: float | None = None  # monotonic time the payment in flight was signed
    counted: bool = True  # the service counts `deposit` (confirmed): a new channel or top-up is not, until it says so
    key: str | None = None  # that payment's journal key
    cumulative: int | None = None  # and its voucher's cumulative amount
    topping: int | None = None  # the nonce of a top-up the node took whose receipt was never read: it may be mined

    def carry(self, since: float | None) -> None:
        """Busy from `since` with a payment not signed yet, or free (None)."""
        self.busy_since, self.key, self.cumulative = since, None, None

    def topping_at(self, nonce: int) -> None:
        self.topping = nonce


@dataclass(frozen=True)
class Unsure:
    """A channel this client asked the hub to open whose outcome it never learnt (the open's receipt not read: the
    node went away, a timeout): mined later, it holds a deposit of the payer's, so it is looked for before another
    channel is opened to its payee."""

    channel: ChannelRef
    nonce: int  # the payer's transaction that the node took last before the open failed: the open, or its approval


@dataclass
class Stopped:
    """A channel this client left because its payee stopped it at the service, until its deposit is back."""

    channel: ChannelRef
    since: float  # monotonic: when the client left it


@dataclass
class DepositPolicy:
    """How much a new channel (or a top-up) locks: `multiple` prices, at least the payee's `minDeposit` hint when
    `follow_hint`, but the hint only up to `hint_limit` prices (None: any hint), never more than `maximum` (None: no
    cap).

    The hint is the payee's word: followed without a limit, a hostile payee (a price of 1 wei, a hint of the payer's
    whole wallet) would have the payer lock all it holds in a channel to that payee, to wait out the challenge period
    to get it back. The default limit is the hint an honest payee gives by default (`ChannelHubServerScheme`'s
    `deposit_multiple`, 1,000 prices)."""

    multiple: int = 100
    follow_hint: bool = True
    maximum: int | None = None
    hint_limit: int | None = 1_000

    def __post_init__(self) -> None:
        if self.multiple < 1 or (self.hint_limit is not None and self.hint_limit < 1):
            raise ValueError("a deposit policy's multiple and hint limit are whole numbers of prices, at least 1")

    def amount(self, price: int, hint: int | None) -> int:
        wanted = price * self.multiple
        if self.follow_hint and hint is not None:
            wanted = max(wanted, hint if self.hint_limit is None else min(hint, price * self.hint_limit))
        if self.maximum is not None:
            wanted = min(wanted, self.maximum)
        if wanted < price:
            raise ValueError(f"the deposit cap {self.maximum} cannot cover one payment of {price}")
        return wanted


@dataclass
class ChannelHubClientScheme:
    """Pay `channelhub` requirements with `payer`'s channels."""

    payer: PayerClient
    policy: DepositPolicy = field(default_factory=DepositPolicy)
    max_lanes: int = 16
    lane_timeout: float = 120.0  # a payment whose answer never came is looked up after this long
    # How long a payment waits for the service to count a deposit just made (its confirmations); past it the payment
    # fails, and the channel stays this payer's lane, waited for again by the next payment that takes it.
    confirm_timeout: float = 60.0
    budgets: list[Budget] = field(default_factory=list)  # rolling limits per period, overall or per payee
    # Channels a payee stopped and whose deposits are not back yet, per payee and asset, beyond which no new channel
    # is opened to it; and how long such a channel is left to its payee's own close before this payer requests it.
    max_stopped: int = 2
    stopped_grace: float = 60.0
    # At most `max_opens` channels opened in any rolling `opens_period` seconds, all payees together (None: no limit).
    # A payee naming a new `payTo` in each 402 had the payer open a channel (a deposit locked, an open's gas) per
    # request, within any budget: budgets count payments, one price each, and `max_lanes` counts lanes per payee.
    max_opens: int | None = 32
    opens_period: float = 3600.0
    clock: Callable[[], float] = time.time  # what `opens_period` is counted by: unix time, kept in the journal
    scheme: ClassVar[str] = SCHEME  # what x402 registers it under; not a choice: `channelhub` only
    # A payment on a free lane whose position the journal holds is made on the event loop: one journal commit (the
    # disk's flush, ~0.1-0.3 ms on a local SSD) instead of a hand-off to a worker thread and back (~0.2 ms of CPU and
    # a wait for each side's turn under load). False: every payment in a worker thread (a journal on a slow disk).
    pay_on_loop: bool = True

    def __post_init__(self) -> None:
        if self.max_stopped < 1 or self.stopped_grace < 0:
            raise ValueError("max_stopped is at least 1 channel and stopped_grace at least 0 seconds")
        if self.confirm_timeout <= 0:
            raise ValueError("confirm_timeout is a time in seconds, more than 0")
        if (self.max_opens is not None and self.max_opens < 1) or not 0 < self.opens_period <= LONGEST_PERIOD:
            raise ValueError(
                "max_opens is at least 1 channel (None: no limit) and opens_period more than 0 seconds, at most "
                f"{LONGEST_PERIOD} (366 days)"
            )
        self.network = network_of(self.payer.domain.chain_id)
        self._lanes: dict[Party, list[Lane]] = {}
        self._by_channel: dict[str, Lane] = {}  # the same lanes by channel id (a payment's answer names its channel)
        self._opening: Counter[Party] = Counter()  # channels being opened per payee, not yet lanes
        self._stopped: dict[Party, list[Stopped]] = {}  # left for a stop, their deposits not back yet
        self._unsure: dict[Party, list[Unsure]] = {}  # opens that failed unanswered: maybe mined since
        self._guard = threading.Lock()
        # One deposit at a time (payments are made in worker threads): two opens must not read one hub balance or
        # one ERC-20 allowance as if each had it alone.
        self._funding = threading.Lock()
        self._prepared: OrderedDict[asyncio.Task[Any], Prepared] = OrderedDict()
        self.scheme_hooks = SimpleNamespace(
            on_before_payment_creation=self.on_before_payment_creation, on_payment_response=self.on_payment_response
        )
        # Payments are made in the scheme's own threads: in the event loop's shared default pool (six threads on two
        # cores) payments waiting for new channels, one deposit at a time, held every thread, and payments on free
        # lanes queued behind them (a payer at 64 concurrent requests fell from ~400 to ~54 paid a second while ~30
        # lanes opened; docs/benchmarks.md). Twice `max_lanes`: a payee's openings hold at most `max_lanes` threads,
        # its payments on lanes at most as many, and a payment beyond its lanes gets a thread to be refused at once.
        self._threads = ThreadPoolExecutor(2 * self.max_lanes, thread_name_prefix="channelhub-pay")

    def on_before_payment_creation(self, context: PaymentCreationContext) -> Coroutine[Any, Any, None] | None:
        """x402's hook before it asks this scheme for a payment. Under an event loop (x402Client) the payment is made
        here: on the loop when the journal alone can sign it (`pay_on_loop`, `_pay_now`), else in a worker thread:
        opening or topping up a channel waits for the chain (seconds), looking up a payment of unknown fate for the
        service, and an async app's other requests must not wait with it; `create_payment_payload` then hands the
        payment over. Without a loop (x402ClientSync) it is made inline, as before."""
        requirements = context.selected_requirements
        if not isinstance(requirements, PaymentRequirements) or requirements.scheme != self.scheme:
            return None
        _writable(context.payment_required)
        task = _current_task()
        if task is None:
            return None
        if self.pay_on_loop:
            try:
                made: dict[str, Any] | Exception | None = self._pay_now(requirements)
            except Exception as ex:
                made = ex
            if made is not None:
                self._keep(task, requirements, made)
                return None
        return self._prepare_in_thread(task, requirements)

    async def _prepare_in_thread(self, task: asyncio.Task[Any], requirements: PaymentRequirements) -> None:
        await asyncio.get_running_loop().run_in_executor(self._threads, self._prepare, task, requirements)

    def create_payment_payload(
        self,
        requirements: PaymentRequirements,
        extensions: dict[str, Any] | None = None,
        context: PaymentPayloadContext | None = None,
    ) -> dict[str, Any]:
        task = _current_task()  # the hook and this call run in one task: the payment x402 is making now
        with self._guard:
            prepared = None if task is None else self._prepared.pop(task, None)
        if prepared is not None and prepared.requirements is requirements:  # made by the hook for these very ones
            if isinstance(prepared.made, Exception):
                raise prepared.made
            return prepared.made
        return self._pay(requirements)

    def _prepare(self, task: asyncio.Task[Any], requirements: PaymentRequirements) -> None:
        """Make `task`'s payment for `requirements` (a worker thread); a refusal is raised where x402 asks for it.
        Keyed by the task, not the requirements: concurrent payments often share one requirements object."""
        try:
            made: dict[str, Any] | Exception = self._pay(requirements)
        except Exception as ex:
            made = ex
        self._keep(task, requirements, made)

    def _keep(
        self, task: asyncio.Task[Any], requirements: PaymentRequirements, made: dict[str, Any] | Exception
    ) -> None:
        """`task`'s payment, made by the hook, for `create_payment_payload` to hand over."""
        with self._guard:
            self._prepared[task] = Prepared(requirements, made)
            while len(self._prepared) > PREPARED_KEPT:  # payments another hook aborted: their lanes time out
                self._prepared.popitem(last=False)

    def _pay(self, requirements: PaymentRequirements) -> dict[str, Any]:
        price = self._check(requirements)
        lane = self._acquire(requirements, price)
        made = self._signed(lane, lambda key: self.payer.authorize(lane.channel, price, key, self.budgets))
        if made is None:  # not reached: authorize signs or raises
            raise RuntimeError("the payer's journal signed nothing")
        return made

    def _pay_now(self, requirements: PaymentRequirements) -> dict[str, Any] | None:
        """`_pay` on a free lane that covers the price, if the journal alone can sign it (`PayerClient.authorize_now`);
        None, nothing signed, when the payment would wait for the chain or the service (a channel to open, discover
        or top up, a payment of unknown fate to look up): a worker thread's."""
        price = self._check(requirements)
        party = self._party(requirements)
        with self._guard:
            lane = _idle(self._lanes.get(party, []))
            if lane is None or not lane.counted:  # a deposit the service may not count yet: a thread waits for it
                return None
            lane.carry(time.monotonic())
        return self._signed(
            lane, lambda key: self.payer.authorize_now(lane.channel, price, key, self.budgets, within=lane.deposit)
        )

    def _signed(self, lane: Lane, authorize: Callable[[str], Authorized | None]) -> dict[str, Any] | None:
        """The payment `authorize` signs under a new journal key on `lane` (held), or None; the lane is freed when it
        signs nothing."""
        key = uuid.uuid4().hex
        try:
            made = authorize(key)
        except BaseException:
            self._release(lane)
            raise
        if made is None:
            self._release(lane)
            return None
        lane.key, lane.cumulative = key, made.cumulative
        return VoucherPayload(ChannelId(lane.channel.hex_id), made.cumulative, made.signature).to_dict()

    def on_payment_response(self, context: PaymentResponseContext) -> RecoveredResponseResult | None:
        """x402's hook after a paid request: conclude the voucher, free its channel, recover from a stale position."""
        try:
            voucher = VoucherPayload.parse(context.payment_payload.payload)
        except PayloadError:
            return None  # another scheme's payment
        lane = self._lane_of(voucher.channel_id)
        if lane is None or lane.key is None:
            return None
        settled = context.settle_response
        try:
            if settled is not None and settled.success:
                receipt = (settled.extra or {}).get("receipt")
                receipt = receipt if isinstance(receipt, dict) else {}
                if _for_another(receipt, voucher):
                    # The answer an earlier payment under this payment's identifier bought, given again (x402's
                    # retry of a logical request with a payment made afresh): this voucher was not taken. Where the
                    # channel stands, and so this payment's fate, is the service's word, not the payee's.
                    self.payer.resynchronise(lane.channel)
                    return None
                self.payer.concluded(lane.channel, lane.key, receipt)
                return None
            # Refused, in the payee's word. A hostile payee can store the voucher at the service and still answer
            # a refusal, so the payment stays pending (counted against the budgets) until the service proves its
            # fate: at once where the refusal asks for the position to be read again, else at the channel's next
            # payment (`PayerClient.authorize`). Put back on the payee's word, a position proven higher by the
            # service afterwards was paid without being counted: budgets did not bound such a payee.
            # A refusal at verify comes back as a new 402 whose `error` is the reason; one at settle, in the answer.
            required = context.payment_required
            reason = settled.error_reason if settled is not None else getattr(required, "error", None)
            if reason in STALE_REASONS:
                self.payer.resynchronise(lane.channel)
                return RecoveredResponseResult()
            if reason == "channel_closed":
                # Not on the payee's word alone: a hostile payee that answers `channel_closed` for an open channel
                # must not make the payer open channels, and lock deposits, one after another. Stopped by its payee
                # at the service (the payee is closing it), or no longer open on the hub: pay on another one.
                stopped = self.payer.stopped(lane.channel)
                if stopped or not self.payer.is_open(lane.channel):
                    self.payer.resynchronise(lane.channel)
                    self._drop(lane, followed=stopped)
                    return RecoveredResponseResult()
            return None
        finally:
            self._release(lane)

    def unanswered(self, payload: PaymentPayload) -> None:
        """A paid request came back with neither a payment answer nor a 402 x402 can read: the payee's handler failed
        (x402's middleware settles nothing then), the payee could not reach its facilitator (a 503), a proxy rewrote
        the header; or it got no answer at all (the connection dropped, a timeout: the payee may have settled it or
        not). x402 runs no hook for it, so the payment's channel would stay busy for `lane_timeout` and new channels be
        opened meanwhile. Freed now; the payment stays pending in the journal, and the next payment on the channel
        first asks the service what became of it (`PayerClient.authorize`): charged at most once, whatever the payee
        did with it.

        Called by the wire that saw the answer (`settlement.x402.ahead.PayAheadTransport(..., unanswered=...)`)."""
        try:
            voucher = VoucherPayload.parse(payload.payload)
        except PayloadError:
            return  # another scheme's payment
        with self._guard:
            lane = self._by_channel.get(voucher.channel_id)
            if lane is not None and lane.key is not None and lane.cumulative == voucher.cumulative:
                lane.carry(None)

    # --- requirements ----------------------------------------------------------------------------------------

    def _check(self, requirements: PaymentRequirements) -> int:
        if requirements.scheme != SCHEME or requirements.network != self.network:
            raise ValueError(
                f"this payer pays {SCHEME} on {self.network}, not {requirements.scheme} on {requirements.network}"
            )
        hub = (requirements.extra or {}).get("hub")
        if not isinstance(hub, str) or not same_address(hub, self.payer.hub.address):
            raise ValueError(
                f"the payee asks for payment through hub {hub!r}; this payer trusts {self.payer.hub.address}"
            )
        price = base_units(requirements.amount)
        if price is None:
            raise ValueError(f"the payee's price {requirements.amount!r} is not a positive integer of base units")
        for field_name, address in (("payTo", requirements.pay_to), ("asset", requirements.asset)):
            if not _typed(address):  # a typo in the payee's own config: a deposit locked for no one
                raise ValueError(f"the payee's {field_name} {address!r} is not an address ({ADDRESS_RULE})")
        return price

    # --- lanes -------------------------------------------------------------------------------------------------

    def _acquire(self, requirements: PaymentRequirements, price: int) -> Lane:
        party = self._party(requirements)
        payee, asset = party
        hint = base_units((requirements.extra or {}).get("minDeposit"))  # not a whole amount: no hint
        with self._guard:
            lanes = self._lanes.get(party)
            if lanes is None:  # the first payment to this payee here: its channels opened before (a restart)
                # Once only: found again while a payment of ours was opening a channel (its lane not yet listed),
                # that channel was listed twice, two payments ran on it at once, and one lane stayed busy for good.
                lanes, stopped = self._discover(payee, asset)
                self._lanes[party] = lanes
                self._stopped.setdefault(party, []).extend(stopped)
                self._by_channel.update((lane.channel.hex_id, lane) for lane in lanes)
            now = time.monotonic()
            free = _idle(lanes)
            if free is None:  # an answer that never came: its payment is looked up when the lane is used again
                free = next((lane for lane in lanes if now - (lane.busy_since or now) > self.lane_timeout), None)
            # Channels being opened count too: each payment that found no free lane saw the same short list.
            in_flight = len(lanes) + self._opening[party]
            if free is None and in_flight >= self.max_lanes:
                raise ValueError(f"{in_flight} payments to {payee} are in flight already (max_lanes)")
            if free is not None:
                free.carry(now)
            else:
                self._opening[party] += 1
        token = None if asset == ETH else asset
        if free is None:
            try:
                free = self._adopted(party)
                if free is None:
                    deposit = self.policy.amount(price, hint)
                    with self._funding:
                        planned = self.payer.planned_channel(payee, token)
                        self._may_open(planned)
                        taken: list[int] = []  # the nonce of an open the node took, its outcome unknown
                        try:
                            self._reclaim(party)
                            with self._taken(taken.append):
                                channel = self._funded(
                                    token,
                                    deposit,
                                    lambda held: self.payer.open_channel(
                                        payee, deposit, token=token, from_balance=held, salt=planned.salt
                                    ),
                                )
                        except BaseException:
                            if taken:  # it may be mined yet: looked for before the next open, and still counted
                                self._unsure_of(party, Unsure(planned, taken[0]))
                            elif self.max_opens is not None:
                                self.payer.journal.unclaim_open(planned.hex_id)
                            raise
                    free = Lane(channel, deposit, busy_since=time.monotonic(), counted=False)
            finally:  # an opening ends as a lane once its channel is on chain, or as nothing when it failed
                with self._guard:
                    self._opening[party] -= 1
                    if free is not None:
                        self._lanes[party].append(free)
                        self._by_channel[free.channel.hex_id] = free
                    elif not (self._lanes[party] or self._opening[party] or self._stopped.get(party)):
                        self._forget(party)
        try:
            self._cover(free, price, hint, token)
        except BaseException:
            # Freed, not held as if a payment were in flight: held, it was passed over for `lane_timeout` and the next
            # payments opened new channels beside it, a deposit each.
            self._release(free)
            raise
        return free

    def _forget(self, party: Party) -> None:
        """A payee this client holds nothing of (its one open failed, or was refused): its entries go, and its next
        payment looks for its channels again. Kept, a payee naming a new `payTo` at each request grew them for good,
        one payee a request (under `_guard`). An open of unknown outcome keeps them: it may be mined yet."""
        if self._unsure.get(party):
            return
        for held in (self._lanes, self._stopped, self._unsure, self._opening):
            held.pop(party, None)

    def _may_open(self, planned: ChannelRef) -> None:
        """Count `planned` against `max_opens` in `opens_period`, in the payer's journal (every client of its file
        together, across restarts); past it, refuse before anything is sent."""
        if self.max_opens is None:
            return
        now = self.clock()
        full = self.payer.journal.claim_open(planned.hex_id, now, self.opens_period, self.max_opens)
        if full is not None:
            raise BudgetExceededError(
                f"this payer opened {full.opened} channel{'s' if full.opened > 1 else ''} in the last "
                f"{self.opens_period:g}s, its max_opens: "
                f"no channel is opened to {planned.payee} (a payee naming a new payTo at each request?)",
                retryAfter=math.ceil(self.opens_period - (now - full.oldest)),
            )

    def _cover(self, lane: Lane, price: int, hint: int | None, token: str | None) -> None:
        """Make `lane`'s deposit, as the service counts it, cover the next price: waited for until the service counts
        what was deposited (a channel just opened, a top-up), and topped up if short. A deposit the chain took stays
        the lane's whatever the wait's end: a payment that waited in vain fails, and the next one waits again."""
        if lane.topping is not None:
            self._topped(lane)
        if not lane.counted:
            self._counted(lane)
        if self.payer.position(lane.channel) + price > lane.deposit:
            top_up = self.policy.amount(price, hint)
            with self._funding:
                with self._taken(lane.topping_at):
                    self._funded(token, top_up, lambda held: self.payer.top_up(lane.channel, top_up, from_balance=held))
                lane.deposit += top_up
                lane.counted = False
            self._counted(lane)

    def _funded(self, token: str | None, amount: int, deposit: Callable[[bool], T]) -> T:
        """`deposit(from_balance)`: from the payer's balance in the hub (a refund, earnings) when it holds `amount`,
        else from its wallet. Another app paying from the same key may spend that balance between the read and the
        deposit: refused while the balance is short of `amount`, the deposit is made from the wallet (before, the
        payment failed, "would revert")."""
        held = self.payer.hub_balance(token) >= amount
        try:
            return deposit(held)
        except TransactionFailedError:
            if not held or self.payer.hub_balance(token) >= amount:
                raise  # refused for something else than the balance
            return deposit(False)

    def _topped(self, lane: Lane) -> None:
        """The deposit of a lane whose last top-up's outcome is unknown, as the hub holds it once that top-up's nonce
        is mined (waited for up to `confirm_timeout`; still pending, the payment fails and the next one waits again;
        gone from the node's pool unmined, the deposit is as it was).
        Taken as it was, a top-up mined after all was not counted and the next payment topped up again: more of the
        payer's money locked than its policy asks."""
        nonce = lane.topping
        if nonce is None:
            return
        with rpc_errors(f"reading what became of the top-up of channel {lane.channel.hex_id}"):
            view = self._view_after(lane.channel, nonce)
            if view is None:
                if self.payer.w3.eth.get_transaction_count(self.payer.account.address, "pending") <= nonce:
                    lane.topping = None  # the node holds it no more: it left the pool unmined
                    return
                raise ChainUnavailableError(
                    f"the top-up of channel {lane.channel.hex_id} (nonce {nonce}) is not mined yet: retry later"
                )
        deposit = int(view[ChannelViewField.DEPOSIT])
        if deposit > lane.deposit:  # mined after all (a deposit read at a block by which the nonce is used has it)
            lane.deposit, lane.counted = deposit, False
        lane.topping = None

    def _counted(self, lane: Lane) -> None:
        self.payer.wait_until_known(lane.channel, min_deposit=lane.deposit, timeout=self.confirm_timeout)
        lane.counted = True

    def _unsure_of(self, party: Party, open_: Unsure) -> None:
        """Remember an open whose outcome is unknown; at most `max_lanes` a payee, the latest."""
        with self._guard:
            unsure = self._unsure.setdefault(party, [])
            unsure.append(open_)
            del unsure[: -self.max_lanes]

    def _adopted(self, party: Party) -> Lane | None:
        """A channel of an earlier open to this payee whose outcome was unknown and that the hub holds open now (mined
        after all), as a lane carrying the payment about to be made. An open still pending (its nonce not mined) is
        waited for, up to `confirm_timeout`: another open would be mined after it anyway (nonces go in order), and on a
        chain that mines every few seconds it was not mined yet when the next payment came. Checked only when a
        channel is about to be opened: without it, such a channel was never paid on (until a restart found it) and the
        next payment opened another."""
        with self._guard:
            unsure = self._unsure.pop(party, [])
        found, kept = None, []
        try:
            while unsure and found is None:
                view = self._outcome(unsure[0])  # raises with the node failing or behind: this payment fails
                earlier = unsure.pop(0)
                if view is None:
                    kept.append(earlier)  # still pending: looked for next time
                elif int(view[ChannelViewField.STATUS]) == ChannelStatus.OPEN:
                    deposit = int(view[ChannelViewField.DEPOSIT])
                    found = Lane(earlier.channel, deposit, busy_since=time.monotonic(), counted=False)
        finally:  # what was not read (one found already, or the node failing) is looked for next time
            with self._guard:
                self._unsure[party] = (kept + unsure + self._unsure.get(party, []))[-self.max_lanes :]
        return found

    def _outcome(self, earlier: Unsure) -> tuple[Any, ...] | None:
        """The hub's view of an open of unknown outcome, once that is known: the channel (any status), or nothing
        there though its nonce was used (it reverted, or it was the open's approval); None while still pending after
        `confirm_timeout`."""
        with rpc_errors(f"reading what became of the open of channel {earlier.channel.hex_id}"):
            return self._view_after(earlier.channel, earlier.nonce)

    def _view_after(self, channel: ChannelRef, nonce: int) -> tuple[Any, ...] | None:
        """The hub's view of `channel` at a block by which the payer's transaction `nonce` is mined (its nonce used),
        waited for up to `confirm_timeout`; None while it is not. Read at that block, not at "latest": a provider's
        balancer may send the read to a node behind the one that counted the nonce, where the hub did not hold what
        the transaction did yet (an open taken as never made, a top-up as not counted: made again). A node without
        the block refuses the read instead."""
        deadline = time.monotonic() + self.confirm_timeout
        while True:
            head = self.payer.w3.eth.block_number
            if self.payer.w3.eth.get_transaction_count(self.payer.account.address, head) > nonce:
                return tuple(self.payer.hub.functions.channel(channel.channel_id).call(block_identifier=head))
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)

    @contextmanager
    def _taken(self, note: Callable[[int], None]) -> Iterator[None]:
        """Around one of the payer's transactions: when it fails after the node took it (its receipt not read: it may
        be mined yet), `note` is given its nonce, to look for what became of it before the next payment."""
        sent = self.payer.transactor.last_nonce
        try:
            yield
        except Exception:
            nonce = self.payer.transactor.last_nonce
            if nonce is not None and nonce != sent:
                note(nonce)
            raise

    def _discover(self, payee: str, asset: str) -> tuple[list[Lane], list[Stopped]]:
        """This payer's open channels to the payee in the asset, as the service knows them (after a restart): the
        ones to pay on, and the ones the payee stopped, open or closing (their deposits to follow)."""
        lanes, stopped = [], []
        closing = self.payer.listed_channels(payee, asset, ChannelStatus.CLOSING)
        for listed in [*self.payer.listed_channels(payee, asset), *(c for c in closing if c.get("stoppedAt"))]:
            listed_id = service_channel_id(listed, "channelId")
            # The listing's salt, not a search of the hub's logs from block 0 (which a provider capping log ranges
            # refused: no payment after a restart); checked, as it must hash to the id with the parties the hub holds.
            salt = service_salt(listed)
            # Read at the block the listing is current to: a node behind it refuses (retryable), where at "latest"
            # it had no such channel and the service was taken for a liar.
            as_of = service_int(listed, "asOfBlock", "a block number")
            try:  # the hub's word, not the listing's: this payer's channel, to this payee, in this asset
                channel = self.payer.channel(listed_id, salt=salt, at_block=as_of)
            except ValueError as ex:
                raise UntrustedServiceError(f"the service lists {listed_id} among this payer's: {ex}") from ex
            if (channel.payee, channel.token) != (payee, asset):  # else its vouchers would pay someone else
                raise UntrustedServiceError(
                    f"the service lists {channel.hex_id} as a channel to {payee} in {asset}; the hub says it pays "
                    f"{channel.payee} in {channel.token}"
                )
            if listed.get("stoppedAt") is None:
                lanes.append(Lane(channel, service_amount(listed, "deposit")))
            else:
                stopped.append(Stopped(channel, time.monotonic()))
        return lanes, stopped

    def _party(self, requirements: PaymentRequirements) -> Party:
        return Party(_checksummed(requirements.pay_to), _checksummed(requirements.asset))

    def _lane_of(self, channel_id: str) -> Lane | None:
        with self._guard:
            return self._by_channel.get(channel_id)

    def _drop(self, lane: Lane, followed: bool) -> None:
        """Leave a channel that takes no more vouchers; if `followed` (its payee stopped it), its deposit is followed
        until it is back (`_reclaim`). One the payer's app closed itself is the app's to finalize, and counts for no
        payee."""
        with self._guard:
            for party, lanes in self._lanes.items():
                if lane in lanes:
                    lanes.remove(lane)
                    if followed:
                        self._stopped.setdefault(party, []).append(Stopped(lane.channel, time.monotonic()))
            if self._by_channel.get(lane.channel.hex_id) is lane:
                del self._by_channel[lane.channel.hex_id]

    def _reclaim(self, party: Party) -> None:
        """Before a new channel to a payee: follow the deposits of the channels left to it (`PayerClient.reclaim`:
        the close requested once a channel was left `stopped_grace` seconds to its payee's own, finalized once its
        challenge period is over), and refuse while `max_stopped` are not back. A payee that stopped every channel
        it was given and never closed them had this payer open channel after channel, each locking a deposit only
        the payer's own close could free, an hour each."""
        with self._guard:
            left = list(self._stopped.get(party, ()))
        back = []
        for stopped in left:
            try:
                ask = time.monotonic() - stopped.since >= self.stopped_grace
                if self.payer.reclaim(stopped.channel, request_close=ask) is Reclaim.BACK:
                    back.append(stopped)
            except TransactionFailedError:
                continue  # the payee closed it first: read again next time
        with self._guard:
            waiting = self._stopped[party] = [s for s in self._stopped.get(party, ()) if s not in back]
        if len(waiting) >= self.max_stopped:
            raise ValueError(
                f"{party.payee} stopped {len(waiting)} channels of this payer without closing them; no new channel is "
                f"opened to it until their deposits are back (closes requested after {self.stopped_grace:g}s, "
                "finalized after the hub's challenge period)"
            )

    def _release(self, lane: Lane) -> None:
        with self._guard:
            lane.carry(None)


class PaymentIdentifiers:
    """An x402 client extension (`x402Client.register_extension`): each payment carries an identifier when the payee
    declares x402's `payment-identifier` extension, so that sending the same paid request again (a lost answer, a
    timeout) is recognised as the same payment: answered again, charged once (docs/x402.md). A fresh one for each
    payment, or inside `one_request` the same one for every attempt of one logical request."""

    key = PAYMENT_IDENTIFIER
    hooks = None  # no lifecycle hooks: the payload carries it all
    transport_hooks = None

    def enrich_payment_payload(self, payload: PaymentPayload, required: PaymentRequired) -> PaymentPayload:
        declared = (required.extensions or {}).get(PAYMENT_IDENTIFIER)
        if declared is None:
            return payload
        extensions = dict(payload.extensions or {}) | {PAYMENT_IDENTIFIER: declared}
        identified = append_payment_identifier_to_extensions(extensions, _ONE_REQUEST.get())
        return payload.model_copy(update={"extensions": identified})

    @staticmethod
    @contextmanager
    def one_request(identifier: str | None = None) -> Iterator[str]:
        """Inside, every payment carries `identifier` (or one made now, given back): x402's logical request, whose
        attempts are one payment. An app's own retry of a request whose answer it never got (a timeout, a connection
        lost after the payee settled; a POST, which the transport does not send again) is then answered with what the
        first attempt bought, charged once; each attempt outside pays anew. One logical request inside: two different
        requests to one route inside get one answer."""
        chosen = identifier if identifier is not None else generate_payment_id()
        if not is_payment_id(chosen):
            raise ValueError("a payment identifier is 16-128 of A-Z, a-z, 0-9, _ and -")
        token = _ONE_REQUEST.set(chosen)
        try:
            yield chosen
        finally:
            _ONE_REQUEST.reset(token)


def _for_another(receipt: dict[str, Any], voucher: VoucherPayload) -> bool:
    """Whether a receipt names another voucher than `voucher` (a receipt without those fields names none)."""
    channel, cumulative = hex32_of(receipt.get("channelId")), uint256_of(receipt.get("cumulativeAmount"))
    return (channel is not None and channel != voucher.channel_id) or (
        cumulative is not None and cumulative != voucher.cumulative
    )


def _idle(lanes: list[Lane]) -> Lane | None:
    """The first lane that carries no payment now, one whose deposit the service counts first."""
    uncounted = None
    for lane in lanes:
        if lane.busy_since is None:
            if lane.counted:
                return lane
            uncounted = uncounted or lane
    return uncounted


def _writable(required: object) -> None:
    """Refuse a payee's 402 whose payment x402 could not write into its header (a lone surrogate, which Python's JSON
    reader takes from the 402's header, in the requirements, the resource or the extensions it copies into the
    payment), before anything is signed (1.8 µs): signed and then not sent, the voucher kept its channel busy for
    `lane_timeout`, and the pay-ahead transport raised pydantic-core's error to the app."""
    try:
        to_json(required)
    except PydanticSerializationError as ex:
        raise ValueError(f"the payee's payment requirements cannot be written into a payment header: {ex}") from None


@functools.lru_cache(maxsize=1024)
def _typed(address: str) -> bool:
    """`is_typed_address`, once per address (its checksum check is a keccak, on every payment otherwise)."""
    return is_typed_address(address)


@functools.lru_cache(maxsize=1024)
def _checksummed(address: str) -> str:
    """A payee's or an asset's address in EIP-55 form, computed once per address (a keccak each time otherwise: ~6 %
    of a busy payer's CPU)."""
    return to_checksum_address(address)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return None
