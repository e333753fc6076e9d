"""The payer's wire sends a request lost to a kept-alive connection once more (settlement.x402.resend), and only such
a request: idempotent, written on a connection that was already open, and not a payment the payee could take twice.
A real server on a socket: it answers the first request of each connection and keeps the connection open, and ends
the connection on the next one unanswered (with a FIN, or a reset), as uvicorn does after a handler's error."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
from x402 import x402ClientSync
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    append_payment_identifier_to_extensions,
    declare_payment_identifier_extension,
)
from x402.http.utils import encode_payment_response_header, encode_payment_signature_header
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

from settlement.x402.ahead import PayAheadAdapter
from settlement.x402.resend import Resending, ResendingAdapter
from settlement.x402.unanswered import UnansweredWire

Seen = tuple[int, str, str | None]  # (the connection's number, the request's method and path, its payment header)
# A payment answer x402 reads (one it cannot read is no answer to the payer's wire).
SETTLED = encode_payment_response_header(SettleResponse(success=True, transaction="", network="eip155:1")).encode()


@dataclass
class OneAnswerEach:
    """Answers the first request of each connection (200, kept alive) and ends the connection on its next request
    unanswered: `reset` sends a TCP reset, else a FIN. `first_too`: ends it on the first request as well."""

    reset: bool = False
    first_too: bool = False
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, answered = self.connections, False
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:  # the client closed it
                    return
                lines = head.decode().split("\r\n")
                headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:] if line)}
                if headers.get("transfer-encoding") == "chunked":
                    await reader.readuntil(b"0\r\n\r\n")
                else:
                    await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = lines[0].split(" ")
                paid = headers.get("payment-signature")
                self.seen.append((number, f"{method} {path}", paid))
                if answered or self.first_too:
                    if self.reset:
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                settled = b"" if paid is None else b"payment-response: " + SETTLED + b"\r\n"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + settled + b"\r\nok")
                await writer.drain()
                answered = True
        finally:
            writer.close()
            self.handlers.discard(task)


@contextmanager
def serving(server: OneAnswerEach) -> Iterator[str]:
    """`server` on an event loop of its own thread: its URL."""
    loop = asyncio.new_event_loop()
    started = asyncio.run_coroutine_threadsafe(asyncio.start_server(server.serve, "127.0.0.1", 0), loop)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listening = started.result(10)
    try:
        yield f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    finally:

        async def stop() -> None:
            listening.close()
            for handler in list(server.handlers):
                handler.cancel()
            await asyncio.gather(*server.handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run_against(server: OneAnswerEach, talk: Callable[[str], Coroutine[Any, Any, list[Any]]]) -> list[Any]:
    """An async client's `talk` to `server`, on an event loop of its own."""
    with serving(server) as url:
        return asyncio.run(talk(url))


def outcome(answer: httpx.Response | BaseException) -> int | str:
    return answer.status_code if isinstance(answer, httpx.Response) else type(answer).__name__


async def two_requests(url: str, method: str, header: str | None = None, **extensions: Any) -> list[int | str]:
    """A first GET (answered, its connection kept), then `method` on the same connection, through `Resending`."""
    async with httpx.AsyncClient(transport=Resending()) as http:
        first = await http.get(f"{url}/first")
        headers = {} if header is None else {"payment-signature": header}
        try:
            second: httpx.Response | BaseException = await http.request(
                method, f"{url}/second", headers=headers, content=b"x" if method == "PUT" else None,
                extensions=extensions,
            )  # fmt: skip
        except httpx.TransportError as ex:
            second = ex
        return [outcome(first), outcome(second)]


def a_payment(identified: bool) -> str:
    required = PaymentRequirements(scheme="channelhub", network="eip155:31337", asset="0x" + "00" * 20, amount="1",
                                   pay_to="0x" + "bb" * 20, max_timeout_seconds=60)  # fmt: skip
    extensions = {PAYMENT_IDENTIFIER: declare_payment_identifier_extension()}
    identifier = append_payment_identifier_to_extensions(extensions) if identified else None
    payload = PaymentPayload(x402_version=2, payload={"voucher": "signed"}, accepted=required, extensions=identifier)
    return encode_payment_signature_header(payload)


@pytest.mark.parametrize("ending", ["FIN", "reset"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_an_idempotent_request_lost_to_a_kept_alive_connection_is_sent_once_more(ending: str, method: str) -> None:
    server = OneAnswerEach(reset=ending == "reset")
    assert run_against(server, lambda url: two_requests(url, method)) == [200, 200]
    assert server.seen == [(1, "GET /first", None), (1, f"{method} /second", None), (2, f"{method} /second", None)]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_request_that_is_not_idempotent_is_not_sent_again(method: str) -> None:
    server = OneAnswerEach()
    assert run_against(server, lambda url: two_requests(url, method)) == [200, "RemoteProtocolError"]
    assert server.seen == [(1, "GET /first", None), (1, f"{method} /second", None)]


def test_a_payment_with_an_identifier_is_sent_once_more_and_one_without_is_not() -> None:
    """The payee may have settled a payment whose answer was lost: with an identifier it answers the same payment
    again and charges it once; without one it would refuse it as replayed and the payer's transport would pay again."""
    identified, bare = a_payment(identified=True), a_payment(identified=False)
    server = OneAnswerEach()
    assert run_against(server, lambda url: two_requests(url, "GET", identified)) == [200, 200]
    assert server.seen == [(1, "GET /first", None), (1, "GET /second", identified), (2, "GET /second", identified)]
    server = OneAnswerEach()
    assert run_against(server, lambda url: two_requests(url, "GET", bare)) == [200, "RemoteProtocolError"]
    assert server.seen == [(1, "GET /first", None), (1, "GET /second", bare)]
    server = OneAnswerEach()
    assert run_against(server, lambda url: two_requests(url, "GET", "not a payment")) == [200, "RemoteProtocolError"]
    assert server.seen == [(1, "GET /first", None), (1, "GET /second", "not a payment")]


def test_a_request_that_failed_on_a_new_connection_is_not_sent_again() -> None:
    server = OneAnswerEach(first_too=True)

    async def one(url: str) -> list[int | str]:
        async with httpx.AsyncClient(transport=Resending()) as http:
            try:
                return [outcome(await http.get(f"{url}/only"))]
            except httpx.TransportError as ex:
                return [outcome(ex)]

    assert run_against(server, one) == ["RemoteProtocolError"]
    assert server.seen == [(1, "GET /only", None)]


def test_a_streamed_body_is_not_sent_again() -> None:
    server = OneAnswerEach()

    async def streamed(url: str) -> list[int | str]:
        async def body() -> Any:
            yield b"x"

        async with httpx.AsyncClient(transport=Resending()) as http:
            first = await http.get(f"{url}/first")
            try:
                second: httpx.Response | BaseException = await http.put(f"{url}/second", content=body())
            except httpx.TransportError as ex:
                second = ex
            return [outcome(first), outcome(second)]

    assert run_against(server, streamed) == [200, "RemoteProtocolError"]
    assert server.seen == [(1, "GET /first", None), (1, "PUT /second", None)]


def test_the_callers_own_trace_still_sees_every_event_and_is_given_back() -> None:
    """A caller's `trace` extension is called through ours, for both sendings, and is the request's again after."""
    events: list[str] = []

    async def trace(name: str, info: dict[str, Any]) -> None:
        events.append(name)

    server = OneAnswerEach()
    assert run_against(server, lambda url: two_requests(url, "GET", trace=trace)) == [200, 200]
    assert events.count("connection.connect_tcp.started") == 1  # the second sending's new connection
    assert events.count("http11.send_request_headers.started") == 2


def test_a_request_answered_on_its_second_sending_is_not_told_unanswered() -> None:
    """Under `UnansweredWire` (every payer wire of ours): the payment the second sending delivered is not handed to
    the scheme as unanswered; one that was not sent again (no identifier) is."""
    told: list[str | None] = []

    def through_the_wire(header: str) -> Callable[[str], Coroutine[Any, Any, list[int | str]]]:
        async def talk(url: str) -> list[int | str]:
            async with httpx.AsyncClient(transport=UnansweredWire(lambda p: told.append(p.payload["voucher"]))) as http:
                await http.get(f"{url}/first")
                try:
                    return [outcome(await http.get(f"{url}/second", headers={"payment-signature": header}))]
                except httpx.TransportError as ex:
                    return [outcome(ex)]

        return talk

    server = OneAnswerEach()
    assert run_against(server, through_the_wire(a_payment(identified=True))) == [200]
    assert (told, [s[0] for s in server.seen]) == ([], [1, 1, 2])
    server = OneAnswerEach()
    assert run_against(server, through_the_wire(a_payment(identified=False))) == ["RemoteProtocolError"]
    assert (told, [s[0] for s in server.seen]) == (["signed"], [1, 1])


def sync_requests(adapter: requests.adapters.HTTPAdapter, url: str, method: str, **kwargs: Any) -> list[int | str]:
    """A first GET (answered, its connection kept), then `method` on the same connection, through `adapter`."""
    with requests.Session() as session:
        session.mount("http://", adapter)
        first = session.get(f"{url}/first").status_code
        try:
            return [first, session.request(method, f"{url}/second", **kwargs).status_code]
        except requests.ConnectionError as ex:
            return [first, type(ex).__name__]


@pytest.mark.parametrize(
    ("adapter", "ending"), [("ResendingAdapter", "FIN"), ("ResendingAdapter", "reset"), ("PayAheadAdapter", "FIN")]
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_requests_sends_an_idempotent_request_lost_to_a_kept_alive_connection_once_more(
    adapter: str, ending: str, method: str
) -> None:
    server = OneAnswerEach(reset=ending == "reset")
    wire = ResendingAdapter() if adapter == "ResendingAdapter" else PayAheadAdapter(x402ClientSync())
    with serving(server) as url:
        assert sync_requests(wire, url, method, data=b"x" if method == "PUT" else None) == [200, 200]
    assert server.seen == [(1, "GET /first", None), (1, f"{method} /second", None), (2, f"{method} /second", None)]


def test_requests_sends_again_neither_a_post_nor_a_streamed_body_nor_a_payment_without_identifier() -> None:
    identified, bare = a_payment(identified=True), a_payment(identified=False)
    cases: list[tuple[str, dict[str, Any], int | str]] = [
        ("POST", {"data": b"x"}, "ConnectionError"),
        ("PUT", {"data": iter([b"x"])}, "ConnectionError"),
        ("GET", {"headers": {"payment-signature": bare}}, "ConnectionError"),
        ("GET", {"headers": {"payment-signature": identified}}, 200),
    ]
    for method, kwargs, expected in cases:
        server = OneAnswerEach()
        with serving(server) as url:
            assert sync_requests(ResendingAdapter(), url, method, **kwargs) == [200, expected]
        assert [s[0] for s in server.seen] == ([1, 1, 2] if expected == 200 else [1, 1])


def test_requests_does_not_send_again_a_request_that_failed_on_a_new_connection() -> None:
    server = OneAnswerEach(first_too=True)
    with serving(server) as url, requests.Session() as session:
        session.mount("http://", ResendingAdapter())
        with pytest.raises(requests.ConnectionError):
            session.get(f"{url}/only")
    assert server.seen == [(1, "GET /only", None)]
