"""A store belongs to one chain instance: a restarted devnet that redeploys the hub at the same address, with the
same chain id, is another chain, and the service says so instead of serving channels that do not exist."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web3.types import RPCEndpoint

from settlement.api.app import create_app
from settlement.chain.deployment import Deployment, deploy_hub
from settlement.chain.node import connect
from settlement.devtools.devnet import Devnet
from settlement.errors import ChainMismatchError
from settlement.server.service import Service
from tests.hub_helpers import CHALLENGE_PERIOD, devnet_settings, free_test_port


def start_chain(port: int, extra_blocks: int) -> tuple[Devnet, Deployment]:
    """A devnet on `port` with the hub deployed by its first account, after `extra_blocks` empty blocks."""
    net = Devnet(devnet_settings(devnet_port=port, devnet_accounts=2)).start()
    w3 = connect(net.url)
    for _ in range(extra_blocks):
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    return net, deploy_hub(w3, net.accounts[0], CHALLENGE_PERIOD)


@pytest.fixture
def restartable_chain() -> Any:
    """Factory: start(extra_blocks) -> (devnet, deployment) on one fixed port; every devnet is stopped after."""
    port = free_test_port()
    nets: list[Devnet] = []

    def start(extra_blocks: int = 0) -> tuple[Devnet, Deployment]:
        for net in nets:
            net.stop()
        net, deployment = start_chain(port, extra_blocks)
        nets.append(net)
        return net, deployment

    yield start
    for net in nets:
        net.stop()


def settings_for(net: Devnet, deployment: Deployment, store_url: str, tmp_path: Path) -> Any:
    record = tmp_path / "deployment.json"
    deployment.save(record)
    return devnet_settings(
        rpc_url=net.url,
        deployment_file=record,
        database_url=store_url,
        confirmations=0,
        indexer_interval=0.05,
        engine_enabled=False,
        access_control=False,  # as in service_settings
    )


def test_a_store_of_a_restarted_devnet_is_refused(
    restartable_chain: Callable[..., tuple[Devnet, Deployment]], store_url: str, tmp_path: Path
) -> None:
    old_net, old = restartable_chain()
    service = Service.build(settings_for(old_net, old, store_url, tmp_path))
    service.stop()
    new_net, new = restartable_chain(extra_blocks=1)
    assert (new.address, new.chain_id) == (old.address, old.chain_id)  # what used to be taken as "the same hub"
    with pytest.raises(ChainMismatchError, match=f"belongs to the hub deployed in block {old.block_number}"):
        Service.build(settings_for(new_net, new, store_url, tmp_path))
    with pytest.raises(ChainMismatchError, match="another instance of the chain"):  # the old record on the new chain
        Service.build(settings_for(new_net, old, store_url, tmp_path))


def test_ready_fails_while_the_chain_under_a_running_service_was_replaced(
    restartable_chain: Callable[..., tuple[Devnet, Deployment]], store_url: str, tmp_path: Path
) -> None:
    old_net, old = restartable_chain()
    with TestClient(create_app(settings_for(old_net, old, store_url, tmp_path))) as client:
        assert client.get("/ready").status_code == 200
        new_net, _new = restartable_chain(extra_blocks=3)  # same port: the running service now talks to it
        connect(new_net.url).provider.make_request(RPCEndpoint("anvil_mine"), [hex(10)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # while the port changes hands /ready says the chain does not answer
            answer = client.get("/ready")
            if "[chain_mismatch]" in answer.json().get("message", ""):
                break
            time.sleep(0.1)
        assert answer.status_code == 503
        assert answer.json()["code"] == "chain_unavailable"
        assert "[chain_mismatch]" in answer.json()["message"]
        assert client.get("/v1/channels").status_code == 200  # the API itself still answers
