"""Shared fixtures: one real anvil per session, a snapshot/revert around every test, factories for the rest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError

from settlement.chain import Revert, connect, revert_of
from settlement.config import Settings
from settlement.contracts import HUB, load_artifact
from settlement.devnet import Devnet
from settlement.vouchers import Domain, sign_voucher

ROOT = Path(__file__).resolve().parent.parent
CHALLENGE_PERIOD = 3600


def devnet_settings(**overrides: Any) -> Settings:
    """Settings for a test devnet, independent of the caller's environment and .env file."""
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def devnet() -> Iterator[Devnet]:
    with Devnet(devnet_settings(devnet_accounts=20)) as net:
        yield net


@pytest.fixture(scope="session")
def w3(devnet: Devnet) -> Web3:
    return connect(devnet.url)


@pytest.fixture(scope="session")
def accounts(devnet: Devnet) -> list[LocalAccount]:
    return devnet.accounts


@pytest.fixture(scope="session")
def deploy(w3: Web3, accounts: list[LocalAccount]) -> Callable[..., Contract]:
    """Factory: deploy(name, *constructor_args, sender=...) -> bound contract."""

    def make(name: str, *args: Any, sender: LocalAccount | None = None) -> Contract:
        artifact = load_artifact(name)
        factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        tx = factory.constructor(*args).transact({"from": (sender or accounts[0]).address})
        receipt = w3.eth.wait_for_transaction_receipt(tx)
        return w3.eth.contract(address=receipt["contractAddress"], abi=artifact.abi)

    return make


@pytest.fixture(scope="session")
def session_hub(deploy: Callable[..., Contract]) -> Contract:
    return deploy(HUB, CHALLENGE_PERIOD)


@pytest.fixture(autouse=True)
def evm_snapshot(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that touches the chain starts from the same state and leaves nothing behind."""
    if "w3" not in request.fixturenames:
        yield
        return
    chain: Web3 = request.getfixturevalue("w3")
    request.getfixturevalue("session_hub")  # deployed once, before the first snapshot
    snapshot = chain.provider.make_request("evm_snapshot", [])["result"]
    yield
    assert chain.provider.make_request("evm_revert", [snapshot])["result"] is True


@pytest.fixture
def hub(session_hub: Contract) -> Contract:
    return session_hub


@pytest.fixture
def domain(hub: Contract, w3: Web3) -> Domain:
    return Domain(chain_id=w3.eth.chain_id, verifying_contract=hub.address)


@pytest.fixture
def sign(domain: Domain) -> Callable[..., bytes]:
    """Factory: sign(account, channel_id, cumulative, domain=None) -> 65-byte signature."""

    def make(account: LocalAccount, channel_id: bytes, cumulative: int, other: Domain | None = None) -> bytes:
        return sign_voucher(account, other or domain, channel_id, cumulative)

    return make


def reverts_with(call: Any, abi: list[dict[str, Any]], tx: dict[str, Any]) -> Revert:
    """Send `call` expecting a custom-error revert; return the decoded error."""
    with pytest.raises((ContractCustomError, ContractLogicError)) as info:
        call.transact(tx)
    revert = revert_of(info.value, abi)
    assert revert is not None, f"no revert data in {info.value!r}"
    return revert


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return os.environ.get("SETTLEMENT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def token(deploy: Callable[..., Contract]) -> Contract:
    """A fresh mintable ERC-20 (18 decimals), reverted with the test."""
    return deploy("DevToken", "Dev Token", "DEV", 18)


@pytest.fixture
def open_channel(w3: Web3, hub: Contract) -> Callable[..., Any]:
    """Factory: open_channel(payer, payee, token=None, amount=10**18, salt=None) -> Channel.

    For a token channel the payer is minted and approves `amount` first (DevToken-like tokens only).
    """
    from tests.hub_helpers import ETH, Channel, channel_id, salt_of, send

    counter = iter(range(1, 1_000_000))

    def make(
        payer: LocalAccount, payee: str, token: Contract | None = None, amount: int = 10**18, salt: bytes | None = None
    ) -> Channel:
        salt = salt if salt is not None else salt_of(next(counter))
        if token is None:
            send(w3, hub.functions.open(payee, ETH, salt, amount), payer.address, value=amount)
            asset = ETH
        else:
            send(w3, token.functions.mint(payer.address, amount), payer.address)
            send(w3, token.functions.approve(hub.address, amount), payer.address)
            send(w3, hub.functions.open(payee, token.address, salt, amount), payer.address)
            asset = token.address
        cid = channel_id(payer.address, payee, asset, salt)
        return Channel(id=cid, payer=payer, payee=payee, token=asset, salt=salt, deposit=amount)

    return make
