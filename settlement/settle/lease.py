"""Leader election for the settlement engine: one engine per store, whichever process holds the lease.

PostgreSQL: a session-level advisory lock on a connection kept open for the purpose; when the holder dies its
connection closes and the lock is free at once. SQLite: an exclusive flock on a file next to the database, which the
kernel releases when the holder dies. Either way no timeout or heartbeat is needed to notice a dead leader.
"""

from __future__ import annotations

import fcntl
import logging
import os
import zlib
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from settlement.store import Database

logger = logging.getLogger(__name__)


class Lease:
    """`acquire()` until it returns True; `check()` tells whether it is still held; `release()` gives it up."""

    def __init__(self, db: Database, name: str = "settlement-engine") -> None:
        self.db = db
        self.name = name
        self._key = zlib.crc32(name.encode())
        self._conn: Connection | None = None
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None or self._file is not None

    def acquire(self) -> bool:
        if self.held:
            return self.check()
        if self.db.is_sqlite:
            return self._acquire_file()
        try:
            conn = self.db.engine.connect()
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar())
            conn.commit()
        except SQLAlchemyError as ex:
            logger.warning("lease %s: database unavailable (%s)", self.name, ex)
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        logger.warning("lease %s acquired by pid %d", self.name, os.getpid())
        return True

    def _acquire_file(self) -> bool:
        # The engine's lock keeps the file name it always had: a process of an older version holding it must still
        # exclude a new one during an upgrade.
        suffix = ".engine.lock" if self.name == "settlement-engine" else f".{self.name}.lock"
        path = Path(self.db.url.database or "settlement.db").with_suffix(suffix)
        handle = path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        logger.warning("lease %s acquired by pid %d (%s)", self.name, os.getpid(), path)
        return True

    def check(self) -> bool:
        """Still the leader? A lost database connection means the lock is gone too."""
        if self._file is not None:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return True
        except SQLAlchemyError:
            logger.error("lease %s lost with its database connection", self.name)
            self._drop()
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                self._conn.commit()
            except SQLAlchemyError:
                pass
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except SQLAlchemyError:
                pass
            self._conn = None
        if self._file is not None:
            self._file.close()
            self._file = None
