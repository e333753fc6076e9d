"""RPC failover: one web3 provider over several JSON-RPC URLs of the same chain.

Requests go to the active URL; a transport failure (connection refused, reset, timeout) moves the request, and the
active URL, to the next one that answers. While a fallback is active the primary (the first URL) is probed every
`primary_retry` seconds and taken back as soon as it answers. JSON-RPC errors are answers, not failures: they are
returned as they are.

A provider's URL often carries its API key (in the path, the query or the user part): every URL this module writes
(a log line, an error) is `shown`, its host and port only. A failure's text from requests names the URL it was
sending to, and `scrubbed` takes it out: that text reached the 503 a client got while the chain was down.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import requests
from urllib3.util import parse_url
from web3 import HTTPProvider
from web3.providers.base import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse

logger = logging.getLogger(__name__)

TRANSPORT_ERRORS = (requests.RequestException, OSError)
_URL = re.compile(r"\b(?:https?|wss?)://[^\s'\"<>]+", re.IGNORECASE)
_REQUESTED = re.compile(r"(\burl: )\S+")  # how requests names the URL a failed request went to


def shown(url: str) -> str:
    """`url` as it may be written where others read it: its scheme, host and port, `/…` for anything more (a path,
    a query or a user part may hold the provider's key)."""
    try:
        parts = parse_url(url)
    except ValueError:
        return "(an RPC URL that does not parse)"
    if not parts.host:
        return "(an RPC URL without a host)"
    base = f"{parts.scheme or 'http'}://{parts.host}" + (f":{parts.port}" if parts.port else "")
    more = parts.auth or parts.query or parts.fragment or (parts.path or "/") != "/"
    return base + ("/…" if more else "")


def scrubbed(text: str) -> str:
    """A transport failure's text without the URLs, or the parts of URLs, it names (see `shown`)."""
    return _REQUESTED.sub(r"\1…", _URL.sub(lambda found: shown(found.group(0)), text))


class FailoverProvider(JSONBaseProvider):
    """An HTTP provider per URL, first healthy one wins; the first URL is preferred whenever it is up."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float,
        session: requests.Session | None = None,
        primary_retry: float = 10.0,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("at least one RPC URL is needed")
        self._providers = [
            HTTPProvider(url, request_kwargs={"timeout": timeout}, session=session, exception_retry_configuration=None)
            for url in urls
        ]
        self.primary_retry = primary_retry
        self.calls: Counter[str] = Counter()  # JSON-RPC requests sent, by method: what a flood costs, in /metrics
        self._active = 0
        self._last_probe = 0.0
        self._lock = threading.Lock()

    @property
    def endpoint_uri(self) -> str:
        """The URL requests go to now."""
        return str(self._providers[self._active].endpoint_uri)

    @property
    def urls(self) -> list[str]:
        return [str(p.endpoint_uri) for p in self._providers]

    @property
    def shown_urls(self) -> str:
        """The URLs as they may be written (`shown`)."""
        return ", ".join(shown(url) for url in self.urls)

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        with self._lock:
            self.calls[str(method)] += 1
        self._maybe_return_to_primary()
        start = self._active
        last: Exception | None = None
        for offset in range(len(self._providers)):
            index = (start + offset) % len(self._providers)
            try:
                response = self._providers[index].make_request(method, params)
            except TRANSPORT_ERRORS as ex:
                last = ex
                logger.warning("RPC %s failed (%s)", shown(str(self._providers[index].endpoint_uri)), type(ex).__name__)
                continue
            if index != self._active:
                with self._lock:
                    self._active = index
                    self._last_probe = time.monotonic()
                logger.warning("RPC failover: now using %s", shown(str(self._providers[index].endpoint_uri)))
            return response
        assert last is not None
        raise last

    def _maybe_return_to_primary(self) -> None:
        if self._active == 0 or time.monotonic() - self._last_probe < self.primary_retry:
            return
        with self._lock:
            self._last_probe = time.monotonic()
        try:
            self._providers[0].make_request(RPCEndpoint("eth_chainId"), [])
        except TRANSPORT_ERRORS:
            return
        with self._lock:
            self._active = 0
        logger.warning("RPC primary %s answers again: switching back", shown(str(self._providers[0].endpoint_uri)))
