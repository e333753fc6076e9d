"""Per-client rate limits against a real `serve`: a client over its rate gets 429 `rate_limited` with Retry-After
before any work is done for it, and another client is not slowed; X-Forwarded-For names the client only when a
trusted proxy sends it (a forged one from anyone else changes nothing)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.servers import ServiceProcess

RATE, BURST = "0.01", "20"  # 20 requests at once, then one every 100 s: nothing refills during a test


def flood(url: str, count: int, client_ip: str | None = None) -> list[int]:
    headers = {"X-Forwarded-For": client_ip} if client_ip else {}
    with httpx.Client(timeout=10) as http:
        return [http.get(f"{url}/health", headers=headers).status_code for _ in range(count)]


def test_a_client_over_its_rate_is_refused_and_a_forged_forwarded_for_does_not_help(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    service = spawn(f"sqlite:///{tmp_path / 'limits.db'}", client_requests_per_second=RATE, client_burst=BURST)
    assert flood(service.url, 30) == [200] * 19 + [429] * 11  # the start-up probe's /health took the 20th
    refused = httpx.get(f"{service.url}/v1/eip712")
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")
    assert refused.headers["retry-after"] == str(refused.json()["retryAfter"]) == "100"
    # Not behind a trusted proxy: the header is the client's own claim and is ignored.
    assert flood(service.url, 3, client_ip="10.9.9.9") == [429] * 3


def test_behind_a_trusted_proxy_each_client_has_its_own_rate(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    service = spawn(
        f"sqlite:///{tmp_path / 'proxied.db'}",
        client_requests_per_second=RATE,
        client_burst=BURST,
        trusted_proxies=json.dumps(["127.0.0.1"]),
    )
    flooder = flood(service.url, 40, client_ip="10.0.0.1")
    assert flooder == [200] * 20 + [429] * 20
    assert flood(service.url, 20, client_ip="10.0.0.2") == [200] * 20  # an honest client behind the same proxy
