"""RPC failover: one web3 provider over several JSON-RPC URLs of the same chain.

Requests go to the active URL; a transport failure (connection refused, reset, timeout) moves the request, and the
active URL, to the next one that answers. While a fallback is active the primary (the first URL) is probed every
`primary_retry` seconds and taken back as soon as it answers. JSON-RPC errors are answers, not failures: they are
returned as they are.

Every URL must serve one chain: `connect` learns its id from the first answer (`chain_id`), and a URL is asked its
chain id before its first request (at `connect`, or when failover first reaches it: a fallback down at `connect` may
come up serving another chain). One serving another chain is passed over as one that does not answer, and said in the
log. (This is why the clients `connect` makes go without web3's validation middleware, which asked the active URL its
chain id twice before every call, estimate and access list: three RPC calls for one read.)

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


class WrongChainError(requests.ConnectionError):
    """A URL that serves another chain than the others: for a caller, one more URL that does not answer ours."""

    def __init__(self, message: str, served: int) -> None:
        super().__init__(message)
        self.served = served


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
        self.chain_id: int | None = None  # the chain every URL must serve, once `connect` has learnt it
        self._serving: set[int] = set()  # the URLs (by index) seen serving `chain_id`
        self.wrong_chain: dict[int, int] = {}  # the URLs (by index) last seen serving another chain: that chain's id

    @property
    def endpoint_uri(self) -> str:
        """The URL requests go to now."""
        return str(self._providers[self._active].endpoint_uri)

    @property
    def active(self) -> int:
        """The index in `urls` of the URL requests go to now (0: the primary)."""
        return self._active

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
                self._check_chain(index)
                response = self._providers[index].make_request(method, params)
            except TRANSPORT_ERRORS as ex:
                last = ex
                with self._lock:
                    self._serving.discard(index)  # back up, it may be another node: asked its chain again first
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

    def learn_chain(self) -> int:
        """Ask the active URL its chain id, and hold every URL to it from now on; raises as `make_request`."""
        chain_id = _chain_of(self.make_request(RPCEndpoint("eth_chainId"), []), self.endpoint_uri)
        with self._lock:
            self.chain_id = chain_id
            self._serving = {self._active}
        return chain_id

    def survey(self) -> list[tuple[str, int]]:
        """Ask each URL not yet seen serving `chain_id` its chain: the URLs and ids of those serving another (those
        down are asked again when failover reaches them)."""
        others = []
        for index, url in enumerate(self.urls):
            if index in self._serving:
                continue
            try:
                self._check_chain(index)
            except WrongChainError as ex:
                others.append((url, ex.served))
            except TRANSPORT_ERRORS:
                continue
        return others

    def served_chain(self, index: int) -> int:
        """The chain id the URL at `index` answers; raises a transport error when it does not answer one."""
        with self._lock:
            self.calls["eth_chainId"] += 1
        return _chain_of(self._providers[index].make_request(RPCEndpoint("eth_chainId"), []), self.urls[index])

    def _check_chain(self, index: int) -> None:
        if self.chain_id is None or index in self._serving:
            return
        served = self.served_chain(index)
        if not self._noted(index, served):
            raise WrongChainError(
                f"RPC {shown_url(self.urls[index])} serves chain {served}, not {self.chain_id}", served
            )

    def _noted(self, index: int, served: int) -> bool:
        """Whether `served` (the chain the URL at `index` answered) is ours; noted either way (`wrong_chain`). A URL
        seen serving another chain is an ERROR line once, until it serves ours again or another: a primary that
        stayed on it was one at each probe (every `primary_retry` seconds), a fallback one at each failover past it."""
        with self._lock:
            if self.chain_id is None or served == self.chain_id:
                self._serving.add(index)
                self.wrong_chain.pop(index, None)
                return True
            news = self.wrong_chain.get(index) != served
            self.wrong_chain[index] = served
        logger.log(
            logging.ERROR if news else logging.DEBUG,
            "RPC %s%s serves chain %d, not %d%s",
            "primary " if index == 0 else "",
            shown_url(self.urls[index]),
            served,
            self.chain_id,
            "" if index == 0 else ": passed over",
        )
        return False

    def _maybe_return_to_primary(self) -> None:
        if self._active == 0 or time.monotonic() - self._last_probe < self.primary_retry:
            return
        with self._lock:
            self._last_probe = time.monotonic()
        try:
            served = self.served_chain(0)
        except TRANSPORT_ERRORS:
            return
        if not self._noted(0, served):
            return
        with self._lock:
            self._active = 0
        logger.warning("RPC primary %s answers again: switching back", shown_url(str(self._providers[0].endpoint_uri)))


def _chain_of(answer: RPCResponse, url: str) -> int:
    """The chain id in an eth_chainId answer; a JSON-RPC error instead is a URL that does not serve a chain."""
    result = answer.get("result")
    if not isinstance(result, str):
        raise requests.ConnectionError(f"RPC {shown_url(url)} answered no chain id ({answer.get('error')})")
    return int(result, 16)
