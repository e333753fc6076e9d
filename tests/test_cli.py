"""The operator CLI as a user runs it: real subprocesses against a real devnet."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import httpx
import pytest
from hexbytes import HexBytes
from web3 import Web3

from settlement.chain.contracts import HUB, load_artifact, runtime_matches
from settlement.chain.deployment import Deployment
from settlement.devtools.devnet import Devnet
from settlement.errors import DeploymentError
from settlement.server.config import Settings
from tests.hub_helpers import run_cli, wait_until
from tests.servers import ServiceProcess, forked_cli


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run_cli("--help", env={}, cwd=tmp_path)
    assert result.returncode == 0
    commands = ("devnet", "deploy", "serve", "settle", "status", "reconcile", "withdraw", "payee", "simulate", "demo")
    for command in commands:
        assert command in result.stdout


def test_deploy_writes_a_record_with_code_at_the_address(devnet: Devnet, w3: Web3, tmp_path: Path) -> None:
    out = tmp_path / "deployment.json"
    key = devnet.accounts[1].key.hex()
    env = {"SETTLEMENT_RPC_URL": devnet.url, "SETTLEMENT_PRIVATE_KEY": key, "SETTLEMENT_DEPLOYMENT_FILE": str(out)}
    result = run_cli("deploy", "--challenge-period", "120", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    deployment = Deployment.load(out)
    assert record["address"] == deployment.address
    assert deployment.chain_id == devnet.chain_id
    assert deployment.deployer == devnet.accounts[1].address
    assert deployment.artifact_sha256 == load_artifact(HUB).checksum
    code = w3.eth.get_code(Web3.to_checksum_address(deployment.address))
    assert runtime_matches(load_artifact(HUB), bytes(code))
    deployed = w3.eth.get_block(deployment.block_number)["transactions"][0]  # hashes: not full transactions
    assert cast(HexBytes, deployed).to_0x_hex() == deployment.tx_hash
    deployment.check(w3)
    hub = w3.eth.contract(address=Web3.to_checksum_address(deployment.address), abi=load_artifact(HUB).abi)
    assert hub.functions.challengePeriod().call() == 120


def test_deploy_without_key_uses_first_account_on_anvil(devnet: Devnet, tmp_path: Path) -> None:
    env = {"SETTLEMENT_RPC_URL": devnet.url, "SETTLEMENT_DEPLOYMENT_FILE": str(tmp_path / "d.json")}
    result = run_cli("deploy", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "anvil only" in result.stderr
    assert Deployment.load(tmp_path / "d.json").deployer == devnet.accounts[0].address


def test_deploy_refuses_a_placeholder_key(devnet: Devnet, tmp_path: Path) -> None:
    env = {"SETTLEMENT_RPC_URL": devnet.url, "SETTLEMENT_PRIVATE_KEY": "changeme"}
    result = run_cli("deploy", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "placeholder" in result.stderr


def test_deploy_to_nowhere_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("deploy", env={"SETTLEMENT_RPC_URL": "http://127.0.0.1:9"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "[chain_unavailable]" in result.stderr


def test_record_for_another_chain_is_refused(devnet: Devnet, w3: Web3, tmp_path: Path) -> None:
    from settlement.chain.deployment import deploy_hub

    deployment = deploy_hub(w3, devnet.accounts[2], 600)
    deployment.model_copy(update={"chain_id": 1}).save(tmp_path / "d.json")
    with pytest.raises(DeploymentError, match="for chain 1"):
        Deployment.load(tmp_path / "d.json").check(w3)
    with pytest.raises(DeploymentError, match="no deployment file"):
        Deployment.load(tmp_path / "missing.json")


def test_a_setting_no_one_reads_is_refused_not_ignored(tmp_path: Path) -> None:
    """A misspelt variable (SETTLEMENT_RPC_FALLBACKS for SETTLEMENT_RPC_FALLBACK_URLS: this suite's own faults test
    had it so, and ran without its fallback) was ignored without a word and the default used. Every command refuses
    a SETTLEMENT_* name no setting reads, in the environment or .env, and names the setting it is closest to."""
    store = {"SETTLEMENT_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    refused = forked_cli("status", env={**store, "SETTLEMENT_RPC_FALLBACKS": '["http://127.0.0.1:9"]'}, cwd=tmp_path)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "error [config_invalid] not a setting: SETTLEMENT_RPC_FALLBACKS (did you mean SETTLEMENT_RPC_FALLBACK_URLS?), "
        "in the environment or .env: fix or unset it (the README lists every setting)",
    )
    (tmp_path / ".env").write_text("# this host's\nexport SETTLEMENT_CONFIRMATION=3\nOTHER_APP=1\nSETTLEMENT_XYZ=\n")
    refused = forked_cli("status", env=store, cwd=tmp_path)
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "error [config_invalid] not a setting: SETTLEMENT_CONFIRMATION (did you mean SETTLEMENT_CONFIRMATIONS?), "
        "SETTLEMENT_XYZ, in the environment or .env: fix or unset it (the README lists every setting)",
    )
    (tmp_path / ".env").write_text("export SETTLEMENT_CONFIRMATIONS=3\nOTHER_APP=1\n")  # others' names are theirs
    ran = forked_cli("status", env=store, cwd=tmp_path)  # past the settings: to the store, which is not there yet
    assert (ran.returncode, ran.stderr.strip()) == (
        1,
        f"error [store_error] no database at {tmp_path / 'store.db'}: set SETTLEMENT_DATABASE_URL to the service's "
        "store (`settlement serve` creates it)",
    )


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SETTLEMENT_RPC_URL", "http://example.invalid:1")
    monkeypatch.setenv("SETTLEMENT_CHALLENGE_PERIOD", "900")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.rpc_url == "http://example.invalid:1"
    assert settings.challenge_period == 900
    monkeypatch.setenv("SETTLEMENT_CHALLENGE_PERIOD", "5")
    with pytest.raises(ValueError, match="challenge_period"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_serve_writes_no_access_line_per_request_unless_asked(
    spawn: Callable[..., ServiceProcess], store_url: str
) -> None:
    """One log line per voucher is noise at thousands a second: access logs are opt-in (`--access-log`)."""
    service = spawn(store_url)
    for _ in range(3):
        assert httpx.get(f"{service.url}/health").status_code == 200
    service.stop()
    assert '"GET /health HTTP/1.1" 200' not in service.log.read_text()


STOP_HOOK = """
import time
from pathlib import Path

import httpx

from settlement.cli.main import _serve
from settlement.server.config import get_settings

settings = get_settings()
release = Path("release")


def on_stop() -> None:  # as the demo's payers: a payment in flight answered by the API, then done when released
    answer = httpx.get(f"http://127.0.0.1:{settings.api_port}/health", timeout=5)
    print("stopping: /health", answer.status_code, flush=True)
    while not release.exists():
        time.sleep(0.05)


_serve(settings, "127.0.0.1", settings.api_port, "warning", on_stop=on_stop)
print("stopped")
"""


@pytest.mark.parametrize("then", ["released", "second_ctrl_c"])
def test_serve_answers_while_its_stop_hook_runs_and_closes_after_it(
    then: str, spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """`make run`'s demo stops its payers when Ctrl-C arrives, before the API closes its socket. The hook ran in the
    signal handler, which held the API's event loop: a payment begun just before Ctrl-C went out after the close,
    found no one to answer it, and the demo printed it as refused (`payment_uncertain`; a CI run failed so). Now the
    hook runs beside the API, which answers until it returns (old code: the hook's own request timed out); a second
    Ctrl-C stops at once."""
    script = tmp_path / "stop_hook.py"
    script.write_text(STOP_HOOK)
    service = spawn(f"sqlite:///{tmp_path / 'stop-hook.db'}", script=script)
    assert service.process is not None
    service.process.send_signal(signal.SIGINT)
    wait_until(lambda: "stopping: /health 200" in service.log.read_text(), timeout=15)
    for _ in range(3):  # still serving while the hook waits
        assert httpx.get(f"{service.url}/health", timeout=5).status_code == 200
        time.sleep(0.2)
    if then == "released":
        (tmp_path / "release").touch()
    else:
        service.process.send_signal(signal.SIGINT)
    assert service.process.wait(timeout=30) == 0, service.log.read_text()[-3000:]
    assert service.log.read_text().strip().splitlines()[-1] == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/health", timeout=5)


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    """Any command, any bad variable: `config_invalid` with the variable's name, never a pydantic traceback."""
    env = {"SETTLEMENT_CONFIRMATIONS": "many", "SETTLEMENT_PRIVATE_KEY": "changeme"}
    result = run_cli("status", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error [config_invalid] configuration refused: SETTLEMENT_PRIVATE_KEY is a placeholder; set a real key or "
        "leave it unset; SETTLEMENT_CONFIRMATIONS: Input should be a valid integer, unable to parse string as an "
        "integer"
    )
