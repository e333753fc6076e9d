"""Run `settlement serve` as a real process of its own, to kill -9 and restart it; or its app on a thread of the test
process, for the tests of its clients.

A service process is forked from the suite's fork server (`multiprocessing`'s, one per test worker), which imported
the service once: the process then runs the CLI's `serve` as `python -m settlement.cli serve` does, with its own
environment, directory, log, pid and signals, without spending ~4 s of a slow machine's CPU on imports at each start
(the suite starts ~170 of them; a third of its CPU went to their imports). The example apps of the x402 tests are run
the same way (`run_script`): the script runs as `__main__` in a process of its own."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from settlement.api.app import create_app
from settlement.api.transport import server_config
from settlement.server.config import Settings
from tests.hub_helpers import CLI, cli_env, free_test_port


class ServiceProcess:
    """`python -m settlement.cli serve` with SETTLEMENT_* settings; its output goes to a log file next to it."""

    def __init__(self, settings: dict[str, str], workdir: Path, name: str = "service") -> None:
        self.port = free_test_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **{f"SETTLEMENT_{key.upper()}": value for key, value in settings.items()},
            "SETTLEMENT_API_PORT": str(self.port),
        }
        self.log = workdir / f"{name}.log"
        self.workdir = workdir
        self.process: Forked | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        return self.launch().ready(timeout)

    def launch(self, script: Path | None = None) -> ServiceProcess:
        """Start the process without waiting for it: a test starts its other processes meanwhile, then calls
        `ready()`. With `script`, that script serves instead of `serve` (with the same settings and port)."""
        if script is None:
            self.process = Forked(_fork(_serve, (self.env, str(self.workdir), str(self.log)), "service"))
        else:
            self.process = run_script(script, self.env, self.workdir, self.log)
        return self

    def ready(self, timeout: float = 60.0) -> ServiceProcess:
        """Wait until the launched process answers /health."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"service did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, exactly like a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Forked:
    """A process of the fork server, with what the tests use of `subprocess.Popen`'s: its pid and exit code (the
    negative signal number when a signal ended it), `poll`, `wait` and `send_signal`."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process
        assert process.pid is not None
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("settlement serve", timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_script(script: Path, env: dict[str, str], workdir: Path, log: Path) -> Forked:
    """`python script` (an example app), forked from the fork server: the script itself runs as `__main__` in the
    new process, the libraries it imports were imported by the server."""
    return Forked(_fork(_script, (str(script), env, str(workdir), str(log)), script.stem))


def forked_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """What `run_cli` returns, the command run in a fork of the fork server (`settlement.cli.main` and the libraries
    its commands import already imported): for the tests of what a command does. A fresh interpreter spends ~1-4 s
    of a slow machine's CPU on imports per command; the tests of the CLI as a user starts it (tests/test_cli.py, the
    README's) use `run_cli`. Its output is a file's, as a pipe's would be (no terminal). Unlike an interpreter's
    exit, the fork's runs no atexit hook: only a devnet registers one, a backstop to its `with` block
    (`simulate`'s devnet is stopped by its block)."""
    command = [*CLI, *args]
    with tempfile.TemporaryDirectory() as streams:
        out, err = Path(streams) / "stdout", Path(streams) / "stderr"
        process = _fork(_command, (list(args), cli_env(env), str(cwd), str(out), str(err)), "settlement")
        process.join(120)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, 120)
        return subprocess.CompletedProcess(command, process.exitcode, out.read_text(), err.read_text())


def _fork(target: Callable[..., None], args: tuple[Any, ...], name: str) -> BaseProcess:
    """`target(*args)` in a new fork of the fork server, started; the server itself started first if it is not
    running, with a file as its output."""
    _start_fork_server()
    process = _FORKS.Process(target=target, args=args, name=name)
    process.start()
    return process


_SERVER_START = threading.Lock()
_server_started = False  # in this test process (a server that died is started again by multiprocessing itself)
_SERVER_LOG = Path(tempfile.gettempdir()) / "settlement-tests-fork-server.log"


def _start_fork_server() -> None:
    """The fork server, started with a file as its stdout and stderr, not this process's: the CLI makes its rich
    consoles at import, in the server, for the output they find there, and a terminal there (`pytest -s` run on one)
    coloured every forked command's output and wrapped it at the terminal's width (a test of `withdraw`'s text failed
    so). What the server itself prints (nothing, unless it fails) goes to `_SERVER_LOG`."""
    global _server_started
    with _SERVER_START:
        if _server_started:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = [os.dup(fd) for fd in (1, 2)]
        log = os.open(_SERVER_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for fd in (1, 2):
                os.dup2(log, fd)
            forkserver.ensure_running()
            _server_started = True
        finally:
            for fd, was in zip((1, 2), saved, strict=True):
                os.dup2(was, fd)
                os.close(was)
            os.close(log)


def _launched(env: dict[str, str], workdir: str, log: str, errors: str | None = None) -> None:
    """In a forked process: the environment, directory and output (stdout, and stderr to `errors` or the same
    file) it would have been started with."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(workdir)
    for fd, path in ((1, log), (2, errors or log)):
        opened = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(opened, fd)
        os.close(opened)


def _serve(env: dict[str, str], workdir: str, log: str) -> None:
    """`python -m settlement.cli serve`, in a forked process."""
    _launched(env, workdir, log)
    from settlement.cli.main import app

    app(["serve"], prog_name="settlement")


def _command(args: list[str], env: dict[str, str], workdir: str, out: str, err: str) -> None:
    """`python -m settlement.cli *args`, in a forked process: its exit code the process's (multiprocessing takes a
    SystemExit's code as it)."""
    _launched(env, workdir, out, err)
    from settlement.cli.main import app

    app(args, prog_name="python -m settlement.cli")


def _script(script: str, env: dict[str, str], workdir: str, log: str) -> None:
    """`python script`, in a forked process."""
    _launched(env, workdir, log)
    sys.argv = [script]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


# What `serve`, the CLI's commands and the example apps import, imported once by the fork server; their processes are
# forks of it.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(
    [
        "tests.servers",
        "settlement.cli.main",
        "settlement.cli.keys",
        "settlement.cli.payee",
        "settlement.settle.reconcile",
        "settlement.api.schemas",
        "settlement.server.service",
        "uvicorn.main",
        "settlement.x402.fastapi",
        "settlement.x402.server",
        "x402.extensions.payment_identifier",
    ]
)


class ServiceThread:
    """The app `settlement serve` runs, with the same uvicorn configuration, served on a thread of the test process.

    For tests whose subject is a client of the service (the SDK, the demo traffic) and which never kill it: a service
    process costs ~4 s of imports on a slow machine before it answers. The tests of the process itself (crashes,
    restarts, its log, its transport limits) spawn `ServiceProcess`.
    """

    def __init__(self, settings: Settings) -> None:
        self.port = free_test_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(create_app(settings), settings, "127.0.0.1", self.port, "warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"service-{self.port}", daemon=True)

    def start(self, timeout: float = 60.0) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:  # set once the lifespan has started the service and the port is bound
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service on port {self.port} did not start in {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
