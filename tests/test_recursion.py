"""The recursion limit while our apps serve (settlement.recursion): lowered, never raised, and put back once the last
of the apps that lowered it stops, whichever stops first (end to end: tests/test_transport.py, a deeply nested body to
a spawned service; tests/test_x402_payee.py, the payee app's lifespan)."""

from __future__ import annotations

import sys
from contextlib import ExitStack

from settlement.recursion import SAFE_RECURSION_LIMIT, bounded_recursion


def test_overlapping_sections_keep_the_limit_until_the_last_one_ends(limit_of_py_ecc: None) -> None:
    """Two apps of one process (the demo's service and its paid API) each lower the limit while they run; the first
    to stop put back the 100,000 it found while the other still served (a 200-KB body then crashed it)."""
    seen: list[int] = []
    with ExitStack() as first:
        first.enter_context(bounded_recursion())
        seen.append(sys.getrecursionlimit())
        second = ExitStack()
        second.enter_context(bounded_recursion())
        seen.append(sys.getrecursionlimit())
    seen.append(sys.getrecursionlimit())  # the first has stopped, the second serves on
    second.close()
    seen.append(sys.getrecursionlimit())
    assert seen == [SAFE_RECURSION_LIMIT, SAFE_RECURSION_LIMIT, SAFE_RECURSION_LIMIT, 100_000]


def test_a_lower_limit_an_app_set_is_kept(limit_of_py_ecc: None) -> None:
    sys.setrecursionlimit(600)
    with bounded_recursion():
        assert sys.getrecursionlimit() == 600
    assert sys.getrecursionlimit() == 600
