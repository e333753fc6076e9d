"""Metrics on a port of their own (SETTLEMENT_METRICS_PORT): what a Prometheus scraper on the operator's network reads
without an API key, while the API's `/metrics` stays an operator route. The network is the boundary here: bind it to
an address only the scraper reaches (127.0.0.1 by default)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a scrape every few seconds is not news
        pass


class MetricsPort:
    """Serves the registry at any path of host:port on a daemon thread; `refresh` runs before each scrape (the gauges
    that are read off the indexer and the RPC counters when asked, as the API route does)."""

    def __init__(self, registry: CollectorRegistry, refresh: Callable[[], None], host: str, port: int) -> None:
        exposition = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            refresh()
            body: Iterable[bytes] = exposition(environ, start_response)
            return body

        self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-port", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
