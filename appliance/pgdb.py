"""Connections to the PostgreSQL store, and what a failure of one means.

Every unit of work is one function of a connection run inside one explicit transaction
(`Db.run`), on the calling thread (a trio worker thread in the server, the main thread in a
CLI command). Connections are opened with `autocommit=True`, so `conn.transaction()` is a real
BEGIN/COMMIT and never a SAVEPOINT inside a transaction some earlier SELECT opened (the psycopg 3
trap in STACK.md: nothing would be committed or fsync'd).

What a failure means decides the answer the sender gets:
* a deadlock or serialization failure between appliances: the work is run again, at once;
* the database unreachable, restarting, read-only (a failover in progress), out of disk, or a
  connection lost: `StoreUnavailable`, the webhook answers 503 + Retry-After, `available` is
  False until a write succeeds again (the server probes every second), and the connection is
  closed, so the next one is opened afresh through the DSN: with several hosts and
  `target_session_attrs=read-write` (the default here) that finds the new primary;
* anything else is a bug and propagates as itself.

The pool is a few lines of our own rather than psycopg_pool: its reconnect backoff doubles
without a cap in background threads (after a one-minute outage it waits another minute), where
the appliance wants every failure answered at once and the very next request to try again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import StoreError, StoreFull, StoreUnavailable

T = TypeVar("T")

RETRIES = 8  # deadlocks between appliances' group commits are rare and resolve at once
STALL_SECONDS = 10.0  # a write waiting longer makes the store unavailable (503, /readyz)

# Defaults for keys the operator's DSN leaves out: find the primary among several hosts, give
# up on an unreachable one quickly, and notice a primary that vanished without a FIN.
DSN_DEFAULTS = {
    "connect_timeout": "5",
    "target_session_attrs": "read-write",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
}
_WEAK_COMMIT = {"off", "local", "remote_write"}


def conninfo(dsn: str, application_name: str) -> str:
    """The operator's DSN (keyword or URI form) with our defaults for what it leaves out."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise StoreError("store.postgresql.dsn is not a valid libpq connection string") from None
    params: dict[str, Any] = {**DSN_DEFAULTS, "application_name": application_name}
    params.update(given)
    return make_conninfo("", **params)


def parses(dsn: str) -> bool:
    """A libpq connection string (keywords or a URI), as config validation asks."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return False
    return True


def has_password(dsn: str) -> bool:
    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except psycopg.ProgrammingError:
        return False


def _describe(e: BaseException) -> str:
    """One line for a log and /readyz: libpq's message names host and port, never a password."""
    text = str(e).strip().splitlines()
    first = text[0] if text else e.__class__.__name__
    code = getattr(e, "sqlstate", None)
    return f"postgresql: {first}" + (f" ({code})" if code else "")


def _unavailable(e: BaseException) -> bool:
    if isinstance(e, pgerrors.DiskFull | pgerrors.ReadOnlySqlTransaction):
        return True
    if isinstance(
        e,
        pgerrors.AdminShutdown | pgerrors.CannotConnectNow | pgerrors.CrashShutdown,
    ):
        return True
    return isinstance(e, psycopg.OperationalError | psycopg.InterfaceError)


class Db:
    """A bounded set of connections to one database, and whether writes work."""

    def __init__(self, dsn: str, *, size: int, application_name: str) -> None:
        self._conninfo = conninfo(dsn, application_name)
        self._idle: list[psycopg.Connection[Any]] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._closed = False
        self._available = True
        self._error: str | None = None
        self._writes: dict[int, float] = {}  # writes in flight: id -> when they began

    # -- connections --------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        level = conn.execute("SHOW synchronous_commit").fetchone()
        if level is not None and level[0] in _WEAK_COMMIT:
            # A 2xx means committed durably (and, with a synchronous standby, on it as well).
            conn.execute("SET synchronous_commit = on")
        return conn

    def _get(self) -> psycopg.Connection[Any]:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        return self._connect()

    def _put(self, conn: psycopg.Connection[Any], broken: bool) -> None:
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if broken or self._closed or conn.closed or not idle:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def _drop_idle(self) -> None:
        """After a lost connection the others to that server are as dead: open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._drop_idle()

    # -- health -------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False after a write failed (until one succeeds), and while a write has waited more
        than STALL_SECONDS: a commit held by a synchronous standby that is gone never fails,
        it waits, and a load balancer should send deliveries elsewhere meanwhile."""
        return self._available and self.stalled() is None

    @property
    def last_error(self) -> str | None:
        stalled = self.stalled()
        if stalled is not None and self._available:
            return (
                f"postgresql: a write has waited {stalled:.0f} s for its commit "
                "(is the synchronous standby down?)"
            )
        return self._error

    def stalled(self) -> float | None:
        """How long the oldest write in flight has waited, when over STALL_SECONDS."""
        oldest = min(list(self._writes.values()), default=None)
        if oldest is None:
            return None
        waited = time.monotonic() - oldest
        return waited if waited > STALL_SECONDS else None

    # -- work ---------------------------------------------------------------------------------
    def run(self, fn: Callable[[psycopg.Connection[Any]], T], *, write: bool = True) -> T:
        """`fn(conn)` inside one transaction, committed when it returns. Deadlocks and
        serialization failures run it again; an unreachable or read-only database raises
        StoreUnavailable (and, for a write, marks the store unavailable)."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        for attempt in range(RETRIES):
            try:
                with self._slots:
                    return self._once(fn, write)
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure):
                time.sleep(0.001 * (attempt + 1))
                continue
            except psycopg.Error as e:
                if not _unavailable(e):
                    raise
                why = _describe(e)
                if write:
                    self._available, self._error = False, why
                self._drop_idle()
                if isinstance(e, pgerrors.DiskFull):
                    raise StoreFull(why) from None
                raise StoreUnavailable(why) from None
        raise StoreUnavailable("postgresql: gave up after repeated deadlocks")

    def _once(self, fn: Callable[[psycopg.Connection[Any]], T], write: bool) -> T:
        token = object()
        if write:
            self._writes[id(token)] = time.monotonic()
        try:
            return self._once_on(self._get(), fn, write)
        finally:
            self._writes.pop(id(token), None)

    def _once_on(
        self, conn: psycopg.Connection[Any], fn: Callable[[psycopg.Connection[Any]], T], write: bool
    ) -> T:
        broken = True
        try:
            with conn.transaction():
                out = fn(conn)
            broken = False
            if write and not self._available:
                self._available, self._error = True, None
            return out
        except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure):
            broken = False
            raise
        finally:
            self._put(conn, broken)

    def read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """A read: the same, but a failure does not mark writes unavailable."""
        return self.run(fn, write=False)

    def connection(self) -> psycopg.Connection[Any]:
        """A connection of its own (`db migrate`, `db import-lmdb`); the caller closes it."""
        return self._connect()


def unavailable_error(e: BaseException) -> StoreError:
    """For code outside `Db.run` (a connection of its own): the same meaning."""
    if isinstance(e, psycopg.Error) and _unavailable(e):
        return StoreUnavailable(_describe(e))
    return StoreError(_describe(e))
