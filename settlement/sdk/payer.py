"""The payer SDK: open and fund channels on chain, then pay by signing vouchers and posting them to the service.

    client = PayerClient(private_key, rpc_url="http://127.0.0.1:8545", service_url="http://127.0.0.1:8000")
    channel = client.open_channel(payee, deposit=10**18)           # ETH; token=... for an ERC-20
    receipt = client.pay(channel, 1_000, reference="order-17")     # one micro-payment, no transaction
    client.close(channel)                                           # starts the challenge period

The client never signs more than the app asked for, whatever the service says or does:
- every payment has an idempotency key (the caller's, or one the client makes); it is written to the payer's
  journal (settlement.sdk.journal, a file of its own) with the voucher BEFORE the voucher is sent. `pay` again
  with the same key after PaymentUncertainError re-sends that same voucher, in this process or after a restart, so
  it ends with exactly one payment; the service knows the key too, and answers a retry signed elsewhere with the
  first receipt;
- its position on a channel is the highest amount it signed itself (in the journal). A position reported by the
  service is taken only when proven by a voucher this payer signed (the channel's latest signature), or from the
  chain's settled amount; anything else raises UntrustedServiceError;
- the hub it sends deposits to is the one its caller names (`hub_address`), or, when none is named, the one the
  service names only after the chain shows ChannelHub's code there and the same EIP-712 domain.
A channel with a payment of unknown outcome pays nothing new until that payment's outcome is known.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import BadFunctionCallOutput, ContractCustomError, ContractLogicError

from settlement.chain.addresses import checksummed
from settlement.chain.contracts import HUB, erc20_errors, load_artifact
from settlement.chain.deployment import hub_at
from settlement.chain.node import Transactor, connect, rpc_errors
from settlement.domain.model import ETH, ChannelStatus, ChannelViewField, Receipt, signature_of
from settlement.domain.redaction import text_start
from settlement.eip712.vouchers import Domain, VoucherSigner, VoucherVerifier, read_domain
from settlement.eip712.vouchers import channel_id as channel_id_of
from settlement.errors import (
    PaymentUncertainError,
    ServiceRejectedError,
    TransactionFailedError,
    UntrustedServiceError,
    WaitTimeoutError,
)
from settlement.sdk.answers import (
    answer_object,
    json_of,
    refusal,
    service_address,
    service_amount,
    service_channel_id,
    service_int,
    service_salt,
    service_text,
    unanswered,
)
from settlement.sdk.bounded import bounded_client
from settlement.sdk.journal import Budget, JournalPayment, PayerJournal, PaymentStatus
from settlement.sdk.loop_commits import LoopCommits
from settlement.sdk.signin import SignInAuth

ERC20_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "approve",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "spender", "type": "address"}, {"name": "amount", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "function",
        "name": "allowance",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
]
_RETRYABLE = {429, 502, 503, 504}  # 429: this address is over its rate; the retry waits
DEFAULT_STATE_DIR = Path.home() / ".channelhub"
STALE_RETRIES = 20  # other instances paying on the same channel at once; each attempt loses only to a winner
TOKEN_DEPOSIT_TRIES = 3  # a token deposit whose approval another app of the same key spent first: approved again
SALT_RANDOM_BYTES = 8  # a default salt is this many random bytes, left-padded to 32: cheap calldata at settlement


class Authorized(NamedTuple):
    """A voucher `PayerClient.authorize` signed for someone else to deliver."""

    cumulative: int  # the channel's new cumulative total, in base units
    signature: bytes  # EIP-712, 65 bytes


class Reclaim(StrEnum):
    """Where a channel's unspent deposit stands (`PayerClient.reclaim`)."""

    OPEN = "open"  # the channel is open: its deposit is locked in it
    CLOSING = "closing"  # its challenge period runs: the deposit comes back once it is over and the close finalized
    BACK = "back"  # closed: what was not paid out is in this payer's balance in the hub


@dataclass(frozen=True)
class ChannelRef:
    """What names a channel: enough to pay on it, close it, or find it again after a restart."""

    channel_id: bytes
    payee: str
    token: str
    salt: bytes

    @property
    def hex_id(self) -> str:
        return "0x" + self.channel_id.hex()

    def __str__(self) -> str:
        asset = "ETH" if self.token == ETH else self.token
        return f"channel {self.hex_id} to {self.payee} in {asset}"

    def __repr__(self) -> str:
        return f"ChannelRef(channel_id={self.hex_id}, payee={self.payee}, token={self.token}, salt=0x{self.salt.hex()})"


def checked_hub(w3: Web3, answer: dict[str, Any], hub_address: str | None) -> tuple[Contract, Domain]:
    """The hub the service names (`answer`: its /v1/eip712) and its EIP-712 domain as the chain reports it, after
    checking that the address holds ChannelHub's code, that the service signs for that very domain, and that it is
    `hub_address` when one is configured: value is never sent to an address on the service's word alone."""
    info = answer.get("domain")
    if not isinstance(info, dict):
        raise UntrustedServiceError(f"the service's /v1/eip712 names no domain: {str(info)[:80]!r}")
    named = service_address(info, "verifyingContract")
    chain_id = service_int(info, "chainId", "a number")
    if hub_address is not None and named != to_checksum_address(hub_address):
        raise UntrustedServiceError(f"the service signs for hub {named}, not for {hub_address} as configured")
    hub = hub_at(w3, named)
    if hub is None:
        raise UntrustedServiceError(f"the service names hub {named}, which holds no ChannelHub code on this chain")
    domain = read_domain(hub)
    claimed = Domain(chain_id, named, service_text(info, "name"), service_text(info, "version"))
    if claimed != domain:
        raise UntrustedServiceError(f"the service's EIP-712 domain {claimed} is not the hub's {domain}")
    return hub, domain


class PayerClient:
    """One payer's view of the hub and the service. Thread-safe; payments on one channel are serialized."""

    def __init__(
        self,
        private_key: str,
        rpc_url: str,
        service_url: str,
        *,
        hub_address: str | None = None,
        state_path: Path | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.2,
        http: httpx.Client | None = None,
        loop_commits: LoopCommits | None = None,
        max_fee_per_gas: int | None = None,
        rpc_fallback_urls: Sequence[str] = (),
    ) -> None:
        """`hub_address`: the hub to trust (from the operator's deployment record); without it, the hub the service
        names is checked on chain. `state_path`: the payer's journal (default ~/.channelhub/<chain>-<hub>-<payer>
        .sqlite3); keep it across restarts, it is what makes a retry after a crash safe. `loop_commits`: when the
        journal's disk is too slow for payments made on an event loop (`authorize_now`; default `LoopCommits()`).
        `max_fee_per_gas` (wei): the most its transactions (opens, top-ups, closes) offer a gas, re-priced with the
        chain's base fee while unmined (settlement.chain.node.Transactor); None follows the base fee alone.
        `rpc_fallback_urls`: more RPC URLs of the same chain, tried in order when `rpc_url` fails (each held to its
        chain: settlement.chain.provider)."""
        self.account: LocalAccount = Account.from_key(private_key)
        self._rpc_session = requests.Session()
        self.w3: Web3 = connect(rpc_url, timeout, self._rpc_session, fallbacks=rpc_fallback_urls)
        self.http = http or bounded_client(service_url, timeout)
        self.retries = retries
        self.backoff = backoff
        try:
            self.hub, self.domain = checked_hub(self.w3, self._get("/v1/eip712"), hub_address)
            if self.http.auth is None:  # reads of its own channels: signed in with its own key when asked to
                self.http.auth = SignInAuth(self.account, service_url, self.domain.chain_id)
            abi = load_artifact(HUB).abi + erc20_errors()  # a token deposit's refusals come from the token
            self.transactor = Transactor(self.w3, self.account, abi, max_fee_per_gas=max_fee_per_gas)
        except BaseException:
            self.http.close()
            self._rpc_session.close()
            raise
        self._verifier = VoucherVerifier(self.domain)
        self.signer = VoucherSigner(self.account, self.domain)
        self.journal = PayerJournal(
            state_path
            or DEFAULT_STATE_DIR / f"{self.domain.chain_id}-{self.hub.address}-{self.account.address}.sqlite3"
        )
        self.loop_commits = loop_commits or LoopCommits()
        self._locks: dict[bytes, threading.Lock] = {}
        self._guard = threading.Lock()
        # One token deposit (its approval, then the open or top-up that spends it) at a time: two at once each read
        # the allowance before the other's was spent or set, and one of them was left short (its open reverted).
        self._token_deposits = threading.Lock()

    @property
    def address(self) -> str:
        return str(self.account.address)

    # --- on chain ----------------------------------------------------------------------------------------------

    @rpc_errors("opening a channel")
    def open_channel(
        self,
        payee: str,
        deposit: int,
        *,
        token: str | None = None,
        salt: bytes | None = None,
        from_balance: bool = False,
    ) -> ChannelRef:
        """Lock `deposit` (base units) for `payee` in a new channel; an ERC-20 is approved first if needed.

        The default salt is 8 random bytes in a 32-byte word: every settlement of the channel carries the salt in
        calldata, where a zero byte costs 4 gas and another 16, so this saves ~290 gas per settlement over 32
        random bytes. It only has to differ between this payer's channels to one payee in one asset (a clash makes
        `open` revert with ChannelHubChannelExists, nothing is lost). `from_balance`: the deposit comes from this
        payer's balance in the hub (a refund, earnings) instead of its wallet.
        """
        ref = self.planned_channel(payee, token, salt)
        payee, asset, salt = ref.payee, ref.token, ref.salt
        if from_balance:
            self.transactor.send(self.hub.functions.openFromBalance(payee, asset, salt, deposit))
        elif asset == ETH:
            self.transactor.send(self.hub.functions.open(payee, asset, salt, deposit), value=deposit)
        else:
            self._token_deposit(asset, deposit, self.hub.functions.open(payee, asset, salt, deposit))
        self.journal.reset(ref.hex_id)  # new on this chain (open reverts otherwise): whatever the journal held is void
        return ref

    def planned_channel(self, payee: str, token: str | None = None, salt: bytes | None = None) -> ChannelRef:
        """The channel `open_channel(payee, ..., token=token, salt=ref.salt)` opens, named before it is sent (a new
        salt unless given): an open whose outcome is unknown (its receipt never read: the node went away, a timeout)
        may still be mined, and the hub then holds this id."""
        asset = checksummed(token, "token") if token else ETH
        salt = salt if salt is not None else os.urandom(SALT_RANDOM_BYTES).rjust(32, b"\0")
        payee = checksummed(payee, "payee")  # a pasted address with a typo: a deposit locked for no one
        return ChannelRef(channel_id_of(self.address, payee, asset, salt), payee, asset, salt)

    @rpc_errors("reading a channel from the hub")
    def channel(
        self, channel_id: str | bytes, *, salt: bytes | None = None, from_block: int = 0, at_block: int | None = None
    ) -> ChannelRef:
        """Rebuild the reference of one of this payer's channels from its id (after a restart): its payee and asset
        from the hub, its salt from `salt`, else the service's (checked: with the hub's parties it must hash to the
        id), else the channel's ChannelOpened log searched from `from_block` (a provider that caps log ranges refuses
        a long search: `ChainError`; pass `salt` or a recent `from_block`).

        `at_block`: the block to read the hub at, for a channel known to exist by then (the service's `asOfBlock`):
        a node behind it (a provider's balancer sends reads to one) refuses (`ChainError`), where at "latest" it had
        no such channel yet. A channel's parties never change once it is opened: any block after that tells them."""
        raw = bytes.fromhex(channel_id[2:]) if isinstance(channel_id, str) else bytes(channel_id)
        try:
            view = self.hub.functions.channel(raw).call(block_identifier="latest" if at_block is None else at_block)
        except BadFunctionCallOutput as ex:  # no code there: a block before the hub's deployment
            raise ValueError(f"hub {self.hub.address} holds no code at block {at_block}") from ex
        if to_checksum_address(view[ChannelViewField.PAYER]) != self.address:
            raise ValueError(f"0x{raw.hex()} is not a channel of payer {self.address} on hub {self.hub.address}")
        payee = to_checksum_address(view[ChannelViewField.PAYEE])
        token = to_checksum_address(view[ChannelViewField.TOKEN])
        told = None if salt is not None else self._told_salt(raw)
        salt = salt if salt is not None else told if told is not None else self._logged_salt(raw, from_block)
        if channel_id_of(self.address, payee, token, salt) != raw:
            wrong = f"salt 0x{salt.hex()} does not name channel 0x{raw.hex()}"
            raise UntrustedServiceError(f"the service's {wrong}") if told is not None else ValueError(wrong)
        return ChannelRef(raw, payee, token, salt)

    def _told_salt(self, raw: bytes) -> bytes | None:
        """The channel's salt as the service has it, or None when it does not know the channel (or is away): one
        read, where a search of the hub's logs from the channel's opening was refused by providers that cap ranges."""
        try:
            known = self._get(f"/v1/channels/0x{raw.hex()}")
        except ServiceRejectedError:
            return None
        return service_salt(known)

    def _logged_salt(self, raw: bytes, from_block: int) -> bytes:
        with rpc_errors(f"searching the ChannelOpened log of 0x{raw.hex()} from block {from_block}"):
            opened = self.hub.events.ChannelOpened().get_logs(
                argument_filters={"channelId": raw}, from_block=from_block, to_block="latest"
            )
        if not opened:
            raise ValueError(f"no ChannelOpened log for 0x{raw.hex()} since block {from_block}: pass salt=")
        return bytes(opened[0]["args"]["salt"])

    def open_channels(self, payee: str, token: str | None = None) -> list[dict[str, Any]]:
        """This payer's open channels to `payee` in `token` (default ETH) as the service lists them (its word:
        `channel(id)` checks each against the hub), less those the payee stopped (`stoppedAt`: it is closing them
        and they take no more vouchers)."""
        return [c for c in self.listed_channels(payee, token) if c.get("stoppedAt") is None]

    def listed_channels(
        self, payee: str, token: str | None = None, status: ChannelStatus = ChannelStatus.OPEN
    ) -> list[dict[str, Any]]:
        """This payer's channels to `payee` in `token` in `status` as the service lists them (`open_channels` with
        those the payee stopped, their deposits still locked in the hub)."""
        asset = checksummed(token, "token") if token else ETH
        query = (
            f"/v1/channels?payer={self.address}&payee={checksummed(payee, 'payee')}&status={status.name.lower()}"
            "&limit=1000"
        )
        listed = self._get(query).get("items")
        if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
            raise UntrustedServiceError(f"the service's answer to GET {query} lists no channels in items")
        for listing in listed:  # each in its one form before anyone acts on it
            service_channel_id(listing, "channelId")
        return [c for c in listed if service_address(c, "token") == asset]

    @rpc_errors("topping up a channel")
    def top_up(self, channel: ChannelRef, amount: int, *, from_balance: bool = False) -> None:
        """Add `amount` to the channel's deposit (vouchers may use it once the service sees it confirmed), from the
        wallet or, with `from_balance`, from this payer's balance in the hub."""
        if from_balance:
            self.transactor.send(self.hub.functions.topUpFromBalance(channel.channel_id, amount))
            return
        if channel.token == ETH:
            self.transactor.send(self.hub.functions.topUp(channel.channel_id, amount), value=amount)
            return
        self._token_deposit(channel.token, amount, self.hub.functions.topUp(channel.channel_id, amount))

    @rpc_errors("requesting the close of a channel")
    def close(self, channel: ChannelRef) -> None:
        """Start the challenge period; the payee (or the service for it) can still settle until it ends."""
        self.transactor.send(self.hub.functions.requestClose(channel.channel_id))

    @rpc_errors("finalizing the close of a channel")
    def finalize_close(self, channel: ChannelRef) -> None:
        """After the challenge period: the unspent deposit is credited to this payer's balance in the hub."""
        self.transactor.send(self.hub.functions.finalizeClose(channel.channel_id))

    @rpc_errors("reclaiming a channel's deposit")
    def reclaim(self, channel: ChannelRef, *, request_close: bool = True) -> Reclaim:
        """One step towards the channel's unspent deposit, by the hub's word: finalize a close whose challenge period
        is over, request the close of a channel still open (when `request_close`), and say where it stands.
        TransactionFailedError when a close it sent was refused (someone closed it first: ask again); ValueError for
        a channel the hub has never seen (it was answered OPEN, as if a deposit waited there)."""
        view = self.hub.functions.channel(channel.channel_id).call()
        status = ChannelStatus(int(view[ChannelViewField.STATUS]))
        if status == ChannelStatus.NONE:
            raise ValueError(f"the hub has no channel {channel.hex_id}")
        if status == ChannelStatus.CLOSED:
            return Reclaim.BACK
        if status == ChannelStatus.CLOSING:
            if int(self.w3.eth.get_block("latest")["timestamp"]) <= int(view[ChannelViewField.CLOSE_DEADLINE]):
                return Reclaim.CLOSING
            self.finalize_close(channel)
            return Reclaim.BACK
        if status == ChannelStatus.OPEN and request_close:
            self.close(channel)
            return Reclaim.CLOSING
        return Reclaim.OPEN

    @rpc_errors("reading the payer's hub balance")
    def hub_balance(self, token: str | None = None) -> int:
        """What the hub holds for this payer in `token` (default ETH): refunds of closed channels, earnings."""
        return int(self.hub.functions.balanceOf(self.address, checksummed(token, "token") if token else ETH).call())

    @rpc_errors("withdrawing the payer's hub balance")
    def withdraw(self, token: str | None = None, amount: int | None = None, to: str | None = None) -> int:
        """Move this payer's hub balance (all of it by default) to `to` (default: itself); returns the amount. `to`
        with a broken EIP-55 checksum is refused (ValueError), not taken for the address its typo spells."""
        asset = checksummed(token, "token") if token else ETH
        recipient = checksummed(to, "to") if to else self.address
        value = amount if amount is not None else int(self.hub.functions.balanceOf(self.address, asset).call())
        if value:
            self.transactor.send(self.hub.functions.withdraw(asset, value, recipient))
        return value

    def _token_deposit(self, token: str, amount: int, deposit: ContractFunction) -> None:
        """Approve `amount` of `token`, then send `deposit` (the open or top-up that spends it); one such pair at a
        time in this client. Another app paying from the same key may spend the approval first (its deposit read the
        allowance before this one's was sent): refused while the allowance is short of `amount`, the deposit is
        approved and sent again (before, it failed, "would revert: ERC20InsufficientAllowance")."""
        with self._token_deposits:
            for attempt in range(TOKEN_DEPOSIT_TRIES):
                self._approve(token, amount)
                try:
                    self.transactor.send(deposit)
                    return
                except TransactionFailedError:
                    if attempt + 1 == TOKEN_DEPOSIT_TRIES or self._allowance(token) >= amount:
                        raise  # refused for something else than its allowance

    def _erc20(self, token: str) -> Contract:
        return self.w3.eth.contract(address=to_checksum_address(token), abi=ERC20_ABI)

    def _allowance(self, token: str) -> int:
        return int(self._erc20(token).functions.allowance(self.address, self.hub.address).call())

    def _approve(self, token: str, amount: int) -> None:
        """Let the hub take `amount` of `token` for the deposit about to be made. An allowance left over (an open that
        failed after its approval) is raised to it; a token that refuses to change an allowance that is not 0 to
        another (USDT does) has it set to 0 first: before, every later deposit of that token was refused."""
        allowed = self._allowance(token)
        if allowed >= amount:
            return
        erc20 = self._erc20(token)
        approval = erc20.functions.approve(self.hub.address, amount)
        if allowed:
            try:
                approval.estimate_gas({"from": self.address})
            except (ContractCustomError, ContractLogicError):
                self.transactor.send(erc20.functions.approve(self.hub.address, 0))
        self.transactor.send(approval)

    # --- with the service --------------------------------------------------------------------------------------

    def wait_until_known(self, channel: ChannelRef, min_deposit: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the service counts the channel with at least `min_deposit` confirmed; returns its state.

        Vouchers are judged against the confirmed deposit, so call this after `open_channel` or `top_up` when the
        service waits for confirmations and the next payment needs the new funds.
        """
        deadline = time.monotonic() + timeout
        last: tuple[str | None, str]
        while True:
            try:
                state = self._get(f"/v1/channels/{channel.hex_id}")
                if service_amount(state, "deposit") >= min_deposit:
                    return state
                last = (None, f"it counts a confirmed deposit of {state['deposit']}")
            except ServiceRejectedError as ex:
                # A service under a flood admits no read of a channel it does not hold yet (503, retried by `_get`
                # and then `service_unavailable`) until its indexer confirms the channel: wait for that too.
                if ex.code not in ("channel_unconfirmed", "channel_not_found", "service_unavailable"):
                    raise
                last = (ex.code, ex.message)
            if time.monotonic() > deadline:
                code, message = last
                raise WaitTimeoutError(
                    f"the service does not count {channel.hex_id} with a deposit of at least {min_deposit} after "
                    f"{timeout:g}s; its last answer: " + (f"[{code}] {message}" if code else message),
                    channelId=channel.hex_id,
                    lastCode=code,
                    lastMessage=message,
                )
            time.sleep(0.1)

    def position(self, channel: ChannelRef) -> int:
        """The cumulative amount this payer signed on the channel: from its journal, or, for a channel it has no
        record of, the highest of what the chain settled and what the service holds with proof (a voucher of ours)."""
        signed = self.journal.signed(channel.hex_id)
        if signed is not None:
            return signed
        proven = self._proven(channel)
        self.journal.settle_position(channel.hex_id, proven)
        return proven

    def _proven(self, channel: ChannelRef) -> int:
        """Where the channel provably stands: what the service proves with a voucher of this payer's, or what the
        chain settled if more."""
        return max(self._proven_by_service(channel), self._settled_on_chain(channel))

    def _proven_by_service(self, channel: ChannelRef) -> int:
        state = self._get(f"/v1/channels/{channel.hex_id}")
        accepted = service_amount(state, "acceptedCumulativeAmount")
        if accepted == 0:
            return 0
        signature = signature_of(state.get("latestSignature"))
        signer = None if signature is None else self._verifier.recover(channel.channel_id, accepted, signature)
        if signer != bytes.fromhex(self.address[2:]):
            raise UntrustedServiceError(
                f"the service says channel {channel.hex_id} stands at {accepted} without a voucher this payer signed "
                "for it: refusing to pay on top of an unproven position"
            )
        return accepted

    @rpc_errors("reading what the hub settled of a channel")
    def _settled_on_chain(self, channel: ChannelRef) -> int:
        return int(self.hub.functions.channel(channel.channel_id).call()[ChannelViewField.SETTLED])

    def pay(
        self,
        channel: ChannelRef,
        amount: int,
        reference: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """Pay `amount` more (an increment, in base units) on `channel`: sign the raised cumulative amount, journal
        it, send it until the service answers.

        With the `idempotency_key` of a payment whose outcome was uncertain, the same voucher is sent again: one
        payment, whatever happened to the first attempt. Raises ServiceRejectedError when the service refuses the
        voucher (its code says why), PaymentUncertainError when no answer came back after every retry (pay again
        with the key it carries), UntrustedServiceError when the service's word cannot be checked.
        """
        _check_amount(amount)
        key = idempotency_key or uuid.uuid4().hex
        with self._lock(channel):
            known = self.journal.payment(key)
            if known is not None:
                if (known.channel_id, known.amount) != (channel.hex_id, amount):
                    raise ValueError(
                        f"idempotency key {key!r} was used for {known.amount} on {known.channel_id}: a new payment "
                        "needs a new key"
                    )
                if known.status == PaymentStatus.ACCEPTED and known.receipt is not None:
                    return _receipt(known.receipt)
            for earlier in self.journal.pending(channel.hex_id):
                if earlier.idempotency_key != key:
                    self._resolve(channel, earlier)  # an earlier payment's fate decides where this one starts
            if known is None:
                start = self.position(channel)
                pending = PaymentStatus.PENDING
                known = JournalPayment(key, channel.hex_id, amount, start + amount, reference, pending, None)
                self.journal.begin(known)
            return self._deliver(channel, known)

    # --- vouchers another party delivers (x402: the payee sends them to the facilitator) --------------------------

    def authorize(
        self, channel: ChannelRef, amount: int, idempotency_key: str, budgets: Sequence[Budget] = ()
    ) -> Authorized:
        """Sign and journal the next voucher of `amount` on `channel` for someone else to deliver; nothing is sent.
        Report what became of it with `concluded`.

        Earlier vouchers on the channel whose fate is unknown are first settled by asking the service where the
        channel stands, never by submitting them: a voucher handed to a payee pays only if the payee delivers it.
        `budgets` (rolling limits, counted in the journal) raise BudgetExceededError before anything is signed."""
        _check_amount(amount)
        with self._lock(channel):
            for earlier in self.journal.pending(channel.hex_id):
                self._learn(channel, earlier)
            return self._authorized(channel, amount, idempotency_key, budgets, self.position(channel), time.time())

    def authorize_now(
        self, channel: ChannelRef, amount: int, idempotency_key: str, budgets: Sequence[Budget] = (), *, within: int
    ) -> Authorized | None:
        """`authorize`, if the journal alone can, in one short commit: None, and nothing signed, when it would first
        ask the service or the chain (payments of unknown fate on the channel, no position of it here), when the
        journal's once-a-minute tidy-up is due with it (`PayerJournal.tidy_due`), when another thread is paying on the
        channel or is in the journal (`PayerJournal.busy`: its commit waits for the disk), when the voucher's
        cumulative amount would pass `within` (the deposit: a top-up first), or when the disk is too slow for a commit
        on the loop (`loop_commits`: every one of its last commits here waited too long; every commit it makes is timed
        for it: the time it waited, not its CPU, which a worker thread would spend as well).
        For a caller on an event loop, which cannot wait for the service or the chain, but can for one journal commit
        (`ChannelHubClientScheme`: cheaper than handing the payment to a worker thread and back)."""
        _check_amount(amount)
        now = time.time()
        if self.journal.tidy_due(now) or self.journal.busy():
            return None
        lock = self._lock(channel)
        if not lock.acquire(blocking=False):
            return None
        try:
            start = self.journal.signed(channel.hex_id)
            if start is None or start + amount > within or self.journal.pending(channel.hex_id):
                return None
            if self.loop_commits.slow():
                return None
            began, cpu = time.perf_counter(), time.thread_time()
            signed = self._authorized(channel, amount, idempotency_key, budgets, start, now, group=False)
            self.loop_commits.took(time.perf_counter() - began - (time.thread_time() - cpu))  # the loop's wait
            return signed
        finally:
            lock.release()

    def _authorized(
        self,
        channel: ChannelRef,
        amount: int,
        idempotency_key: str,
        budgets: Sequence[Budget],
        start: int,
        now: float,
        *,
        group: bool = True,
    ) -> Authorized:
        """Journal the voucher of `amount` over `start`, spent at `now` (unix time) and counted against `budgets`,
        then sign it; under the channel's lock. `group=False`: the journal commits it at once (`PayerJournal.begin`)."""
        payment = JournalPayment(
            idempotency_key, channel.hex_id, amount, start + amount, None, PaymentStatus.PENDING, None
        )
        self.journal.begin(payment, spend=(channel.payee, channel.token, now), budgets=budgets, group=group)
        return Authorized(payment.cumulative, self.signer.sign(channel.channel_id, payment.cumulative))

    def concluded(self, channel: ChannelRef, idempotency_key: str, receipt: dict[str, Any] | None) -> None:
        """An authorized voucher was accepted (with the facilitator's receipt) or refused (None): refused, the
        position goes back, so the next voucher does not pay this one's amount too. A refusal only the payee reports
        is not one to pass here: leave the payment pending, and the channel's next `authorize` (or `resynchronise`)
        learns its fate from the service."""
        if receipt is not None:  # no read first: recorded if still pending, and no wait for the journal (`accepted`)
            # Not kept with its receipt: the key is the caller's for this one delivery, and a week of receipts was a
            # KB a payment (hundreds of GB at x402's rates); the payment's spending counts on.
            self.journal.accepted(idempotency_key, None)
            return
        with self._lock(channel):
            payment = self.journal.payment(idempotency_key)
            if payment is None or payment.status != PaymentStatus.PENDING:
                return
            self.journal.refused(idempotency_key, channel.hex_id, payment.cumulative - payment.amount)

    def resynchronise(self, channel: ChannelRef) -> int:
        """Put the position where the service proves it (a voucher of ours) or the chain settled it, lower or
        higher: after a refusal that says the position is stale. The channel's payments of unknown fate are concluded
        by the same proof (`_conclude`). Returns it."""
        with self._lock(channel):
            proven = self._proven(channel)
            for earlier in self.journal.pending(channel.hex_id):
                self._conclude(channel, earlier, proven)
            self.journal.set_position(channel.hex_id, proven)
            return proven

    @rpc_errors("reading a channel's status from the hub")
    def is_open(self, channel: ChannelRef) -> bool:
        """Whether the hub has the channel open still (neither closing nor closed): the chain's word, not a payee's."""
        status = self.hub.functions.channel(channel.channel_id).call()[ChannelViewField.STATUS]
        return int(status) == ChannelStatus.OPEN

    def stopped(self, channel: ChannelRef) -> bool:
        """Whether the channel's payee stopped it at the service (`stoppedAt`: it takes no more vouchers), the
        service's word."""
        return self._get(f"/v1/channels/{channel.hex_id}").get("stoppedAt") is not None

    def _learn(self, channel: ChannelRef, payment: JournalPayment) -> None:
        self._conclude(channel, payment, self._proven(channel))

    def _conclude(self, channel: ChannelRef, payment: JournalPayment, proven: int) -> None:
        """A payment of unknown fate, by what the service or the chain proves the channel stands at: paid if that
        reaches its voucher (counted against the budgets, whoever's voucher it was), else refused (its amount given
        back, the position put at `proven`). Never by a payee's word: a hostile one can store a voucher at the service
        and answer that it refused it."""
        if proven >= payment.cumulative:  # dropped as `concluded` drops it: a voucher someone else delivered
            self.journal.accepted(payment.idempotency_key, None)
        else:
            self.journal.refused(payment.idempotency_key, channel.hex_id, proven)

    def _resolve(self, channel: ChannelRef, payment: JournalPayment) -> None:
        """Learn the outcome of a payment left uncertain: send its voucher again (harmless if it was stored)."""
        try:
            self._deliver(channel, payment)
        except ServiceRejectedError:
            pass  # refused for good: forgotten, and the position put back

    def _deliver(self, channel: ChannelRef, payment: JournalPayment) -> Receipt:
        for _ in range(STALE_RETRIES):
            try:
                receipt, body = self._send(channel, payment)
            except ServiceRejectedError as ex:
                stored = ex.details.get("receipt")
                if ex.code == "exists_with_different_metadata" and isinstance(stored, dict):
                    self.journal.accepted(payment.idempotency_key, {str(k): v for k, v in stored.items()})  # it paid
                    raise
                if ex.code == "stale_voucher":
                    # Another client of this payer moved the channel on: start again above what it proves.
                    proven = self._proven(channel)
                    self.journal.settle_position(channel.hex_id, proven)
                    payment = JournalPayment(
                        payment.idempotency_key,
                        payment.channel_id,
                        payment.amount,
                        max(proven, self.journal.signed(channel.hex_id) or 0) + payment.amount,
                        payment.reference,
                        PaymentStatus.PENDING,
                        None,
                    )
                    self.journal.begin(payment)
                    continue
                if 400 <= ex.status < 500:  # not stored: the payment did not happen, the position goes back
                    self.journal.refused(payment.idempotency_key, channel.hex_id, payment.cumulative - payment.amount)
                raise
            # A receipt for another amount is the key's first voucher (a retry signed elsewhere): ours was not stored,
            # and the position is where the service proves the channel stands with a voucher of ours, never the
            # receipt's word (a receipt for nearly the whole deposit had the next payment sign for all of it).
            moved = None
            if receipt.cumulative != payment.cumulative:
                moved = self._proven(channel)
                if receipt.cumulative > moved:  # left pending: the channel's next payment asks again
                    raise UntrustedServiceError(
                        f"the service's receipt on channel {channel.hex_id} names {receipt.cumulative}, more than it "
                        f"proves with a voucher this payer signed ({moved})"
                    )
            self.journal.accepted(payment.idempotency_key, body, lower_to=moved)
            return receipt
        raise ServiceRejectedError(
            409, "stale_voucher", f"channel {channel.hex_id} kept moving under {STALE_RETRIES} attempts"
        )

    def _send(self, channel: ChannelRef, payment: JournalPayment) -> tuple[Receipt, dict[str, Any]]:
        signature = self.signer.sign(channel.channel_id, payment.cumulative)
        body: dict[str, Any] = {
            "channelId": channel.hex_id,
            "cumulativeAmount": str(payment.cumulative),
            "signature": "0x" + signature.hex(),
            "idempotencyKey": payment.idempotency_key,
        }
        if payment.reference is not None:
            body["reference"] = payment.reference
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.http.post("/v1/vouchers", json=body)
            except httpx.TransportError as ex:
                last = f"{type(ex).__name__}: {ex}"
                continue
            if response.status_code in (200, 201):
                try:
                    data: dict[str, Any] = json_of(response)
                    return _receipt(data), data
                except (ValueError, KeyError, TypeError, AttributeError) as ex:  # left pending: asked again later
                    raise UntrustedServiceError(
                        f"the service's answer to the voucher of {payment.cumulative} on channel {channel.hex_id} is "
                        f"not a receipt ({type(ex).__name__})"
                    ) from ex
            if response.status_code in _RETRYABLE:
                last = f"HTTP {response.status_code}: {text_start(response.content, 200)}"
                continue
            raise refusal(response)
        raise PaymentUncertainError(
            f"no answer for the voucher of {payment.cumulative} on channel {channel.hex_id} after {self.retries + 1} "
            f"attempts ({last}); it may have been accepted: pay again with idempotency_key={payment.idempotency_key!r}",
            channelId=channel.hex_id,
            cumulativeAmount=str(payment.cumulative),
            idempotencyKey=payment.idempotency_key,
        )

    def _lock(self, channel: ChannelRef) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(channel.channel_id, threading.Lock())

    def _get(self, path: str) -> dict[str, Any]:
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.http.get(path)
            except httpx.TransportError as ex:
                last = f"{type(ex).__name__}: {ex}"
                continue
            if response.status_code == 200:
                return answer_object(response)
            if response.status_code not in _RETRYABLE:
                raise refusal(response)
            last = f"HTTP {response.status_code}"
        message = f"GET {path}: no answer but a retryable one in {self.retries + 1} attempts (the last: {last})"
        raise unanswered(f"GET {path}", message)

    def __enter__(self) -> PayerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Release the HTTP connections to the service and the RPC, and the journal."""
        self.http.close()
        self._rpc_session.close()
        self.journal.close()


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError("amount must be a positive int in base units")


def _receipt(data: dict[str, Any]) -> Receipt:
    return Receipt(
        channel_id=data["channelId"],
        cumulative=service_amount(data, "cumulativeAmount"),
        increment=service_amount(data, "increment"),
        remaining=service_amount(data, "remaining"),
        accepted_at=datetime.fromisoformat(data["acceptedAt"]),
        reference=data.get("reference"),
        idempotency_key=data.get("idempotencyKey"),
    )
