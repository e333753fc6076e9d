"""A payee's own commands: `settlement payee` (what it earned and can withdraw) and `settlement withdraw`.

A payee runs them without the operator's files: the hub's address (from the operator, or `/v1/eip712`'s
`verifyingContract`) and its own key are enough; the code at that address is checked to be ChannelHub's.

`settlement payee` reads the service alone: web3 and eth-account are imported by what needs them (the chain, a key),
not with this module (3 of the command's 6 s on a slow machine, 2026-12-04).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
from eth_utils.address import is_address, to_checksum_address
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from settlement.chain.addresses import ADDRESS_RULE, checksummed, is_typed_address
from settlement.domain.amounts import human_of_units
from settlement.domain.model import ETH
from settlement.errors import (
    ConfigError,
    DeploymentError,
    NothingToWithdrawError,
    ServiceRejectedError,
    UntrustedServiceError,
    rejected,
)
from settlement.sdk.answers import answer_object, json_of, service_address, service_amount, service_int
from settlement.sdk.bounded import bounded_client
from settlement.server.config import Settings, is_private_key

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3
    from web3.contract import Contract

SYMBOL_MAX = 32  # characters of a token's symbol shown; a longer one is not shown (its address stands for it)
_ERC20_METADATA: list[dict[str, Any]] = [
    {"type": "function", "name": name, "stateMutability": "view", "inputs": [], "outputs": [{"name": "", "type": kind}]}
    for name, kind in (("symbol", "string"), ("decimals", "uint8"))
]


def resolve_hub(w3: Web3, settings: Settings, hub: str | None) -> Contract:
    """The hub at `hub`, else SETTLEMENT_HUB_ADDRESS, else the deployment file's; refused without ChannelHub code."""
    from settlement.chain.deployment import Deployment, hub_at, hub_contract

    address = hub or settings.hub_address
    if address is None:
        if not settings.deployment_file.exists():
            raise DeploymentError(
                "no hub address: pass --hub 0x… or set SETTLEMENT_HUB_ADDRESS (the operator publishes it; the service "
                f"shows it as verifyingContract at /v1/eip712); no deployment file at {settings.deployment_file}"
            )
        deployment = Deployment.load(settings.deployment_file)
        deployment.check(w3)
        return hub_contract(w3, deployment)
    typed = checksummed(address, "--hub", ConfigError)
    found = hub_at(w3, typed)
    if found is None:
        raise DeploymentError(f"no ChannelHub code at {typed} on chain {w3.eth.chain_id}: check the address")
    return found


def withdraw_account(settings: Settings, key_file: Path | None) -> LocalAccount:
    """The payee's key from --key-file or SETTLEMENT_WITHDRAW_KEY; never from the command line (it shows in `ps`)."""
    from eth_account import Account

    if key_file is not None:
        try:
            raw = key_file.read_text(encoding="utf-8").strip()
        except OSError as ex:
            raise ConfigError(f"cannot read the key file {key_file}: {ex.strerror}") from ex
        source = f"the key file {key_file}"
    elif settings.withdraw_key is not None:
        raw, source = settings.withdraw_key.get_secret_value().strip(), "SETTLEMENT_WITHDRAW_KEY"
    else:
        raise ConfigError("no key: set SETTLEMENT_WITHDRAW_KEY or pass --key-file FILE (a file holding 0x + 64 hex)")
    if not is_private_key(raw):
        raise ConfigError(f"{source} does not hold a private key (0x + 64 hex digits)")
    try:
        account: LocalAccount = Account.from_key(raw)
    except ValueError as ex:  # in range of the shape, not of the curve (zero, or above its order)
        raise ConfigError(f"{source} does not hold a valid secp256k1 key: {ex}") from ex
    return account


def asset_name(w3: Web3, asset: str) -> tuple[str, int]:
    """`("ETH", 18)`, or an ERC-20's symbol and decimals (its address and 0 when it does not say).

    The symbol is the token's word, and a payer picks the token of its channel: one that is not a short line of
    printable text (terminal control sequences, a page of text) is replaced by the token's address. What is printed
    is escaped by the caller (rich markup such as "[/]" failed the line after the withdrawal was sent)."""
    if asset == ETH:
        return "ETH", 18
    token = w3.eth.contract(address=to_checksum_address(asset), abi=_ERC20_METADATA)
    try:
        symbol, decimals = str(token.functions.symbol().call()), int(token.functions.decimals().call())
    except Exception:  # an ERC-20 need not implement the optional metadata; any failure means "not said"
        return asset, 0
    shown = symbol.strip()
    return (shown if 0 < len(shown) <= SYMBOL_MAX and shown.isprintable() else asset), decimals


def amount_text(value: int, unit: str, decimals: int) -> str:
    """Base units first, exact; then the human amount when the asset has decimals: `1,500 wei (0.0000000000000015
    ETH)`."""
    base = "wei" if unit == "ETH" else "base units"
    if decimals == 0:
        return f"{value:,} {base} of {unit}"
    human = human_of_units(value, decimals)
    return f"{value:,} {base} ({human} {unit})"


def withdraw(
    settings: Settings,
    console: Console,
    *,
    token: str | None,
    amount: int | None,
    to: str | None,
    hub: str | None,
    key_file: Path | None,
) -> None:
    from settlement.chain.node import Transactor, connect, rpc_errors

    account = withdraw_account(settings, key_file)
    for option, given in (("--token", token), ("--to", to)):
        if given is not None:  # a pasted address with a typo: someone else's
            checksummed(given, option, ConfigError)
    if amount is not None and amount <= 0:
        raise ConfigError(f"--amount must be positive base units, not {amount}")
    w3 = connect(settings.rpc_url, settings.rpc_timeout, fallbacks=settings.rpc_fallback_urls)
    contract = resolve_hub(w3, settings, hub)
    asset = to_checksum_address(token) if token else ETH
    unit, decimals = asset_name(w3, asset)
    with rpc_errors("reading the hub balance"):
        balance = int(contract.functions.balanceOf(account.address, asset).call())
    value = balance if amount is None else amount
    if balance == 0 or value > balance:
        raise NothingToWithdrawError(
            f"{account.address} holds {amount_text(balance, unit, decimals)} in the hub: "
            + ("nothing to withdraw" if amount is None else f"cannot withdraw {amount_text(value, unit, decimals)}")
            + ". Accepted payments are credited by the engine's next batch: `settlement payee` shows what is "
            "settled and what is not yet",
            balance=str(balance),
        )
    recipient = to_checksum_address(to or account.address)
    transactor = Transactor(
        w3,
        account,
        list(contract.abi),  # type: ignore[arg-type]
        timeout=settings.tx_timeout,
        reprice_after=settings.bump_after,
        max_fee_per_gas=settings.max_fee_per_gas,
    )
    receipt = transactor.send(contract.functions.withdraw(asset, value, recipient))
    console.print(
        escape(
            f"withdrew {amount_text(value, unit, decimals)} to {recipient} (tx "
            f"{receipt['transactionHash'].to_0x_hex()}); {amount_text(balance - value, unit, decimals)} left in the hub"
        )
    )


def payee_report(
    settings: Settings,
    console: Console,
    address: str,
    *,
    service_url: str | None,
    as_json: bool,
    key_file: Path | None = None,
) -> None:
    """The service's summary for `address`: paid, settled, unsettled, withdrawable and withdrawn, per asset. Sent
    with SETTLEMENT_API_KEY when set, else signed in with the payee's own key (--key-file or SETTLEMENT_WITHDRAW_KEY)
    when the service asks for credentials."""
    if not is_typed_address(address):
        raise ConfigError(f"{address!r} is not an address ({ADDRESS_RULE})")
    payee = to_checksum_address(address)
    url = (service_url or settings.service_url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")
    path = f"/v1/payees/{payee}/summary"
    request = f"GET {url}{path}"
    auth: httpx.Auth | None = None
    headers = {}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    elif key_file is not None or settings.withdraw_key is not None:
        from settlement.sdk.signin import SignInAuth

        auth = SignInAuth(withdraw_account(settings, key_file), url)
    try:
        with bounded_client(url, 10) as http:  # the SDK's bounds: a hostile answer cannot fill the CLI's memory
            answer = http.get(path, headers=headers, auth=auth)
    except httpx.HTTPError as ex:
        raise ServiceRejectedError(
            503, "service_unavailable", f"the service at {url} does not answer ({ex}): pass --service-url"
        ) from ex
    if answer.status_code != 200:
        try:
            body = json_of(answer)
            raise rejected(answer.status_code, str(body["code"]), str(body["message"]), request=request)
        except (ValueError, KeyError, TypeError):
            raise ServiceRejectedError(
                answer.status_code, "service_unavailable", f"{request} answered {answer.status_code}", request=request
            ) from None
    summary = answer_object(answer)
    rows, interval, unread = _summary_of(summary)  # the service's word in its one form, before any of it is shown
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"payee {payee}")
    for column in ("asset", "channels", "accepted", "settled", "unsettled", "withdrawable now", "withdrawn"):
        table.add_column(column, justify="left" if column == "asset" else "right")
    for row in rows:
        unknown = "not read" if row.token in unread else "chain down"
        table.add_row(
            "ETH (wei)" if row.token == ETH else row.token,
            str(row.channels),
            *(f"{value:,}" for value in (row.accepted, row.settled, row.unsettled)),
            unknown if row.withdrawable is None else f"{row.withdrawable:,}",
            f"{row.withdrawn:,}",
        )
    console.print(table)
    if unread:
        console.print(
            f"withdrawable not read for {len(unread)} asset(s): the service reads a few balances a summary, ETH's and "
            "its configured tokens' first; `settlement withdraw --token` reads one from the chain"
        )
    # A line of its own (a title wraps at the table's width, through a URL), and text, not markup: "[fe80::1]" was
    # read as a style tag and left out.
    console.print(f"service: {escape(url)}", soft_wrap=True)
    when = f"with the engine's next batch (every {interval:g}s)" if interval else "when the engine next settles"
    console.print(f"unsettled value becomes withdrawable {when}; `settlement withdraw` takes it out")


class _SummaryRow(NamedTuple):
    """One asset of a payee's summary, as the service answered it, each field checked."""

    token: str
    channels: int
    accepted: int
    settled: int
    unsettled: int
    withdrawable: int | None  # None: the service did not read the balance (`balancesUnread`) or the chain is down
    withdrawn: int


def _summary_of(summary: dict[str, Any]) -> tuple[list[_SummaryRow], float | None, set[str]]:
    """A payee summary's rows, the engine's interval and the assets whose balance the service did not read, each
    field in its one form; else `service_untrusted`, not a KeyError or ValueError of the rendering."""
    assets, interval = summary.get("assets"), summary.get("settleInterval")
    unread = summary.get("balancesUnread", [])
    if not isinstance(unread, list) or not all(isinstance(token, str) and is_address(token) for token in unread):
        raise UntrustedServiceError("the service's balancesUnread is not a list of addresses")
    if not isinstance(assets, list) or not all(isinstance(row, dict) for row in assets):
        raise UntrustedServiceError("the service's payee summary lists no assets")
    if interval is not None and (not isinstance(interval, int | float) or isinstance(interval, bool)):
        raise UntrustedServiceError(f"the service's settleInterval is not a number: {str(interval)[:40]!r}")
    rows = []
    for row in assets:
        channels = service_int(row, "channels", "a count")
        withdrawable = None if row.get("withdrawable") is None else service_amount(row, "withdrawable")
        accepted, settled, unsettled = (service_amount(row, field) for field in ("accepted", "settled", "unsettled"))
        token, withdrawn = service_address(row, "token"), service_amount(row, "withdrawn")
        rows.append(_SummaryRow(token, channels, accepted, settled, unsettled, withdrawable, withdrawn))
    return rows, None if interval is None else float(interval), {to_checksum_address(t) for t in unread}
