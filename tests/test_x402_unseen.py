"""A payee's budget of a client's payments on channels the facilitator does not know (settlement.x402.unseen): what
reaches the facilitator of a wave sent at once, and what the budget keeps of a client once it is idle."""

from __future__ import annotations

import asyncio

import pytest

from settlement.x402.unseen import OverBudget, UnseenBudget


class Facilitator:
    """Verifies the test answers one at a time: `answer(known)` ends the oldest in flight."""

    def __init__(self) -> None:
        self.in_flight: list[asyncio.Future[bool]] = []
        self.sent = 0
        self.most_at_once = 0

    async def verify(self) -> bool:
        self.sent += 1
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.in_flight.append(answer)
        self.most_at_once = max(self.most_at_once, len(self.in_flight))
        return await answer

    async def answer(self, known: bool) -> None:
        while not self.in_flight:
            await asyncio.sleep(0)
        self.in_flight.pop(0).set_result(known)
        for _ in range(5):  # let the payment that ended, and those it woke, take their next steps
            await asyncio.sleep(0)


async def pay(budget: UnseenBudget, facilitator: Facilitator, client: str = "10.0.0.1") -> str:
    """One payment on an unseen channel: "known", "unknown" (the facilitator's answers) or "refused" (unsent)."""
    try:
        async with budget.spend(client) as unknown:
            if await facilitator.verify():
                return "known"
            unknown()
            return "unknown"
    except OverBudget:
        return "refused"


def test_a_wave_of_made_up_channels_sent_at_once_reaches_the_facilitator_only_a_bursts_worth() -> None:
    async def run() -> tuple[list[str], int, int]:
        budget, facilitator = UnseenBudget(0.001, 3), Facilitator()
        wave = [asyncio.create_task(pay(budget, facilitator)) for _ in range(40)]
        for _ in range(3):
            await facilitator.answer(known=False)
        return await asyncio.wait_for(asyncio.gather(*wave), 5), facilitator.sent, facilitator.most_at_once

    answers, sent, most = asyncio.run(run())
    assert (answers.count("unknown"), answers.count("refused"), sent, most) == (3, 37, 3, 3)


def test_a_wave_of_real_channels_is_all_sent_a_bursts_worth_at_a_time_and_spends_nothing() -> None:
    async def run() -> tuple[list[str], int, int, int]:
        budget, facilitator = UnseenBudget(0.001, 3), Facilitator()
        wave = [asyncio.create_task(pay(budget, facilitator)) for _ in range(10)]
        for _ in range(10):
            await facilitator.answer(known=True)
        return await asyncio.gather(*wave), facilitator.sent, facilitator.most_at_once, len(budget._clients)

    answers, sent, most, kept = asyncio.run(run())
    assert (answers, sent, most, kept) == (["known"] * 10, 10, 3, 0)


def test_a_payment_waiting_behind_the_unknown_ends_as_soon_as_a_real_channel_gives_its_token_back() -> None:
    """Three in flight hold the budget of three; the fourth waits. The first ends known (its token back): the fourth
    is sent. The other two end unknown: a fifth, sent then, is refused (two spent, the fourth's held)."""

    async def run() -> list[str]:
        budget, facilitator = UnseenBudget(0.001, 3), Facilitator()
        first = [asyncio.create_task(pay(budget, facilitator)) for _ in range(4)]
        await asyncio.sleep(0)
        assert (facilitator.sent, len(facilitator.in_flight)) == (3, 3)
        await facilitator.answer(known=True)
        assert facilitator.sent == 4
        await facilitator.answer(known=False)
        await facilitator.answer(known=False)
        fifth = asyncio.create_task(pay(budget, facilitator))
        await asyncio.sleep(0)
        assert facilitator.sent == 4  # waits: the fourth still holds the last token
        await facilitator.answer(known=False)
        return [*await asyncio.gather(*first), await fifth]

    assert asyncio.run(run()) == ["known", "unknown", "unknown", "unknown", "refused"]


def test_another_client_is_sent_while_one_is_over_its_budget_and_an_idle_client_is_not_kept() -> None:
    async def run() -> tuple[list[str], str, int]:
        budget, facilitator = UnseenBudget(0.001, 1), Facilitator()
        flood = [asyncio.create_task(pay(budget, facilitator, "10.0.0.1")) for _ in range(5)]
        other = asyncio.create_task(pay(budget, facilitator, "10.0.0.2"))
        await asyncio.sleep(0)
        assert facilitator.sent == 2
        await facilitator.answer(known=False)  # the flood's one
        await facilitator.answer(known=True)  # the other client's
        return await asyncio.gather(*flood), await other, len(budget._clients)

    flood, other, kept = asyncio.run(run())
    assert (flood, other, kept) == (["unknown"] + ["refused"] * 4, "known", 0)


def test_a_payment_cancelled_while_it_waits_leaves_nothing_held() -> None:
    async def run() -> tuple[str, int, str]:
        budget, facilitator = UnseenBudget(0.001, 1), Facilitator()
        sent = asyncio.create_task(pay(budget, facilitator))
        waiting = asyncio.create_task(pay(budget, facilitator))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await facilitator.answer(known=True)
        first = await sent
        kept = len(budget._clients)
        later = asyncio.create_task(pay(budget, facilitator))
        await facilitator.answer(known=True)
        return first, kept, await later

    assert asyncio.run(run()) == ("known", 0, "known")


def test_no_budget_sends_every_payment_at_once() -> None:
    async def run() -> tuple[int, int]:
        budget, facilitator = UnseenBudget(0, 1), Facilitator()
        wave = [asyncio.create_task(pay(budget, facilitator)) for _ in range(10)]
        await asyncio.sleep(0)
        at_once = len(facilitator.in_flight)
        for _ in range(10):
            await facilitator.answer(known=False)
        assert await asyncio.gather(*wave) == ["unknown"] * 10
        return at_once, len(budget._clients)

    assert asyncio.run(run()) == (10, 0)
