"""The payer SDK: open and fund channels on chain, then pay by signing vouchers and posting them to the service.

    client = PayerClient(private_key, rpc_url="http://127.0.0.1:8545", service_url="http://127.0.0.1:8000")
    channel = client.open_channel(payee, deposit=10**18)           # ETH; token=... for an ERC-20
    receipt = client.pay(channel, 1_000, reference="order-17")     # one micro-payment, no transaction
    client.close(channel)                                           # starts the challenge period

A payment is safe to retry: the voucher for a given cumulative amount is the same voucher however often it is
sent, and the service answers a re-send with the original receipt. The client keeps each channel's position (the
cumulative amount the service accepted) in memory; a new client, or one that lost an answer, re-reads it from the
service first, so it never signs a lower cumulative amount than one the service may already hold.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.contract import Contract

from settlement.chain import Transactor, connect
from settlement.contracts import HUB, load_artifact
from settlement.errors import ConfigError, PaymentUncertainError, ServiceRejectedError
from settlement.model import ETH, Receipt
from settlement.vouchers import Domain, channel_id, sign_voucher

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
_RETRYABLE = {502, 503, 504}
STALE_RETRIES = 20  # other instances paying on the same channel at once; each attempt loses only to a winner
SALT_RANDOM_BYTES = 8  # a default salt is this many random bytes, left-padded to 32: cheap calldata at settlement


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


class PayerClient:
    """One payer's view of the hub and the service. Thread-safe; payments on one channel are serialized."""

    def __init__(
        self,
        private_key: str,
        rpc_url: str,
        service_url: str,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.2,
        http: httpx.Client | None = None,
    ) -> None:
        self.account: LocalAccount = Account.from_key(private_key)
        self._rpc_session = requests.Session()
        self.w3: Web3 = connect(rpc_url, timeout, self._rpc_session)
        self.http = http or httpx.Client(base_url=service_url, timeout=timeout)
        self.retries = retries
        self.backoff = backoff
        info = self._get("/v1/eip712")
        self.domain = Domain(
            chain_id=int(info["domain"]["chainId"]),
            verifying_contract=info["domain"]["verifyingContract"],
            name=info["domain"]["name"],
            version=info["domain"]["version"],
        )
        if self.domain.chain_id != self.w3.eth.chain_id:
            raise ConfigError(
                f"the service signs for chain {self.domain.chain_id}, the RPC serves chain {self.w3.eth.chain_id}"
            )
        abi = load_artifact(HUB).abi
        self.hub: Contract = self.w3.eth.contract(address=to_checksum_address(self.domain.verifying_contract), abi=abi)
        self.transactor = Transactor(self.w3, self.account, abi)
        self._positions: dict[bytes, int] = {}
        self._locks: dict[bytes, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def address(self) -> str:
        return str(self.account.address)

    # --- on chain ----------------------------------------------------------------------------------------------

    def open_channel(
        self, payee: str, deposit: int, *, token: str | None = None, salt: bytes | None = None
    ) -> ChannelRef:
        """Lock `deposit` (base units) for `payee` in a new channel; an ERC-20 is approved first if needed.

        The default salt is 8 random bytes in a 32-byte word: every settlement of the channel carries the salt in
        calldata, where a zero byte costs 4 gas and another 16, so this saves ~290 gas per settlement over 32
        random bytes. It only has to differ between this payer's channels to one payee in one asset (a clash makes
        `open` revert with ChannelHubChannelExists, nothing is lost).
        """
        asset = to_checksum_address(token) if token else ETH
        salt = salt if salt is not None else os.urandom(SALT_RANDOM_BYTES).rjust(32, b"\0")
        payee = to_checksum_address(payee)
        if asset != ETH:
            self._approve(asset, deposit)
        self.transactor.send(self.hub.functions.open(payee, asset, salt, deposit), value=deposit if asset == ETH else 0)
        ref = ChannelRef(channel_id(self.address, payee, asset, salt), payee, asset, salt)
        with self._guard:
            self._positions[ref.channel_id] = 0
        return ref

    def top_up(self, channel: ChannelRef, amount: int) -> None:
        """Add `amount` to the channel's deposit (vouchers may use it once the service sees it confirmed)."""
        if channel.token != ETH:
            self._approve(channel.token, amount)
        self.transactor.send(
            self.hub.functions.topUp(channel.channel_id, amount), value=amount if channel.token == ETH else 0
        )

    def close(self, channel: ChannelRef) -> None:
        """Start the challenge period; the payee (or the service for it) can still settle until it ends."""
        self.transactor.send(self.hub.functions.requestClose(channel.channel_id))

    def finalize_close(self, channel: ChannelRef) -> None:
        """After the challenge period: the unspent deposit is credited to this payer's balance in the hub."""
        self.transactor.send(self.hub.functions.finalizeClose(channel.channel_id))

    def withdraw(self, token: str | None = None, amount: int | None = None, to: str | None = None) -> int:
        """Move this payer's hub balance (all of it by default) to `to` (default: itself); returns the amount."""
        asset = to_checksum_address(token) if token else ETH
        value = amount if amount is not None else int(self.hub.functions.balanceOf(self.address, asset).call())
        if value:
            self.transactor.send(self.hub.functions.withdraw(asset, value, to_checksum_address(to or self.address)))
        return value

    def _approve(self, token: str, amount: int) -> None:
        erc20 = self.w3.eth.contract(address=to_checksum_address(token), abi=ERC20_ABI)
        if int(erc20.functions.allowance(self.address, self.hub.address).call()) < amount:
            self.transactor.send(erc20.functions.approve(self.hub.address, amount))

    # --- with the service --------------------------------------------------------------------------------------

    def wait_until_known(self, channel: ChannelRef, min_deposit: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the service counts the channel with at least `min_deposit` confirmed; returns its state.

        Vouchers are judged against the confirmed deposit, so call this after `open_channel` or `top_up` when the
        service waits for confirmations and the next payment needs the new funds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self._get(f"/v1/channels/{channel.hex_id}")
                if int(state["deposit"]) >= min_deposit:
                    return state
            except ServiceRejectedError as ex:
                if ex.code not in ("channel_unconfirmed", "channel_not_found"):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service does not count {channel.hex_id} with {min_deposit} after {timeout}s")
            time.sleep(0.1)

    def position(self, channel: ChannelRef) -> int:
        """The cumulative amount this channel has paid so far, as the service holds it (read once, then tracked)."""
        with self._guard:
            known = self._positions.get(channel.channel_id)
        if known is not None:
            return known
        state = self._get(f"/v1/channels/{channel.hex_id}")
        value = max(int(state["acceptedCumulativeAmount"]), int(state["settled"]))
        with self._guard:
            self._positions[channel.channel_id] = value
        return value

    def pay(self, channel: ChannelRef, amount: int, reference: str | None = None) -> Receipt:
        """Pay `amount` more on `channel`: sign the raised cumulative amount and send it until the service answers.

        Raises ServiceRejectedError when the service refuses the voucher (its code says why) and
        PaymentUncertainError when no answer came back after every retry.
        """
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ValueError("amount must be a positive int in base units")
        with self._lock(channel):
            cumulative = self.position(channel) + amount
            for _ in range(STALE_RETRIES):
                try:
                    receipt = self._send(channel, cumulative, reference)
                    break
                except ServiceRejectedError as ex:
                    if ex.code != "stale_voucher":
                        raise
                    # someone else (another instance with this key) moved the channel on meanwhile:
                    # pay `amount` on top of where it really is now
                    cumulative = int(str(ex.details["currentCumulativeAmount"])) + amount
            else:
                raise ServiceRejectedError(
                    409, "stale_voucher", f"channel {channel.hex_id} kept moving under {STALE_RETRIES} attempts"
                )
            with self._guard:
                self._positions[channel.channel_id] = cumulative
            return receipt

    def _send(self, channel: ChannelRef, cumulative: int, reference: str | None) -> Receipt:
        signature = sign_voucher(self.account, self.domain, channel.channel_id, cumulative)
        payload: dict[str, Any] = {
            "channelId": channel.hex_id,
            "cumulativeAmount": str(cumulative),
            "signature": "0x" + signature.hex(),
        }
        if reference is not None:
            payload["reference"] = reference
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.http.post("/v1/vouchers", json=payload)
            except httpx.TransportError as ex:
                last = f"{type(ex).__name__}: {ex}"
                continue
            if response.status_code in (200, 201):
                return _receipt(response.json())
            if response.status_code in _RETRYABLE:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            raise _rejected(response)
        with self._guard:
            self._positions.pop(channel.channel_id, None)  # re-read from the service before the next payment
        raise PaymentUncertainError(
            f"no answer for the voucher of {cumulative} on channel {channel.hex_id} after {self.retries + 1} "
            f"attempts ({last}); it may have been accepted",
            channelId=channel.hex_id,
            cumulativeAmount=str(cumulative),
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
                data: dict[str, Any] = response.json()
                return data
            if response.status_code not in _RETRYABLE:
                raise _rejected(response)
            last = f"HTTP {response.status_code}"
        raise ServiceRejectedError(503, "service_unavailable", f"GET {path} failed after retries ({last})")

    def __enter__(self) -> PayerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Release the HTTP connections to the service and the RPC."""
        self.http.close()
        self._rpc_session.close()


def _receipt(data: dict[str, Any]) -> Receipt:
    return Receipt(
        channel_id=data["channelId"],
        cumulative=int(data["cumulativeAmount"]),
        increment=int(data["increment"]),
        remaining=int(data["remaining"]),
        accepted_at=datetime.fromisoformat(data["acceptedAt"]),
        reference=data.get("reference"),
    )


def _rejected(response: httpx.Response) -> ServiceRejectedError:
    try:
        data = response.json()
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    code = str(data.pop("code", f"http_{response.status_code}"))
    message = str(data.pop("message", response.text[:200]))
    return ServiceRejectedError(response.status_code, code, message, **data)
