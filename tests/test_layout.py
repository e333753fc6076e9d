"""The rules that hold the package layout, checked on every module's imports (those inside functions too):

- the domain (records and ledger rules) imports nothing of ours but the error tree, and nothing from outside the
  standard library;
- what apps install (sdk, x402, eip712, chain, domain, errors) imports nothing of the server, nor any server-only
  library (but settlement.x402.fastapi, a payee's FastAPI adapter, and the modules it is made of (facilitator_client,
  paid_answers, exchange) import FastAPI and Starlette, and settlement.x402.serving, its uvicorn protocol, uvicorn);
- nothing imports the dev tools but the CLI (and the dev tools themselves);
- the API reaches the store through its package and its query module only, never its tables or internals.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_helpers import ROOT

PACKAGE = ROOT / "settlement"
SDK_SIDE = (
    "settlement.sdk",
    "settlement.x402",
    "settlement.eip712",
    "settlement.chain",
    "settlement.domain",
    "settlement.errors",
)
SERVER_SIDE = (
    "settlement.server",
    "settlement.api",
    "settlement.store",
    "settlement.ingest",
    "settlement.indexer",
    "settlement.settle",
    "settlement.cli",
    "settlement.devtools",
)
SERVER_LIBRARIES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "prometheus_client",
    "pydantic_settings",
    "typer",
    "rich",
    "solcx",
)
# A payee app's web framework adapter and the protocol its server runs: imported only by apps that run FastAPI and
# uvicorn themselves (the SDK alone needs neither).
WEB_ADAPTERS = (
    "settlement.x402.fastapi",
    "settlement.x402.facilitator_client",
    "settlement.x402.paid_answers",
    "settlement.x402.exchange",
    "settlement.x402.serving",
)
WEB_FRAMEWORK = ("fastapi", "starlette", "uvicorn")
# The query modules the API reads through; a payee's book spans channels, the chain log and the engine's facts.
API_MAY_USE_OF_THE_STORE = (
    "settlement.store",
    "settlement.store.channels",
    "settlement.store.caps",
    "settlement.store.payees",
    "settlement.store.payee_events",
    "settlement.store.risk",
    "settlement.store.standing",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of the package -> every module it imports (absolute names; `from a import b` counts a and a.b)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[module_name(path)] = names
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def ours(name: str) -> bool:
    return within(name, ("settlement",))


def test_the_package_has_the_modules_this_test_reads() -> None:
    found = imports()
    assert len(found) >= 40 and "settlement.sdk.payer" in found and "settlement.domain.ledger" in found


def test_the_domain_imports_only_the_standard_library_and_the_error_tree() -> None:
    offences = {
        (module, name)
        for module, names in imports().items()
        if within(module, ("settlement.domain",))
        for name in names
        if (ours(name) and not within(name, ("settlement.domain", "settlement.errors")))
        or (not ours(name) and name.split(".")[0] not in sys.stdlib_module_names)
    }
    assert offences == set()


def test_what_apps_install_imports_nothing_of_the_server() -> None:
    offences = {
        (module, name)
        for module, names in imports().items()
        if within(module, SDK_SIDE)
        for name in names
        if within(name, SERVER_SIDE)
        or (within(name, SERVER_LIBRARIES) and not (module in WEB_ADAPTERS and within(name, WEB_FRAMEWORK)))
    }
    assert offences == set()


def test_nothing_imports_the_dev_tools_but_the_cli() -> None:
    offences = {
        (module, name)
        for module, names in imports().items()
        if not within(module, ("settlement.cli", "settlement.devtools"))
        for name in names
        if within(name, ("settlement.devtools",))
    }
    assert offences == set()


def test_the_api_uses_the_store_through_its_queries_only() -> None:
    offences = {
        (module, name)
        for module, names in imports().items()
        if within(module, ("settlement.api",))
        for name in names
        if within(name, ("settlement.store",))
        and name not in API_MAY_USE_OF_THE_STORE
        and not name.startswith(tuple(f"{module}." for module in API_MAY_USE_OF_THE_STORE[1:]))
    }
    assert offences == set()


def test_the_readme_architecture_table_names_every_package() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == ["api", "chain", "cli", "devtools", "domain", "eip712", "indexer", "ingest", "sdk", "server",
                        "settle", "store", "x402"]  # fmt: skip
    assert [p for p in packages if f"| `settlement/{p}/` |" not in readme] == []


def test_the_payee_command_and_a_part_of_the_sdk_import_no_chain_library_until_one_is_used() -> None:
    """`settlement payee` reads the service alone: web3 and eth-account (3 of its 6 s on a slow machine) come with the
    chain or a key, not with the module; `settlement.sdk`'s names are imported when asked for."""
    probe = (
        "import json, sys\n"
        "import settlement.cli.payee, settlement.sdk.answers\n"
        "loaded = lambda: [m for m in ('eth_account', 'web3') if m in sys.modules]\n"
        "before = loaded()\n"
        "from settlement.sdk import PayerClient\n"
        "print(json.dumps([before, loaded(), PayerClient.__module__]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[], ["eth_account", "web3"], "settlement.sdk.payer"]


def test_the_sdks_names_are_the_modules_own() -> None:
    import settlement.sdk as sdk

    assert sdk.__all__ == sorted(sdk._FROM)
    for name in sdk.__all__:
        assert getattr(sdk, name) is getattr(importlib.import_module(sdk._FROM[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'Payer'"):
        sdk.Payer  # noqa: B018
