"""A local anvil devnet on a free port, owned by this process: it never outlives its parent."""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
from eth_account.signers.local import LocalAccount

from settlement.chain.contracts import DEV_TOKEN, load_artifact
from settlement.chain.deployment import deploy_contract
from settlement.chain.node import Transactor, connect
from settlement.errors import DevnetError
from settlement.server.config import Settings
from settlement.server.operator import devnet_accounts

_PR_SET_PDEATHSIG = 1


def find_anvil(settings: Settings) -> Path:
    """The anvil binary: the configured one, the npm-installed one of this checkout, or one on PATH."""
    if settings.anvil_path is not None:
        return settings.anvil_path
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):  # the checkout this package is installed from
        candidate = base / "node_modules" / ".bin" / "anvil"
        if candidate.exists():
            return candidate
    found = shutil.which("anvil")
    if found is None:
        raise DevnetError("anvil not found: run `npm ci` in the repository (Node 20+) or set SETTLEMENT_ANVIL_PATH")
    return Path(found)


def free_port(host: str) -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    """Nothing listens on the port right now: it can be bound (as servers bind, with SO_REUSEADDR, so a closed
    connection's TIME_WAIT does not count). A connect() probe would be wrong: on Linux a connection to a free port in
    the ephemeral range can connect to itself, and the port then looks taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


PORT_RELEASE_SECONDS = 5.0  # npm's anvil is a wrapper: its child may hold the port a moment after it was stopped


def _wait_port_free(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not port_free(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM to anvil when our process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Devnet:
    """One anvil process. Use as a context manager, or call start() and stop()."""

    settings: Settings
    url: str = ""
    port: int = 0
    accounts: list[LocalAccount] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None

    @property
    def chain_id(self) -> int:
        return self.settings.devnet_chain_id

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self, port: int) -> list[str]:
        s = self.settings
        cmd = [
            str(find_anvil(s)),
            "--host", s.devnet_host,
            "--port", str(port),
            "--chain-id", str(s.devnet_chain_id),
            "--accounts", str(s.devnet_accounts),
            "--balance", str(s.devnet_balance_eth),
            "--mnemonic", s.devnet_mnemonic,
        ]  # fmt: skip
        if s.devnet_block_time is not None:
            cmd += ["--block-time", str(s.devnet_block_time)]
        if s.devnet_keep_states is not None:  # long runs: anvil otherwise keeps every block's state in memory
            cmd += ["--prune-history", str(s.devnet_keep_states)]
        return cmd

    def start(self, *, stdout: int | None = subprocess.DEVNULL) -> Devnet:
        """Start anvil and wait until its JSON-RPC answers; retries once if the chosen port was taken meanwhile."""
        if self._process is not None:
            raise DevnetError("devnet already started")
        last_error = ""
        for _ in range(3):
            port = self.settings.devnet_port or free_port(self.settings.devnet_host)
            if not _wait_port_free(self.settings.devnet_host, port, PORT_RELEASE_SECONDS):
                raise DevnetError(f"anvil did not start: port {port} is already in use")
            # stderr goes to a file, not a pipe: a pipe nobody reads would stall a long-running anvil once full
            errors = tempfile.TemporaryFile()
            try:
                # A session of its own: Ctrl-C in a terminal signals the whole foreground group, and anvil dying
                # first made the demo's last lines RPC errors; the owner stops it after everything that uses it.
                process = subprocess.Popen(
                    self.command(port),
                    stdout=stdout,
                    stderr=errors,
                    preexec_fn=_die_with_parent,
                    start_new_session=True,
                )
            except OSError as ex:
                errors.close()
                raise DevnetError(f"cannot start anvil: {ex}") from ex
            url = f"http://{self.settings.devnet_host}:{port}"
            last_error = self._wait_ready(process, url, errors)
            errors.close()
            if not last_error:
                self._process, self.url, self.port = process, url, port
                self.accounts = devnet_accounts(self.settings.devnet_mnemonic, self.settings.devnet_accounts)
                atexit.register(self.stop)
                return self
            if self.settings.devnet_port:
                break
        raise DevnetError(f"anvil did not start: {last_error}")

    def _wait_ready(self, process: subprocess.Popen[bytes], url: str, errors: IO[bytes]) -> str:
        deadline = time.monotonic() + self.settings.devnet_start_timeout
        payload = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    errors.seek(0)
                    err = errors.read().decode(errors="replace")
                    return f"exited with {process.returncode}: {err.strip()[-500:]}"
                try:
                    # a second poll() guards against answering for another process on the same port
                    if client.post(url, json=payload).json().get("result") and process.poll() is None:
                        return ""
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.05)
        _terminate(process)
        return f"no JSON-RPC answer on {url} within {self.settings.devnet_start_timeout}s"

    def stop(self) -> None:
        """Stop anvil and reap it; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process)
            atexit.unregister(self.stop)

    def __enter__(self) -> Devnet:
        return self.start() if self._process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@dataclass(frozen=True)
class TestToken:
    """The devnet's test ERC-20 (DevToken: anyone may mint it, so it exists on devnets only)."""

    address: str
    symbol: str
    decimals: int
    minted: int  # base units minted to each devnet account


def deploy_test_token(net: Devnet, *, per_account: int = 10**6 * 10**18) -> TestToken:
    """Deploy a DevToken from the devnet's last account and mint `per_account` to every account, so that
    `open_channel(..., token=address)` can be tried by hand. The last account deploys it so that the operator's
    (the first account's) nonce, and with it the hub's address from `settlement deploy`, stay what they were."""
    w3 = connect(net.url)
    artifact = load_artifact(DEV_TOKEN)
    transactor = Transactor(w3, net.accounts[-1], artifact.abi)
    token, _ = deploy_contract(transactor, artifact, "Devnet Token", "DEV", 18)
    with ThreadPoolExecutor(max_workers=len(net.accounts)) as pool:  # one block for every mint, not one each
        list(pool.map(lambda a: transactor.send(token.functions.mint(a.address, per_account)), net.accounts))
    return TestToken(address=str(token.address), symbol="DEV", decimals=18, minted=per_account)
