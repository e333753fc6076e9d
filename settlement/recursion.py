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
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SAFE_RECURSION_LIMIT = 1_000  # CPython's default: ~130 KB of C stack for the JSON decoder's deepest


class _Sections:
    """The bounded sections running in this process: the limit they found is put back when the last one ends, in
    whatever order they end (two apps of one process, a service and a payee app in the demo, overlap)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.found = 0


_sections = _Sections()


@contextmanager
def bounded_recursion() -> Iterator[None]:
    """The recursion limit at most `SAFE_RECURSION_LIMIT` within (never raised: an app that set a lower one keeps it),
    and put back as the first section found it once the last one ends."""
    with _sections.lock:
        if _sections.running == 0:
            _sections.found = sys.getrecursionlimit()
        _sections.running += 1
        sys.setrecursionlimit(min(sys.getrecursionlimit(), SAFE_RECURSION_LIMIT))
    try:
        yield
    finally:
        with _sections.lock:
            _sections.running -= 1
            if _sections.running == 0:
                sys.setrecursionlimit(_sections.found)
