"""Serving a payee app with uvicorn: bounds on what one connection holds, and for how long.

uvicorn's httptools protocol (the one it takes when httptools is installed, as `uvicorn[standard]` and
`fastapi[standard]` install it) buffers a request head of any size, and a payment header is the payer's to fill: four
connections each sending a header line of 100 MB that never ended held ~380 MB of a plain uvicorn app. Nor does it time
a head: a connection that sends nothing, or half a head, is held until the client closes it, and with uvicorn's
`limit_concurrency` a client holding that many such connections had every other client's requests answered 503; nor the
rest of a body that its answer went out before (a route that never reads it): each piece put off its keep-alive timer,
so a body sent a byte at a time held the connection for good; nor a body that a route reads (a payment is verified
before the handler reads the body and settled after it answered, so one payment held connections for as long as their
bodies took); nor an answer its client reads none of (pipelined requests for a large answer, the window closed). This
protocol answers 431 and closes the connection once a head that is not complete yet passes `max_head_bytes`, and 408
(or closes a connection that sent nothing) once one takes longer than `head_timeout` seconds from the connection's start
or its first byte, and 408 once a body takes longer than `body_timeout` seconds and one more for each `body_min_rate`
bytes of it, closes a connection whose body is still coming `head_timeout` after its answer, and drops one whose answer
waits `write_timeout` seconds for its client to read any of it, so that a connection holds at most that much of the app
for at most that long. And when a connection goes, every request of it not answered yet is told (uvicorn tells only the
newest: a paid request with another pipelined behind it was settled for a client that was gone):

    uvicorn.run(app, host=..., port=..., http=bounded_protocol(), limit_concurrency=1_000)

uvicorn's other protocol, h11, bounds a head at 16 KiB by itself (a 400 past it), but not in time. `settlement serve`
runs this protocol too, with a record per connection of its own (settlement.api.transport).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Self

from settlement.x402.wire import CONNECTION_GONE

try:
    import httptools
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
except ImportError as missing:  # uvicorn alone serves with h11
    raise ImportError(
        "settlement.x402.serving runs uvicorn's httptools protocol: pip install 'uvicorn[standard]'"
    ) from missing

# A paid request's head: ~1.4 KB of PAYMENT-SIGNATURE (ours) and the app's own headers. 16 KiB, as h11's own bound and
# `settlement serve`'s default (SETTLEMENT_MAX_HEADER_BYTES).
MAX_HEAD_BYTES = 16 * 1024
# Seconds a head may take from the connection's start (or, on a kept-alive connection, its first byte): a client on a
# slow link sends a head of a few KB in well under a second.
HEAD_TIMEOUT_SECONDS = 10.0
# Seconds an answer may wait for its client to read it (its writes paused: the buffers full) before the connection
# is dropped: a client on a slow link reads something within seconds.
WRITE_TIMEOUT_SECONDS = 30.0
# A request body (one the app reads) may take this many seconds, and one more for each BODY_MIN_RATE bytes that came:
# a large upload on a slow link passes, a body sent a byte at a time does not (Apache's mod_reqtimeout has the same
# rule, body=20,MinRate=500). Time the app spends not reading (its buffer full, a pipelined request waiting its turn,
# a 100-continue not sent yet) does not count.
BODY_TIMEOUT_SECONDS = 10.0
BODY_MIN_RATE = 500
_TOO_LARGE = b"request head too large"
_TOO_SLOW = b"request head too slow"
_BODY_TOO_SLOW = b"request body too slow"


class _Deadline:
    """One of a connection's timers: started, cancelled or run, and then not set."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None

    @property
    def set(self) -> bool:
        return self._timer is not None

    def start(self, loop: asyncio.AbstractEventLoop, seconds: float, then: Callable[[], None]) -> None:
        self.cancel()
        self._timer = loop.call_later(seconds, self._run, then)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self, then: Callable[[], None]) -> None:
        self._timer = None
        then()


class _Flow(FlowControl):
    """uvicorn's flow control, telling its connection when the app takes up reading again."""

    def __init__(self, transport: asyncio.Transport, resumed: Callable[[], None]) -> None:
        super().__init__(transport)
        self._resumed = resumed

    def resume_reading(self) -> None:
        if self.read_paused:
            super().resume_reading()
            self._resumed()


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers 431 and closes a connection whose request head passes
    `max_head_bytes`, whether it came whole or is still coming, and 408 one whose head takes over `head_timeout`, or
    whose body takes over `body_timeout` and a second for each `body_min_rate` bytes of it; closes one whose request
    body is still coming `head_timeout` after its answer went out; and drops one whose answer waits `write_timeout` for
    its client to read any of it."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT_SECONDS
    write_timeout = WRITE_TIMEOUT_SECONDS
    body_timeout: float | None = BODY_TIMEOUT_SECONDS  # None: a body's time is not bounded here (the app bounds it)
    body_min_rate = BODY_MIN_RATE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._message_done = False  # the request's whole message (head and body) has come
        self._head_deadline = _Deadline()  # the head's time
        self._rest_deadline = _Deadline()  # the time of a body's rest after its answer
        self._write_deadline = _Deadline()  # the time an answer waits for its client to read
        self._body_deadline = _Deadline()  # the time of a body the app is (or will be) reading
        self._body_since = 0.0  # the body's time counts from here (its head's end, or the app reading again)
        self._body_bytes = 0  # and what came of it since
        self._unanswered: list[RequestResponseCycle] = []  # this connection's requests not answered yet, oldest first

    @classmethod
    def with_limits(
        cls,
        max_head_bytes: int = MAX_HEAD_BYTES,
        head_timeout: float = HEAD_TIMEOUT_SECONDS,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
        body_timeout: float | None = BODY_TIMEOUT_SECONDS,
        body_min_rate: int = BODY_MIN_RATE,
    ) -> type[Self]:
        """This protocol class (or a subclass's) for uvicorn's `http=`, with these limits."""
        timeouts = [head_timeout, write_timeout, *([] if body_timeout is None else [body_timeout])]
        if max_head_bytes < 1024 or body_min_rate < 1 or not all(timeout > 0 for timeout in timeouts):
            raise ValueError(
                "a request head's bound is at least 1 KiB (ordinary requests pass), a body's rate at least 1 byte a"
                " second; the timeouts above 0 s"
            )
        limits = {
            "max_head_bytes": max_head_bytes,
            "head_timeout": head_timeout,
            "write_timeout": write_timeout,
            "body_timeout": body_timeout,
            "body_min_rate": body_min_rate,
        }
        return type(cls.__name__, (cls,), limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport, self._reading_resumed)
        self._head_deadline.start(self.loop, self.head_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self._head_deadline, self._rest_deadline, self._write_deadline, self._body_deadline):
            deadline.cancel()
        # uvicorn tells only the newest request that its client went away: one being answered while a request was
        # pipelined behind it wrote its answer to the closed connection (an "Exception in ASGI application" in the
        # log), and a paid one was settled, its payer charged for an answer it never got. Every one is told.
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if not self._write_deadline.set:
            self._write_deadline.start(self.loop, self.write_timeout, self._reader_stalled)

    def resume_writing(self) -> None:
        self._write_deadline.cancel()
        super().resume_writing()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._unset_keepalive_if_required()  # a request is coming: not idle (whatever armed the timer)
        self._head_bytes, self._in_head, self._message_done = 0, True, False
        if not self._head_deadline.set:  # a kept-alive connection's next request: timed from its first byte
            self._head_deadline.start(self.loop, self.head_timeout, self._head_too_slow)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_deadline.cancel()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:  # a whole head that came in one piece: refused all the same
            self._head_bytes = size
            raise httptools.HttpParserError("request head too large")  # uvicorn answers it (send_400_response)
        super().on_headers_complete()
        cycle = self.cycle  # the request this head made (an upgrade makes none)
        if cycle is not None and not cycle.response_complete and cycle not in self._unanswered:
            self._unanswered = [c for c in self._unanswered if not c.response_complete] + [cycle]
            # Whether its client went away, from the connection (`connection_lost` tells every request of it): the
            # payment middleware asks before it settles, and Starlette's own probe (a receive in a cancelled anyio
            # scope) cost 25-40 µs of a paid request, most of it anyio formatting the task's repr for its message.
            told: dict[object, object] = {"gone": lambda: cycle.disconnected}
            cycle.scope.setdefault("extensions", {})[CONNECTION_GONE] = told

    def on_message_complete(self) -> None:
        late = self._rest_deadline.set
        self._message_done = True
        self._rest_deadline.cancel()
        self._body_deadline.cancel()
        super().on_message_complete()
        if late and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # The rest of a body whose answer went out before it: idle from here, as after any answer (the body's
            # pieces put off uvicorn's keep-alive timer, and nothing armed it again).
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self._message_done and not self.transport.is_closing():
            # Answered before its body came (a route that never reads it, a refusal): the rest is read by no one, and
            # each piece of it put off uvicorn's keep-alive timer, so a body sent a byte at a time held the
            # connection for good. It may come within the head's time (a client sends its whole body before it
            # reads the answer); later, the connection is closed.
            self._body_deadline.cancel()
            self._rest_deadline.start(self.loop, self.head_timeout, self._rest_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += len(data)  # the parser took this chunk and the head is still not complete
            if self._head_bytes > self.max_head_bytes:
                self.send_400_response("")
        elif (
            not self._message_done
            and self.body_timeout is not None
            and self.cycle is not None
            and not self.cycle.response_complete  # else the rest's time (on_response_complete), or an upgrade's
        ):
            # A body is coming for a request not answered yet: a route that reads it waited for as long as the client
            # took, and a payer with one payment (verified, never settled) held as many connections as it liked so.
            if self._body_deadline.set:
                self._body_bytes += len(data)
            else:
                self._time_body_afresh()

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes <= self.max_head_bytes:
            super().send_400_response(msg)
            return
        self._refuse(b"431 Request Header Fields Too Large", _TOO_LARGE)

    def _head_too_slow(self) -> None:  # set only while a head is coming: cancelled when it is complete
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head behind an answer in flight
            self._head_deadline.start(self.loop, self.head_timeout, self._head_too_slow)
            return
        if self._head_bytes:
            self._refuse(b"408 Request Timeout", _TOO_SLOW)
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def _reading_resumed(self) -> None:
        if self._body_deadline.set:  # the app reads again: the body's time counts afresh
            self._time_body_afresh()

    def _time_body_afresh(self) -> None:
        """The body's time and bytes counted from now, its timer set for `body_timeout` (the rate's seconds come on
        top as bytes come: `_body_too_slow`)."""
        self._body_since, self._body_bytes = self.loop.time(), 0
        self._body_deadline.start(self.loop, self.body_timeout or 0.0, self._body_too_slow)

    def _body_too_slow(self) -> None:  # cancelled when the body has come or the request is answered
        cycle = self.cycle
        if self.body_timeout is None or self.transport.is_closing() or cycle is None or cycle.response_complete:
            return  # (armed only with a timeout, for a request not answered yet)
        if self.flow.read_paused or cycle.waiting_for_100_continue:  # the app's turn, not the client's
            self._time_body_afresh()
            return
        left = self._body_since + self.body_timeout + self._body_bytes / self.body_min_rate - self.loop.time()
        if left > 0:  # it came fast enough so far
            self._body_deadline.start(self.loop, left, self._body_too_slow)
            return
        if cycle.response_started:
            self.transport.close()
            return
        # The app waits on the body: it is told the client went away (its answer, if it makes one, is not sent; a
        # payment is not settled for it), and the client is told why.
        cycle.disconnected = True
        cycle.message_event.set()
        self._refuse(b"408 Request Timeout", _BODY_TOO_SLOW)

    def _reader_stalled(self) -> None:
        # A client that reads none of its answers (pipelined requests for a large one, its window closed) held the
        # connection for good: the answer waited for the buffers to drain, and no timer runs while one is in flight.
        # Dropped, not closed: a close waits for the buffers to drain.
        if not self.transport.is_closing():
            self.transport.abort()

    def _rest_too_slow(self) -> None:  # cancelled when the rest has come
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, status: bytes, text: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 "
            + status
            + b"\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: "
            + str(len(text)).encode()
            + b"\r\n\r\n"
            + text
        )
        self.transport.close()


bounded_protocol = BoundedProtocol.with_limits  # the protocol class for uvicorn's `http=`, with these limits
