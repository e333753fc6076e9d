"""ASGI guards in front of the routes: JSON bodies only, no body larger than the configured limit, and none that
takes longer than the configured time to arrive (a client sending its body a byte at a time holds a connection and
memory for nothing); allowed hosts; a request budget per client; and a refusal budget per connection."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settlement.domain.buckets import Buckets
from settlement.domain.clients import client_of
from settlement.errors import (
    HostNotAllowedError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestTimeoutError,
    SettlementError,
    UnsupportedMediaError,
)

_WITH_BODY = {"POST", "PUT", "PATCH"}
# The scope key under which `settlement serve`'s HTTP protocol (settlement.api.transport) puts a dict that lives as
# long as the TCP connection: what a connection has spent is kept there, whatever client addresses it names.
CONNECTION = "settlement.connection"
INTERNAL_ERROR = {"code": "internal_error", "message": "internal error"}  # the answer to a bug: nothing more


class BodyGuard:
    """Refuses non-JSON (415) and oversized (413) bodies before any route reads them, chunked uploads included."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        body = await read_json_body(scope, receive, send, self.max_bytes, self.body_timeout)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def read_json_body(
    scope: Scope, receive: Receive, send: Send, max_bytes: int, timeout: float = 10.0
) -> bytes | None:
    """The whole body of a JSON request; None once the request has been refused (415, 413, 408) or the client
    left."""
    headers = dict(scope["headers"])
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if media != b"application/json":
        await refuse(send, UnsupportedMediaError("send the body as JSON with Content-Type: application/json"))
        return None
    too_large = PayloadTooLargeError(f"the body is larger than {max_bytes} bytes", maxBytes=max_bytes)
    declared = headers.get(b"content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > max_bytes):
        await refuse(send, too_large)
        return None
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                if len(body) > max_bytes:
                    await refuse(send, too_large)
                    return None
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        await refuse(send, RequestTimeoutError(f"the body did not arrive within {timeout:g} s", timeoutSeconds=timeout))
        return None


def retry_after(error: SettlementError) -> str | None:
    """The Retry-After header of a refusal that says when to come back (429s, the chain look-up budget)."""
    wait = error.retry_after
    return None if wait is None else str(wait)


async def refuse(send: Send, error: SettlementError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer a refusal (its traceback dropped: `SettlementError.detached`)."""
    error.detached()
    body = json.dumps(error.body(), ensure_ascii=False, separators=(",", ":")).encode()
    wait = retry_after(error)
    if wait is not None and not any(name == b"retry-after" for name, _ in headers or ()):
        headers = [*(headers or ()), (b"retry-after", wait.encode())]
    await respond(send, error.status, body, headers)


async def respond(send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete JSON response in two ASGI messages."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class HostGuard:
    """Answers only requests whose Host is one of `allowed` (any port): a web page cannot reach a service on
    127.0.0.1 through DNS rebinding (its requests carry the attacker's host name). `*` allows any host."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = {h.lower() for h in allowed}

    @property
    def state(self) -> object:
        """The wrapped app's state, so callers can treat this as the app."""
        return getattr(self.app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                await refuse(send, HostNotAllowedError(f"host {host!r} is not served here (SETTLEMENT_ALLOWED_HOSTS)"))
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """A Host header's name, lower case, without its port: `[::1]:8000` -> `[::1]`."""
    host = host.lower()
    return host.rsplit(":", 1)[0] if not host.endswith("]") else host


def named_host(host: str, allowed: Iterable[str]) -> bool:
    """Whether a Host header's name (any port) is one of `allowed` by name (`*` names none)."""
    name = host_name(host)
    return name != "*" and name in {h.lower() for h in allowed}


class RateGuard:
    """A token bucket per client: `rate` requests a second, `burst` saved. A client over it gets 429 `rate_limited`
    with Retry-After, before any work is done for it; every other client goes on as before.

    The client is the connection's peer, or the address a trusted proxy names (uvicorn rewrites it only for
    SETTLEMENT_TRUSTED_PROXIES, so a forged X-Forwarded-For from anyone else changes nothing); an IPv6 client by its
    network of `ipv6_prefix` bits. At most `max_clients` buckets are kept (settlement.domain.buckets)."""

    def __init__(
        self, app: ASGIApp, rate: float, burst: float, ipv6_prefix: int = 64, max_clients: int = 100_000
    ) -> None:
        self.app = app
        self.rate = rate
        self.ipv6_prefix = ipv6_prefix
        self._buckets = Buckets(rate, max(burst, 1.0), max_clients)

    @property
    def state(self) -> object:
        return getattr(self.app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate <= 0:
            await self.app(scope, receive, send)
            return
        client = client_of(scope, self.ipv6_prefix)
        wait = self._buckets.take(client, time.monotonic())
        if wait is not None:
            error = RateLimitedError(
                f"more than {self.rate:g} requests a second from {client or 'this client'}: retry in {wait}s",
                retryAfter=wait,
            )
            await refuse(send, error)  # Retry-After from the error's retryAfter
            return
        await self.app(scope, receive, send)


class RefusalTarpit:
    """Paces a connection's refusals at `rate` a second once it has had a burst of `burst`.

    Per-client limits cannot hold a flood that names a new client address in every request (a botnet behind a
    proxy); a connection cannot change. A connection whose requests keep being refused (4xx, 503: forged vouchers,
    made-up channel ids, bytes that are not JSON) gets each further refusal at its turn, one every 1/`rate` seconds
    (the generic cell rate algorithm), so a client that waits for its answers, as HTTP/1.1 clients do, is slowed to
    that pace and the event loop serves everyone else. No accepted request is ever delayed. Outside `settlement
    serve` (no connection record in the scope) it does nothing.

    Each connection's late answers keep a phase of its own, drawn at random within the interval when it is first
    paced: connections that started together (a flood's) would otherwise be answered together and come back
    together, one burst of the whole flood each interval, which the event loop serves while honest requests wait
    (bench-flood: 64 connections, an honest p99 3-6x its p99 alone). Spread out, the same work is a steady trickle.
    """

    def __init__(
        self,
        app: ASGIApp,
        rate: float,
        burst: float,
        delayed: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        phase: Callable[[], float] = random.random,
    ) -> None:
        self.app = app
        self.rate = rate
        self.burst = burst
        self.delayed = delayed
        self.clock = clock
        self.phase = phase  # a fraction of the interval, drawn once per paced connection

    @property
    def state(self) -> object:
        return getattr(self.app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection: dict[str, Any] | None = scope.get(CONNECTION) if scope["type"] == "http" else None
        if connection is None or self.rate <= 0:
            await self.app(scope, receive, send)
            return

        async def send_late(message: Message) -> None:
            if message["type"] == "http.response.start" and _refused(message["status"]):
                wait = self._turn(connection)
                if wait > 0:
                    self.delayed()
                    await asyncio.sleep(wait)
            await send(message)

        await self.app(scope, receive, send_late)

    def _turn(self, connection: dict[str, Any]) -> float:
        """Seconds until this refusal's turn; books the turn (one event loop: no lock needed)."""
        now = self.clock()
        interval = 1.0 / self.rate
        due = max(float(connection.get("refusals_due", now)), now)  # when the next refusal is due at the pace
        turn = max(now, due - (self.burst - 1) * interval)  # a burst may come that much ahead of the pace
        connection["refusals_due"] = due + interval
        if turn <= now:
            return 0.0
        if "refusal_phase" not in connection:
            connection["refusal_phase"] = self.phase() * interval
        return turn - now + float(connection["refusal_phase"])


def _refused(status: int) -> bool:
    """The answers a flood gets: the client's fault (4xx) or a budget that is spent (503). A 500 is ours."""
    return 400 <= status < 500 or status == 503
