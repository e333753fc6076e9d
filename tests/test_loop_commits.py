"""When the payer's disk is too slow for its journal to commit on an event loop (settlement.sdk.loop_commits)."""

from __future__ import annotations

import pytest

from settlement.sdk.loop_commits import LoopCommits


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_disk_counts_as_slow_only_when_every_one_of_the_last_commits_waited_the_limit() -> None:
    commits = LoopCommits(limit=0.002, seen=5, probe_every=1.0, clock=Clock())
    for _ in range(4):  # four commits on a 3-ms disk: too few to say anything
        commits.took(0.003)
        assert commits.slow() is False
    commits.took(0.003)  # five
    assert commits.slow() is True
    for waits in (
        (0.003, 0.003, 0.0003, 0.003, 0.003),  # one commit that waited little: the disk can be fast, the loop's
        (0.0001, 0.0001, 0.080, 0.0001, 0.0001),  # one stall among fast flushes
        (0.003, 0.0019999, 0.003, 0.003, 0.003),  # just under the limit once
    ):
        other = LoopCommits(limit=0.002, seen=5, probe_every=1.0, clock=Clock())
        for seconds in waits:
            other.took(seconds)
        assert other.slow() is False
    at_limit = LoopCommits(limit=0.002, seen=1, probe_every=1.0, clock=Clock())
    at_limit.took(0.002)
    assert at_limit.slow() is True  # at the limit counts as slow
    negative = LoopCommits(limit=0.0, seen=1, probe_every=1.0, clock=Clock())
    negative.took(-1e-7)  # a wait measured below 0 by two clocks' roundings is 0
    assert negative.slow() is True


def test_while_slow_one_payment_a_probe_period_is_still_made_on_the_loop_and_a_fast_one_brings_it_back() -> None:
    clock = Clock()
    commits = LoopCommits(limit=0.001, seen=3, probe_every=1.0, clock=clock)
    for _ in range(3):
        commits.took(0.003)  # a 3-ms disk
    assert [commits.slow() for _ in range(3)] == [True, True, True]
    clock.now += 0.999
    assert commits.slow() is True
    clock.now += 0.001  # a probe period after the disk was found slow: this payment probes, the next do not
    assert [commits.slow() for _ in range(3)] == [False, True, True]
    commits.took(0.0031)  # the probe's commit waited as long: still slow, the next probe a period on
    clock.now += 0.5
    assert commits.slow() is True
    clock.now += 0.5
    assert commits.slow() is False
    commits.took(0.0001)  # this probe's commit waited 0.1 ms: the payments come back to the loop
    assert [commits.slow() for _ in range(3)] == [False, False, False]
    commits.took(0.003)  # two slow ones after it: one fast commit among the last three still says fast
    commits.took(0.003)
    assert commits.slow() is False
    commits.took(0.003)  # three slow in a row: slow again
    assert commits.slow() is True


@pytest.mark.parametrize(("limit", "seen", "probe_every"), [(-0.001, 16, 1.0), (0.001, 0, 1.0), (0.001, 16, 0.0)])
def test_a_limit_below_zero_no_commits_or_no_probe_period_is_refused(
    limit: float, seen: int, probe_every: float
) -> None:
    with pytest.raises(ValueError, match="loop commit limit"):
        LoopCommits(limit=limit, seen=seen, probe_every=probe_every)
