"""Signer recovery in worker processes, through the pipes the event loop writes and reads (settlement.ingest.recovery):
each request gets its own answers, in place, however many are in flight; a voucher no record can hold, a worker that
cannot start and a service that stops are handled without an error."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from settlement.domain.model import MAX_UINT256, ChannelId, Voucher
from settlement.eip712.vouchers import Domain, VoucherSigner, VoucherVerifier
from settlement.ingest.recovery import Recovered, RecoveredBy, Recovery
from tests.hub_helpers import wait_until

DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "5a" * 20)
PAYER: LocalAccount = Account.from_key(b"\x01" * 32)
STRANGER: LocalAccount = Account.from_key(b"\x02" * 32)


@pytest.fixture
def recovery() -> Iterator[Callable[..., Recovery]]:
    """Started Recovery objects, stopped after the test."""
    made: list[Recovery] = []

    def make(*, processes: int, verifier: VoucherVerifier | None = None) -> Recovery:
        started = Recovery(verifier or VoucherVerifier(DOMAIN), threads=2, processes=processes)
        made.append(started)
        started.start()
        return started

    yield make
    for started in made:
        started.stop()


def voucher(channel: bytes, cumulative: int, by: LocalAccount) -> Voucher:
    return Voucher(ChannelId("0x" + channel.hex()), cumulative, VoucherSigner(by, DOMAIN).sign(channel, cumulative))


def test_many_requests_in_flight_on_two_workers_each_get_their_own_signers_in_place(
    recovery: Callable[..., Recovery],
) -> None:
    """24 requests at once over two workers (each request split between them; the answers of one worker come back in
    one read or across several): every request gets exactly its own signers, a forged voucher's in its place."""
    workers = recovery(processes=2)
    wait_until(lambda: workers.workers_ready)
    payer, stranger = bytes.fromhex(PAYER.address[2:]), bytes.fromhex(STRANGER.address[2:])
    requests = [
        [voucher(os.urandom(32), n, STRANGER if (r + n) % 5 == 0 else PAYER) for n in range(1, 18 + r)]
        for r in range(24)
    ]

    async def all_at_once() -> list[Recovered]:
        return await asyncio.gather(*(workers.recover(request) for request in requests))

    answers = asyncio.run(all_at_once())
    assert [answer.by for answer in answers] == [RecoveredBy.PROCESS] * 24
    assert [answer.signers for answer in answers] == [
        [stranger if (r + n) % 5 == 0 else payer for n in range(1, 18 + r)] for r in range(24)
    ]


def test_a_batch_larger_than_the_pipe_is_written_as_the_worker_reads_it(recovery: Callable[..., Recovery]) -> None:
    """3,000 vouchers are 387 KB of records, six times what a pipe holds: the event loop writes what the pipe takes and
    the rest as the worker drains it, while smaller requests queue behind it; the answers (60 KB) come back in several
    reads. Every request gets its own signers."""
    workers = recovery(processes=1)
    wait_until(lambda: workers.workers_ready)
    channel = os.urandom(32)
    signer = VoucherSigner(PAYER, DOMAIN)
    large = [Voucher(ChannelId("0x" + channel.hex()), n, signer.sign(channel, n)) for n in range(1, 3001)]
    small = [[voucher(os.urandom(32), n, STRANGER) for n in range(1, 21)] for _ in range(3)]

    async def together() -> list[Recovered]:
        return await asyncio.gather(workers.recover(large), *(workers.recover(request) for request in small))

    answers = asyncio.run(together())
    payer, stranger = bytes.fromhex(PAYER.address[2:]), bytes.fromhex(STRANGER.address[2:])
    assert answers == [([payer] * 3000, RecoveredBy.PROCESS)] + [([stranger] * 20, RecoveredBy.PROCESS)] * 3


def test_request_numbers_wrap_past_what_a_frame_header_holds(recovery: Callable[..., Recovery]) -> None:
    """A frame's request number is 32 bits. A server up long enough passes 2^32 - 1 requests to one generation of
    workers (~50 days at 1,000 batches a second over two workers): the numbers wrap to 1 (0 is a worker's "ready"),
    not to an error on every batch from then on, and each request still gets its own signers from the workers."""
    workers = recovery(processes=2)
    wait_until(lambda: workers.workers_ready)
    generation = workers._workers  # the number is the generation's, with no public way to age it
    assert generation is not None
    generation.last_number = 2**32 - 4  # a number for each of a request's two parts: the second request's wraps
    payer, stranger = bytes.fromhex(PAYER.address[2:]), bytes.fromhex(STRANGER.address[2:])
    requests = [[voucher(os.urandom(32), n, STRANGER if n == r else PAYER) for n in range(1, 4)] for r in range(1, 6)]

    async def in_turn() -> list[Recovered]:
        return [await workers.recover(request) for request in requests]

    assert asyncio.run(in_turn()) == [
        ([stranger if n == r else payer for n in range(1, 4)], RecoveredBy.PROCESS) for r in range(1, 6)
    ]
    assert generation.last_number == 7  # the two parts of each: 2^32 - 3, 2^32 - 2; 2^32 - 1, 1; 2, 3; 4, 5; 6, 7
    assert workers._workers is generation  # no worker was taken for dead on the way


def test_when_one_worker_dies_a_request_waiting_on_another_goes_on_on_threads_at_once(
    recovery: Callable[..., Recovery], caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers, both stopped (SIGSTOP): a one-voucher request waits on the first, a two-voucher one on both; then
    the second is killed. Its death ends the generation, and the request on the first worker goes on on threads then,
    not when its 60 s deadline runs out (which would log that the workers did not answer)."""
    before = set(multiprocessing.active_children())
    workers = recovery(processes=2)
    workers.deadline = 60.0
    wait_until(lambda: workers.workers_ready)
    by_name = {process.name: process for process in set(multiprocessing.active_children()) - before}
    channel = os.urandom(32)
    payer = bytes.fromhex(PAYER.address[2:])

    async def scenario() -> list[Recovered]:
        assert (await workers.recover([voucher(channel, n, PAYER) for n in range(1, 21)])).by == RecoveredBy.PROCESS
        for name in ("recover-0", "recover-1"):
            os.kill(by_name[name].pid, signal.SIGSTOP)  # type: ignore[arg-type]
        alone = asyncio.ensure_future(workers.recover([voucher(channel, 21, PAYER)]))  # all on the first worker
        split = asyncio.ensure_future(workers.recover([voucher(channel, n, PAYER) for n in (22, 23)]))
        await asyncio.sleep(0.2)
        os.kill(by_name["recover-1"].pid, signal.SIGKILL)  # type: ignore[arg-type]
        return list(await asyncio.gather(alone, split))

    with caplog.at_level(logging.ERROR, logger="settlement.ingest.recovery"):
        answers = asyncio.run(scenario())
    assert answers == [([payer], RecoveredBy.THREAD), ([payer, payer], RecoveredBy.THREAD)]
    died = "a signature recovery worker died; recovering on threads until a new one is ready"
    assert [record.getMessage() for record in caplog.records] == [died, died]  # each request says so
    by_name["recover-0"].join(timeout=10)
    assert by_name["recover-0"].exitcode == -signal.SIGKILL  # the stopped one ended with its generation


def test_a_voucher_no_record_holds_has_no_signer_and_the_rest_keep_their_places(
    recovery: Callable[..., Recovery],
) -> None:
    """A signature of 64 or 66 bytes, an amount below 0 or above 2^256 - 1, a short channel id: the hub accepts no
    such voucher, so none has a signer; they are not sent to a worker, and the vouchers around them keep theirs."""
    workers = recovery(processes=1)
    wait_until(lambda: workers.workers_ready)
    channel = os.urandom(32)
    good = [voucher(channel, n, PAYER) for n in range(1, 21)]
    signature = good[0].signature
    bad = {
        0: Voucher(good[0].channel_id, 1, signature[:64]),
        5: Voucher(good[0].channel_id, 1, signature + b"\x00"),
        9: Voucher(good[0].channel_id, -1, signature),
        13: Voucher(good[0].channel_id, MAX_UINT256 + 1, signature),
        21: Voucher(ChannelId("0x" + channel[:31].hex()), 1, signature),
    }
    mixed = list(good)
    for at in sorted(bad):
        mixed.insert(at, bad[at])
    signers, where = asyncio.run(workers.recover(mixed))
    payer = bytes.fromhex(PAYER.address[2:])
    assert where == RecoveredBy.PROCESS
    assert signers == [None if at in bad else payer for at in range(25)]


def test_a_worker_that_cannot_start_leaves_recovery_to_the_threads(
    recovery: Callable[..., Recovery],
) -> None:
    """A worker that dies before it is ready (here its domain cannot be hashed: it fails on start, the server's
    verifier does not): threads recover from then on, and no worker process is left behind."""
    before = set(multiprocessing.active_children())
    verifier = VoucherVerifier(DOMAIN)
    verifier.domain = Domain(chain_id=31337, verifying_contract="0xnot-hex")
    workers = recovery(processes=1, verifier=verifier)
    wait_until(lambda: workers.processes == 0)
    channel = os.urandom(32)
    signers, where = asyncio.run(workers.recover([voucher(channel, n, PAYER) for n in range(1, 21)]))
    assert (where, signers) == (RecoveredBy.THREAD, [bytes.fromhex(PAYER.address[2:])] * 20)
    wait_until(lambda: not set(multiprocessing.active_children()) - before)


def test_stopping_after_the_event_loop_is_gone_ends_the_workers(recovery: Callable[..., Recovery]) -> None:
    """The pipes were handed to an event loop that has closed since (a test's, a script's): stopping still closes
    them, and the worker exits on its own (it is not killed)."""
    before = set(multiprocessing.active_children())
    workers = recovery(processes=1)
    wait_until(lambda: workers.workers_ready)
    (worker,) = set(multiprocessing.active_children()) - before
    channel = os.urandom(32)
    assert asyncio.run(workers.recover([voucher(channel, n, PAYER) for n in range(1, 21)])).by == RecoveredBy.PROCESS
    workers.stop()
    worker.join(timeout=10)
    assert worker.exitcode == 0
