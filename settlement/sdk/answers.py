"""The answers of a service (or a payee) as the SDK reads them: its word in one form, or an SDK error.

Whatever another party sends (a proxy, a service that lies, a web server's error page with status 200) reaches the
app as UntrustedServiceError, or as the refusal's ServiceRejectedError when it is one: never as a KeyError, a
ValueError or a JSONDecodeError of the parse, which an app cannot tell from its own bug and a retry loop does not
catch.
"""

from __future__ import annotations

from typing import Any

import httpx
from eth_utils.address import is_address, to_checksum_address
from pydantic_core import from_json

from settlement.domain.model import hex32_of, uint256_of
from settlement.domain.redaction import text_start
from settlement.errors import ServiceRejectedError, UntrustedServiceError, rejected


def json_of(response: httpx.Response) -> Any:
    """The answer's JSON, read by pydantic-core: the standard library's decoder (httpx's `json()`) raised
    RecursionError, not ValueError, for an answer nested a few thousand deep (2 KB of `[`), out of the SDK's call."""
    return from_json(response.content)


def answer_object(response: httpx.Response, who: str = "the service") -> dict[str, Any]:
    """The answer's JSON object."""
    try:
        data = json_of(response)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UntrustedServiceError(
            f"{who}'s answer to {_request(response)} is not a JSON object: {text_start(response.content, 80)!r}"
        )
    return data


def refusal(response: httpx.Response) -> ServiceRejectedError:
    """A refusal's error of its code, with its details; a body that is not one of ours keeps the status as code."""
    try:
        data = json_of(response)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    code = str(data.get("code", f"http_{response.status_code}"))
    message = str(data.get("message", text_start(response.content, 200)))
    details = {k: v for k, v in data.items() if k not in _NAMED}  # "request" or "status" in a body raised TypeError
    return rejected(response.status_code, code, message, request=_request(response), **details)


_NAMED = frozenset(("status", "code", "message", "request"))  # what `rejected` takes by name


def unanswered(request: str, message: str) -> ServiceRejectedError:
    """No answer at all (out of reach, a timeout; raise it `from` httpx's error): our 503 `service_unavailable`, not
    httpx's own error, outside the SDK's root. `request`: "POST /path" as the error names it."""
    return ServiceRejectedError(503, "service_unavailable", message, request=request)


def service_amount(data: dict[str, Any], field: str, who: str = "the service") -> int:
    """An amount in the answer, in its one form (`uint256_of`), not whatever `int()` made of the text or raised."""
    found = uint256_of(data.get(field))
    if found is None:
        raise UntrustedServiceError(f"{who}'s {field} is not an amount in base units: {str(data.get(field))[:40]!r}")
    return found


def service_int(data: dict[str, Any], field: str, what: str, who: str = "the service") -> int:
    """A JSON integer of the answer, 0 or more (not a bool, which JSON's true is to Python, nor a string of digits):
    a count, a number, a block."""
    found = data.get(field)
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise UntrustedServiceError(f"{who}'s {field} is not {what}: {str(found)[:40]!r}")
    return found


def service_text(data: dict[str, Any], field: str, who: str = "the service") -> str:
    """A string field of the answer, present and a string."""
    found = data.get(field)
    if not isinstance(found, str):
        raise UntrustedServiceError(f"{who}'s {field} is not a string: {str(found)[:40]!r}")
    return found


def service_address(data: dict[str, Any], field: str, who: str = "the service") -> str:
    """An address in the answer (a mixed-case one with its checksum), checksummed."""
    found = data.get(field)
    if not isinstance(found, str) or not is_address(found) or not found.startswith("0x"):
        raise UntrustedServiceError(f"{who}'s {field} is not an address: {str(found)[:50]!r}")
    return to_checksum_address(found)


def service_channel_id(data: dict[str, Any], field: str, who: str = "the service", what: str = "a channel id") -> str:
    """A channel id (or another 32-byte word: `what`) in the answer ("0x" + 64 hex digits, matched whole), in lower
    case."""
    found = hex32_of(data.get(field))
    if found is None:
        raise UntrustedServiceError(f"{who}'s {field} is not {what}: {str(data.get(field))[:70]!r}")
    return found


def service_salt(data: dict[str, Any], who: str = "the service") -> bytes:
    """A channel's `salt` in the answer, as the 32 bytes it names (checked by the caller: with the channel's parties
    it must hash to its id)."""
    return bytes.fromhex(service_channel_id(data, "salt", who, what="a 32-byte salt")[2:])


def _request(response: httpx.Response) -> str:
    return f"{response.request.method} {response.request.url.path}"
