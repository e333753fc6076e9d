"""Compile contracts/**/*.sol with the official solc (through py-solc-x) into settlement/artifacts/<Contract>.json.

The pinned compiler version is read from the contracts' `pragma solidity` line. A native solc of that version is used
when one is installed (SOLCX_BINARY_PATH or py-solc-x's install dir); otherwise the same compiler from npm (`solc`,
a wasm build) runs through scripts/solcjs-wrapper.js. Both give the same bytecode.

    python scripts/compile_contracts.py           # (re)write the artifacts
    python scripts/compile_contracts.py --check   # exit 1 if the committed artifacts differ from a fresh compile
"""

from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

import solcx
from packaging.version import Version

from settlement.chain.contracts import source_file

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS_DIR = "contracts"
ARTIFACTS_DIR = Path("settlement") / "artifacts"
WRAPPER = Path("scripts") / "solcjs-wrapper.js"
EVM_VERSION = "prague"
OPTIMIZER_RUNS = 1_000_000

_IMPORT = re.compile(r"""^\s*import\s+(?:[^"';]*\s+from\s+)?["']([^"']+)["']""", re.MULTILINE)
_PRAGMA = re.compile(r"^\s*pragma\s+solidity\s+([0-9.]+)\s*;", re.MULTILINE)


def collect_sources(root: Path) -> dict[str, str]:
    """Every source unit the contracts need, imports included, keyed by source unit name."""
    pending = sorted(p.relative_to(root).as_posix() for p in (root / CONTRACTS_DIR).rglob("*.sol"))
    sources: dict[str, str] = {}
    while pending:
        unit = pending.pop()
        if unit in sources:
            continue
        path = source_file(root, unit)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as ex:
            raise SystemExit(f"cannot read {path} (imported as {unit}): {ex}; did `npm ci` run?") from ex
        sources[unit] = text
        for imported in _IMPORT.findall(text):
            if imported.startswith("."):
                imported = posixpath.normpath(posixpath.join(posixpath.dirname(unit), imported))
            pending.append(imported)
    return dict(sorted(sources.items()))


def pinned_version(sources: dict[str, str]) -> Version:
    """The exact version our own contracts pin; they must all agree."""
    pins = {m for unit, text in sources.items() if unit.startswith(f"{CONTRACTS_DIR}/") for m in _PRAGMA.findall(text)}
    if len(pins) != 1:
        raise SystemExit(f"contracts must pin one exact solc version with `pragma solidity X.Y.Z;`, found {pins}")
    return Version(pins.pop())


def compiler_binary(root: Path, version: Version) -> Path:
    """A native solc of `version` if one is installed, else the npm wasm build through the wrapper."""
    try:
        if version in solcx.get_installed_solc_versions():
            return Path(solcx.install.get_executable(version))
    except solcx.exceptions.SolcNotInstalled:
        pass
    wrapper = root / WRAPPER
    found = solcx.wrapper.get_solc_version(wrapper)
    if found != version:
        raise SystemExit(f"npm solc is {found} but the contracts pin {version}: fix package.json and run `npm ci`")
    return wrapper


def standard_input(sources: dict[str, str]) -> dict[str, Any]:
    return {
        "language": "Solidity",
        "sources": {unit: {"content": text} for unit, text in sources.items()},
        "settings": {
            "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
            "evmVersion": EVM_VERSION,
            "viaIR": True,
            "outputSelection": {
                "*": {
                    "*": [
                        "abi",
                        "evm.bytecode.object",
                        "evm.deployedBytecode.object",
                        "evm.deployedBytecode.immutableReferences",
                    ]
                }
            },
        },
    }


def build_artifacts(root: Path = ROOT) -> dict[str, str]:
    """Compile and return {artifact file name: JSON text}; pure apart from running the compiler."""
    sources = collect_sources(root)
    version = pinned_version(sources)
    binary = compiler_binary(root, version)
    compiler_input = standard_input(sources)
    output = solcx.compile_standard(compiler_input, solc_binary=binary)
    long_version = str(solcx.wrapper.get_solc_version(binary, with_commit_hash=True))
    recorded_settings = {k: v for k, v in compiler_input["settings"].items() if k != "outputSelection"}
    checksums = {unit: hashlib.sha256(text.encode("utf-8")).hexdigest() for unit, text in sources.items()}
    artifacts: dict[str, str] = {}
    for unit, contracts in sorted(output["contracts"].items()):
        if not unit.startswith(f"{CONTRACTS_DIR}/"):
            continue
        for name, data in sorted(contracts.items()):
            artifact = {
                "contractName": name,
                "sourceName": unit,
                "abi": data["abi"],
                "bytecode": "0x" + data["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + data["evm"]["deployedBytecode"]["object"],
                "immutableReferences": sorted(
                    [ref["start"], ref["length"]]
                    for refs in data["evm"]["deployedBytecode"].get("immutableReferences", {}).values()
                    for ref in refs
                ),
                "compiler": {"version": long_version, "settings": recorded_settings},
                "sources": checksums,
            }
            # Contracts that only tests deploy go to artifacts/test/, which the wheel leaves out.
            where = "test/" if unit.startswith(f"{CONTRACTS_DIR}/test/") else ""
            artifacts[f"{where}{name}.json"] = json.dumps(artifact, indent=1, sort_keys=True) + "\n"
    return artifacts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed artifacts, write nothing")
    args = parser.parse_args(argv)
    artifacts = build_artifacts(ROOT)
    out_dir = ROOT / ARTIFACTS_DIR
    if args.check:
        stale = sorted(
            name
            for name, text in artifacts.items()
            if not (out_dir / name).exists() or (out_dir / name).read_text(encoding="utf-8") != text
        )
        extra = sorted(name for name in _committed(out_dir) if name not in artifacts)
        if stale or extra:
            print(f"artifacts out of date: {', '.join(stale + extra)}; run `python scripts/compile_contracts.py`")
            return 1
        print(f"artifacts match the sources ({len(artifacts)} contracts)")
        return 0
    (out_dir / "test").mkdir(parents=True, exist_ok=True)
    for name in _committed(out_dir):
        if name not in artifacts:
            (out_dir / name).unlink()
    for name, text in artifacts.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(artifacts)} artifacts to {ARTIFACTS_DIR}")
    return 0


def _committed(out_dir: Path) -> list[str]:
    """The artifact files there, by their path below `out_dir` (test/X.json for test-only contracts)."""
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.json"))


if __name__ == "__main__":
    sys.exit(main())
