"""Payee webhooks: each webhook gets its payee's events (settlement.server.payee_events) in order, at least once,
signed with its secret (settlement.sdk.webhooks). One process on the store delivers (a lease, as the engine has);
each webhook's position is stored after each delivery, so a restart or another process resumes where it stood
(a delivery whose answer was lost comes again, with the same event id). A failing receiver is retried with
exponential backoff, its later events waiting behind (per-payee order is kept); other webhooks go on. A slow one
too: a webhook's turn lasts TURN_SECONDS at most, and ticks do not wait for turns still running; and a webhook whose
receiver answered slowly takes its turns on threads of their own for a while, so that many of them (a payee's ten, or
several payees') never hold the threads that every other webhook is delivered on.

Targets are checked each time (SSRF): only http(s), and never a loopback, private, link-local or reserved address
unless SETTLEMENT_WEBHOOK_ALLOW_PRIVATE_TARGETS (or on a devnet); and a delivery goes to the very address that was
checked (`Target`), so a host name that resolves elsewhere a moment later (DNS rebinding) cannot move it inside.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import httpx

from settlement.errors import LookUpsBusyError, MalformedRequestError
from settlement.sdk.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature
from settlement.server.config import Settings
from settlement.server.payee_events import Front, Horizon, Position, payees_moved, read_events, read_front
from settlement.settle.lease import Lease
from settlement.store import Database
from settlement.store.payee_events import WebhookRow, due_webhooks, webhook_delivered, webhook_failed

logger = logging.getLogger(__name__)
BACKOFF_BASE_SECONDS = 1.0
LOOKUPS_RETRY_SECONDS = 5  # a webhook refused while every look-up thread waits: asked again after
TURN_SECONDS = 1.0  # a webhook's deliveries in a row before its thread goes to the next due webhook
SLOW_ANSWER_SECONDS = 0.5  # an answer (or a failure) that took this long makes its webhook a slow one ...
SLOW_FOR_SECONDS = 60.0  # ... for this long after it: its turns on the slow threads


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


Resolve = Callable[[str, int], Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's (host, port) -> addresses


@dataclass(frozen=True)
class Target:
    """Where a webhook's delivery goes: the address that was checked (`url`), asked for by its own name (`host`, the
    Host header, and for TLS `sni`, which the certificate is checked against). The name is not looked up again by the
    HTTP client: a name that resolves to a public address when checked and to one inside the network a moment later
    (DNS rebinding) reaches only the address checked."""

    url: str
    host: str
    sni: str | None

    @property
    def extensions(self) -> dict[str, Any]:
        return {"sni_hostname": self.sni} if self.sni is not None else {}


def check_target(url: str, allow_private: bool, resolve: Resolve = socket.getaddrinfo) -> Target:
    """Refuse a URL the service must not call: not http(s), or (unless allowed) one that resolves to an address
    inside the service's own network; else where to send its deliveries."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise MalformedRequestError("a webhook URL is http(s)://host[:port]/path, without credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        name = httpx.URL(url)
        found = resolve(parts.hostname, port)
        addresses = [ipaddress.ip_address(address[0]) for *_, address in found]
    except (OSError, UnicodeError, ValueError, httpx.InvalidURL) as ex:
        raise MalformedRequestError(f"the webhook's host {parts.hostname!r} does not resolve") from ex
    if not addresses:
        raise MalformedRequestError(f"the webhook's host {parts.hostname!r} does not resolve")
    if not allow_private:
        for ip in addresses:
            if _inside(ip):
                raise MalformedRequestError(
                    f"the webhook's host {parts.hostname!r} is a private, loopback or reserved address ({ip}): refused"
                )
    ip = addresses[0]
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    pinned = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    return Target(
        pinned, name.netloc.decode("ascii"), name.raw_host.decode("ascii") if parts.scheme == "https" else None
    )


class HostLookUps:
    """The look-ups of webhook hosts the API makes (a webhook made), on threads of their own, each given up after
    `timeout` seconds: a host whose DNS answers slowly (an attacker's own zone) held one of the few request threads
    (SETTLEMENT_REQUEST_THREADS) for as long as the resolver waited, so a handful of such requests at once stopped
    every store read of every client. Now they wait on these threads only; a request gives up at the timeout.

    A look-up given up still holds its thread until the resolver answers. While every thread is so held, a webhook
    asked for is refused at once (503 `lookups_busy`, Retry-After): queued behind them, its own look-up's time ran out
    before it started, and its maker was told its host did not resolve."""

    def __init__(self, threads: int = 4, timeout: float = 3.0, resolve: Resolve = socket.getaddrinfo) -> None:
        self.threads = threads
        self.timeout = timeout
        self.resolve = resolve
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webhook-lookup")
        self._running = 0  # look-ups on the threads, finished or not by their requests' measure
        self._lock = threading.Lock()

    async def check(self, url: str, allow_private: bool) -> Target:
        """`check_target` off the request threads; MalformedRequestError if the host took longer than `timeout`,
        LookUpsBusyError when no thread is free."""
        with self._lock:
            if self._running >= self.threads:
                raise LookUpsBusyError(
                    f"every one of the {self.threads} threads looking up webhook hosts waits for a slow resolver: "
                    "retry in a few seconds",
                    retryAfter=LOOKUPS_RETRY_SECONDS,
                )
            self._running += 1
        looking = self._pool.submit(check_target, url, allow_private, self.resolve)
        looking.add_done_callback(self._done)  # answered, failed or cancelled: the thread is free again
        try:
            return await asyncio.wait_for(asyncio.wrap_future(looking), self.timeout)
        except TimeoutError:
            host = urlsplit(url).hostname
            raise MalformedRequestError(f"the webhook's host {host!r} did not resolve in {self.timeout:g}s") from None

    def _done(self, _looked_up: futures.Future[Target]) -> None:
        with self._lock:
            self._running -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a network's own translation, to wherever it chose
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address may reach inside the service's network: not global, multicast, or an IPv6 address that
    carries an IPv4 address which is (IPv4-mapped, IPv4-compatible, NAT64, 6to4). Those are judged by the address they
    carry alone, not by Python's table of IPv6 prefixes: it counts 64:ff9b::a00:1 (10.0.0.1 through a NAT64 gateway)
    as global, and 2002::/16 (6to4) as global or not by its release (global in 3.11.7 and 3.12.1, not in 3.13 and
    Debian's 3.11.2), so a public address's 6to4 form passed on one Python and not on another."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL:
            return True
        last32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        carried = ip.ipv4_mapped or ip.sixtofour or (last32 if ip in NAT64 or ip in IPV4_COMPATIBLE else None)
        if carried is not None:
            return _inside(carried)
    return not ip.is_global or ip.is_multicast


PASSED_SAVED = 10_000  # other payees' payments a webhook's stored position is moved past at once, at least


def _worth_saving(stored: Position, passed: Position) -> bool:
    """Whether to store a position moved past rows that were not the payee's: at once for chain events (rare), and
    once it passes PASSED_SAVED payments, so a quiet payee's read walks at most that many of the other payees'
    payments without a write per webhook at every tick."""
    return passed.chain != stored.chain or passed.payment - stored.payment >= PASSED_SAVED


class Seen(NamedTuple):
    """Where a webhook's last turn left it: the tick's front it had nothing more to deliver as of, and the front it
    last read its events at."""

    checked: Front
    read_at: Front


def _quiet(hook: WebhookRow, seen: dict[str, Seen], last: Front, now: Front, moved: set[str]) -> bool:
    """Whether a webhook's turn would read nothing new and store nothing: it had nothing to deliver as of the last
    tick's front, its payee has no event since, no chain event came since its last read (its position moves past
    every settlement at once: `_worth_saving`), and fewer than PASSED_SAVED payments of other payees."""
    was = seen.get(hook.webhook_id)
    return (
        was is not None
        and was.checked == last
        and hook.payee.lower() not in moved
        and now.chain == was.read_at.chain
        and now.horizon - hook.after_payment < PASSED_SAVED
    )


class WebhookSender:
    """`tick()` delivers what is due; call it every `webhook_tick` seconds."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        allow_private: bool,
        horizon: Horizon,
        resolve: Resolve = socket.getaddrinfo,
    ) -> None:
        self.db = db
        self.settings = settings
        self.allow_private = allow_private
        self.resolve = resolve  # the one look-up of a webhook's host per delivery (`check_target`)
        self.horizon = horizon
        self.lease = Lease(db, "payee-webhooks")
        self._local = threading.local()  # each sender thread's event loop and HTTP client (`_post`)
        self._clients: list[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = []
        self._pool = ThreadPoolExecutor(max_workers=settings.webhook_concurrency, thread_name_prefix="webhook")
        # Turns of webhooks whose receivers answered slowly (`_slow_until`: webhook -> monotonic end): a quarter as
        # many threads. On the one pool, ten such receivers answering just inside the timeout held every thread, and
        # every other payee's events waited behind them, seconds a turn.
        self._slow_pool = ThreadPoolExecutor(
            max_workers=max(1, settings.webhook_concurrency // 4), thread_name_prefix="webhook-slow"
        )
        self._slow_until: dict[str, float] = {}
        self._busy: set[str] = set()  # webhooks whose turn is running
        self._front: Front | None = None  # the feed's front at the last tick
        self._seen: dict[str, Seen] = {}  # webhook -> where its last turn left it
        self._lock = threading.Lock()

    def tick(self, wait: float | None = None) -> int:
        """Start a turn for each due webhook that has none running and may have something to deliver; returns the
        deliveries of the turns that ended within `wait` seconds (default: `webhook_tick`). A turn still running goes
        on by itself: its webhook gets no other turn meanwhile (never two deliveries of one webhook at once), the
        others get theirs at the next tick. A webhook whose last turn read all it had gets none while its payee has no
        new event (`payees_moved`): a turn costs the store reads, and anyone may make ten webhooks for its own
        address. 0 when another process holds the lease; a store without webhooks costs one query."""
        with self._lock:
            busy = set(self._busy)  # before the read: a turn that ends after it was read from a row it moved
        with self.db.read() as conn:
            due = [hook for hook in due_webhooks(conn, time.time_ns() // 1000) if hook.webhook_id not in busy]
        if not due or not self.lease.acquire():
            return 0
        front = read_front(self.db, self.horizon)
        last, self._front = self._front, front
        moved = None if last is None else payees_moved(self.db, last, front)
        with self._lock:
            kept = busy | {hook.webhook_id for hook in due}  # a deleted webhook's entry goes
            seen = {webhook: fronts for webhook, fronts in self._seen.items() if webhook in kept}
            quiet = {
                hook.webhook_id
                for hook in due
                if last is not None and moved is not None and _quiet(hook, seen, last, front, moved)
            }
            seen.update({webhook: seen[webhook]._replace(checked=front) for webhook in quiet})  # as of this front
            self._seen = seen
            due = [hook for hook in due if hook.webhook_id not in quiet]
            self._busy.update(hook.webhook_id for hook in due)
            now = time.monotonic()
            self._slow_until = {webhook: end for webhook, end in self._slow_until.items() if end > now}
            slow = {hook.webhook_id for hook in due if hook.webhook_id in self._slow_until}
        turns = [(self._slow_pool if h.webhook_id in slow else self._pool).submit(self._turn, h, front) for h in due]
        ended, _ = futures.wait(turns, timeout=self.settings.webhook_tick if wait is None else wait)
        return sum(turn.result() for turn in ended)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._slow_pool.shutdown(wait=True)
        for loop, client in self._clients:  # their threads have ended: nothing runs these loops now
            loop.run_until_complete(client.aclose())
            loop.close()
        self._clients.clear()
        self.lease.release()

    def _turn(self, hook: WebhookRow, front: Front) -> int:
        complete = False
        try:
            sent, complete = self._deliver(hook, front.horizon)
            return sent
        except Exception as ex:  # the store down: the webhook's stored position stands, the next turn resumes there
            logger.warning("webhook %s: %s; retrying", hook.webhook_id, getattr(ex, "message", None) or ex)
            return 0
        finally:
            with self._lock:
                self._busy.discard(hook.webhook_id)
                if complete:  # it read all it had as of `front`
                    self._seen[hook.webhook_id] = Seen(checked=front, read_at=front)
                else:
                    self._seen.pop(hook.webhook_id, None)

    def _deliver(self, hook: WebhookRow, horizon: int) -> tuple[int, bool]:
        """Deliver the webhook's next events in order, for TURN_SECONDS at most (then its thread goes to the others:
        a receiver that answers each event just inside the timeout held a thread, and every webhook's next tick,
        for as long as a hundred such answers took)."""
        sent, started = 0, time.monotonic()
        position = Position(hook.after_payment, hook.after_block, hook.after_log)
        feed = read_events(self.db, horizon, hook.payee, position, self.settings.webhook_batch)
        for event in feed.events:
            if sent and time.monotonic() - started >= TURN_SECONDS:
                return sent, False  # the rest at its next turn, from the position stored after each delivery
            body = json.dumps(event.body(), separators=(",", ":")).encode()
            try:
                headers = {
                    "content-type": "application/json",
                    SIGNATURE_HEADER: signature(hook.secret, body, int(time.time())),
                    EVENT_ID_HEADER: event.event_id,
                }
                asked = time.monotonic()
                try:
                    status = self._post(hook.url, body, headers)
                finally:
                    if time.monotonic() - asked >= SLOW_ANSWER_SECONDS:
                        with self._lock:
                            self._slow_until[hook.webhook_id] = time.monotonic() + SLOW_FOR_SECONDS
                if not 200 <= status < 300:
                    raise OSError(f"answered HTTP {status}")
            except (httpx.HTTPError, OSError, MalformedRequestError) as ex:
                self._failed(hook, f"{event.event_id}: {type(ex).__name__}: {ex}")
                return sent, False
            position = event.position
            with self.db.write() as conn:
                webhook_delivered(conn, hook.webhook_id, position.payment, position.block, position.log)
            sent += 1
        if _worth_saving(position, feed.position):  # what the read looked past, none of it the payee's
            with self.db.write() as conn:
                p = feed.position
                webhook_delivered(conn, hook.webhook_id, p.payment, p.block, p.log)
        return sent, not feed.more

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """The receiver's answer status, its host looked up and checked (`check_target`) and the exchange made within
        `webhook_timeout_seconds` in all; its body is never read. A timeout per read let a receiver that streams an
        endless body (memory grew ~400 MB a second on loopback, a whole body being read) or dribbles its headers a
        byte at a time hold a sender thread, and the service, for good; a host whose DNS answers slowly held it as
        long as the resolver waited. The whole runs on this thread's own event loop (the look-up on that loop's
        executor) and is cancelled wherever it stands at the deadline (TimeoutError, an OSError: a failure like any
        other)."""
        mine: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = getattr(self._local, "client", None)
        if mine is None:
            loop = asyncio.new_event_loop()
            client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_seconds, follow_redirects=False)
            mine = self._local.client = (loop, client)
            with self._lock:
                self._clients.append(mine)
        loop, client = mine

        async def exchange() -> int:
            target = await loop.run_in_executor(None, check_target, url, self.allow_private, self.resolve)
            sent = {"host": target.host, **headers}
            async with client.stream(
                "POST", target.url, content=body, headers=sent, extensions=target.extensions
            ) as answer:
                return answer.status_code

        return loop.run_until_complete(asyncio.wait_for(exchange(), self.settings.webhook_timeout_seconds))

    def _failed(self, hook: WebhookRow, error: str) -> None:
        failures = hook.failures + 1
        wait = min(BACKOFF_BASE_SECONDS * 2 ** min(failures - 1, 30), self.settings.webhook_backoff_max_seconds)
        logger.warning("webhook %s: %s (attempt %d; next in %.0fs)", hook.webhook_id, error, failures, wait)
        with self.db.write() as conn:
            webhook_failed(conn, hook.webhook_id, failures, time.time_ns() // 1000 + int(wait * 1e6), error)
