"""Health, readiness and the EIP-712 domain, served for a real deployment."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from web3 import Web3

from settlement.api.app import create_app
from settlement.deployment import deploy_hub
from settlement.devnet import Devnet
from settlement.vouchers import VoucherVerifier, read_domain
from tests.conftest import devnet_settings


def test_health_ready_and_domain(devnet: Devnet, w3: Web3, tmp_path: Path) -> None:
    deployment = deploy_hub(w3, devnet.accounts[3], 600)
    deployment.save(tmp_path / "d.json")
    settings = devnet_settings(rpc_url=devnet.url, deployment_file=tmp_path / "d.json")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["status"] == "ok"
        ready = client.get("/ready").json()
        assert ready["status"] == "ready"
        assert ready["contract"] == deployment.address
        info = client.get("/v1/eip712").json()
    assert info["domain"] == {
        "name": "ChannelHub",
        "version": "1",
        "chainId": devnet.chain_id,
        "verifyingContract": deployment.address,
    }
    assert info["primaryType"] == "Voucher"
    hub = w3.eth.contract(address=Web3.to_checksum_address(deployment.address), abi=[])
    assert hub.address == deployment.address
    # the domain served is the one the contract hashes with
    from settlement.deployment import hub_contract

    contract = hub_contract(w3, deployment)
    domain = read_domain(contract)
    verifier = VoucherVerifier(domain)
    assert verifier.digest(b"\x01" * 32, 5) == bytes(contract.functions.hashVoucher(b"\x01" * 32, 5).call())
