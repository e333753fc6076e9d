"""The README's paths, walked as a newcomer walks them: its own lines, run as written (only the ports and the
checkout's paths are changed), so the README cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.hub_helpers import CLI, ROOT, free_test_port, run_cli, typed_env, wait_until

README = (ROOT / "README.md").read_text(encoding="utf-8")
VENV_BIN = Path(sys.executable).parent
PAYEE, PAYEE_KEY = (
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    "0x" + "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
)

pytestmark = pytest.mark.slow


def block_after(heading: str, language: str) -> str:
    """The first fenced block of `language` after the line `heading`."""
    start = README.index(heading)
    match = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M).search(README, start)
    assert match is not None, f"no {language} block after {heading!r}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's commands: comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


class Shell:
    """Runs README lines one by one the way bash would for these simple forms: `export`, `VAR=value cmd`, `cmd &`
    (kept as a background job) and `kill %N` (SIGTERM to job N), in one working directory."""

    def __init__(self, cwd: Path, ports: dict[str, str]) -> None:
        self.cwd = cwd
        self.ports = ports
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLEMENT_")} | {
            "HOME": str(cwd),
            # a person whose 8545 and 8000 are taken would set these; the README's defaults are those two ports
            "SETTLEMENT_DEVNET_PORT": ports["8545"],
            "SETTLEMENT_API_PORT": ports["8000"],
        }
        self.jobs: list[subprocess.Popen[str]] = []
        self.outputs: list[str] = []

    def line(self, text: str) -> str:
        for old, new in self.ports.items():
            text = text.replace(old, new)
        return text.replace(".venv/bin/", f"{VENV_BIN}/")

    def run(self, command: str, *, timeout: float = 180) -> subprocess.CompletedProcess[str] | None:
        command = self.line(command)
        if command.startswith("export "):
            name, value = command.removeprefix("export ").split("=", 1)
            self.env[name] = value
            return None
        if command.startswith("kill %"):
            for number in reversed(command.removeprefix("kill ").split()):
                self.jobs[int(number.removeprefix("%")) - 1].send_signal(signal.SIGTERM)
            return None
        command = re.sub(r"\$(\w+)", lambda m: self.env.get(m.group(1), ""), command)  # $VAR, as bash expands it
        words = shlex.split(command.removesuffix("&"))
        env = dict(self.env)
        while "=" in words[0] and not words[0].startswith("/"):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if command.endswith("&"):
            with (self.cwd / f"job{len(self.jobs) + 1}.log").open("w") as log:
                # started as bash starts `cmd &` without job control: SIGINT ignored
                job = subprocess.Popen(
                    words, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                )  # fmt: skip
            self.jobs.append(job)
            return None
        result = subprocess.run(words, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def job_log(self, n: int) -> str:
        return (self.cwd / f"job{n}.log").read_text()

    def stop(self) -> None:
        for job in self.jobs:
            if job.poll() is None:
                job.kill()
                job.wait(timeout=30)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    ports = {"8545": str(free_test_port()), "8000": str(free_test_port())}
    walker = Shell(tmp_path, ports)
    yield walker
    walker.stop()


def test_the_by_hand_devnet_session_pays_settles_and_withdraws(shell: Shell, tmp_path: Path) -> None:
    """The README's session: devnet, deploy, serve, the payer snippet, the payee's view and withdrawal, and stop.
    Found broken once: with a devnet that mined only on transactions, the snippet's wait never ended."""
    (tmp_path / "pay.py").write_text(shell.line(block_after("## Paying from an app", "python")))
    steps = commands(block_after("### A session on a devnet, by hand", "bash"))
    assert [s.split()[0] for s in steps] == [
        ".venv/bin/settlement", "export", ".venv/bin/settlement", ".venv/bin/settlement", ".venv/bin/python",
        "export", ".venv/bin/settlement", ".venv/bin/settlement", "kill",
    ]  # fmt: skip
    devnet, export, deploy, serve, pay, payee_key, payee, withdraw, stop = steps
    assert payee_key.split()[1] == f"SETTLEMENT_WITHDRAW_KEY={PAYEE_KEY}"
    shell.run(devnet)
    wait_until(lambda: "devnet running" in shell.job_log(1), timeout=60)
    assert re.search(r"test ERC-20 0x[0-9a-fA-F]{40} \(DEV, 18 decimals\)", shell.job_log(1))
    shell.run(export)
    deployed = shell.run(deploy)
    assert deployed is not None
    assert deployed.returncode == 0, deployed.stderr
    shell.run(serve)
    wait_until(lambda: listening(int(shell.ports["8000"])), timeout=60)
    assert "warning" not in shell.job_log(2)  # 1 s blocks: confirmations come on their own

    paid = shell.run(pay)
    assert paid is not None
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert paid.stdout.splitlines()[0] == "25000000000 25000000000 999999975000000000"

    # The close made the engine settle the channel at once; the payee (signed in with its own key) sees it, then
    # takes it out.
    shell.run(payee_key)

    def settled() -> bool:
        report = run_cli("payee", "--json", payee.split()[-1], env=_cli_env(shell), cwd=tmp_path)
        assets = json.loads(report.stdout)["assets"] if report.returncode == 0 else []
        return bool(assets) and assets[0]["withdrawable"] == "25000000000"

    wait_until(settled, timeout=90)
    view = shell.run(payee)
    assert view is not None
    assert view.returncode == 0, view.stderr
    cells = ["ETH \\(wei\\)", "1", "25,000,000,000", "25,000,000,000", "0", "25,000,000,000", "0"]
    assert re.search(r"\s*│\s*".join(cells), view.stdout), view.stdout
    out = shell.run(withdraw)
    assert out is not None
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "withdrew 25,000,000,000 wei (0.000000025 ETH) to 0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
    )

    # The README's close, to its end: move the devnet's clock past the 60 s challenge period, finalize, refund.
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's clock step cannot run as written")
    (jump,) = commands(block_after("To see a close to its end", "bash"))
    moved = shell.run(jump)
    assert moved is not None
    assert moved.returncode == 0 and '"result"' in moved.stdout, moved.stdout + moved.stderr
    listed = run_cli("channels", "--json", env=_cli_env(shell), cwd=tmp_path)
    (channel_id,) = [c["channelId"] for c in json.loads(listed.stdout)]
    finish = shell.line(FINISH.format(channel_id=channel_id))
    finished = subprocess.run(
        [sys.executable, "-c", finish], cwd=tmp_path, env=shell.env, capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == [str(2 * 10**18 - 25_000_000_000)]  # the whole deposit but what was paid

    shell.run(stop)
    # serve shuts down gracefully, then uvicorn re-raises the SIGTERM it caught (the shell prints "Terminated")
    assert [job.wait(timeout=30) for job in shell.jobs] == [0, -signal.SIGTERM]
    assert "devnet stopped" in shell.job_log(1)
    assert "Application shutdown complete." in shell.job_log(2)
    assert not listening(int(shell.ports["8545"]))


# What the README says to run after the clock step, in the snippet's Python session (a new one here, so the channel
# is rebuilt from its id as the README's SDK section shows).
FINISH = """
from settlement.sdk import PayerClient
client = PayerClient("0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
                     rpc_url="http://127.0.0.1:8545", service_url="http://127.0.0.1:8000")
channel = client.channel("{channel_id}")
client.finalize_close(channel)
print(client.withdraw())
"""


def _cli_env(shell: Shell) -> dict[str, str]:
    return {k: v for k, v in shell.env.items() if k.startswith("SETTLEMENT_")}


def test_make_run_then_a_second_terminal_reads_the_demo(tmp_path: Path) -> None:
    """`make run`'s demo prints the export lines; a second terminal (another directory) pastes them and the
    read-only commands see the demo's channels. Found broken once: `status` said `deployment_missing`; and once in a
    checkout whose path has a space (`bash` took the path's second word for a name to export)."""
    port = free_test_port()
    shell = typed_env()
    dry = subprocess.run(
        ["make", "-n", "run", f"PORT={port}"], cwd=ROOT, env=shell, capture_output=True, text=True, check=True
    )
    assert [line for line in dry.stdout.splitlines() if "settlement demo" in line] == [
        f".venv/bin/settlement demo --port {port}"
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETTLEMENT_")} | {"HOME": str(tmp_path)}
    log = tmp_path / "demo.log"
    checkout = tmp_path / "My Projects"
    checkout.mkdir()
    with log.open("w") as out:
        demo = subprocess.Popen(  # a group of its own, as a terminal's foreground job
            [*CLI, "demo", "--port", str(port)], cwd=checkout, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_until(lambda: "demo: 6 channels open" in log.read_text(), timeout=120)
        # and the paid API (x402): its payer's requests are paid and the payee's earnings reported
        wait_until(lambda: re.search(r"x402 demo: [1-9]\d* paid requests", log.read_text()) is not None, timeout=60)
        lines = [line.strip() for line in log.read_text().splitlines() if line.strip().startswith("export SETTLEMENT_")]
        pasted = subprocess.run(  # into bash, as a second terminal would
            ["bash", "-c", "\n".join([*lines, "env -0"])], env={"PATH": os.environ["PATH"]}, capture_output=True,
            text=True, check=True,
        )  # fmt: skip
        exports = dict(item.split("=", 1) for item in pasted.stdout.split("\0") if item.startswith("SETTLEMENT_"))
        assert sorted(exports) == [
            "SETTLEMENT_API_KEY", "SETTLEMENT_DATABASE_URL", "SETTLEMENT_DEPLOYMENT_FILE", "SETTLEMENT_RPC_URL",
        ]  # fmt: skip
        deployment = checkout / ".settlement" / "demo-deployment.json"
        assert (exports["SETTLEMENT_DEPLOYMENT_FILE"], exports["SETTLEMENT_DATABASE_URL"]) == (
            str(deployment),
            f"sqlite:///{deployment.parent / 'demo.db'}",
        )
        assert httpx.get(f"http://127.0.0.1:{port}/v1/channels").status_code == 401
        listing = httpx.get(
            f"http://127.0.0.1:{port}/v1/channels", headers={"Authorization": f"Bearer {exports['SETTLEMENT_API_KEY']}"}
        )
        assert len(listing.json()["items"]) == 7
        second = tmp_path / "elsewhere"
        second.mkdir()
        listed = run_cli("channels", "--json", env=exports, cwd=second)
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)) == 7  # 3 payers x 2 payees, and the x402 payer's channel
        status = run_cli("status", "--json", env=exports, cwd=second)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["settleInterval"] == 10.0
        view = run_cli(  # the demo's payees are devnet accounts 4 and 5
            "payee", "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65",
            env=exports | {"SETTLEMENT_SERVICE_URL": f"http://127.0.0.1:{port}"}, cwd=second,
        )  # fmt: skip
        assert view.returncode == 0 and "ETH (wei)" in view.stdout, view.stdout + view.stderr
    finally:
        before = len(log.read_text())
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: every process of the group gets it
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, log.read_text()[-3000:]
    last = log.read_text()[before:]
    assert last.strip().splitlines()[-1] == "stopped", last
    assert not re.search(r"Traceback|does not answer|failed", last), last  # anvil stops last, not first
    # the demo's payers stop before the API does: no payment left without an answer by Ctrl-C
    assert "refused: [" not in last, last


def test_a_taken_port_stops_the_demo_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo", "--port", str(port), env={"HOME": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error [port_in_use] port {port} on 127.0.0.1 is in use (another `settlement serve` or `make run`?): "
        f"choose another with --port {port + 1} (make run PORT={port + 1})"
    )
    assert result.stdout == ""  # no devnet table, no "API on ..." line
    assert not (tmp_path / ".settlement").exists()
