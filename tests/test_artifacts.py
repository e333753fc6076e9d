"""The committed artifacts are exactly what the sources compile to, and drift is caught by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from scripts.compile_contracts import build_artifacts
from settlement.chain.contracts import HUB, load_artifact, runtime_matches, verify_sources
from settlement.errors import ArtifactError, SourceDriftError
from tests.hub_helpers import ROOT


@pytest.fixture(scope="module")
def fresh_artifacts() -> dict[str, str]:
    return build_artifacts(ROOT)


def test_recompiling_gives_byte_identical_artifacts(fresh_artifacts: dict[str, str]) -> None:
    folder = ROOT / "settlement" / "artifacts"
    committed = {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8") for p in folder.rglob("*.json")}
    assert committed.keys() == fresh_artifacts.keys()
    for name, text in fresh_artifacts.items():
        assert committed[name] == text, f"{name} differs from a fresh compile"


def test_artifact_records_compiler_and_every_source(fresh_artifacts: dict[str, str]) -> None:
    hub = json.loads(fresh_artifacts[f"{HUB}.json"])
    assert hub["compiler"]["version"].startswith("0.8.30+commit.")
    assert hub["compiler"]["settings"]["optimizer"] == {"enabled": True, "runs": 1_000_000}
    assert "contracts/ChannelHub.sol" in hub["sources"]
    assert "@openzeppelin/contracts/utils/cryptography/ECDSA.sol" in hub["sources"]


def test_sources_match_checksums_in_this_checkout() -> None:
    verify_sources(load_artifact(HUB), ROOT)


def _tree_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "contracts", tmp_path / "contracts")
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    return tmp_path


def test_edited_contract_fails_the_check_naming_the_file(tmp_path: Path) -> None:
    root = _tree_copy(tmp_path)
    source = root / "contracts" / "ChannelHub.sol"
    source.write_text(source.read_text() + "\n// edited\n")
    with pytest.raises(SourceDriftError, match=r"contracts/ChannelHub\.sol changed since compilation"):
        verify_sources(load_artifact(HUB), root)


def test_missing_import_fails_the_check_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path
    shutil.copytree(ROOT / "contracts", root / "contracts")
    with pytest.raises(SourceDriftError, match=r"node_modules/@openzeppelin/contracts/.*\.sol is unreadable"):
        verify_sources(load_artifact(HUB), root)


def test_unknown_artifact_is_a_clear_error() -> None:
    with pytest.raises(ArtifactError, match=r"cannot load artifact Nope\.json"):
        load_artifact("Nope")


def test_runtime_match_ignores_only_immutables() -> None:
    artifact = load_artifact(HUB)
    code = bytearray(bytes.fromhex(artifact.deployed_bytecode[2:]))
    start, length = artifact.immutable_references[0]
    code[start : start + length] = b"\x01" * length
    assert runtime_matches(artifact, bytes(code))
    code[0] ^= 0xFF
    assert not runtime_matches(artifact, bytes(code))


def test_the_integrator_interface_declares_what_the_hub_does(fresh_artifacts: dict[str, str]) -> None:
    """IChannelHub is what integrators compile against: every event, error and function it declares is the hub's,
    and every event and error the hub can emit or revert with is declared there (with its documented parameters)."""

    def entries(name: str) -> set[str]:
        abi = json.loads(fresh_artifacts[f"{name}.json"])["abi"]
        plain = [{k: v for k, v in e.items() if k != "internalType"} for e in abi]
        for e in plain:  # internalType names the declaring contract (IChannelHub.Status vs ChannelHub.Status)
            for field in ("inputs", "outputs"):
                e[field] = [strip(arg) for arg in e.get(field, [])]
        return {json.dumps(e, sort_keys=True) for e in plain}

    def strip(arg: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in arg.items() if k != "internalType"}
        if "components" in out:
            out["components"] = [strip(c) for c in out["components"]]
        return out

    interface, hub = entries("IChannelHub"), entries(HUB)
    assert interface <= hub
    inherited = {"EIP712DomainChanged"}  # OpenZeppelin's (ERC-5267); its errors do not start with ChannelHub
    own = {
        e
        for e in hub
        if (json.loads(e)["type"] == "event" and json.loads(e)["name"] not in inherited)
        or (json.loads(e)["type"] == "error" and json.loads(e)["name"].startswith("ChannelHub"))
    }
    assert len(own) == 7 + 20 and own <= interface  # 7 events, 20 errors
    declared = {json.loads(e)["name"] for e in interface if json.loads(e)["type"] == "function"}
    assert declared == {
        "open", "openFromBalance", "topUp", "topUpFromBalance", "settleBatch", "requestClose", "finalizeClose",
        "closeByPayee", "withdraw", "balanceOf", "channel", "channelIdOf", "hashVoucher", "domainSeparator",
        "challengePeriod",
    }  # fmt: skip
