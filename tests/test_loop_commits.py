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


def test_the_median_of_the_last_commits_decides_and_nothing_before_there_are_enough() -> None:
    commits = LoopCommits(limit=0.002, seen=5, probe_every=1.0, clock=Clock())
    for _ in range(4):  # four commits of a disk stalled for 50 ms: too few to say anything
        commits.took(0.050)
        assert commits.slow() is False
    commits.took(0.0003)  # five: median 50 ms
    assert commits.slow() is True
    fast = LoopCommits(limit=0.002, seen=5, probe_every=1.0, clock=Clock())
    for seconds in (0.0003, 0.0004, 0.080, 0.0003, 0.0005):  # one stall among fast flushes: median 0.4 ms
        fast.took(seconds)
    assert fast.slow() is False
    at_limit = LoopCommits(limit=0.002, seen=1, probe_every=1.0, clock=Clock())
    at_limit.took(0.002)
    assert at_limit.slow() is True  # at the limit counts as slow
    at_limit.took(0.0019999)
    assert at_limit.slow() is False


def test_while_slow_one_payment_a_probe_period_is_still_made_on_the_loop_and_fast_probes_bring_it_back() -> None:
    clock = Clock()
    commits = LoopCommits(limit=0.0015, seen=3, probe_every=1.0, clock=clock)
    for _ in range(3):
        commits.took(0.003)  # a 3-ms disk
    assert [commits.slow() for _ in range(3)] == [True, True, True]
    clock.now += 0.999
    assert commits.slow() is True
    clock.now += 0.001  # a probe period after the disk was found slow: this payment probes, the next do not
    assert [commits.slow() for _ in range(3)] == [False, True, True]
    commits.took(0.0004)  # the probe's commit: fast; the median (3, 3, 0.4 ms) still slow
    clock.now += 1.0
    assert commits.slow() is False
    commits.took(0.0004)  # the second fast probe: median 0.4 ms
    assert [commits.slow() for _ in range(3)] == [False, False, False]
    commits.took(0.003)  # one slow commit again among fast ones: the median stays fast
    assert commits.slow() is False


@pytest.mark.parametrize(("limit", "seen", "probe_every"), [(-0.001, 16, 1.0), (0.0015, 0, 1.0), (0.0015, 16, 0.0)])
def test_a_limit_below_zero_no_commits_or_no_probe_period_is_refused(
    limit: float, seen: int, probe_every: float
) -> None:
    with pytest.raises(ValueError, match="loop commit limit"):
        LoopCommits(limit=limit, seen=seen, probe_every=probe_every)
