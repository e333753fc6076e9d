"""Checking a webhook delivery in a payee's app (docs/payee-events.md): the service signs each delivery with the
webhook's secret, Stripe's way: `Settlement-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. A
delivery whose signature does not hold, or whose time is more than `tolerance` seconds away (a replayed old delivery),
is not the service's."""

from __future__ import annotations

import hashlib
import hmac
import re
import time

SIGNATURE_HEADER = "Settlement-Signature"
EVENT_ID_HEADER = "Settlement-Event-Id"
TOLERANCE_SECONDS = 300
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # ASCII: str.isdigit takes "²" (then int() raised) and other scripts' digits


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The header's value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def is_authentic(
    secret: str, header: str | None, body: bytes, *, tolerance: int = TOLERANCE_SECONDS, now: float | None = None
) -> bool:
    """Whether `body` came from the service with this webhook's secret, recently: compare in constant time, and
    check the raw body as received (before any JSON parsing)."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not _TIMESTAMP.fullmatch(stamps[0]):
        return False  # a forged header is not authentic, never an error in the app that asks
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = signature(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))
