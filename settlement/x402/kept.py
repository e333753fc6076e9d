"""A payee's kept paid answers shared by its processes on one host: a SQLite file.

A payee app served by several processes (`uvicorn --workers 4`, or instances behind one balancer on one host) kept
each answer bought by a payment with an identifier in the process that served it: a retry of that payment (its
answer lost on the way) that reached another process was a replayed voucher there, a 402, and the payer had paid for
an answer it never got. Through this file every process answers such a retry with the answer bought, and a retry
that arrives while another process is still answering the payment waits for it (`claim`) instead of reaching the
facilitator. A claim lasts `claim_seconds` at most: a process that dies holding one holds that payment's retries that
long, then another process answers them (a 402 if the payment was settled: its answer died with the process).

Each call blocks on the file: reads and claims take microseconds (WAL: readers never wait, and no write is flushed
to the disk on its own), `keep` writes a body (up to a megabyte); a writer waits up to `timeout` for another's.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CLAIM_SECONDS = 60.0  # longest a process may take to answer a paid request (its handler, the settle) for others


@dataclass(frozen=True)
class KeptAnswer:
    """A paid answer as it went out: its status, its raw headers and its body; and the `PAYMENT-SIGNATURE` header of
    the payment that bought it (a copy of the payment under its identifier with another payload is judged by it)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    paid_with: str = ""


class SharedAnswers:
    """Kept answers and the claims of payments being answered, by payment key, in the SQLite file at `path`."""

    def __init__(self, path: str | Path, claim_seconds: float = CLAIM_SECONDS, timeout: float = 5.0) -> None:
        self.path, self.claim_seconds, self.timeout = str(path), claim_seconds, timeout
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._instance = uuid.uuid4().hex[:12]
        self._open()  # a file that cannot be opened (its directory missing, not writable) fails the app's start,
        self.close()  # not each paid request; kept open, it would cross a fork (gunicorn's `--preload`)

    @property
    def owner(self) -> str:
        """Who holds this object's claims: this process (a worker forked after the app was built has its own)."""
        return f"{os.getpid()}-{self._instance}"

    def _open(self) -> sqlite3.Connection:
        """The file, opened in this process at its first use here (under the lock): a connection opened before a
        fork (gunicorn's `--preload`) must not be used in the children."""
        if self._db is None or self._pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a cache of answers: a power cut may lose the last ones
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS answers (
                    key TEXT PRIMARY KEY, status INTEGER NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
                    size INTEGER NOT NULL, expires REAL NOT NULL);
                CREATE INDEX IF NOT EXISTS answers_expires ON answers (expires);
                CREATE TABLE IF NOT EXISTS kept (one INTEGER PRIMARY KEY CHECK (one = 1), bytes INTEGER NOT NULL);
                INSERT OR IGNORE INTO kept VALUES (1, 0);
                CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL);
                """
            )
            if "paid_with" not in {column for _, column, *_ in db.execute("PRAGMA table_info(answers)")}:
                # A file kept before 2026-12-08 (keyed by the header; its rows are never asked for again).
                try:
                    db.execute("ALTER TABLE answers ADD COLUMN paid_with TEXT NOT NULL DEFAULT ''")
                except sqlite3.OperationalError as ex:  # another process starting on the file added it first
                    if "duplicate column" not in str(ex):
                        raise
            self._db, self._pid = db, os.getpid()
        return self._db

    def get(self, key: str) -> KeptAnswer | None:
        with self._lock:
            row = (
                self._open()
                .execute(
                    "SELECT status, headers, body, paid_with FROM answers WHERE key = ? AND expires >= ?",
                    (key, time.time()),
                )
                .fetchone()
            )
        if row is None:
            return None
        status, headers, body, paid_with = row
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(headers)]
        return KeptAnswer(status, raw, body, paid_with)

    def claim(self, key: str) -> bool:
        """Whether this process may answer the payment now: no other process holds its claim (or the claim ran out)."""
        now = time.time()
        with self._lock:
            taken = self._open().execute(
                "INSERT INTO claims (key, owner, until) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                " SET owner = excluded.owner, until = excluded.until WHERE claims.until < ? OR claims.owner = ?",
                (key, self.owner, now + self.claim_seconds, now, self.owner),
            )
            return taken.rowcount == 1

    def release(self, key: str) -> None:
        with self._lock:
            self._open().execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))

    def keep(self, key: str, answer: KeptAnswer, ttl: float, max_bytes: int) -> None:
        """Keep `answer` for `ttl` seconds and release the payment's claim, in one transaction: a process that then
        takes the claim finds the answer. The expired go, and past `max_bytes` of bodies in all, those that expire
        first (`kept` holds the total: summed on each keep, it read every row)."""
        now = time.time()
        headers = json.dumps([(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer.headers])
        with self._lock:
            db = self._open()
            db.execute("BEGIN IMMEDIATE")
            try:
                _drop(db, "SELECT key, size FROM answers WHERE key = ? OR expires < ?", (key, now))
                db.execute("DELETE FROM claims WHERE until < ?", (now,))
                db.execute(
                    "INSERT INTO answers (key, status, headers, body, size, expires, paid_with)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, answer.status, headers, answer.body, len(answer.body), now + ttl, answer.paid_with),
                )
                db.execute("UPDATE kept SET bytes = bytes + ?", (len(answer.body),))
                while db.execute("SELECT bytes FROM kept").fetchone()[0] > max_bytes:  # the first to expire go
                    _drop(db, "SELECT key, size FROM answers ORDER BY expires LIMIT 1", ())
                db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None


def _drop(db: sqlite3.Connection, query: str, args: tuple[object, ...]) -> None:
    """Delete the answers `query` selects (key, size), and their bytes from the total."""
    gone = db.execute(query, args).fetchall()
    db.executemany("DELETE FROM answers WHERE key = ?", [(key,) for key, _ in gone])
    db.execute("UPDATE kept SET bytes = bytes - ?", (sum(size for _, size in gone),))
