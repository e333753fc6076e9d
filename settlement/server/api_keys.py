"""API keys (`settlement keys create --role ...`): `chk_` + 32 random bytes; the store keeps their SHA-256 only (a key
is 256 bits of entropy: a slow hash would add nothing), shown once, revocable at once. The other credential, a
sign-in token, and who a request speaks for are settlement.server.access; this module needs no eth-account, so
`settlement keys` starts in about a second."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

from settlement.domain.buckets import TokenBucket
from settlement.errors import UnknownKeysBusyError
from settlement.store import Database
from settlement.store.keys import KeyRow, key_by_hash, live_hashes

KEY_PREFIX = "chk_"
_KEY = re.compile(r"\A" + KEY_PREFIX + r"[A-Za-z0-9_-]{43}\Z")


class Role(StrEnum):
    """What a credential may read. ACCOUNT is an account signed in with its own key: its channels as payer and as
    payee. An API key is made for the OPERATOR, or for one PAYEE or PAYER account."""

    OPERATOR = "operator"
    PAYEE = "payee"
    PAYER = "payer"
    ACCOUNT = "account"


class NewKey(NamedTuple):
    secret: str  # the key itself, shown once and never stored
    row: KeyRow

    @property
    def digest(self) -> str:
        """What the store keeps of it: its SHA-256."""
        return hash_key(self.secret)


def make_key(role: Role, account: str | None, name: str, now_us: int) -> NewKey:
    if role is Role.ACCOUNT:
        raise ValueError("an API key is for the operator, a payee or a payer; an account signs in with its own key")
    if (account is None) != (role is Role.OPERATOR):
        raise ValueError("a payee or payer key names its account; an operator key names none")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    while secret[len(KEY_PREFIX)] == "-":  # an id "-Qb..." would read as an option: `settlement keys revoke -Qb...`
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = KeyRow(secret[len(KEY_PREFIX) : len(KEY_PREFIX) + 8], role.value, account, name, now_us, None)
    return NewKey(secret, row)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_key(credential: str) -> bool:
    return bool(_KEY.match(credential))


class KeyDirectory:
    """The hashes of the store's live API keys, held by this process so that a made-up key costs no store read.

    A key whose hash is held is read from the store each time (a revoked key stops at once, and its hash is let go).
    Any other key makes the process read the live hashes again (a key just made by `settlement keys create`, in
    another process) at most `reads_per_second` a second, bursts of twice that: beyond, 503 `unknown_keys_busy`.
    The set is replaced whole, never changed in place: threads that race on it can at worst cost one more read.
    """

    def __init__(self, db: Database, reads_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.clock = clock
        self._live: frozenset[str] = frozenset()
        self._reloads = TokenBucket(reads_per_second, 2 * reads_per_second)

    def find(self, credential: str) -> KeyRow | None:
        """The key's row if it is live, else None (blocking: store reads)."""
        secret_hash = hash_key(credential)
        if secret_hash not in self._live:
            if not self._reloads.take(self.clock()):
                raise UnknownKeysBusyError(
                    "too many API keys this service does not hold are being presented right now; retry in a second",
                    retryAfter=1,
                )
            with self.db.read() as conn:
                live = live_hashes(conn)
            self._live = live
            if secret_hash not in live:
                return None
        with self.db.read() as conn:
            row = key_by_hash(conn, secret_hash)
        if row is None or row.revoked_at_us is not None:
            self._live = self._live - {secret_hash}
            return None
        return row
