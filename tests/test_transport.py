"""What one client can hold of a `settlement serve` process is bounded: a body that arrives too slowly gets a 408,
an oversized request head is refused, connections beyond the cap get a 503, and the server keeps serving others."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from settlement.x402.serving import BoundedProtocol, bounded_protocol
from settlement.x402.wire import CONNECTION_GONE
from tests.hub_helpers import Answers, free_test_port, trickled, wait_until
from tests.servers import ServiceProcess


@contextmanager
def raw(service: ServiceProcess) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def test_a_body_nested_past_the_stack_is_a_400_and_the_service_serves_on(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """py_ecc, imported with eth_account, sets the recursion limit to 100,000, and CPython's JSON decoder stops at
    that limit, not at the end of the stack: 100,000 `[` in a body (200 KB, within the 1-MB bound) to a route past
    the fast path ran FastAPI's `json.loads` off the stack, a segmentation fault of the whole service. Each such body
    is now a 400 `malformed_request` (settlement.recursion), on every route anyone may post to."""
    service = spawn(f"sqlite:///{tmp_path / 'deep.db'}")
    deep = b"[" * 100_000 + b"]" * 100_000
    paths = [
        "/v1/auth/challenge",
        "/v1/vouchers",
        "/v1/vouchers/batch",
        "/x402/verify",
        "/x402/settle",
        "/x402/settle/batch",
    ]
    answers = [
        httpx.post(service.url + path, content=deep, headers={"content-type": "application/json"}, timeout=30)
        for path in paths
    ]
    assert [(answer.status_code, answer.json()["code"]) for answer in answers] == 6 * [(400, "malformed_request")]
    assert httpx.get(f"{service.url}/health", timeout=10).status_code == 200


def test_a_body_that_arrives_too_slowly_gets_a_408(spawn: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    service = spawn(f"sqlite:///{tmp_path / 't.db'}", body_timeout_seconds="1")
    with raw(service) as sock:
        sock.sendall(
            b"POST /v1/vouchers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        head = Answers(sock).head()
        waited = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert 0.9 <= waited < 5, waited
    assert httpx.get(f"{service.url}/health").status_code == 200


def test_an_oversized_request_head_is_refused_and_others_are_served(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    service = spawn(f"sqlite:///{tmp_path / 't.db'}", max_header_bytes="4096")
    with raw(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: " + b"a" * 20_000 + b"\r\n\r\n")
        head = Answers(sock).head()
    assert head.startswith(b"HTTP/1.1 431 "), head
    with raw(service) as sock:  # a head that never ends: refused once past the limit, not buffered on and on
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: ")
        sent = 1 + trickled(sock, b"a" * 1000, 19, 0.05)
        head = Answers(sock).head()
    assert sent < 20  # cut off past the limit (4 KB), long before the client stopped
    assert head.startswith(b"HTTP/1.1 431 "), head
    assert httpx.get(f"{service.url}/health", headers={"X-Fine": "b" * 1000}).status_code == 200
    # a small head with a large body in one write is no oversized head: the body's own rules answer (413 here)
    big = httpx.post(f"{service.url}/v1/vouchers/batch", content=b"[" + b" " * 2_000_000 + b"]",
                     headers={"content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413


def test_connections_beyond_the_cap_get_a_503(spawn: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    service = spawn(f"sqlite:///{tmp_path / 't.db'}", max_connections="3")
    held = [socket.create_connection(("127.0.0.1", service.port), timeout=10) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # an unfinished head: the connection is held
        time.sleep(0.3)
        assert httpx.get(f"{service.url}/health").status_code == 503
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{service.url}/health").status_code == 200


def test_a_slow_head_gets_a_408_and_silent_connections_are_closed_which_frees_the_cap(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """uvicorn's parser waits for a request head for ever: a client holding the connection cap with connections that
    sent nothing, or half a head, had every other client's requests answered 503 for as long as it held them. Past
    SETTLEMENT_HEAD_TIMEOUT_SECONDS the half head gets a 408 and its connection is closed, and so is a connection that
    sent nothing (no answer: nothing was asked), while the client still holds its sockets; a kept-alive connection's
    next head is timed from its first byte, not from the last answer."""
    service = spawn(f"sqlite:///{tmp_path / 't.db'}", max_connections="3", head_timeout_seconds="1")
    silent = [socket.create_connection(("127.0.0.1", service.port), timeout=10) for _ in range(2)]
    opened = time.monotonic()
    half = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.3)
        assert httpx.get(f"{service.url}/health").status_code == 503  # the cap is held
        assert Answers(half).head().startswith(b"HTTP/1.1 408 "), "the half head's answer"
        assert 0.9 <= time.monotonic() - opened < 6  # timed from the connection's start
        assert [sock.recv(1024) for sock in silent] == [b"", b""]  # closed, nothing said
        assert httpx.get(f"{service.url}/health").status_code == 200  # the cap is free while the client holds on
    finally:
        for sock in [*silent, half]:
            sock.close()
    with raw(service) as sock:  # kept alive: 2 s idle (under the 5-s keep-alive), then a whole head at once
        answers = Answers(sock)
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = answers.whole()
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert json.loads(body)["status"] == "ok"
            time.sleep(2)


def test_a_body_still_coming_after_its_answer_is_cut_off_and_one_that_came_leaves_the_connection_usable(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """A route that never reads its body answers at once; uvicorn then discards the rest of the body as it comes, and
    each piece put off its keep-alive timer: a GET with a long Content-Length sent a byte every 0.2 s held its
    connection for good (two such held a cap of 3: every other request a 503). The rest now has the head's time
    (SETTLEMENT_HEAD_TIMEOUT_SECONDS) to come, and the connection is closed after it; a rest that does come in time
    leaves the connection usable, and idle from then on (closed after the keep-alive)."""
    service = spawn(f"sqlite:///{tmp_path / 't.db'}", max_connections="3", head_timeout_seconds="1")
    with raw(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nx")
        assert Answers(sock).whole()[0].startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        sent = trickled(sock, b"x", 50, 0.2)  # 10 s of a byte every 0.2 s, unless the service cuts it off
        assert sent < 25, sent  # cut off about a second after the answer (5 bytes), not left to trickle on
        assert time.monotonic() - started < 5
    with raw(service) as sock:  # the rest comes within the time: the connection serves the next request
        answers = Answers(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\nx")
        assert answers.whole()[0].startswith(b"HTTP/1.1 200 ")
        time.sleep(0.3)
        sock.sendall(b"xyz")
        time.sleep(1.5)  # past the head's time: the connection was not closed for it
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answers.whole()[0].startswith(b"HTTP/1.1 200 ")
    with raw(service) as sock:  # and idle once it came: closed after the keep-alive (5 s), not held for good
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\nx")
        assert Answers(sock).whole()[0].startswith(b"HTTP/1.1 200 ")
        time.sleep(0.3)
        sock.sendall(b"xyz")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # the socket's timeout is 10 s
        assert 4 <= time.monotonic() - started < 9


def test_a_client_that_reads_none_of_its_answers_is_dropped(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """200 pipelined requests for a large answer (/openapi.json, ~90 KB) from a client that reads nothing: the
    answers waited for the buffers to drain, no timer runs while one is in flight, and the connection was held for as
    long as the client liked. Past SETTLEMENT_WRITE_TIMEOUT_SECONDS with its writes paused the connection is dropped:
    what the client reads afterwards is what the buffers held, far from the 200 answers it asked for."""
    service = spawn(f"sqlite:///{tmp_path / 't.db'}", write_timeout_seconds="1")
    size = len(httpx.get(f"{service.url}/openapi.json").content)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a window that fills at once
    sock.settimeout(10)
    sock.connect(("127.0.0.1", service.port))
    with closing(sock):
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 200)
        time.sleep(5)  # reading nothing
        assert httpx.get(f"{service.url}/health").status_code == 200  # others are served meanwhile
        read = 0
        try:
            while chunk := sock.recv(1 << 20):
                read += len(chunk)
        except ConnectionResetError:
            pass
    assert 0 < read < 100 * size, (read, size)  # the old code sent all 200 once the client read


def test_a_request_for_another_host_name_is_refused(spawn: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    """DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name as Host; the service answers
    only the names it was told to (SETTLEMENT_ALLOWED_HOSTS, by default the loopback names)."""
    service = spawn(f"sqlite:///{tmp_path / 't.db'}")
    for path in ("/health", "/v1/channels"):
        evil = httpx.get(f"{service.url}{path}", headers={"Host": "rebind.attacker.example"})
        assert (evil.status_code, evil.json()["code"]) == (400, "host_not_allowed")
    voucher = httpx.post(
        f"{service.url}/v1/vouchers", json={}, headers={"Host": "rebind.attacker.example:8000"}
    )  # the fast path too
    assert (voucher.status_code, voucher.json()["code"]) == (400, "host_not_allowed")
    for host in (f"127.0.0.1:{service.port}", f"localhost:{service.port}", "localhost"):
        assert httpx.get(f"{service.url}/health", headers={"Host": host}).status_code == 200
    anyone = spawn(f"sqlite:///{tmp_path / 'u.db'}", name="open", allowed_hosts='["*"]')
    assert httpx.get(f"{anyone.url}/health", headers={"Host": "api.example.com"}).status_code == 200


@pytest.mark.parametrize(
    "limits",
    [
        {"max_head_bytes": 1023},
        {"head_timeout": 0.0},
        {"write_timeout": -1.0},
        {"body_timeout": 0.0},
        {"body_min_rate": 0},
    ],
)
def test_the_bounded_protocols_limits_are_checked(limits: dict[str, float]) -> None:
    """A bound that would refuse ordinary requests, or a timeout that is no time, is refused when the app is set up."""
    with pytest.raises(ValueError, match="at least 1 KiB"):
        bounded_protocol(**limits)  # type: ignore[arg-type]


def test_the_bounded_protocol_takes_its_limits_and_can_leave_bodies_to_the_app() -> None:
    made = bounded_protocol(2048, 1.5, 2.5, None, 7)
    assert issubclass(made, BoundedProtocol)
    assert (made.max_head_bytes, made.head_timeout, made.write_timeout, made.body_timeout, made.body_min_rate) == (
        2048, 1.5, 2.5, None, 7
    )  # fmt: skip
    assert (BoundedProtocol.body_timeout, BoundedProtocol.body_min_rate) == (10.0, 500)  # the class itself untouched


def test_the_bounded_protocol_tells_each_request_whether_its_client_went_away() -> None:
    """The payment middleware asks, before it settles, whether the payer is still there: under the bounded protocol
    the scope says so (`CONNECTION_GONE`, read at no cost), where Starlette's probe of the request's receive cost
    25-40 µs of each paid request. A request whose client stays is told it is there; one whose client closes the
    connection while the app works is told it went away."""
    seen: list[tuple[bool, bool]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        gone = scope["extensions"][CONNECTION_GONE]["gone"]
        before = gone()
        await asyncio.sleep(0.5)  # the app's work: a client may go away meanwhile
        seen.append((before, gone()))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_test_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http=bounded_protocol(), lifespan="off", log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=10)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "ok"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            time.sleep(0.1)
        wait_until(lambda: len(seen) == 2, timeout=10)
    finally:
        server.should_exit = True
        thread.join(10)
    assert seen == [(False, False), (False, True)]
