"""The devnet starts on a free port, answers, honours its settings, and never outlives its owner."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from web3 import Web3
from web3.types import RPCEndpoint

from settlement.chain.node import connect
from settlement.devtools.devnet import Devnet
from tests.hub_helpers import devnet_settings


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _our_devnet_answers(port: int) -> bool:
    try:
        return bool(connect(f"http://127.0.0.1:{port}", timeout=2).eth.chain_id == 4747)
    except Exception:  # refused, or some other process's server: either way not our devnet
        return False


def test_devnet_starts_answers_and_stops() -> None:
    net = Devnet(devnet_settings(devnet_chain_id=4747, devnet_accounts=3, devnet_balance_eth=7)).start()
    pid = net.pid
    assert pid is not None
    try:
        w3 = connect(net.url)
        assert w3.eth.chain_id == 4747
        assert [a.address for a in net.accounts] == list(w3.eth.accounts)
        assert w3.eth.get_balance(net.accounts[2].address) == 7 * 10**18
    finally:
        net.stop()
    assert not _alive(pid)
    assert not _our_devnet_answers(net.port)  # the port itself may already serve another process's free port
    net.stop()  # idempotent


def test_block_time_mines_without_transactions() -> None:
    with Devnet(devnet_settings(devnet_block_time=0.2)) as net:
        w3 = connect(net.url)
        first = w3.eth.block_number
        time.sleep(1.0)
        assert w3.eth.block_number >= first + 2


@pytest.mark.parametrize("keep", [None, 2])
def test_keep_states_forgets_old_states_but_serves_recent_ones(keep: int | None) -> None:
    with Devnet(devnet_settings(devnet_keep_states=keep)) as net:
        w3 = connect(net.url)
        account = net.accounts[1].address
        for _ in range(6):
            w3.provider.make_request(RPCEndpoint("evm_mine"), [])
        assert w3.eth.get_balance(account, block_identifier=5) > 0
        if keep is None:  # the whole history
            assert w3.eth.get_balance(account, block_identifier=1) > 0
        else:
            with pytest.raises(Exception, match="BlockOutOfRange"):
                w3.eth.get_balance(account, block_identifier=1)


def test_two_devnets_get_different_ports() -> None:
    with Devnet(devnet_settings()) as a, Devnet(devnet_settings()) as b:
        assert a.port != b.port
        assert connect(a.url).eth.block_number == 0 == connect(b.url).eth.block_number


def test_taken_port_is_a_clear_error() -> None:
    from settlement.errors import DevnetError

    with Devnet(devnet_settings()) as net, pytest.raises(DevnetError, match="anvil did not start"):
        Devnet(devnet_settings(devnet_port=net.port, devnet_start_timeout=5)).start()


OWNER = """
import sys, time
from settlement.server.config import Settings
from settlement.devtools.devnet import Devnet
net = Devnet(Settings(_env_file=None)).start()
print(net.pid, net.port, flush=True)
time.sleep(600)
"""


def test_no_orphan_when_owner_is_killed() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    anvil_pid, port = map(int, owner.stdout.readline().split())
    assert _alive(anvil_pid)
    assert httpx.post(f"http://127.0.0.1:{port}", json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}).json()
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    owner.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(anvil_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(anvil_pid), "anvil outlived its owner"


def test_a_chain_that_mines_only_on_transactions_is_recognised() -> None:
    from settlement.chain.node import mines_only_on_transactions

    with Devnet(devnet_settings()) as per_tx, Devnet(devnet_settings(devnet_block_time=0.5)) as timed:
        assert mines_only_on_transactions(connect(per_tx.url)) is True
        assert mines_only_on_transactions(connect(timed.url)) is False


def test_settlement_devnet_started_with_ampersand_mines_mints_and_stops_on_sigint(tmp_path: Path) -> None:
    """`settlement devnet &` from a script inherits SIGINT as ignored; it used to ignore Ctrl-C and `kill -INT`.
    It also mined only on transactions, so a deposit never reached the service's 2 confirmations."""
    from tests.hub_helpers import CLI, free_test_port

    port = free_test_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLEMENT_")}
    log = tmp_path / "devnet.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*CLI, "devnet", "--port", str(port)], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "devnet running" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        match = re.search(r"test ERC-20 (0x[0-9a-fA-F]{40}) \(DEV, 18 decimals\): 1,000,000 DEV minted to each", text)
        assert match is not None, text
        assert "a block every 1s; 2 confirmations make a deposit count" in text
        assert f"export SETTLEMENT_RPC_URL=http://127.0.0.1:{port}" in text
        w3 = connect(f"http://127.0.0.1:{port}")
        first = w3.eth.block_number
        time.sleep(2.5)
        assert w3.eth.block_number >= first + 2  # blocks come without transactions
        erc20 = w3.eth.contract(address=Web3.to_checksum_address(match.group(1)), abi=ERC20_BALANCE)
        assert [erc20.functions.balanceOf(a).call() for a in w3.eth.accounts] == [10**24] * 10
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        assert log.read_text().rstrip().endswith("devnet stopped")
        assert not _our_devnet_answers(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_devnet_that_mines_per_transaction_warns_about_confirmations(tmp_path: Path) -> None:
    from tests.hub_helpers import CLI, free_test_port

    port = free_test_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLEMENT_")}
    process = subprocess.Popen(
        [*CLI, "devnet", "--port", str(port), "--block-time", "0", "--no-token"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # the warning is printed right after the accounts
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert "a block per transaction; 2 confirmations make a deposit count" in out
    assert "test ERC-20" not in out
    assert " ".join(err.split()) == (
        "warning this chain mines a block only when a transaction arrives: with SETTLEMENT_CONFIRMATIONS=2 a deposit "
        "counts only after 2 later transactions. Use `settlement devnet` (a block a second) or "
        "SETTLEMENT_CONFIRMATIONS=0."
    )


def _answers(port: int) -> bool:
    try:
        return bool(httpx.post(f"http://127.0.0.1:{port}", json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}))
    except httpx.TransportError:
        return False


ERC20_BALANCE = [
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    }
]
