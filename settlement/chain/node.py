"""Web3 access: connecting, sending signed transactions with our own nonce counter, decoding custom-error reverts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, NamedTuple

import requests
from eth_abi.abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import AccessList, Nonce, TxParams, TxReceipt

from settlement.chain.provider import FailoverProvider
from settlement.domain.redaction import scrubbed, shown_url
from settlement.errors import ChainError, ChainUnavailableError, ConfigError, TransactionFailedError

logger = logging.getLogger(__name__)

GAS_HEADROOM = 1.2  # estimates are exact on anvil, but state can move between estimate and inclusion
NONCE_RETRIES = 3
REPRICE_BUMP = Fraction(9, 8)  # a payer's re-pricing: 12.5 % dearer, what every node takes as a replacement


def access_list_plan(w3: Web3, tx: TxParams, estimate: int | None = None) -> tuple[int, AccessList | None]:
    """Gas for `tx`, and the EIP-2930 access list to send it with when naming its storage up front is cheaper.

    A listed slot costs 1,900 gas plus a 100-gas warm read instead of a 2,100-gas cold read, and the list names the
    contract once for 2,400: a settlement touching more than ~25 channels saves ~100 gas per channel, a smaller one
    goes without. `estimate` is the plain estimate if the caller has one. With the list, the node's `gasUsed` for
    it is the figure (no second estimate: every estimate re-runs the whole batch several times on the node). A node
    without `eth_createAccessList` gets the plain estimate.
    """
    plain = int(w3.eth.estimate_gas(tx)) if estimate is None else estimate
    try:
        created = w3.eth.create_access_list(tx)
    except Web3RPCError:
        return plain, None
    access_list, listed = created["accessList"], int(created["gasUsed"])
    return (listed, access_list) if access_list and listed < plain else (plain, None)


def connect(
    url: str,
    timeout: float = 10.0,
    session: requests.Session | None = None,
    fallbacks: Sequence[str] = (),
    primary_retry: float = 10.0,
) -> Web3:
    """A Web3 for `url` (and `fallbacks`, tried in order when it fails); raises ChainUnavailableError if none answers.

    Pass `session` to own the HTTP connections (and close them with it); web3's default keeps one per thread.
    """
    provider = FailoverProvider([url, *fallbacks], timeout=timeout, session=session, primary_retry=primary_retry)
    w3 = Web3(provider)
    w3.middleware_onion.remove("validation")  # the provider holds every URL to one chain (its docstring)
    try:
        chain_id = provider.learn_chain()
    except (requests.RequestException, OSError) as ex:
        raise ChainUnavailableError(f"no JSON-RPC answer at {provider.shown_urls}: {scrubbed(str(ex))}") from ex
    others = provider.survey()
    if others:
        other, other_id = others[0]
        raise ConfigError(
            f"RPC {shown_url(other)} serves chain {other_id}, {shown_url(provider.endpoint_uri)} serves chain "
            f"{chain_id}"
        )
    return w3


@contextmanager
def rpc_errors(what: str) -> Iterator[None]:
    """Turn transport failures into ChainUnavailableError and JSON-RPC errors into ChainError, naming `what`."""
    try:
        yield
    except (requests.RequestException, OSError) as ex:
        raise ChainUnavailableError(f"{what}: the chain's RPC does not answer ({scrubbed(str(ex))})") from ex
    except Web3RPCError as ex:
        raise ChainError(f"{what}: the chain's RPC refused ({scrubbed(str(ex))})") from ex


def mines_only_on_transactions(w3: Web3) -> bool:
    """Whether the chain is an anvil that makes a block only when a transaction arrives (automine): there, an event
    becomes N blocks deep only after N later transactions. Any other node (or an unreachable one) answers False."""
    try:
        answer = w3.provider.make_request("anvil_getAutomine", [])  # type: ignore[arg-type]
    except (requests.RequestException, OSError, Web3RPCError):
        return False
    return isinstance(answer, dict) and answer.get("result") is True


DEVNET_CLIENTS = ("anvil/", "hardhatnetwork/", "ganache/")


def is_devnet(w3: Web3) -> bool:
    """Whether the node is a local development chain (anvil, Hardhat, Ganache), by its client version: there, the
    service may start without credentials configured (docs/security.md)."""
    with rpc_errors("asking the node which client it is"):
        version = str(w3.client_version).lower()
    return version.startswith(DEVNET_CLIENTS)


@dataclass(frozen=True)
class Revert:
    """A decoded revert: the custom error's name and arguments, or the raw data when the ABI does not know it."""

    name: str
    args: tuple[Any, ...]
    data: str
    names: tuple[str, ...] = ()  # the arguments' names in the ABI

    def describe(self) -> str:
        """For people: `ChannelHubChallengeNotOver(channelId=0x…, deadline=2026-11-30T03:00:00Z)`, not raw bytes
        and unix seconds."""
        names = self.names if len(self.names) == len(self.args) else tuple(f"arg{i}" for i in range(len(self.args)))
        return f"{self.name}({', '.join(f'{n}={_readable(n, v)}' for n, v in zip(names, self.args, strict=True))})"


def _readable(name: str, value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if name.lower().endswith("deadline") and isinstance(value, int) and 0 < value < 2**40:
        return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def decode_revert(abi: list[dict[str, Any]], data: str | bytes) -> Revert:
    """Match revert data against the ABI's custom errors (and Error(string) / Panic(uint256))."""
    raw = bytes(HexBytes(data))
    errors = [e for e in abi if e.get("type") == "error"]
    errors += [
        {"name": "Error", "inputs": [{"type": "string"}]},
        {"name": "Panic", "inputs": [{"type": "uint256"}]},
    ]
    for entry in errors:
        types = [i["type"] for i in entry["inputs"]]
        if raw[:4] == function_signature_to_4byte_selector(f"{entry['name']}({','.join(types)})"):
            values = abi_decode(types, raw[4:])
            args = tuple(to_checksum_address(v) if t == "address" else v for t, v in zip(types, values, strict=True))
            names = tuple(str(i.get("name", "")) for i in entry["inputs"])
            return Revert(entry["name"], args, "0x" + raw.hex(), names)
    return Revert("unknown", (), "0x" + raw.hex())


def revert_of(ex: Exception, abi: list[dict[str, Any]]) -> Revert | None:
    """The decoded revert carried by a web3 exception, if any."""
    if isinstance(ex, ContractCustomError) and isinstance(ex.data, str):
        return decode_revert(abi, ex.data)
    if isinstance(ex, ContractLogicError) and isinstance(ex.data, str) and len(ex.data) >= 10:
        return decode_revert(abi, ex.data)
    return None


REPRICE_AFTER = 30.0  # seconds a transaction waits unmined before it is sent again at the fees of the moment
RECEIPT_POLL = 0.1  # seconds between receipt reads (web3's own pace)


class Transactor:
    """Signs and sends transactions from one local account, numbering nonces itself so that concurrent senders in
    this process never collide and never leave gaps (a failed send gives its nonce back).

    A transaction not mined within `reprice_after` seconds is signed again with the same nonce at the fees a new one
    would be given then (twice the base fee plus the node's tip, at least 12.5 % above the last), until `timeout`: the
    chain's base fee can double in six full blocks, and a transaction priced before was left in the node's pool with
    every later transaction of the account queued behind it. `max_fee_per_gas` (wei), when set, caps what any of them
    offers: past it, the transaction waits for the base fee to come down."""

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        abi: list[dict[str, Any]],
        *,
        timeout: float = 120.0,
        reprice_after: float = REPRICE_AFTER,
        max_fee_per_gas: int | None = None,
    ):
        if max_fee_per_gas is not None and max_fee_per_gas < 1:
            raise ValueError(f"max_fee_per_gas must be a positive number of wei, not {max_fee_per_gas!r}")
        self.w3 = w3
        self.account = account
        self.abi = abi
        self.timeout = timeout
        self.reprice_after = reprice_after
        self.max_fee_per_gas = max_fee_per_gas
        self._lock = threading.Lock()
        self._next_nonce: int | None = None
        self._chain_id: int | None = None  # asked once: a connection's chain never changes (FailoverProvider)
        # The nonce of the last transaction the node took: one whose receipt was then never read may still be mined.
        self.last_nonce: int | None = None

    @property
    def address(self) -> str:
        return str(self.account.address)

    def send(
        self, call: ContractFunction | ContractConstructor, *, value: int = 0, gas: int | None = None
    ) -> TxReceipt:
        """Estimate, sign, send and wait; raises TransactionFailedError (with the decoded revert) on failure."""
        params: TxParams = {"from": self.account.address, "value": value}  # type: ignore[typeddict-item]
        # No node answering (before the transaction is sent) is ChainUnavailableError, not requests' error, whose
        # message names the RPC's URL path (a provider's key); a node's refusal is turned into ours below first.
        with rpc_errors(f"sending a transaction from {self.account.address}"):
            try:
                estimate = gas or int(call.estimate_gas(params) * GAS_HEADROOM)
            except (ContractCustomError, ContractLogicError) as ex:
                revert = revert_of(ex, self.abi)
                reason = revert.describe() if revert else str(ex)
                raise TransactionFailedError(f"transaction would revert: {reason}") from ex
            except Web3RPCError as ex:
                raise self._refused(ex) from ex
            with self._lock:
                for attempt in range(NONCE_RETRIES):
                    try:
                        nonce = self._nonce()
                        if self._chain_id is None:
                            self._chain_id = int(self.w3.eth.chain_id)
                        full: TxParams = {**params, "gas": estimate, "nonce": Nonce(nonce), "chainId": self._chain_id}
                        tx = call.build_transaction({**full, **self._fees(None)})  # type: ignore[arg-type]
                        signed = self.account.sign_transaction(tx)  # type: ignore[arg-type]
                        tx_hash = self._broadcast(signed.raw_transaction, nonce)
                    except Web3RPCError as ex:
                        self._next_nonce = None  # re-read from the chain: the nonce may or may not be used
                        if _taken_by_another(ex) and attempt + 1 < NONCE_RETRIES:
                            continue  # another sender from this account took it (mined, or in the pool): again
                        raise self._refused(ex) from ex
                    except Exception:
                        self._next_nonce = None
                        raise
                    self._next_nonce = nonce + 1
                    self.last_nonce = nonce
                    break
        return self.wait(tx_hash, tx)

    def _broadcast(self, raw: bytes, nonce: int) -> HexBytes:
        """Send a signed transaction. Its sending unanswered (the node went away on the way), it may have reached the
        node: its nonce is noted as the last the node took (`last_nonce`), for the caller to look for what it did."""
        try:
            return self.w3.eth.send_raw_transaction(raw)
        except (requests.RequestException, OSError) as ex:
            self.last_nonce = nonce
            raise ChainUnavailableError(
                f"a transaction from {self.account.address} (nonce {nonce}) was being sent, and the chain's RPC did "
                f"not answer ({type(ex).__name__}): it may have reached the node, and be mined yet"
            ) from ex

    def _refused(self, ex: Web3RPCError) -> TransactionFailedError:
        """The node's refusal in its own words (an account with nothing to pay the gas with, above all: a payee that
        earned in the hub only), not web3's error and its traceback out of a command."""
        error = (ex.rpc_response or {}).get("error")
        said = scrubbed(str(error.get("message") if isinstance(error, dict) else ex))
        if "insufficient funds" in said.lower():
            try:
                held = f"{self.w3.eth.get_balance(self.account.address):,} wei"
            except (requests.RequestException, OSError, Web3RPCError):
                held = "too little"
            said += f" (the account holds {held}; a transaction's gas is paid in ETH from the account sending it)"
        return TransactionFailedError(f"the chain's node refused a transaction from {self.account.address}: {said}")

    def wait(self, tx_hash: HexBytes, tx: TxParams | None = None) -> TxReceipt:
        """The receipt of a transaction sent, waited for up to `timeout`; `tx`, the transaction as signed, is
        re-priced every `reprice_after` seconds unmined (without it, it is waited for as it is)."""
        try:
            receipt = self._mined([tx_hash], tx)
        except (ChainUnavailableError, TransactionFailedError):
            self._forget_nonce()  # its outcome not known: it may have left the node's pool
            raise
        if receipt["status"] != 1:
            raise TransactionFailedError(f"transaction {HexBytes(receipt['transactionHash']).to_0x_hex()} reverted")
        return receipt

    def _mined(self, hashes: list[HexBytes], tx: TxParams | None) -> TxReceipt:
        deadline = time.monotonic() + self.timeout
        while True:
            receipt = self._receipt_of(hashes, min(deadline, time.monotonic() + self.reprice_after))
            if receipt is not None:
                return receipt
            if time.monotonic() >= deadline:
                again = f" (sent {len(hashes)} times, re-priced)" if len(hashes) > 1 else ""
                raise TransactionFailedError(f"transaction {hashes[0].to_0x_hex()} not mined in {self.timeout}s{again}")
            if tx is not None:
                tx = self._replaced(tx, hashes)

    def _forget_nonce(self) -> None:
        """The next transaction is numbered from the node's count again. A transaction whose outcome was not learnt
        may have left the node's pool (dropped, or the node restarted without it): numbered after it, the next one
        waited behind a nonce never to be used, and every later one with it."""
        with self._lock:
            self._next_nonce = None

    def _receipt_of(self, hashes: list[HexBytes], until: float) -> TxReceipt | None:
        """The receipt of any of `hashes` (one nonce: at most one is mined), or None once `until` passes."""
        while True:
            for tx_hash in reversed(hashes):
                try:
                    return self.w3.eth.get_transaction_receipt(tx_hash)
                except TransactionNotFound:
                    continue
                except (requests.RequestException, OSError) as ex:
                    raise ChainUnavailableError(
                        f"transaction {hashes[0].to_0x_hex()} was sent, and the chain's RPC went away before its "
                        f"receipt was read ({type(ex).__name__}): it may be mined yet"
                    ) from ex
            now = time.monotonic()
            if now >= until:
                return None
            time.sleep(min(RECEIPT_POLL, until - now))

    def _replaced(self, tx: TxParams, hashes: list[HexBytes]) -> TxParams:
        """`tx` signed again at the fees of the moment and sent (its hash added to `hashes`), or `tx` itself when
        no dearer offer is allowed, the chain has no base fee, or the node keeps what it holds."""
        try:
            fees = self._fees(tx)
            if not fees or fees["maxFeePerGas"] <= int(tx.get("maxFeePerGas", 0)):
                return tx
            dearer: TxParams = {**tx, **fees}  # type: ignore[typeddict-item]
            signed = self.account.sign_transaction(dearer)  # type: ignore[arg-type]
            hashes.append(self.w3.eth.send_raw_transaction(signed.raw_transaction))
        except Web3RPCError as ex:  # mined meanwhile ("nonce too low"), or underpriced for this node: waited for
            logger.info("transaction %s not re-priced: %s", hashes[0].to_0x_hex(), scrubbed(str(ex)))
            return tx
        except (requests.RequestException, OSError):
            return tx  # the node out of reach: its receipt is read (or its absence said) by the wait
        logger.warning(
            "transaction %s not mined in %.0fs: sent again as %s at %d wei a gas at most",
            hashes[0].to_0x_hex(),
            self.reprice_after,
            hashes[-1].to_0x_hex(),
            fees["maxFeePerGas"],
        )
        return dearer

    def _fees(self, previous: TxParams | None) -> dict[str, int]:
        """EIP-1559 fees at the node's tip (`offered_fees`), a re-pricing 12.5 % above `previous`'s offer at least;
        within `max_fee_per_gas`. Empty on a chain without a base fee."""
        base = self.w3.eth.get_block("latest").get("baseFeePerGas")
        if base is None:
            return {}
        before = None
        if previous is not None:
            before = Fees(_fee(previous.get("maxFeePerGas")), _fee(previous.get("maxPriorityFeePerGas")))
        fees = offered_fees(int(base), int(self.w3.eth.max_priority_fee), before, REPRICE_BUMP, self.max_fee_per_gas)
        return {"maxFeePerGas": fees.max_fee, "maxPriorityFeePerGas": fees.priority}

    def _nonce(self) -> int:
        """The node's count of the account's transactions, pending ones included, or this process's own where that is
        higher (one it sent the node does not count yet). Read at each send: another app paying from the same key
        (another process, another host) takes nonces this one never hears of, and numbered from its own count alone
        its transaction was refused as a replacement offering too little, or, the base fee risen since the other was
        priced, replaced the other's in the pool."""
        counted = int(self.w3.eth.get_transaction_count(self.account.address, "pending"))
        if self._next_nonce is None or counted > self._next_nonce:
            self._next_nonce = counted
        return self._next_nonce


def _taken_by_another(refusal: Web3RPCError) -> bool:
    """Whether a node refused a transaction for its nonce: used already, or held in the pool for a transaction this
    process did not send (each of its own has a nonce of its own; a re-pricing is not sent through here)."""
    said = str(refusal).lower()
    return "nonce too low" in said or "replacement transaction underpriced" in said


def _fee(fee: object) -> int:
    return fee if isinstance(fee, int) else 0


class Fees(NamedTuple):
    """An EIP-1559 offer, wei per gas."""

    max_fee: int
    priority: int


def offered_fees(base: int, tip: int, previous: Fees | None, bump: Fraction, cap: int | None) -> Fees:
    """What a transaction offers when the latest block's base fee is `base`: twice it plus `tip` (web3's rule, room
    for six full blocks in a row), and, replacing `previous`, at least `bump` times its offer, plus one wei (nodes
    take a replacement only 10-12.5 % dearer); at most `cap`. The higher of the two, not the bump alone: after the
    base fee jumped, a bump of the last offer alone stays under it, one bump after another, while what waits behind
    the transaction's nonce (a close's settlement) waits too."""
    if previous is not None:
        tip = max(tip, _raised(previous.priority, bump))
    max_fee = max(2 * base + tip, 0 if previous is None else _raised(previous.max_fee, bump))
    if cap is not None:
        max_fee, tip = min(max_fee, cap), min(tip, cap)
    return Fees(max_fee, tip)


def _raised(fee: int, bump: Fraction) -> int:
    return fee * bump.numerator // bump.denominator + 1
