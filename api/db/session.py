"""Engines and sessions.

SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
`BEGIN IMMEDIATE`: SQLite has one writer at a time, and taking the write lock up front makes a
transaction wait its turn instead of failing when it upgrades from reading to writing. Reads use a
plain deferred BEGIN and run beside the writer.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from psycopg.pq import ConnStatus
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker


CONNECT_TIMEOUT_SECONDS = 10  # PostgreSQL
# PostgreSQL connections a process keeps (its request threads, anyio's 40 at most, and its
# background loops), and the most it opens past those in a burst. Each API, dispatcher and
# bridge process has its own pool: the server's max_connections (100 by default) bounds how
# many such processes a cluster runs without a connection pooler in front.
POOL_SIZE = 24
POOL_OVERFLOW = 16


def _prepare_sqlite_file(url: str) -> None:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _prepare_sqlite_file(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Let SQLAlchemy's BEGIN events, not the driver, decide when transactions start.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # connect_timeout: an unreachable server fails requests (503, see api/errors.py) in seconds
    # instead of holding them. The pool keeps as many connections as a process's request
    # threads use at once (POOL_SIZE): connections past the pool are closed when returned, and
    # a server process started and ended per request costs more than the request itself.
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})
    event.listen(engine, "checkout", _refuse_closed_connection)
    return engine


def _refuse_closed_connection(dbapi_conn, _record, _proxy) -> None:
    """A pooled PostgreSQL connection the server has closed (a restart, pg_terminate_backend,
    an idle timeout) is replaced when taken from the pool, so the API recovers by itself once
    the database is back. The server says so on the idle connection's socket (a FATAL message,
    then end of file), so a look at the socket, without waiting, finds it; SQLAlchemy's
    pool_pre_ping found it with a `SELECT 1` round trip on every checkout, a fifth of a
    check's time. An idle connection receives nothing else here (no LISTEN), and a false alarm
    only costs a new connection. Raising DisconnectionError makes the pool reconnect."""
    if dbapi_conn.closed or dbapi_conn.info.status != ConnStatus.OK:
        raise exc.DisconnectionError("the PostgreSQL connection is closed")
    # poll, not select: a Ray replica's sockets can be numbered past select's 1024.
    poller = select.poll()
    poller.register(dbapi_conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        raise exc.DisconnectionError("the PostgreSQL server closed this connection")


class Database:
    """One engine and its two session factories (read and write)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock = threading.RLock() if self.is_sqlite else None
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        # Reads on PostgreSQL run in autocommit: under READ COMMITTED each statement of a
        # transaction takes its own snapshot anyway, so a read-only BEGIN ... COMMIT adds two
        # round trips and no consistency. (SQLite reads keep their deferred BEGIN: there it
        # is the snapshot.)
        read_options = {"readonly": True}
        if url.startswith("postgresql"):
            read_options["isolation_level"] = "AUTOCOMMIT"
        self._read = sessionmaker(self.engine.execution_options(**read_options),
                                  expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any error, so nothing
        half-written stays in the database."""
        with self._sqlite_writer(), self._write() as session, session.begin():
            yield session

    @contextmanager
    def _sqlite_writer(self) -> Iterator[None]:
        """On SQLite, this process's write transactions take turns on a lock before asking
        SQLite for its write lock. SQLite's own wait is a sleep-and-retry (up to 100 ms a
        sleep) with no order, so under a burst of submits some waited seconds while others
        went by; threads queued on one lock go in turn, and only other processes (the
        dispatcher, another replica) meet SQLite's wait."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


@lru_cache(maxsize=8)
def get_database(url: str) -> Database:
    return Database(url)
