"""Signer recovery for requests that carry many vouchers: in worker processes, or on threads.

libsecp256k1 (through cffi) releases the GIL while it recovers a key, but it takes the GIL back three times per
voucher, and each time waits behind whatever Python the event loop and the ingest writer are running. Beside one busy
Python thread a recovery thread ran at 40 % of its speed (132 µs a voucher against 50 alone; docs/benchmarks.md), and
the server's batch throughput was set by that wait, with a third of the two cores idle. A worker process has a GIL
of its own: the process recovers, the server process only sends it the batch's bytes and reads back 20 per voucher.

The server's event loop itself writes a batch to a worker's pipe (one write of fixed 129-byte records) and reads the
answers (add_writer / add_reader on the pipes): no thread of the server takes part. ProcessPoolExecutor, used before,
ran two threads for it (one pickling and feeding each task, one reading each result and waking the loop) that cost
the server ~4 µs a voucher alone and far more beside the loop and the ingest writer, whose GIL they took
(docs/benchmarks.md).

Workers start with the service (spawned: the server's threads are never forked), and until they are ready, or after
one died, vouchers are recovered on the threads meanwhile: no request waits for a process to start, and a worker that
is killed, or hangs (no answer in DEADLINE), costs the requests in flight a recovery on threads, not an error, and new
workers start. A worker ends when its request pipe ends: the server closed it, or died (kill -9, the OOM killer).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import NamedTuple, TypeVar

from settlement.domain.model import Voucher
from settlement.eip712.vouchers import Domain, VoucherVerifier, encode_voucher

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEADLINE = 5.0  # seconds: 1,000 vouchers take ~0.06 s in a worker
STOP_GRACE = 2.0  # seconds a stopping service waits for its workers to exit before it kills them
WAITER_JOIN = 5.0  # seconds for the "ready" reader to see the pipes of killed workers end
Item = tuple[bytes, int, bytes]  # (channel id, cumulative amount, signature): what recovering a signer takes

# The pipes' frames: a header (the request's number, its vouchers), then per voucher a record to the worker and a
# signer back. Number 0 is the worker's "ready", before any request.
HEADER = struct.Struct("<II")
LAST_NUMBER = 2**32 - 1  # what a header's number holds: requests are numbered 1 … LAST_NUMBER, then 1 again
RECORD = 129  # channel id (32) + cumulative amount (32, big-endian) + signature (65)
SIGNER = 20
NO_SIGNER = bytes(SIGNER)  # where the hub would refuse the signature: it refuses the zero address as a signer too
READY = HEADER.pack(0, 0)


class RecoveredBy(StrEnum):
    """Where a request's signers were recovered (the `settlement_signers_recovered_total` metric's label)."""

    PROCESS = "process"
    THREAD = "thread"


class Recovered(NamedTuple):
    signers: list[bytes | None]  # each voucher's, in order; None where the hub would refuse the signature
    by: RecoveredBy


class _WorkerLost(Exception):
    """A worker's answers ended (it died) before a request's answer came. Never leaves this module: the request is
    recovered on threads instead."""


@dataclass
class _Worker:
    """One worker process and the server's ends of its two pipes. From its first request on, the event loop writes
    the requests and reads the answers itself (add_writer / add_reader on the pipes, made non-blocking): a request
    costs the server a write, its answer a read, and no thread."""

    process: BaseProcess
    requests: Connection
    answers: Connection
    loop: asyncio.AbstractEventLoop | None = None
    waiting: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    received: bytearray = field(default_factory=bytearray)
    unsent: bytearray = field(default_factory=bytearray)  # what the pipe could not take yet (a worker behind)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(self.requests.fileno(), False)
        os.set_blocking(self.answers.fileno(), False)
        loop.add_reader(self.answers.fileno(), self._readable)
        self.loop = loop

    def ask(self, number: int, records: bytes) -> asyncio.Future[bytes]:
        """The signers of `records`, once the worker answers (_WorkerLost if it dies first)."""
        assert self.loop is not None
        if self.answers.closed:  # died since the last request (or its generation ended): no answer would come
            raise _WorkerLost()
        future: asyncio.Future[bytes] = self.loop.create_future()
        self.waiting[number] = future
        self.unsent += HEADER.pack(number, len(records) // RECORD) + records
        if len(self.unsent) == HEADER.size + len(records):  # nothing was waiting to be written before it
            self._writable()
            if self.unsent:  # the rest once the pipe takes it (a write that found the worker dead cleared it)
                self.loop.add_writer(self.requests.fileno(), self._writable)
        return future

    def _writable(self) -> None:
        try:
            sent = os.write(self.requests.fileno(), self.unsent)
        except BlockingIOError:
            return
        except OSError:  # the worker's end is gone: it died
            self._lose()
            return
        del self.unsent[:sent]
        if not self.unsent and self.loop is not None:
            self.loop.remove_writer(self.requests.fileno())

    def _readable(self) -> None:
        try:
            data = os.read(self.answers.fileno(), 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker's end is gone: it died
            self._lose()
            return
        self.received += data
        while len(self.received) >= HEADER.size:
            number, count = HEADER.unpack_from(self.received)
            end = HEADER.size + count * SIGNER
            if len(self.received) < end:
                return
            answer = bytes(self.received[HEADER.size : end])
            del self.received[:end]
            future = self.waiting.pop(number, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def _lose(self) -> None:
        self.close_requests()
        self.close_answers()

    def close_requests(self) -> None:
        """The server's end of the request pipe (a worker waiting for a request then exits); on the loop, if any."""
        if self.loop is not None and not self.requests.closed:
            self.loop.remove_writer(self.requests.fileno())  # nothing if the loop is closed
        self.requests.close()
        self.unsent.clear()  # batches not yet written are for threads now (their requests failed over)

    def close_answers(self) -> None:
        """The server's end of the answer pipe; the requests still waiting on it go on on threads now, not at their
        deadline (another worker of the generation died or hung, and the generation is being ended)."""
        if self.loop is not None and not self.answers.closed:
            self.loop.remove_reader(self.answers.fileno())
        self.answers.close()
        if self.loop is not None and not self.loop.is_closed():
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(_WorkerLost())
        self.waiting.clear()


@dataclass
class _Workers:
    """One generation of worker processes: started together, ready together, ended together. Their pipes belong to
    the first event loop that uses them."""

    workers: list[_Worker]
    ready: threading.Event = field(default_factory=threading.Event)
    waiter: threading.Thread | None = None  # reads each worker's "ready"
    loop: asyncio.AbstractEventLoop | None = None
    last_number: int = 0  # the last request's (on the loop only)

    def number(self) -> int:
        """The next request's number. It wraps: a counter that ran past what a header holds failed every batch from
        then on (~50 days at 1,000 batches a second over two workers); a number is in flight for moments only."""
        self.last_number = self.last_number % LAST_NUMBER + 1
        return self.last_number

    def end(self, *, grace: float) -> None:
        """Close the request pipes, wait up to `grace` seconds for the workers to exit, kill those still there, then
        close the answer pipes (not under the "ready" reader: it returns once the processes are gone)."""
        self._on_loop(self._close_requests)
        until = time.monotonic() + grace
        for worker in self.workers:
            worker.process.join(max(0.0, until - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
        if self.loop is None and self.waiter is not None:
            self.waiter.join(timeout=WAITER_JOIN)
            if self.waiter.is_alive():
                return  # its pipe stays open rather than be closed under a read (and reused by another file)
        self._on_loop(self._close_answers)

    def _close_requests(self) -> None:
        for worker in self.workers:
            worker.close_requests()

    def _close_answers(self) -> None:
        for worker in self.workers:
            worker.close_answers()

    def _on_loop(self, do: Callable[[], None]) -> None:
        """`do` on the event loop that owns the pipes (now if this is it, or there is none left, else soon)."""
        loop = self.loop
        if loop is None or loop.is_closed() or _running_loop() is loop:
            do()
        else:
            loop.call_soon_threadsafe(do)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Recovery:
    """Recovers the signers of many vouchers at once, off the event loop. `processes` 0: threads only."""

    def __init__(self, verifier: VoucherVerifier, *, threads: int, processes: int, deadline: float = DEADLINE) -> None:
        self.verifier = verifier
        self.threads = threads
        self.processes = processes
        self.deadline = deadline  # workers that take longer are taken for hung: the request goes on on threads
        self._threads: ThreadPoolExecutor | None = None
        self._workers: _Workers | None = None
        self._lock = threading.RLock()

    def start(self) -> None:
        """The threads, and the worker processes starting (threads recover until they are ready)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.threads, thread_name_prefix="recover")
            self._usable_workers()

    def stop(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, None
        if workers is not None:  # a worker frozen (SIGSTOP) or stuck would otherwise hold the shutdown for good
            workers.end(grace=STOP_GRACE)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None

    @property
    def workers_ready(self) -> bool:
        workers = self._workers
        return workers is not None and workers.ready.is_set()

    async def recover(self, vouchers: Sequence[Voucher]) -> Recovered:
        """Each voucher's signer, and where they were recovered. Call `start()` first."""
        loop = asyncio.get_running_loop()
        workers = self._usable_workers()
        if workers is not None and workers.loop in (None, loop):
            try:
                async with asyncio.timeout(self.deadline):
                    return Recovered(await self._in_workers(loop, workers, vouchers), RecoveredBy.PROCESS)
            except TimeoutError:  # before OSError: TimeoutError is one
                logger.error("recovery workers did not answer in %s s: ended, new ones starting", self.deadline)
                self._discard(workers, again=True)
            except (_WorkerLost, OSError):
                logger.error("a signature recovery worker died; recovering on threads until a new one is ready")
                self._discard(workers, again=True)
        threads = self._threads
        if threads is None:
            raise RuntimeError("Recovery.start() was not called")
        parts = await asyncio.gather(
            *(loop.run_in_executor(threads, self.here, part) for part in _split(list(vouchers), self.threads))
        )
        return Recovered([signer for part in parts for signer in part], RecoveredBy.THREAD)

    async def _in_workers(
        self, loop: asyncio.AbstractEventLoop, workers: _Workers, vouchers: Sequence[Voucher]
    ) -> list[bytes | None]:
        if workers.loop is None:  # the first request of this generation hands its pipes to this loop
            workers.loop = loop
            for worker in workers.workers:
                worker.attach(loop)
        records: list[bytes] = []
        unsendable: list[int] = []  # where a voucher does not fit a record: no signer the hub would accept
        for i, voucher in enumerate(vouchers):
            channel_id, amount, signature = item(voucher)
            encoded = encode_voucher(channel_id, amount)
            if encoded is not None and len(signature) == 65:
                records.append(encoded + signature)
            else:
                unsendable.append(i)
        asked = [  # fewer parts than workers where there are fewer records
            worker.ask(workers.number(), b"".join(part))
            for worker, part in zip(workers.workers, _split(records, len(workers.workers)), strict=False)
        ]
        answers = b"".join(await asyncio.gather(*asked))
        signers: list[bytes | None] = [
            None if signer == NO_SIGNER else signer
            for signer in (answers[at : at + SIGNER] for at in range(0, len(answers), SIGNER))
        ]
        for i in unsendable:
            signers.insert(i, None)
        return signers

    def here(self, vouchers: Sequence[Voucher]) -> list[bytes | None]:
        """The signers, recovered on the caller's thread (a few vouchers: a hand-off would cost more)."""
        return _recover(self.verifier, [item(v) for v in vouchers])

    def _usable_workers(self) -> _Workers | None:
        """The workers once ready (`start()` starts them, and a worker's death new ones)."""
        if self.processes == 0 or self._threads is None:
            return None
        with self._lock:
            if self._workers is None:
                self._spawn()
            workers = self._workers
            return workers if workers is not None and workers.ready.is_set() else None

    def _spawn(self) -> None:
        """New workers (under the lock), ready once each has said so. Where processes cannot be made (a process
        limit, no pipes left), threads recover from then on: the service starts and serves regardless."""
        started: list[_Worker] = []
        try:
            context = multiprocessing.get_context("spawn")
            for n in range(self.processes):
                theirs, requests = context.Pipe(duplex=False)
                answers, ours = context.Pipe(duplex=False)
                process = context.Process(
                    target=serve, args=(theirs, ours, self.verifier.domain), name=f"recover-{n}", daemon=True
                )
                started.append(_Worker(process, requests, answers))
                process.start()
                theirs.close()
                ours.close()
        except (OSError, RuntimeError, ValueError) as ex:
            logger.error("signature recovery workers cannot be started (%s); recovering on threads from now on", ex)
            self.processes = 0
            self._workers = None
            for worker in started:
                if worker.process.pid is not None:
                    worker.process.kill()
                worker.close_requests()
                worker.close_answers()
            return
        self._workers = workers = _Workers(started)
        workers.waiter = threading.Thread(target=self._wait_ready, args=(workers,), name="recover-start", daemon=True)
        workers.waiter.start()

    def _wait_ready(self, workers: _Workers) -> None:
        """Each worker's "ready" (a worker that exits while starting: its pipe ends, and threads recover from then on,
        or the service is stopping)."""
        for worker in workers.workers:
            if os.read(worker.answers.fileno(), HEADER.size) != READY:
                with self._lock:
                    if self._workers is not workers:
                        return  # ended meanwhile: the service stopping, or new workers already
                    logger.error("signature recovery workers did not start; recovering on threads from now on")
                    self.processes = 0
                    self._workers = None
                for ended in workers.workers:  # never attached to a loop: this thread may close their pipes
                    ended.close_requests()
                    if ended.process.is_alive():
                        ended.process.kill()
                    ended.close_answers()
                return
        with self._lock:
            if self._workers is workers:
                workers.ready.set()

    def _discard(self, workers: _Workers, *, again: bool) -> None:
        """Stop using `workers` and end their processes (a hung one is stopped or stuck, a dead one is gone); with
        `again`, start new ones (threads recover until they are ready)."""
        with self._lock:
            if self._workers is workers:
                self._workers = None
                if again and self._threads is not None:
                    self._spawn()
        workers.end(grace=0.0)


def item(voucher: Voucher) -> Item:
    """What recovering a voucher's signer takes of it."""
    return bytes.fromhex(voucher.channel_id[2:]), voucher.cumulative, voucher.signature


def _recover(verifier: VoucherVerifier, items: Sequence[Item]) -> list[bytes | None]:
    return [verifier.recover(channel_id, amount, signature) for channel_id, amount, signature in items]


def _split(items: list[T], parts: int) -> list[list[T]]:
    size = -(-len(items) // max(parts, 1))
    return [items[at : at + size] for at in range(0, len(items), size)] if items else []


def serve(requests: Connection, answers: Connection, domain: Domain) -> None:
    """A worker process: the signers of each batch its server writes, until the request pipe ends (the server closed
    it, or died: the worker holds no write end of it). Ctrl-C is the server's to handle, not the worker's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    verifier = VoucherVerifier(domain)
    source = os.fdopen(requests.fileno(), "rb", closefd=False)
    sink = os.fdopen(answers.fileno(), "wb", closefd=False)
    sink.write(READY)
    sink.flush()
    while len(head := source.read(HEADER.size)) == HEADER.size:
        number, count = HEADER.unpack(head)
        records = source.read(count * RECORD)
        if len(records) != count * RECORD:
            return
        sink.write(HEADER.pack(number, count) + recover_records(verifier, records))
        sink.flush()


def recover_records(verifier: VoucherVerifier, records: bytes) -> bytes:
    """The signers of a worker's records, 20 bytes each (NO_SIGNER where the hub would refuse the signature)."""
    recover = verifier.recover_encoded
    return b"".join(
        recover(records[at : at + 64], records[at + 64 : at + RECORD]) or NO_SIGNER
        for at in range(0, len(records), RECORD)
    )
