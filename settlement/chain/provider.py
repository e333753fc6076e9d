"""RPC failover: one web3 provider over several JSON-RPC URLs of the same chain.

Requests go to the active URL; a transport failure (connection refused, reset, timeout) moves the request, and the
active URL, to the next one that answers. While a fallback is active the primary (the first URL) is probed every
`primary_retry` seconds and taken back as soon as it answers. JSON-RPC errors are answers, not failures: they are
returned as they are.

A provider's URL often carries its API key (in the path, the query or the user part): every URL this module writes
(a log line, an error) is written by `settlement.domain.redaction.shown_url`, its scheme, host and port only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import requests
from web3 import HTTPProvider
from web3.providers.base import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse

from settlement.domain.redaction import shown_url

logger = logging.getLogger(__name__)

TRANSPORT_ERRORS = (requests.RequestException, OSError)


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
        """The URLs as they may be written (`shown_url`)."""
        return ", ".join(shown_url(url) for url in self.urls)

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
                logger.warning(
                    "RPC %s failed (%s)", shown_url(str(self._providers[index].endpoint_uri)), type(ex).__name__
                )
                continue
            if index != self._active:
                with self._lock:
                    self._active = index
                    self._last_probe = time.monotonic()
                logger.warning("RPC failover: now using %s", shown_url(str(self._providers[index].endpoint_uri)))
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
        logger.warning("RPC primary %s answers again: switching back", shown_url(str(self._providers[0].endpoint_uri)))
