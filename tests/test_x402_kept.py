"""Paid answers kept in a file a payee's processes share (settlement.x402.kept, `PaidAnswers(path=)`): each
`PaidAnswers` here stands for one process of the app (its own claims, its own memory), the file for their host."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from fastapi import Response

from settlement.x402.kept import KeptAnswer, SharedAnswers
from settlement.x402.paid_answers import PaidAnswers

KEY = "a" * 64


class Handler:
    """A paid route: each call is one payment settled (`paid`); it answers once the test lets it (`go`)."""

    def __init__(self, status: int = 200, settled: bool = True) -> None:
        self.paid = 0
        self.go = asyncio.Event()
        self.status, self.settled = status, settled

    async def __call__(self) -> Response:
        self.paid += 1
        await self.go.wait()
        headers = {"payment-response": f"receipt-{self.paid}"} if self.settled else {}
        return Response(content=f"answer {self.paid}".encode(), status_code=self.status, headers=headers)


def answered(response: Response) -> tuple[int, bytes, str | None]:
    return response.status_code, bytes(response.body), response.headers.get("payment-response")


async def settle_soon(*handlers: Handler) -> None:
    await asyncio.sleep(0.1)
    for handler in handlers:
        handler.go.set()


def test_a_retry_at_another_process_gets_the_answer_bought_and_pays_nothing(tmp_path: Path) -> None:
    """Without the file, the other process had nothing kept: the retry paid again (the facilitator's replay 402)."""

    async def run(path: Path | None) -> tuple[list[tuple[int, bytes, str | None]], int, int]:
        one, two = PaidAnswers(path=path), PaidAnswers(path=path)
        first, second = Handler(), Handler()
        first.go.set()
        second.go.set()
        answers = [await one.answer(KEY, first), await two.answer(KEY, second)]
        return [answered(a) for a in answers], first.paid, second.paid

    shared = asyncio.run(run(tmp_path / "answers.sqlite3"))
    assert shared == ([(200, b"answer 1", "receipt-1")] * 2, 1, 0)
    alone = asyncio.run(run(None))
    assert alone == ([(200, b"answer 1", "receipt-1"), (200, b"answer 1", "receipt-1")], 1, 1)


def test_copies_sent_to_two_processes_at_once_pay_once(tmp_path: Path) -> None:
    async def run() -> tuple[list[tuple[int, bytes, str | None]], int]:
        one, two = PaidAnswers(path=tmp_path / "answers.sqlite3"), PaidAnswers(path=tmp_path / "answers.sqlite3")
        handler = Handler()
        copies = [asyncio.create_task(answers.answer(KEY, handler)) for answers in (one, two, one, two)]
        await settle_soon(handler)
        return [answered(a) for a in await asyncio.gather(*copies)], handler.paid

    assert asyncio.run(run()) == ([(200, b"answer 1", "receipt-1")] * 4, 1)


def test_another_payload_under_a_kept_payments_key_waits_and_is_refused_409_at_either_process(tmp_path: Path) -> None:
    """Copies of a payment's key (its route, credentials and identifier) sent while the first is answered, two at the
    other process: the one with the first's header gets the answer bought, the one whose payload is not the first
    payer's (here no payment at all) a 409 `idempotency_key_reused` once the first is answered; one handler run. The
    header that bought an answer is kept with it in the file: another process judges the copies by it."""

    async def run() -> tuple[list[tuple[int, bytes, str | None]], int, int]:
        one, two = PaidAnswers(path=tmp_path / "answers.sqlite3"), PaidAnswers(path=tmp_path / "answers.sqlite3")
        first, others = Handler(), Handler()
        copies = [
            asyncio.create_task(one.answer(KEY, first, "the-first")),
            asyncio.create_task(two.answer(KEY, others, "the-first")),
            asyncio.create_task(two.answer(KEY, others, "another")),
            asyncio.create_task(one.answer(KEY, others, "another")),
        ]
        await settle_soon(first, others)
        return [answered(a) for a in await asyncio.gather(*copies)], first.paid, others.paid

    reused = (409, b'{"error":"idempotency_key_reused","message":"this payment identifier bought an answer with another'
              b' payment: a new payment needs a new identifier"}', None)  # fmt: skip
    assert asyncio.run(run()) == ([(200, b"answer 1", "receipt-1")] * 2 + [reused] * 2, 1, 0)


def test_a_file_kept_before_answers_carried_their_payment_takes_them_now(tmp_path: Path) -> None:
    """A file an earlier version made has no column for the header that bought each answer: it is added, not a
    failure at each write (the app would have answered as if it had no file)."""
    path = tmp_path / "answers.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE answers (key TEXT PRIMARY KEY, status INTEGER NOT NULL, headers TEXT NOT NULL,"
            " body BLOB NOT NULL, size INTEGER NOT NULL, expires REAL NOT NULL)"
        )
        old.execute("INSERT INTO answers VALUES ('old', 200, '[]', x'00', 1, 1e12)")
    shared = SharedAnswers(path)
    answer = KeptAnswer(200, [(b"payment-response", b"r")], b"new", "its-payment")
    assert shared.claim(KEY)
    shared.keep(KEY, answer, ttl=60, max_bytes=300)
    assert (shared.get(KEY), shared.get("old")) == (answer, KeptAnswer(200, [], b"\x00", ""))


def test_an_answer_not_kept_lets_the_waiting_process_pay_for_itself(tmp_path: Path) -> None:
    """The first process's answer was a refusal (nothing settled, nothing kept): the copy waiting at the other
    process is judged on its own once the claim is released."""

    async def run() -> tuple[list[tuple[int, bytes, str | None]], int, int]:
        one, two = PaidAnswers(path=tmp_path / "answers.sqlite3"), PaidAnswers(path=tmp_path / "answers.sqlite3")
        refused, served = Handler(status=402, settled=False), Handler()
        first = asyncio.create_task(one.answer(KEY, refused))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(two.answer(KEY, served))
        await asyncio.sleep(0.1)
        assert served.paid == 0  # waits for the first process
        await settle_soon(refused, served)
        return [answered(await first), answered(await second)], refused.paid, served.paid

    assert asyncio.run(run()) == ([(402, b"answer 1", None), (200, b"answer 1", "receipt-1")], 1, 1)


def test_a_request_cancelled_while_it_is_answered_releases_its_claim(tmp_path: Path) -> None:
    """Its claim held for `claim_seconds` (60 s) would have held every copy of the payment at other processes."""

    async def run() -> tuple[tuple[int, bytes, str | None], int]:
        one, two = PaidAnswers(path=tmp_path / "answers.sqlite3"), PaidAnswers(path=tmp_path / "answers.sqlite3")
        stuck, served = Handler(), Handler()
        first = asyncio.create_task(one.answer(KEY, stuck))
        await asyncio.sleep(0.05)
        assert stuck.paid == 1
        first.cancel()
        served.go.set()
        return answered(await asyncio.wait_for(two.answer(KEY, served), 2)), served.paid

    assert asyncio.run(run()) == ((200, b"answer 1", "receipt-1"), 1)


def test_a_claim_left_by_a_process_that_died_runs_out(tmp_path: Path) -> None:
    path = tmp_path / "answers.sqlite3"
    dead = SharedAnswers(path, claim_seconds=0.3)
    assert dead.claim(KEY)  # and its process is gone

    async def run() -> tuple[tuple[int, bytes, str | None], int, float]:
        answers, handler = PaidAnswers(path=path), Handler()
        handler.go.set()
        started = asyncio.get_running_loop().time()
        response = await answers.answer(KEY, handler)
        return answered(response), handler.paid, asyncio.get_running_loop().time() - started

    response, paid, waited = asyncio.run(run())
    assert (response, paid, waited >= 0.2) == ((200, b"answer 1", "receipt-1"), 1, True)


def test_the_file_keeps_answers_for_their_ttl_and_within_its_bytes(tmp_path: Path) -> None:
    shared = SharedAnswers(tmp_path / "answers.sqlite3")
    answer = KeptAnswer(200, [(b"payment-response", b"r"), (b"x-\xe9", b"\xff")], b"x" * 100)
    for n in range(5):
        assert shared.claim(f"{n}")
        shared.keep(f"{n}", answer, ttl=60 + n, max_bytes=300)
    assert [shared.get(f"{n}") for n in range(5)] == [None, None, answer, answer, answer]
    assert SharedAnswers(tmp_path / "answers.sqlite3").claim("4")  # its claim released as it was kept
    shared.keep("gone", answer, ttl=-1, max_bytes=300)
    assert shared.get("gone") is None


def test_a_file_that_cannot_be_opened_fails_at_once_not_at_each_paid_request(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        PaidAnswers(path=tmp_path / "no-such-directory" / "answers.sqlite3")


def test_workers_forked_after_the_app_was_built_share_the_file(tmp_path: Path) -> None:
    """As gunicorn's `--preload` forks its workers: the object built before the fork opens the file afresh in each."""
    answers = PaidAnswers(path=tmp_path / "answers.sqlite3")

    def worker() -> None:
        handler = Handler()
        handler.go.set()
        asyncio.run(answers.answer(KEY, handler))

    child = multiprocessing.get_context("fork").Process(target=worker)
    child.start()
    child.join(30)

    async def retried() -> tuple[tuple[int, bytes, str | None], int]:
        handler = Handler()
        return answered(await answers.answer(KEY, handler)), handler.paid

    assert (child.exitcode, asyncio.run(retried())) == (0, ((200, b"answer 1", "receipt-1"), 0))


def test_a_file_that_fails_never_fails_a_paid_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that fails: the process answers as if it had no file; a write that fails: the paid answer goes out all
    the same, kept in the process, and the claim is released for the other processes."""

    def broken(*_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def run() -> tuple[list[tuple[int, bytes, str | None]], list[int], bool]:
        one, two = PaidAnswers(path=tmp_path / "answers.sqlite3"), PaidAnswers(path=tmp_path / "answers.sqlite3")
        handlers = [Handler(), Handler(), Handler()]
        for handler in handlers:
            handler.go.set()
        with monkeypatch.context() as patch:
            patch.setattr(SharedAnswers, "keep", broken)
            written = await one.answer(KEY, handlers[0])
        with monkeypatch.context() as patch:
            patch.setattr(SharedAnswers, "get", broken)
            read = await two.answer("b" * 64, handlers[1])
        again = await one.answer(KEY, handlers[2])  # kept in the process whose write failed
        free = SharedAnswers(tmp_path / "answers.sqlite3").claim(KEY)  # its claim was released
        return [answered(a) for a in (written, read, again)], [h.paid for h in handlers], free

    answers, paid, free = asyncio.run(run())
    assert answers == [(200, b"answer 1", "receipt-1")] * 3
    assert (paid, free) == ([1, 1, 0], True)


def test_a_claim_taken_before_the_file_failed_is_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim succeeded, the read after it failed: the process pays on its own and releases the claim; held, it
    would have held the payment's copies at the other processes for `claim_seconds`."""
    reads = 0
    read = SharedAnswers.get

    def second_read_fails(self: SharedAnswers, key: str) -> KeptAnswer | None:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return read(self, key)

    async def run() -> tuple[tuple[int, bytes, str | None], int, bool]:
        answers, handler = PaidAnswers(path=tmp_path / "answers.sqlite3"), Handler(status=402, settled=False)
        handler.go.set()
        with monkeypatch.context() as patch:
            patch.setattr(SharedAnswers, "get", second_read_fails)
            response = await answers.answer(KEY, handler)
        return answered(response), handler.paid, SharedAnswers(tmp_path / "answers.sqlite3").claim(KEY)

    assert asyncio.run(run()) == ((402, b"answer 1", None), 1, True)
