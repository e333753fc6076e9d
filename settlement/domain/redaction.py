"""URLs as they may be written where others read them (a log, an error a client gets).

An RPC provider's or a hosted facilitator's URL often carries its key, in the path (`/v2/<key>`), the query
(`?apikey=`) or the user part (`https://:secret@…`): such a URL is written as its scheme, host and port, `/…` for the
rest. A transport failure's text names the URL it was sending to (requests: `… with url: /v2/<key>`; httpx: `… for
url 'https://…'`): `scrubbed` takes URLs out of it. An answer's body quoted in a failure is its start (`text_start`).
"""

from __future__ import annotations

import codecs
import re
from urllib.parse import urlsplit

_URL = re.compile(r"\b(?:https?|wss?)://[^\s'\"<>()]+", re.IGNORECASE)
_URL_AT_END = re.compile(r"\b(?:https?|wss?)://[^\s'\"<>()]*\Z", re.IGNORECASE)
_REQUESTED = re.compile(r"(\burl: )[^\s;,()]+")  # how requests names the URL a failed request went to


def shown_url(url: str) -> str:
    """`url` as scheme, host and port, with `/…` for anything more (a path, a query or a user part may hold a key)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "(a URL that does not parse)"
    if not host:
        return "(a URL without a host)"
    base = f"{parts.scheme or 'http'}://" + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    more = parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/")
    return base + ("/…" if more else "")


def scrubbed(text: str) -> str:
    """A failure's text with every URL it names written as `shown_url` writes it, and requests' `url: <path>` cut."""
    return _REQUESTED.sub(r"\1…", _URL.sub(_shown_in_text, text))


def _shown_in_text(found: re.Match[str]) -> str:
    """A URL found in text, shown; the sentence's punctuation after it kept."""
    url = found.group(0)
    core = url.rstrip(".,;:!?")
    return shown_url(core) + url[len(core) :]


def scrubbed_start(text: str, limit: int) -> str:
    """`scrubbed` of `text`'s first `limit` characters (scrubbing is linear in the text: a 100-KB error page took 2 ms).
    A URL the cut falls in is dropped whole: cut short, its user part could read as a host and a port."""
    if len(text) <= limit:
        return scrubbed(text)
    start = text[:limit]
    cut = _URL_AT_END.search(start)
    return scrubbed(start if cut is None else start[: cut.start()])


def text_start(body: bytes, limit: int) -> str:
    """An answer body's first `limit` characters at most, as UTF-8 text, and its length in bytes after them when cut.
    Only the start is decoded: decoding is linear in the body (an 8-MB error page of non-ASCII text took 13.5 ms), and
    a failure quotes a few hundred characters of it. A character the cut falls in is left out whole."""
    if len(body) <= limit:
        return body.decode(errors="replace")
    after = f"… ({len(body):,} bytes in all)"
    start = body[: max(limit - len(after), 0)]
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(start, final=False) + after
