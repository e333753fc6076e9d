"""The database handle: engine set-up per backend, transactions, migrations, and error wrapping.

SQLite runs in WAL mode with `synchronous=FULL`: in WAL mode NORMAL would survive a process crash but could lose the
last commits on a power cut or kernel panic, and an acknowledged voucher must survive both. Group commits (see
settlement.ingest.pipeline) make FULL affordable: one fsync covers every voucher in the group. Write transactions
start with `BEGIN IMMEDIATE`, so two writers queue on the busy timeout instead of failing with "database is locked"
when a read lock would have to be upgraded. PostgreSQL runs at READ COMMITTED with explicit row locks.

A PostgreSQL connection taken from the pool after it sat idle there for `ping_after_idle` seconds is pinged first,
and replaced (with every connection pooled before it) if the server does not answer: one restarted or dropped while
the service was quiet costs no request. SQLAlchemy's `pool_pre_ping` pings at every checkout, a round trip per
transaction (~170 µs, ~105 µs of the process's CPU and ~40 of the server's here): a third of a one-voucher group's
time. A connection in use moments ago that died since fails its transaction (503, nothing acknowledged) and SQLAlchemy
then replaces every connection pooled before it, as it does for one that dies in use.

The pool hands out the connection used last (LIFO), not the one idle longest: a server process's few busy
connections stay hot (their PostgreSQL backends' caches and prepared statements), the rest sit idle. Single vouchers
one at a time through `settlement serve` (docs/benchmarks.md): PostgreSQL's CPU a voucher ~700 -> ~550 µs.

The ingest writer, which writes all the time, keeps its connection between its transactions (`WriterConnection`)
instead of taking one from the pool for each: one-voucher groups cost its process 8-15 % less CPU.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, InvalidatePoolError, OperationalError, SQLAlchemyError

from settlement.errors import StoreError, StoreUnavailableError
from settlement.store.types import sqlite_amount_value

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
PING_AFTER_IDLE_S = 1.0  # a pooled PostgreSQL connection idle this long is pinged before use
_IDLE_SINCE = "idle_since"  # in a pooled connection's info: when it was last given back (monotonic)
_MIGRATION_LOCK = zlib.crc32(b"channelhub-settlement-migrations")


class Database:
    """One store: `write()` for serialized read-modify-write transactions, `read()` for consistent reads."""

    def __init__(self, url: str, *, pool_size: int = 8, ping_after_idle: float = PING_AFTER_IDLE_S) -> None:
        self.url = make_url(url)
        self.ping_after_idle = ping_after_idle
        if self.url.drivername in ("postgresql", "postgres"):
            self.url = self.url.set(drivername="postgresql+psycopg")  # the driver we ship (psycopg 3)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._migrated = threading.Lock()
        try:
            self.engine = self._sqlite_engine() if self.is_sqlite else self._server_engine(pool_size)
        except (SQLAlchemyError, ImportError, ValueError) as ex:
            raise StoreError(f"cannot use database {self.url.render_as_string()}: {ex}") from ex

    def _sqlite_engine(self) -> Engine:
        database = self.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}, pool_size=8
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (pysqlite's own BEGIN is deferred)
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            dbapi_connection.create_function("amount_value", 1, sqlite_amount_value, deterministic=True)

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _server_engine(self, pool_size: int) -> Engine:
        engine = create_engine(self.url, pool_size=pool_size, max_overflow=pool_size, pool_use_lifo=True)

        @event.listens_for(engine, "checkin")
        def _idle_from(_dbapi_connection: Any, record: Any) -> None:
            record.info.setdefault(_IDLE_SINCE, time.monotonic())  # or since its holder last used it (WriterConnection)

        @event.listens_for(engine, "checkout")
        def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
            idle_since = record.info.pop(_IDLE_SINCE, None)  # none: a new connection, just made
            if idle_since is None or time.monotonic() - idle_since < self.ping_after_idle:
                return
            try:
                engine.dialect.do_ping(dbapi_connection)
            except engine.dialect.loaded_dbapi.Error as ex:  # the pool replaces it and every one pooled before it
                raise InvalidatePoolError(f"a pooled connection did not answer its ping: {ex}") from ex

        return engine

    @property
    def shown_url(self) -> str:
        """The store's URL as it may be printed: its password masked (`serve` writes it where logs are kept)."""
        return self.url.render_as_string(hide_password=True)

    @property
    def backend(self) -> str:
        return "sqlite" if self.is_sqlite else self.url.get_backend_name()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write: committed on success, rolled back on any exception."""
        with self._wrap(), self._write_connection() as conn, conn.begin():
            yield conn

    def _write_connection(self) -> Connection:
        """A pooled connection whose transactions will write (on SQLite: `BEGIN IMMEDIATE`)."""
        conn = self.engine.connect()
        conn.execution_options(write=True)
        return conn

    def writer_connection(self) -> WriterConnection:
        """A connection kept between one thread's write transactions (`WriterConnection`)."""
        return WriterConnection(self)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction with one consistent view."""
        with self._wrap(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _wrap(self) -> Iterator[None]:
        """Database errors become StoreError(s) whose message says what happened, never the database's own text
        (table names, SQL, values): that goes to the log, under an id the message names."""
        try:
            yield
        except (OperationalError, InterfaceError) as ex:
            incident = _log_incident(ex)
            raise StoreUnavailableError(f"the {self.backend} store is unavailable (logged as {incident})") from ex
        except DBAPIError as ex:
            incident = _log_incident(ex)
            raise StoreError(f"the {self.backend} store refused the operation (logged as {incident})") from ex

    def ping(self) -> None:
        """Raise StoreUnavailableError unless the database answers."""
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def migrate(self) -> None:
        """Bring the schema to the newest revision; safe when several processes start at once."""
        self._alembic(lambda config: command.upgrade(config, "head"))

    def downgrade(self, revision: str) -> None:
        """Take the schema back to `revision` (every revision has its way back; rows are converted, not lost)."""
        self._alembic(lambda config: command.downgrade(config, revision))

    def _alembic(self, step: Callable[[Config], None]) -> None:
        with self._migrated, self._wrap(), self.engine.connect() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
                conn.commit()
            else:
                # SQLite rebuilds a table to change it (create, copy, drop, rename): with foreign keys enforced,
                # dropping a referenced table would fail. Its own recipe: keys off outside the transaction, checked
                # before the commit.
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            try:
                config = _alembic_config()
                config.attributes["connection"] = conn
                step(config)
                if self.is_sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise StoreError("the migration left rows whose foreign keys point nowhere; nothing was changed")
                conn.commit()
            finally:
                if self.is_sqlite:
                    conn.rollback()
                    conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
                else:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                    conn.commit()

    @classmethod
    def existing(cls, url: str) -> Database:
        """The store as it is, for read-only use: no migration, no file created, no chain needed.

        An operator reads the store most when the chain or the service is down; a command that migrated or created
        an empty database would print a healthy-looking empty answer instead of the truth.
        """
        try:
            parsed = make_url(url)
        except (SQLAlchemyError, ValueError) as ex:
            raise StoreError(f"cannot use database {url}: {ex}") from ex
        path = parsed.database
        if parsed.get_backend_name() == "sqlite" and path and path != ":memory:" and not Path(path).exists():
            raise StoreError(
                f"no database at {path}: set SETTLEMENT_DATABASE_URL to the service's store "
                "(`settlement serve` creates it)"
            )
        db = cls(url)
        try:
            at, head = db.revision(), head_revision()
        except StoreError:
            db.dispose()
            raise
        if at != head:
            db.dispose()
            raise StoreError(
                f"the store at {db.url.render_as_string()} has schema revision {at}, this version reads {head}: "
                "start `settlement serve` once to migrate it"
            )
        return db

    def revision(self) -> str | None:
        """The schema revision the database is at (None before the first migration)."""
        with self._wrap(), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def head_revision() -> str | None:
    """The newest migration shipped with this package."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("settlement.store") / "migrations"))
    return config


class WriterConnection:
    """One thread's write transactions on one connection, kept between them while they come quickly (the ingest
    writer's groups). `Database.write()` checks a connection out of the pool and back in and wraps it anew each time:
    30-130 µs of CPU, 8-15 % of a one-voucher group's writer (docs/benchmarks.md). The connection goes back to the
    pool once unused for `ping_after_idle` seconds (so the pool pings it before its next use, as any idle one) and
    after a transaction that failed; a connection that died in use fails that one transaction, as a pooled one does.
    Not thread-safe: its thread's own."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Connection | None = None
        self._used_at = 0.0

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """As `Database.write()`: committed on success, rolled back on any exception. One at a time."""
        conn = self._conn
        if conn is not None and time.monotonic() - self._used_at >= self.db.ping_after_idle:
            conn.info[_IDLE_SINCE] = self._used_at  # idle since its last use: the pool pings it on its way out again
            self.close()
            conn = None
        with self.db._wrap():
            if conn is None:
                conn = self._conn = self.db._write_connection()
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self.close()  # rolled back; a connection that died is discarded by the pool
                raise
            finally:
                self._used_at = time.monotonic()

    def close(self) -> None:
        """Give the connection back to the pool (the next write checks one out again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _log_incident(ex: Exception) -> str:
    incident = uuid.uuid4().hex[:12]
    logger.error("store incident %s: %s", incident, _short(ex))
    return incident


def _short(ex: Exception) -> str:
    return str(getattr(ex, "orig", ex)).strip().splitlines()[0]
