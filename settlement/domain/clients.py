"""Who a request counts against: the client address every per-client budget is kept under, in the service and in a
payee's app alike."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any


def client_of(scope: Mapping[str, Any], ipv6_prefix: int) -> str:
    """The client a request's (an ASGI scope's) limits count against: the connection's peer, or the address a trusted
    proxy names (uvicorn rewrites the peer only for the proxies it trusts: SETTLEMENT_TRUSTED_PROXIES, or a payee's
    `--forwarded-allow-ips`); an IPv6 client by its network (`client_key`)."""
    peer = scope.get("client")
    return client_key(str(peer[0]), ipv6_prefix) if peer else ""


def client_key(host: str, ipv6_prefix: int) -> str:
    """`host` as a client: an IPv4 address as it is, an IPv6 address as its network of `ipv6_prefix` bits
    (SETTLEMENT_CLIENT_IPV6_PREFIX), an IPv4-mapped one as its IPv4 address. One host is given a /64 (or more) and
    may send from any address in it: counted by address, each of its 2^64 addresses was a fresh client with a full
    budget of requests and forgeries, and its flood pushed other clients' debts out of the buckets."""
    if ":" not in host:
        return host
    return _ipv6_client(host, ipv6_prefix)


@functools.lru_cache(maxsize=4096)
def _ipv6_client(host: str, ipv6_prefix: int) -> str:
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host  # not an address (a name a proxy gave): counted as given
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip), ipv6_prefix), strict=False))


def untrusted_proxy(scope: Mapping[str, Any], forwarded_for: str | None) -> bool:
    """Whether a request (its ASGI scope) carries an `X-Forwarded-For` (`forwarded_for`) that uvicorn did not apply
    (the client it gives is not among its addresses): most likely a proxy that uvicorn does not trust, whose clients
    then share every budget kept per client (or a client sent the header itself, which changes nothing)."""
    peer = scope.get("client")
    return bool(forwarded_for and peer and peer[0] not in {part.strip() for part in forwarded_for.split(",")})
