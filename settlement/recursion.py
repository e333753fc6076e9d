"""The interpreter's recursion limit, kept where a recursion in C code cannot overflow the thread's stack.

py_ecc, imported through eth_account (eth_keyfile), sets `sys.setrecursionlimit(100000)` when it is imported, in every
program that imports it. CPython's JSON decoder (and its other recursions in C: repr, pickle, deep copies) stop at that
limit, not at the end of the stack: a request body of 100,000 `[` (200 KB, within the service's 1-MB bound) made
`json.loads` (FastAPI's, for every route past the fast path) run off the 8-MB stack, a segmentation fault of the whole
service, every payment in flight with it; 75,000 were enough, in a worker thread as on the main one. At the
interpreter's own default the decoder raises RecursionError (FastAPI: a 400) a thousand levels in. A process of ours
that reads what others send lowers the limit while it serves (`bounded_recursion`); nothing here needs py_ecc's depth
(its BLS keys, which eth_keyfile imports it for, are never made).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

SAFE_RECURSION_LIMIT = 1_000  # CPython's default: ~130 KB of C stack for the JSON decoder's deepest


@contextmanager
def bounded_recursion(limit: int = SAFE_RECURSION_LIMIT) -> Iterator[None]:
    """The recursion limit at most `limit` within (never raised: an app that set a lower one keeps it), and put back
    as it was after."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(min(before, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)
