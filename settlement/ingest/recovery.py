"""Signer recovery for requests that carry many vouchers: in worker processes, or on threads.

libsecp256k1 (through cffi) releases the GIL while it recovers a key, but it takes the GIL back three times per
voucher, and each time waits behind whatever Python the event loop and the ingest writer are running. Beside one busy
Python thread a recovery thread ran at 40 % of its speed (132 µs a voucher against 50 alone; docs/benchmarks.md), and
the server's batch throughput was set by that wait, with a third of the two cores idle. A worker process has a GIL
of its own: the process recovers, the server process only sends it the batch's bytes and reads back 20 per voucher.

Workers start with the service (spawned: the server's threads are never forked), and until they are ready, or after
one died, vouchers are recovered on the threads meanwhile: no request waits for a process to start, and a worker that
is killed, or hangs (no answer in DEADLINE), costs the requests in flight a recovery on threads, not an error, and new
workers start.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from enum import StrEnum
from typing import TypeVar

from settlement.domain.model import Voucher
from settlement.eip712.vouchers import Domain, VoucherVerifier

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEADLINE = 5.0  # seconds: 1,000 vouchers take ~0.06 s in a worker
STOP_GRACE = 2.0  # seconds a stopping service waits for its workers to exit before it kills them
Item = tuple[bytes, int, bytes]  # (channel id, cumulative amount, signature): what a worker needs of a voucher


class RecoveredBy(StrEnum):
    """Where a request's signers were recovered (the `settlement_signers_recovered_total` metric's label)."""

    PROCESS = "process"
    THREAD = "thread"


class Recovery:
    """Recovers the signers of many vouchers at once, off the event loop. `processes` 0: threads only."""

    def __init__(self, verifier: VoucherVerifier, *, threads: int, processes: int, deadline: float = DEADLINE) -> None:
        self.verifier = verifier
        self.threads = threads
        self.processes = processes
        self.deadline = deadline  # workers that take longer are taken for hung: the request goes on on threads
        self._threads: ThreadPoolExecutor | None = None
        self._workers: ProcessPoolExecutor | None = None
        self._ready = threading.Event()  # the current workers answered their first (empty) task
        self._lock = threading.RLock()

    def start(self) -> None:
        """The threads, and the worker processes starting (threads recover until they are ready)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.threads, thread_name_prefix="recover")
            self._usable_workers()

    def stop(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, None
            self._ready.clear()
        if workers is not None:  # a worker frozen (SIGSTOP) or stuck would otherwise hold the shutdown for good
            _end(workers, grace=STOP_GRACE)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None

    @property
    def workers_ready(self) -> bool:
        return self._ready.is_set()

    async def recover(self, vouchers: Sequence[Voucher]) -> tuple[list[bytes | None], RecoveredBy]:
        """Each voucher's signer (None where the hub would refuse the signature), in order, and where they were
        recovered. Call `start()` first."""
        loop = asyncio.get_running_loop()
        workers = self._usable_workers()
        if workers is not None:
            items = [item(v) for v in vouchers]
            try:
                async with asyncio.timeout(self.deadline):
                    parts = await asyncio.gather(
                        *(loop.run_in_executor(workers, recover_items, part) for part in _split(items, self.processes))
                    )
                return [signer for part in parts for signer in part], RecoveredBy.PROCESS
            except BrokenProcessPool:
                logger.error("a signature recovery worker died; recovering on threads until a new one is ready")
                self._discard(workers, again=True)
            except TimeoutError:
                logger.error("recovery workers did not answer in %s s: ended, new ones starting", self.deadline)
                self._discard(workers, again=True)
        threads = self._threads
        if threads is None:
            raise RuntimeError("Recovery.start() was not called")
        parts = await asyncio.gather(
            *(loop.run_in_executor(threads, self.here, part) for part in _split(list(vouchers), self.threads))
        )
        return [signer for part in parts for signer in part], RecoveredBy.THREAD

    def here(self, vouchers: Sequence[Voucher]) -> list[bytes | None]:
        """The signers, recovered on the caller's thread (a few vouchers: a hand-off would cost more)."""
        return _recover(self.verifier, [item(v) for v in vouchers])

    def _usable_workers(self) -> ProcessPoolExecutor | None:
        """The workers once ready (`start()` starts them, and a worker's death new ones)."""
        if self.processes == 0 or self._threads is None:
            return None
        with self._lock:
            if self._workers is None:
                self._spawn()
            return self._workers if self._ready.is_set() else None

    def _spawn(self) -> None:
        """New workers (under the lock), ready once each has answered an empty task. Where processes cannot be made
        (no /dev/shm for the executor's semaphores, a process limit), threads recover from then on: the service
        starts and serves regardless."""
        try:
            self._workers = workers = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=start_worker,
                initargs=(self.verifier.domain, os.getpid()),
            )
            warm = [workers.submit(recover_items, []) for _ in range(self.processes)]
        except (OSError, RuntimeError, ValueError) as ex:
            logger.error("signature recovery workers cannot be started (%s); recovering on threads from now on", ex)
            self.processes = 0
            self._workers = None
            return

        def done(_: Future[list[bytes | None]]) -> None:
            if not all(f.done() for f in warm) or any(f.cancelled() for f in warm):
                return  # still starting, or shut down meanwhile (the service stopping)
            if any(f.exception() is not None for f in warm):
                logger.error("signature recovery workers did not start; recovering on threads from now on")
                self.processes = 0
                self._discard(workers, again=False)
            else:
                with self._lock:
                    if self._workers is workers:
                        self._ready.set()

        for future in warm:
            future.add_done_callback(done)

    def _discard(self, workers: ProcessPoolExecutor, *, again: bool) -> None:
        """Stop using `workers` and end their processes (a hung one is stopped or stuck; a broken pool's are being
        ended by the executor already); with `again`, start new ones (threads recover until they are ready)."""
        with self._lock:
            if self._workers is workers:
                self._workers = None
                self._ready.clear()
                if again and self._threads is not None:
                    self._spawn()
        _end(workers, grace=0.0)


def _end(workers: ProcessPoolExecutor, *, grace: float) -> None:
    """Shut `workers` down (tasks not started are cancelled) and kill each process still there after `grace` seconds.
    The executor can end its workers itself only from Python 3.14 (terminate_workers), hence its `_processes`."""
    processes = list((getattr(workers, "_processes", None) or {}).values())
    workers.shutdown(wait=False, cancel_futures=True)
    until = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, until - time.monotonic()))
        if process.is_alive():
            process.kill()


def item(voucher: Voucher) -> Item:
    """What recovering a voucher's signer takes of it, as a worker receives it."""
    return bytes.fromhex(voucher.channel_id[2:]), voucher.cumulative, voucher.signature


def _recover(verifier: VoucherVerifier, items: Sequence[Item]) -> list[bytes | None]:
    return [verifier.recover(channel_id, amount, signature) for channel_id, amount, signature in items]


def _split(items: list[T], parts: int) -> list[list[T]]:
    size = -(-len(items) // max(parts, 1))
    return [items[at : at + size] for at in range(0, len(items), size)] if items else []


_VERIFIER: VoucherVerifier | None = None  # a worker process's own
PARENT_WATCH_SECONDS = 0.5


def start_worker(domain: Domain, server: int) -> None:
    """A worker's initialiser: its verifier for the hub's domain. Ctrl-C is the server's to handle, not the worker's;
    and a worker whose server (`server`, the pid) died without stopping it (kill -9, the OOM killer), even while the
    worker was starting, exits within a second, rather than wait for tasks that never come (its queue's pipe never
    closes: the worker holds both ends)."""
    global _VERIFIER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _VERIFIER = VoucherVerifier(domain)

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(PARENT_WATCH_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


def recover_items(items: list[Item]) -> list[bytes | None]:
    """In a worker: the signers of `items`."""
    if _VERIFIER is None:
        raise RuntimeError("the recovery worker was not started with start_worker")
    return _recover(_VERIFIER, items)
