"""Deploying the hub and the deployment record (address, chain, block, artifact checksum) other commands read."""

from __future__ import annotations

import json
from pathlib import Path

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from pydantic import BaseModel, ConfigDict, ValidationError
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import TransactionNotFound
from web3.types import TxReceipt

from settlement.chain.contracts import HUB, Artifact, load_artifact, runtime_matches
from settlement.chain.node import REPRICE_AFTER, Transactor, rpc_errors
from settlement.domain.model import BlockRef
from settlement.errors import ChainMismatchError, DeploymentError


class Deployment(BaseModel):
    """Where the hub lives; written by `settlement deploy`, read by every command that talks to the hub."""

    model_config = ConfigDict(frozen=True)

    contract: str = HUB
    address: str
    chain_id: int
    block_number: int
    tx_hash: str
    deployer: str
    challenge_period: int
    artifact_sha256: str
    block_hash: str | None = None  # the deployment block's hash: names the chain instance (records before it: None)

    def save(self, path: Path) -> None:
        """Write atomically, so a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError as ex:
            raise DeploymentError(f"no deployment file at {path}: run `settlement deploy` first") from ex
        except (OSError, ValidationError, json.JSONDecodeError) as ex:
            raise DeploymentError(f"deployment file {path} is unreadable: {ex}") from ex

    def check(self, w3: Web3, artifact: Artifact | None = None) -> BlockRef:
        """Refuse a record made for another chain or chain instance, another artifact, or an address without the
        hub's code; returns the deployment block (see `anchor`)."""
        artifact = artifact or load_artifact(self.contract)
        chain_id = w3.eth.chain_id
        if chain_id != self.chain_id:
            raise DeploymentError(f"deployment is for chain {self.chain_id}, the RPC serves chain {chain_id}")
        if artifact.checksum != self.artifact_sha256:
            raise DeploymentError("deployment was made from another artifact: redeploy with `settlement deploy`")
        code = w3.eth.get_code(Web3.to_checksum_address(self.address))
        if not runtime_matches(artifact, bytes(code)):
            raise DeploymentError(f"no {self.contract} code at {self.address} on chain {chain_id}: redeploy")
        return self.anchor(w3)

    def anchor(self, w3: Web3) -> BlockRef:
        """The deployment block as this chain has it, after checking that it is the block this record names.

        A restarted devnet that redeployed gives the hub the same address and chain id, so those prove nothing: the
        deployment transaction must be in block `block_number`, with the recorded hash where the record has one.
        """
        with rpc_errors(f"reading the deployment transaction {self.tx_hash}"):
            try:
                receipt = w3.eth.get_transaction_receipt(HexBytes(self.tx_hash))
            except TransactionNotFound:
                receipt = None
        found = None if receipt is None else HexBytes(receipt["blockHash"]).to_0x_hex()
        if (
            receipt is None
            or receipt["blockNumber"] != self.block_number
            or (self.block_hash is not None and found != self.block_hash)
        ):
            raise ChainMismatchError(
                f"the chain has no deployment transaction {self.tx_hash} in block {self.block_number}"
                + (f" ({self.block_hash})" if self.block_hash else "")
                + ": this deployment record is from another instance of the chain (a restarted devnet?); redeploy"
            )
        assert found is not None
        return BlockRef(self.block_number, found)


def deploy_contract(transactor: Transactor, artifact: Artifact, *args: object) -> tuple[Contract, TxReceipt]:
    """Deploy `artifact` with constructor `args`; returns the contract and the deployment's receipt."""
    factory = transactor.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = transactor.send(factory.constructor(*args))
    address = receipt["contractAddress"]
    if address is None:
        raise DeploymentError("deployment receipt has no contract address")
    return transactor.w3.eth.contract(address=address, abi=artifact.abi), receipt


def deploy_hub(
    w3: Web3,
    account: LocalAccount,
    challenge_period: int,
    *,
    timeout: float = 120.0,
    reprice_after: float = REPRICE_AFTER,
    max_fee_per_gas: int | None = None,
) -> Deployment:
    """Deploy a ChannelHub and return its record (not yet saved)."""
    artifact = load_artifact(HUB)
    transactor = Transactor(
        w3, account, artifact.abi, timeout=timeout, reprice_after=reprice_after, max_fee_per_gas=max_fee_per_gas
    )
    contract, receipt = deploy_contract(transactor, artifact, challenge_period)
    return Deployment(
        address=contract.address,
        chain_id=w3.eth.chain_id,
        block_number=receipt["blockNumber"],
        block_hash=HexBytes(receipt["blockHash"]).to_0x_hex(),
        tx_hash=receipt["transactionHash"].to_0x_hex(),
        deployer=account.address,
        challenge_period=challenge_period,
        artifact_sha256=artifact.checksum,
    )


def hub_contract(w3: Web3, deployment: Deployment) -> Contract:
    """The deployed hub, bound to its ABI."""
    return w3.eth.contract(address=Web3.to_checksum_address(deployment.address), abi=load_artifact(HUB).abi)


def hub_at(w3: Web3, address: str) -> Contract | None:
    """The hub at `address`, bound to its ABI, or None when the address holds no ChannelHub code on this chain (what
    a payer or a payee checks before it trusts an address it was told)."""
    artifact = load_artifact(HUB)
    checksummed = Web3.to_checksum_address(address)
    with rpc_errors("reading the hub's code"):
        code = bytes(w3.eth.get_code(checksummed))
    return w3.eth.contract(address=checksummed, abi=artifact.abi) if runtime_matches(artifact, code) else None
