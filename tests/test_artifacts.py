"""The committed artifacts are exactly what the sources compile to, and drift is caught by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.compile_contracts import build_artifacts
from settlement.contracts import HUB, load_artifact, runtime_matches, verify_sources
from settlement.errors import ArtifactError, SourceDriftError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def fresh_artifacts() -> dict[str, str]:
    return build_artifacts(ROOT)


def test_recompiling_gives_byte_identical_artifacts(fresh_artifacts: dict[str, str]) -> None:
    committed = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "settlement" / "artifacts").glob("*.json")}
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
