"""What `pip install` of the package gives: the base install is a working payer SDK without any server library, and
the wheel carries no contract that only tests deploy."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.hub_helpers import ROOT

pytestmark = pytest.mark.slow

SDK_CHECK = """
import importlib.util, sys
for server_only in ("fastapi", "sqlalchemy", "alembic", "psycopg", "uvicorn", "typer", "prometheus_client"):
    assert importlib.util.find_spec(server_only) is None, server_only + " came with the base install"
from eth_account import Account
from settlement.sdk import PayerClient, ChannelRef, PaymentUncertainError
from settlement.eip712 import Domain, VoucherVerifier, sign_voucher
from settlement.chain.contracts import load_artifact
payer = Account.create()
domain = Domain(chain_id=31337, verifying_contract="0x" + "11" * 20)
signature = sign_voucher(payer, domain, b"\\x07" * 32, 1234)
assert VoucherVerifier(domain).recover(b"\\x07" * 32, 1234, signature) == bytes.fromhex(payer.address[2:])
assert load_artifact("ChannelHub").abi
from x402 import x402Client, x402ResourceServer  # the x402 plug-ins come with the SDK, without a web framework
from x402.http.clients import x402HttpxClient
from settlement.x402.client import ChannelHubClientScheme
from settlement.x402.server import ChannelHubServerScheme
try:  # a payee app's uvicorn protocol says what it needs
    import settlement.x402.serving
except ImportError as missing:
    assert "pip install 'uvicorn[standard]'" in str(missing), missing
else:
    raise AssertionError("settlement.x402.serving imported without uvicorn")
import settlement
print("sdk ok", settlement.__version__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = out.glob("channelhub_settlement-*.whl")
    return built


def pip_into(python: Path) -> list[str]:
    """`pip install` into another environment, at the versions `make setup` installs (constraints.txt);
    `--no-compile`: the check imports a few modules of the hundreds installed, and compiling them all was most of
    this test's time."""
    return [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile", "-c",
            str(ROOT / "constraints.txt")]  # fmt: skip


def test_the_wheel_carries_no_test_only_contract(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    artifacts = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("settlement/artifacts/"))
    assert artifacts == ["ChannelHub.json", "DevToken.json", "IChannelHub.json"]
    assert not [n for n in names if n.startswith("tests/")]


def test_the_base_install_is_a_working_sdk_without_the_server(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "app-venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # this venv's pip installs into it (`--python`): no ensurepip
    python = env_dir / "bin" / "python"
    install = subprocess.run([*pip_into(python), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([str(python), "-c", SDK_CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.startswith("sdk ok 0.1.0")
    command = subprocess.run(
        [str(env_dir / "bin" / "settlement"), "status"], capture_output=True, text=True, timeout=60
    )
    assert command.returncode == 1
    assert "pip install 'channelhub-settlement[server]'" in command.stderr
    # ... and the server extra makes the same install the operator's `settlement serve`
    server = subprocess.run([*pip_into(python), f"{wheel}[server]"], capture_output=True, text=True, timeout=600)
    assert server.returncode == 0, server.stderr[-3000:]
    serve = subprocess.run(
        [str(env_dir / "bin" / "settlement"), "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert serve.returncode == 0, serve.stderr[-3000:]
    assert "--log-level" in serve.stdout
