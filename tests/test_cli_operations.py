"""The operator commands against a real store and devnet: settle, status, channels, reconcile, withdraw (each run in a
fork of the suite's fork server, as `python -m settlement.cli` runs it; tests/test_cli.py starts fresh interpreters)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from sqlalchemy import text
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.devtools.devnet import Devnet
from settlement.domain.model import Voucher
from settlement.server.config import Settings
from settlement.server.service import Service
from tests.hub_helpers import ETH, Channel, TamperingProxy, body, fee_paid, free_test_port, operator_env, send
from tests.servers import ServiceThread, forked_cli


class Ran(NamedTuple):
    """A command's exit code and its stripped output."""

    code: int
    out: str
    err: str


def test_settle_status_channels_reconcile_withdraw(
    make_service: Callable[..., Service],
    service_settings: Callable[..., Settings],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    service = make_service()
    payee = accounts[7]
    channels = [open_channel(accounts[5], payee.address, amount=10**18), open_channel(accounts[6], payee.address)]
    service.indexer.catch_up()
    for channel, amount in zip(channels, (300, 500), strict=True):
        outcome = service.ingestor.ingest([Voucher(channel.hex_id, amount, sign(channel.payer, channel.id, amount))])[0]
        assert not isinstance(outcome, Exception)
    settings = service_settings()
    env = operator_env(settings, accounts[19])

    before = json.loads(forked_cli("status", "--json", env=env, cwd=tmp_path).stdout)
    assert before["unsettled"] == {ETH: "800"}
    assert before["batches"] == []

    settled = forked_cli("settle", env=env, cwd=tmp_path)
    assert settled.returncode == 0, settled.stderr
    assert "confirmed" in settled.stdout
    assert hub.functions.balanceOf(payee.address, ETH).call() == 800

    after = json.loads(forked_cli("status", "--json", env=env, cwd=tmp_path).stdout)
    assert [(b["status"], b["channels"]) for b in after["batches"]] == [("confirmed", 2)]
    assert after["batches"][0]["gasUsed"] > 0 and after["batches"][0]["txHash"].startswith("0x")
    assert "unsettled value" in forked_cli("status", env=env, cwd=tmp_path).stdout

    listed = json.loads(forked_cli("channels", "--json", "--payee", payee.address, env=env, cwd=tmp_path).stdout)
    assert sorted(c["settled"] for c in listed) == ["300", "500"]
    typed = forked_cli("channels", "--json", "--payee", payee.address.lower(), env=env, cwd=tmp_path)  # was: []
    assert json.loads(typed.stdout) == listed

    report = forked_cli("reconcile", "--json", env=env, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["mismatches"] == 0
    assert [(r["problem"], r["explained"]) for r in json.loads(report.stdout)["channels"]] == [(None, None)] * 2

    balance = w3.eth.get_balance(payee.address)
    out = forked_cli("withdraw", env={**env, "SETTLEMENT_WITHDRAW_KEY": HexBytes(payee.key).to_0x_hex()}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"withdrew 800 wei (0.0000000000000008 ETH) to {payee.address} (tx 0x")
    assert out.stdout.rstrip().endswith("; 0 wei (0 ETH) left in the hub")
    assert hub.functions.balanceOf(payee.address, ETH).call() == 0
    withdrawal = w3.eth.get_transaction_receipt(re.findall(r"\(tx (0x[0-9a-f]{64})\)", out.stdout)[0])
    assert w3.eth.get_balance(payee.address) == balance + 800 - fee_paid(withdrawal)  # 800 wei, less its gas
    again = forked_cli(
        "withdraw", env={**env, "SETTLEMENT_WITHDRAW_KEY": HexBytes(payee.key).to_0x_hex()}, cwd=tmp_path
    )
    assert again.returncode == 1
    assert again.stderr.startswith(
        f"error [balance_insufficient] {payee.address} holds 0 wei (0 ETH) in the hub: nothing to withdraw."
    )

    with service.db.write() as conn:  # the books drift from the chain: reconcile must say so
        conn.execute(text("UPDATE channels SET settled = deposit"))
    drift = forked_cli("reconcile", env=env, cwd=tmp_path)
    assert drift.returncode == 1
    assert "2 unexplained mismatch(es)" in drift.stdout
    rows = json.loads(forked_cli("reconcile", "--json", env=env, cwd=tmp_path).stdout)["channels"]
    assert {r["problem"] for r in rows} == {"settled differs"}
    assert sorted(rows[0]) == [  # camelCase, as the API
        "accepted", "channelId", "depositChain", "depositStore", "explained", "inFlight", "problem", "settledChain",
        "settledStore", "status",
    ]  # fmt: skip


@pytest.mark.parametrize("block_time", [None, "1"], ids=["automine", "interval"])
def test_simulate_proves_the_books_to_the_wei(block_time: str | None, tmp_path: Path) -> None:
    """Also on a devnet that mines every second: many payers' transactions share each block."""
    result = forked_cli(
        "simulate",
        "--payers",
        "2",
        "--payees",
        "2",
        "--count",
        "60",
        "--rate",
        "200",
        "--settle-interval",
        "0.5",
        env={} if block_time is None else {"SETTLEMENT_DEVNET_BLOCK_TIME": block_time},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "60 payments" in result.stdout and "0 refused" in result.stdout
    assert "to the wei" in result.stdout
    # Found as "0 settlement batches, 0 gas" on every run: counted from the store before it recorded the batch.
    counted = re.search(r"(\d+) settlement batches, ([\d,]+) gas", result.stdout)
    assert counted is not None, result.stdout[-2000:]
    batches, gas = int(counted.group(1)), int(counted.group(2).replace(",", ""))
    assert batches >= 1 and gas >= 21_000 * batches  # each batch is a transaction of its own
    latency = re.search(r"accepted -> credited on chain: p50 ([\d,]+) ms, p99 ([\d,]+) ms", result.stdout)
    assert latency is not None, result.stdout[-2000:]
    p50, p99 = (int(group.replace(",", "")) for group in latency.groups())
    assert 0 < p50 <= p99 < 60_000  # every payment was seen credited, after it was accepted


def test_a_simulation_outcome_reports_every_difference() -> None:
    from settlement.devtools.simulate import Outcome

    outcome = Outcome(
        expected={("a", ETH): 5, ("b", ETH): 7, ("c", ETH): 1},
        credited={("a", ETH): 5, ("b", ETH): 6},
    )
    assert outcome.mismatches == [("b", ETH), ("c", ETH)]


def test_e2e_percentiles_are_nearest_rank() -> None:
    from settlement.devtools.simulate import Outcome

    outcome = Outcome(e2e_seconds=[i / 1000 for i in range(100, 0, -1)])  # 1 .. 100 ms
    assert (outcome.e2e_ms(0.5), outcome.e2e_ms(0.99), outcome.e2e_ms(1.0)) == (50.0, 99.0, 100.0)
    assert Outcome().e2e_ms(0.5) is None


def test_status_and_channels_read_the_store_alone_when_the_chain_is_down(
    make_service: Callable[..., Service],
    service_settings: Callable[..., Settings],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    """An operator needs them most when the chain is down; they used to connect to it and run migrations."""
    service = make_service()
    channel = open_channel(accounts[5], accounts[7].address, amount=10**18)
    service.indexer.catch_up()
    outcome = service.ingestor.ingest([Voucher(channel.hex_id, 300, sign(channel.payer, channel.id, 300))])[0]
    assert not isinstance(outcome, Exception)
    settings = service_settings()
    env = {
        "SETTLEMENT_RPC_URL": "http://127.0.0.1:9",  # nothing listens there
        "SETTLEMENT_DEPLOYMENT_FILE": str(tmp_path / "no-such-deployment.json"),
        "SETTLEMENT_DATABASE_URL": settings.database_url,
    }
    status = forked_cli("status", "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["unsettled"] == {ETH: "300"}
    listed = forked_cli("channels", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(c["channelId"], c["acceptedCumulativeAmount"]) for c in rows] == [(channel.hex_id, "300")]
    table = forked_cli("channels", env=env, cwd=tmp_path).stdout  # piped, as into a log: nothing cut at 80 columns
    assert channel.hex_id in table and "1,000,000,000,000,000,000" in table and accounts[7].address in table


def test_read_only_commands_refuse_a_missing_database_instead_of_creating_one(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "settlement.db"
    env = {"SETTLEMENT_DATABASE_URL": f"sqlite:///{missing}", "SETTLEMENT_RPC_URL": "http://127.0.0.1:9"}
    for command in ("status", "channels"):
        result = forked_cli(command, env=env, cwd=tmp_path)
        assert result.returncode == 1
        assert f"[store_error] no database at {missing}" in " ".join(result.stderr.split())
    assert not missing.exists() and not missing.parent.exists()


def test_settle_next_to_a_running_engine_says_so(
    spawn: Callable[..., Any], service_settings: Callable[..., Settings], accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """It answered `config_invalid`, as if something were misconfigured."""
    settings = service_settings()
    key = HexBytes(accounts[19].key).to_0x_hex()
    service = spawn(settings.database_url, engine_enabled="true", private_key=key, settle_interval="3600")
    deadline = time.monotonic() + 30
    while "settlement_engine_leader 1.0" not in httpx.get(f"{service.url}/metrics").text:  # it holds the lease
        assert time.monotonic() < deadline, "the engine never took the lease"
        time.sleep(0.1)
    env = operator_env(settings, accounts[19])
    result = forked_cli("settle", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "[engine_busy] another process runs the settlement engine on this store" in result.stderr


def test_settle_with_a_settler_that_cannot_pay_the_gas_says_so_at_once(
    make_service: Callable[..., Service],
    service_settings: Callable[..., Settings],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    sign: Callable[..., bytes],
    tmp_path: Path,
    mining: str,
) -> None:
    """The operator's settler key holds no ETH. `settlement settle` made the batch, could not send it (the engine's
    `low_funds` alert), and waited out its whole `--timeout` (300 s) for a confirmation no wait brings, to say then
    that the batch "is not confirmed". It now ends at once with `settler_unfunded`, saying what the settler holds and
    what the batch may need; the batch stays in the store and goes out once the settler is funded."""
    service = make_service()
    payee, settler = accounts[7], accounts[19]
    channel = open_channel(accounts[5], payee.address, amount=10**18)
    service.indexer.catch_up()
    (outcome,) = service.ingestor.ingest([Voucher(channel.hex_id, 300, sign(channel.payer, channel.id, 300))])
    assert not isinstance(outcome, Exception)
    env = operator_env(service_settings(), settler)
    funds = w3.eth.get_balance(settler.address)
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [settler.address, "0x0"])
    unfunded = forked_cli("settle", "--timeout", "20", env=env, cwd=tmp_path)  # before: chain_error after 20 s
    (error,) = [line for line in unfunded.stderr.splitlines() if line.startswith("error [")]
    assert unfunded.returncode == 1
    refusal = (
        f"error \\[settler_unfunded\\] settler {settler.address} holds 0 wei, batch [0-9a-f]{{32}} may need "
        "[1-9][0-9]*: top it up; the batch waits \\(sent once the settler can pay: by a running engine, or "
        "`settlement settle` again\\)"
    )
    assert re.fullmatch(refusal, error), error
    assert hub.functions.balanceOf(payee.address, ETH).call() == 0

    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [settler.address, hex(funds)])
    settled = forked_cli("settle", env=env, cwd=tmp_path)
    assert settled.returncode == 0, settled.stderr
    assert hub.functions.balanceOf(payee.address, ETH).call() == 300


def test_status_reports_the_running_engines_interval_and_every_closing_channel(
    engine: Callable[..., Any],
    service_settings: Callable[..., Settings],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    tmp_path: Path,
) -> None:
    """It printed the CLI's own interval (30 s) while the demo's engine settled every 10 s, and "no pending closes"
    while a channel was closing with nothing left to settle."""
    service, settler = engine(settle_interval=7.0)
    channel = open_channel(accounts[5], accounts[7].address, amount=1_000)
    receipt = send(w3, hub.functions.requestClose(channel.id), accounts[5].address)
    deadline = w3.eth.get_block(receipt["blockNumber"])["timestamp"] + 3600
    service.indexer.catch_up()
    env = {"SETTLEMENT_DATABASE_URL": service_settings().database_url}
    before = json.loads(forked_cli("status", "--json", env=env, cwd=tmp_path).stdout)
    assert before["settleInterval"] is None  # no engine has ticked on this store yet
    settler.tick()
    after = json.loads(forked_cli("status", "--json", env=env, cwd=tmp_path).stdout)
    assert after["settleInterval"] == 7.0
    assert after["pendingCloses"] == [{"channelId": channel.hex_id, "deadline": deadline, "unsettled": "0"}]
    text_out = forked_cli("status", env=env, cwd=tmp_path).stdout
    assert "the engine settles every 7s" in text_out and channel.hex_id in text_out


def test_a_payee_withdraws_with_only_its_key_and_the_hub_address(
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    token: Contract,
    w3: Web3,
    devnet: Devnet,
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    """A payee has no deployment file and no store: `--hub` and a key file are enough. Found broken once: the key
    was a required command-line option (visible in `ps`), a bad key printed an 80-line traceback, an empty balance
    said `config_invalid` and named ETH as the zero address, and without the operator's file the payee was told to
    deploy a hub of its own. It touches no store (the payee credits itself by closing with the payer's voucher), so it
    runs once, not on each store."""
    payee = accounts[7]
    channel = open_channel(accounts[5], payee.address, token=token, amount=10**21)
    amount = 1_500_000_000_000_000_000  # 1.5 DEV-like units of an 18-decimal token
    send(w3, hub.functions.closeByPayee(channel.id, amount, sign(channel.payer, channel.id, amount)), payee.address)
    key_file = tmp_path / "payee.key"
    key_file.write_text(HexBytes(payee.key).to_0x_hex() + "\n")
    rpc = {"SETTLEMENT_RPC_URL": devnet.url}
    nowhere = {**rpc, "SETTLEMENT_DEPLOYMENT_FILE": str(tmp_path / "none.json")}

    def withdraw(*args: str, env: dict[str, str] = nowhere) -> Ran:
        result = forked_cli("withdraw", *args, env=env, cwd=tmp_path)
        return Ran(result.returncode, result.stdout.strip(), result.stderr.strip())

    code, _, err = withdraw("--key-file", str(key_file), "--token", token.address)
    assert (code, err.split("]")[0]) == (1, "error [deployment_missing")
    assert "pass --hub 0x… or set SETTLEMENT_HUB_ADDRESS" in err and "settlement deploy" not in err
    assert withdraw("--key-file", str(key_file), "--hub", token.address).err == (
        f"error [deployment_missing] no ChannelHub code at {token.address} on chain {w3.eth.chain_id}: "
        "check the address"
    )
    assert withdraw("--hub", hub.address).err == (
        "error [config_invalid] no key: set SETTLEMENT_WITHDRAW_KEY or pass --key-file FILE "
        "(a file holding 0x + 64 hex)"
    )
    assert withdraw("--hub", hub.address, env={**nowhere, "SETTLEMENT_WITHDRAW_KEY": "0x1234"}).err == (
        "error [config_invalid] configuration refused: SETTLEMENT_WITHDRAW_KEY must be 32 bytes of hex (0x + 64 hex "
        "digits)"
    )  # one line, no traceback
    (tmp_path / "bad.key").write_text("0x" + "f" * 64)  # the shape of a key, above the curve's order
    code, _, err = withdraw("--key-file", str(tmp_path / "bad.key"), "--hub", hub.address)
    assert code == 1
    assert err.startswith(f"error [config_invalid] the key file {tmp_path / 'bad.key'} does not hold a valid"), err
    assert forked_cli("withdraw", "--private-key", "0x" + "1" * 64, env=nowhere, cwd=tmp_path).returncode == 2  # gone
    assert withdraw("--key-file", str(key_file), "--hub", hub.address).err == (
        f"error [balance_insufficient] {payee.address} holds 0 wei (0 ETH) in the hub: nothing to withdraw. Accepted "
        "payments are credited by the engine's next batch: `settlement payee` shows what is settled and what is not yet"
    )
    too_much = withdraw(
        "--key-file", str(key_file), "--hub", hub.address, "--token", token.address, "--amount", str(amount + 1)
    )
    assert too_much.err.startswith(
        f"error [balance_insufficient] {payee.address} holds 1,500,000,000,000,000,000 base units (1.5 DEV) in the "
        "hub: cannot withdraw 1,500,000,000,000,000,001 base units (1.500000000000000001 DEV)."
    )
    # One character wrong in a pasted recipient: its EIP-55 checksum no longer holds. It was taken for the address
    # it spells (eth_utils' `is_address` takes any mixed case), and the balance went to no one's account.
    typo = accounts[8].address[:-1] + ("0" if accounts[8].address[-1] != "0" else "1")
    assert not Web3.is_checksum_address(typo) and typo != typo.lower()
    keyed = {**nowhere, "SETTLEMENT_WITHDRAW_KEY": HexBytes(payee.key).to_0x_hex()}
    assert withdraw("--hub", hub.address, "--token", token.address, "--to", typo, env=keyed).err == (
        f"error [config_invalid] --to '{typo}' is not an address (0x + 40 hex digits; mixed case must be a correct "
        "EIP-55 checksum)"
    )
    assert hub.functions.balanceOf(payee.address, token.address).call() == amount
    # SETTLEMENT_RPC_URL down, as in a provider's outage: the fallbacks the service is configured with are used too
    # (before, the withdrawal was `chain_unavailable` with a fallback configured).
    down = {"SETTLEMENT_RPC_URL": f"http://127.0.0.1:{free_test_port()}"}
    code, out, err = withdraw(
        "--token", token.address, "--amount", "500000000000000000", "--to", accounts[8].address,
        env={
            **down, "SETTLEMENT_RPC_FALLBACK_URLS": json.dumps([devnet.url]), "SETTLEMENT_HUB_ADDRESS": hub.address,
            "SETTLEMENT_WITHDRAW_KEY": HexBytes(payee.key).to_0x_hex(),
        },
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"withdrew 500,000,000,000,000,000 base units (0.5 DEV) to {accounts[8].address} (tx 0x")
    assert out.endswith("; 1,000,000,000,000,000,000 base units (1 DEV) left in the hub")
    assert token.functions.balanceOf(accounts[8].address).call() == 500_000_000_000_000_000


def test_a_payee_without_eth_for_the_gas_is_told_so_not_shown_a_traceback(
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    devnet: Devnet,
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    """A payee that earned in the hub and holds no ETH (a fresh address for its service, paid only through channels)
    withdraws; the node refuses the transaction for its gas. `settlement withdraw` printed web3's error under a
    traceback of ~40 lines (`settlement deploy` from an unfunded key too); it now says what the node said and what
    the account holds, in one line."""
    payee = accounts[7]
    channel = open_channel(accounts[5], payee.address, amount=10**18)
    send(w3, hub.functions.closeByPayee(channel.id, 10**17, sign(channel.payer, channel.id, 10**17)), payee.address)
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [payee.address, "0x0"])
    env = {
        "SETTLEMENT_RPC_URL": devnet.url,
        "SETTLEMENT_HUB_ADDRESS": hub.address,
        "SETTLEMENT_WITHDRAW_KEY": HexBytes(payee.key).to_0x_hex(),
        "SETTLEMENT_DEPLOYMENT_FILE": str(tmp_path / "none.json"),
    }
    out = forked_cli("withdraw", env=env, cwd=tmp_path)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"error [transaction_failed] the chain's node refused a transaction from {payee.address}: Insufficient funds "
        "for gas * price + value (the account holds 0 wei; a transaction's gas is paid in ETH from the account "
        "sending it)\n"
    )
    assert hub.functions.balanceOf(payee.address, ETH).call() == 10**17  # nothing withdrawn
    # So did `settlement deploy` from an account with no ETH (the operator's new key, before it was funded).
    deployed = forked_cli(
        "deploy",
        env={
            "SETTLEMENT_RPC_URL": devnet.url,
            "SETTLEMENT_PRIVATE_KEY": HexBytes(payee.key).to_0x_hex(),
            "SETTLEMENT_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        },
        cwd=tmp_path,
    )
    assert (deployed.returncode, deployed.stdout) == (1, "")
    assert deployed.stderr == out.stderr
    assert not (tmp_path / "deployment.json").exists()


def test_a_withdrawal_offers_at_most_the_configured_fee_ceiling(
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    devnet: Devnet,
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    """`settlement withdraw` signs with `SETTLEMENT_MAX_FEE_PER_GAS` as its ceiling (its transaction re-priced while
    unmined, never above it): with the chain's base fee past the ceiling the node refuses it and nothing moves;
    without the ceiling in the way it is made."""
    payee = accounts[7]
    channel = open_channel(accounts[5], payee.address, amount=10**18)
    send(w3, hub.functions.closeByPayee(channel.id, 10**17, sign(channel.payer, channel.id, 10**17)), payee.address)
    env = withdrawing(devnet, hub, payee, tmp_path)
    w3.provider.make_request(RPCEndpoint("anvil_setNextBlockBaseFeePerGas"), [hex(10**12)])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])  # a fee spike: the latest block's base fee 1,000 gwei
    out = forked_cli("withdraw", env={**env, "SETTLEMENT_MAX_FEE_PER_GAS": str(10**11)}, cwd=tmp_path)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"error [transaction_failed] the chain's node refused a transaction from {payee.address}: max fee per gas "
        "less than block base fee\n"
    )
    assert hub.functions.balanceOf(payee.address, ETH).call() == 10**17  # nothing withdrawn
    out = forked_cli("withdraw", env={**env, "SETTLEMENT_MAX_FEE_PER_GAS": str(3 * 10**12)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert hub.functions.balanceOf(payee.address, ETH).call() == 0
    (withdrawal,) = hub.events.Withdrawn().get_logs(from_block=w3.eth.block_number)
    assert w3.eth.get_transaction(withdrawal["transactionHash"])["maxFeePerGas"] == 2 * 10**12 + 10**9


@pytest.mark.parametrize(
    ("symbol", "shown"),
    [("[/]", "[/]"), ("[bold red]ETH", "[bold red]ETH"), ("\x1b]0;pwned\x07", None), ("S" * 33, None)],
    ids=["closing-tag", "style", "terminal-control", "too-long"],
)
def test_a_tokens_symbol_is_printed_as_text_never_as_markup_or_terminal_control(
    symbol: str,
    shown: str | None,
    deploy: Callable[..., Contract],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    devnet: Devnet,
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    """A payer picks its channel's token, so the token's symbol is the payer's text. `settlement withdraw` printed
    it as rich markup: "[/]" failed the output line with a traceback after the withdrawal was sent (the payee saw
    an error for a withdrawal that was made), and a style tag changed what the line said. A symbol that is not a
    short printable line (a terminal's control sequence) is replaced by the token's address."""
    hostile = deploy("DevToken", "Hostile Token", symbol, 18)
    payee = accounts[7]
    channel = open_channel(accounts[5], payee.address, token=hostile, amount=10**21)
    amount = 1_500_000_000_000_000_000
    send(w3, hub.functions.closeByPayee(channel.id, amount, sign(channel.payer, channel.id, amount)), payee.address)
    result = forked_cli(
        "withdraw",
        "--token",
        hostile.address,
        "--amount",
        str(amount // 3),
        env=withdrawing(devnet, hub, payee, tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    unit = shown or hostile.address
    assert result.stdout.startswith(f"withdrew 500,000,000,000,000,000 base units (0.5 {unit}) to {payee.address} (tx")
    assert result.stdout.rstrip("\n").endswith(f"; 1,000,000,000,000,000,000 base units (1 {unit}) left in the hub")
    assert "\x1b" not in result.stdout + result.stderr
    assert hostile.functions.balanceOf(payee.address).call() == amount // 3


def test_a_withdrawal_is_printed_to_the_last_base_unit(
    deploy: Callable[..., Contract],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    hub: Contract,
    w3: Web3,
    devnet: Devnet,
    sign: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    """`settlement withdraw` wrote the human amount through `Decimal`, whose arithmetic rounds to 28 significant
    digits: a balance of 30 digits was shown ending in ...679 where it ends in ...6789 (a payer's token holds any
    amount). Every digit is kept now."""
    token = deploy("DevToken", "Big Token", "BIG", 18)
    payee = accounts[7]
    amount = 123_456_789_012_345_678_901_234_567_891
    channel = open_channel(accounts[5], payee.address, token=token, amount=amount)
    send(w3, hub.functions.closeByPayee(channel.id, amount, sign(channel.payer, channel.id, amount)), payee.address)
    env = withdrawing(devnet, hub, payee, tmp_path)
    result = forked_cli("withdraw", "--token", token.address, "--amount", str(amount - 1), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "withdrew 123,456,789,012,345,678,901,234,567,890 base units (123456789012.34567890123456789 BIG) to "
    )
    assert result.stdout.rstrip("\n").endswith("; 1 base units (0.000000000000000001 BIG) left in the hub")


def withdrawing(devnet: Devnet, hub: Contract, payee: LocalAccount, tmp_path: Path) -> dict[str, str]:
    """The environment of `settlement withdraw` by `payee` from `hub`, in `tmp_path` (cwd too)."""
    return {
        "SETTLEMENT_RPC_URL": devnet.url,
        "SETTLEMENT_HUB_ADDRESS": hub.address,
        "SETTLEMENT_WITHDRAW_KEY": HexBytes(payee.key).to_0x_hex(),
        "SETTLEMENT_DEPLOYMENT_FILE": str(tmp_path / "none.json"),
    }


def test_a_payee_summary_not_in_the_services_form_is_refused_not_rendered(
    serve_here: Callable[..., ServiceThread],
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
    store_url: str,
    tmp_path: Path,
) -> None:
    """`settlement payee` rendered the service's summary with `[...]` and `int()`: an answer that was not one (a
    proxy's page, a list of assets that is not one, an amount "1e3") showed a traceback. Each is now refused, with
    the field it could not read, before anything is shown. And the service's URL is printed whole, on a line of its
    own, as text: in the table's title it was folded at the table's width, and a `[…]` part would be rich markup."""
    service = serve_here(store_url, allowed_hosts=["*"])
    payee = accounts[7].address
    channel = open_channel(accounts[5], payee, amount=1_000)
    paid = httpx.post(f"{service.url}/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10)))
    assert paid.status_code == 201, paid.text

    def row(data: dict[str, Any], **changes: object) -> dict[str, Any]:
        return {**data, "assets": [{**data["assets"][0], **changes}]}

    forms: list[tuple[Callable[[Any], object], str]] = [
        (lambda data: b"<html>Bad gateway</html>", "is not a JSON object"),
        (lambda data: {**data, "assets": "all"}, "lists no assets"),
        (lambda data: row(data, accepted="1e3"), "accepted is not an amount"),
        (lambda data: row(data, channels="1"), "channels is not a count"),
        (lambda data: row(data, token="ETH"), "token is not an address"),
        (lambda data: {**data, "settleInterval": "soon"}, "settleInterval is not a number"),
        (lambda data: {**data, "balancesUnread": "all"}, "balancesUnread is not a list of addresses"),
    ]
    summary = f"/v1/payees/{payee}/summary"
    for forge, refusal in forms:

        def rewrite(path: str, data: Any, forge: Callable[[Any], Any] = forge) -> Any:
            return forge(data) if path == summary else data

        with TamperingProxy(service.url, rewrite) as proxy:
            out = forked_cli("payee", payee, "--service-url", proxy.url, env={}, cwd=tmp_path)
        assert (out.returncode, "Traceback" in out.stderr) == (1, False), out.stderr
        assert "error [service_untrusted]" in out.stderr and refusal in out.stderr, out.stderr
    # Its answer bounded as the SDK's are (a plain httpx.get before: 64 KB of gzip read as 64 MB, an endless body read
    # until memory ran out).
    for way, refusal in [("endless", "is larger than 8388608 bytes"), ("gzip", "is encoded ('gzip'), not plain")]:

        def hostile(path: str, way: str = way) -> str | None:
            return way if path == summary else None

        with TamperingProxy(service.url, lambda _path, data: data, hostile) as proxy:
            out = forked_cli("payee", payee, "--service-url", proxy.url, env={}, cwd=tmp_path)
        assert (out.returncode, "Traceback" in out.stderr) == (1, False), out.stderr
        assert "error [service_untrusted]" in out.stderr and refusal in out.stderr, out.stderr
    shown = forked_cli("payee", payee, "--service-url", service.url, env={}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"\s*│\s*".join(["ETH \\(wei\\)", "1", "10", "0", "10"]), shown.stdout), shown.stdout
    unread = {"balancesUnread": [ETH]}  # the service read no balance of this asset: not "chain down"
    with TamperingProxy(
        service.url, lambda path, data: {**row(data, withdrawable=None), **unread} if path == summary else data
    ) as proxy:
        shown = forked_cli("payee", payee, "--service-url", proxy.url, env={}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"\s*│\s*".join(["ETH \\(wei\\)", "1", "10", "0", "10", "not read", "0"]), shown.stdout)
    assert "withdrawable not read for 1 asset(s): the service reads a few balances a summary" in shown.stdout
    mapped = service.url.replace("127.0.0.1", "[::ffff:127.0.0.1]")  # IPv4 through an IPv6 literal
    shown = forked_cli("payee", payee, "--service-url", mapped, env={}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"\nservice: {mapped}\n" in shown.stdout, shown.stdout
