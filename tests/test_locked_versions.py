"""The installed packages are the ones constraints.txt names: pip, every package the dev install needs, at that
version, and no pin left for a package nothing needs any more. A dependency added to pyproject.toml without `make
lock`, or a package upgraded by hand in the venv, fails here, before a fresh clone would install something else."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from tests.hub_helpers import ROOT

PROJECT = "channelhub-settlement"


def pinned() -> dict[NormalizedName, str]:
    """constraints.txt's `name==version` lines; any other line but a comment is refused (pip would take it)."""
    pins: dict[NormalizedName, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and version and version == version.strip(), f"not an exact pin: {line!r}"
        assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
        pins[canonicalize_name(name)] = version
    return pins


def needed(root: str, extra: str) -> dict[NormalizedName, str]:
    """Every installed distribution `root[extra]` needs, with its version: requirements followed with their extras
    and their markers judged on this machine, as pip judged them when it installed them."""
    found: dict[NormalizedName, str] = {}
    seen: set[tuple[NormalizedName, str]] = set()
    todo = [(root, extra)]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise AssertionError(f"{name} is needed and not installed (`make setup`)") from None
        found[canonicalize_name(dist.metadata["Name"])] = dist.version
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": wanted}):
                todo.extend((requirement.name, each) for each in requirement.extras or {""})
    return found


def test_every_package_the_dev_install_needs_is_installed_at_its_pinned_version() -> None:
    installed = needed(PROJECT, "dev")
    installed.pop(canonicalize_name(PROJECT))
    assert len(installed) > 50  # the walk followed the requirements (web3, FastAPI, pytest and theirs)
    pins = pinned()
    assert pins.pop(canonicalize_name("pip"), None) == distribution("pip").version  # installed first, by itself
    assert installed == pins, (  # the message is built only on a failure: each package where the two differ
        "installed / pinned, where they differ (`make setup` installs the pins; `make lock` after a change to "
        "pyproject.toml's dependencies): "
        + str(
            sorted(
                (name, (installed.get(name), pins.get(name)))
                for name in installed.keys() | pins.keys()
                if installed.get(name) != pins.get(name)
            )
        )
    )


def test_the_walk_follows_extras_and_markers() -> None:
    """`needed` itself: the server extra brings uvicorn's `standard` extra (uvloop on Linux), the base install none
    of the server's libraries."""
    server = needed(PROJECT, "server")
    base = needed(PROJECT, "")
    assert {"uvicorn", "uvloop", "httptools", "fastapi"} <= server.keys()
    assert not {"uvicorn", "uvloop", "fastapi", "sqlalchemy", "pytest"} & base.keys()
    assert {"web3", "x402", "eth-account"} <= base.keys()
