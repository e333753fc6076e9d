"""The Makefile's set-up, as a newcomer's machine meets it: its npm step run with stub `node` and `npm` on PATH (the
real ones are this machine's; the stubs stand for another machine's), so a missing anvil is said at set-up, in words
that name the cause, instead of later as "anvil not found"."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.hub_helpers import ROOT, typed_env

STAMP = Path("node_modules/.installed")
NODE_18 = "v18.20.8"


def npm_step(tmp_path: Path, node_version: str, installs_anvil: bool, **env: str) -> subprocess.CompletedProcess[str]:
    """`make node_modules/.installed` in a copy of the Makefile and the npm files, with a `node` that prints
    `node_version` and an `npm` whose `ci` installs anvil's binary or (as npm does on Node 18) leaves it out."""
    for name in ("Makefile", "package.json", "package-lock.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    installed = "mkdir -p node_modules/.bin && printf '#!/bin/sh\\n' > node_modules/.bin/anvil && "
    installed += "chmod +x node_modules/.bin/anvil" if installs_anvil else "true"
    for name, script in (("node", f"echo {node_version}"), ("npm", f'echo "stub npm $*"; {installed}')):
        (stubs / name).write_text(f"#!/bin/sh\n{script}\n")
        (stubs / name).chmod(0o755)
    return make_stamp(tmp_path, {"PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin", **env})


def make_stamp(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        [make, "--no-print-directory", str(STAMP)],
        cwd=cwd,
        env={**typed_env("SETTLEMENT_ANVIL_PATH"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_npm_install_without_anvil_stops_the_set_up_and_says_node_20_is_needed(tmp_path: Path) -> None:
    """On Node 18, npm skipped anvil's platform package (it declares Node >= 20) and said nothing; the stamp was made
    and `make run` failed later, telling the newcomer to run `npm ci`, which they had."""
    done = npm_step(tmp_path, NODE_18, installs_anvil=False)
    assert done.returncode == 2
    assert "npm ci installed no anvil: its npm package needs Node 20+ (this is node v18.20.8)" in done.stdout
    assert not (tmp_path / STAMP).exists()  # the next `make` tries again


def test_an_npm_install_with_anvil_is_stamped_once(tmp_path: Path) -> None:
    done = npm_step(tmp_path, "v24.21.0", installs_anvil=True)
    command = "npm ci --no-audit --no-fund --loglevel=error"
    assert (done.returncode, done.stdout) == (0, f"{command}\nstub {command}\n")
    assert (tmp_path / STAMP).exists()
    again = make_stamp(tmp_path, {})
    assert (again.returncode, again.stdout) == (0, f"make: '{STAMP}' is up to date.\n")


def test_an_anvil_of_ones_own_lets_the_set_up_go_on_without_npms(tmp_path: Path) -> None:
    """A platform anvil's npm package has no binary for: the documented way out (`SETTLEMENT_ANVIL_PATH`) works."""
    done = npm_step(tmp_path, NODE_18, installs_anvil=False, SETTLEMENT_ANVIL_PATH="/opt/foundry/anvil")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / STAMP).exists()


@pytest.mark.parametrize(
    ("line", "goes_on"),
    [
        ("SETTLEMENT_ANVIL_PATH=/opt/foundry/anvil", True),
        ('export settlement_anvil_path="/opt/foundry/anvil"', True),  # as Settings read it: any case, `export`
        ("# SETTLEMENT_ANVIL_PATH=/opt/foundry/anvil", False),
        ("SETTLEMENT_ANVIL_PATH=", False),
    ],
)
def test_an_anvil_of_ones_own_in_dot_env_counts_as_settings_read_it(tmp_path: Path, line: str, goes_on: bool) -> None:
    """The service's Settings read `.env` too: an anvil set there was refused by the set-up, and the service used it."""
    (tmp_path / ".env").write_text(f"SETTLEMENT_DATABASE_URL=sqlite:///x.db\n{line}\n")
    done = npm_step(tmp_path, NODE_18, installs_anvil=False)
    assert (done.returncode, (tmp_path / STAMP).exists()) == ((0, True) if goes_on else (2, False)), done.stdout
