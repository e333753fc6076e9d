"""Shipped contract artifacts: load them from the package and prove they match the sources they claim."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from settlement.errors import ArtifactError, SourceDriftError

HUB = "ChannelHub"
DEV_TOKEN = "DevToken"  # a mintable OpenZeppelin ERC20, for devnets, the simulator and tests


@dataclass(frozen=True)
class Artifact:
    """A compiled contract as committed under settlement/artifacts/."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str
    compiler_version: str
    sources: dict[str, str]
    immutable_references: list[tuple[int, int]]  # (start, length) byte ranges set by the constructor
    checksum: str  # sha256 of the artifact file itself, recorded in deployments


def _artifact_bytes(name: str) -> bytes:
    """The shipped artifact, or in a source checkout a test-only one (artifacts/test/, left out of the wheel)."""
    folder = resources.files("settlement").joinpath("artifacts")
    for candidate in (folder.joinpath(f"{name}.json"), folder.joinpath("test", f"{name}.json")):
        try:
            return candidate.read_bytes()
        except (FileNotFoundError, OSError):
            continue
    raise ArtifactError(f"cannot load artifact {name}.json: not in the package (nor among the test contracts)")


def load_artifact(name: str = HUB) -> Artifact:
    """Read one artifact; raises ArtifactError if it is missing or malformed."""
    raw = _artifact_bytes(name)
    try:
        data = json.loads(raw)
        return Artifact(
            name=data["contractName"],
            abi=data["abi"],
            bytecode=data["bytecode"],
            deployed_bytecode=data["deployedBytecode"],
            compiler_version=data["compiler"]["version"],
            sources=data["sources"],
            immutable_references=[(int(start), int(length)) for start, length in data["immutableReferences"]],
            checksum=hashlib.sha256(raw).hexdigest(),
        )
    except (ValueError, KeyError, TypeError) as ex:
        raise ArtifactError(f"artifact {name}.json is malformed: {ex}") from ex


def source_file(root: Path, unit: str) -> Path:
    """Where a source unit lives in a checkout: ours under contracts/, imports under node_modules/."""
    return root / unit if unit.startswith("contracts/") else root / "node_modules" / unit


def verify_sources(artifact: Artifact, root: Path) -> None:
    """Raise SourceDriftError naming the first source whose sha256 differs from the one compiled."""
    for unit, expected in sorted(artifact.sources.items()):
        path = source_file(root, unit)
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as ex:
            raise SourceDriftError(f"{artifact.name}: source {path} is unreadable: {ex}") from ex
        if actual != expected:
            raise SourceDriftError(
                f"{artifact.name}: source {path} changed since compilation "
                f"(sha256 {actual[:12]}…, artifact has {expected[:12]}…); run `python scripts/compile_contracts.py`"
            )


def runtime_matches(artifact: Artifact, code: bytes) -> bool:
    """Whether on-chain `code` is this artifact's runtime code, ignoring the bytes the constructor fills in."""
    expected = bytearray(bytes.fromhex(artifact.deployed_bytecode.removeprefix("0x")))
    actual = bytearray(code)
    if len(actual) != len(expected):
        return False
    for start, length in artifact.immutable_references:
        actual[start : start + length] = expected[start : start + length]
    return actual == expected


def erc20_errors() -> list[dict[str, Any]]:
    """The ERC-20 errors of OpenZeppelin's tokens (IERC20Errors, as DevToken declares them): what a token reverts
    with when the hub takes a deposit the payer does not hold or did not approve, named for the payer (before:
    `unknown()`)."""
    return [entry for entry in load_artifact(DEV_TOKEN).abi if entry.get("type") == "error"]
