"""The LMDB environment under `store.path`, and the one writer that commits to it.

Theory of operation
-------------------
* Durability. The environment is opened with LMDB's defaults for sync: a write transaction's
  commit returns only after its pages and its meta page are fsync'd. A caller learns the outcome
  of its write only after that commit returned, so the HTTP layer can never answer 2xx for a
  delivery that is not on disk (spec §5.1).
* Group commit. Inside the server every write goes through `GroupCommitter`: a request appends
  its operation to a queue and sleeps; one writer task takes everything queued, runs all the
  operations in ONE write transaction on a worker thread (`trio.to_thread.run_sync`, so the
  transaction never crosses an `await` and stays on the thread that opened it), commits once,
  then wakes every waiter with its own result. Requests arriving during a commit form the next
  batch; nobody waits on a commit it does not need beyond the one in flight.
* Isolation of failures. An operation that raises (a bug, never a normal outcome) aborts the
  batch; the batch is then replayed one operation per transaction so only the faulty one fails.
* Map growth. `MapFullError` aborts the transaction, the map is doubled (in-process transactions
  are excluded by a gate while `set_mapsize` runs) and the batch is retried. A map resized by
  another process (the CLI) is adopted on `MapResizedError`.
* Full disk. An ENOSPC during commit aborts the transaction; nothing is half-written because LMDB
  never overwrites live pages. The store is marked unavailable (the webhook answers 503) and a
  probe retries a tiny write until it succeeds. A panicked environment is reopened.
* Two environments. The inbox (deliveries, bodies, queue, runs, ...) lives in the fsync'd
  environment at `store.path`; the flow-id index lives in `store.path/index`, opened without
  fsync. One operation sees both through one `Txn` that routes each call to the environment
  owning its database, and the writer commits the inbox FIRST (durable) and the index second.
  The index is derived state (spec §5.4): it records the last inbox seq it has applied, and
  `Inbox.recover_index` replays newer records after a crash between the two commits. A kill -9
  loses nothing of the index (its pages are in the page cache); a machine that rebooted while
  the index was open and not flushed cannot trust it, so it is rebuilt from the inbox. The win:
  a commit no longer waits on the random B-tree pages that new flow ids dirty (STACK.md: ~4x).
* Several processes. The server and the CLI may open the same environments (LMDB's lock file
  serialises writers). Each process opens them once; a forked child never touches them.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast

import lmdb
import trio

from .errors import StoreError, StoreFull

log = logging.getLogger("ct_appliance.store")

T = TypeVar("T")

DB_NAMES = ("deliveries", "bodies", "attempts", "queue", "dead", "done", "runs", "state", "parts")
INDEX_DB_NAMES = ("flows", "index_meta")
MAX_BATCH = 512
MAX_MAP_BYTES = 1 << 40


class _Gate:
    """Many transactions at once, or one `set_mapsize` alone (LMDB requires no live txn)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class DBs:
    deliveries: Any
    bodies: Any
    attempts: Any
    queue: Any
    dead: Any
    done: Any
    runs: Any
    state: Any
    parts: Any
    flows: Any
    index_meta: Any


class Txn2:
    """One operation's view of both environments: inbox calls go to the inbox transaction,
    calls naming an index database go to the index transaction (begun on first use)."""

    __slots__ = ("inbox", "_index", "_index_env", "_index_dbs", "_write")

    def __init__(self, inbox: Any, index_env: Any, index_dbs: frozenset[int], write: bool) -> None:
        self.inbox = inbox
        self._index: Any = None
        self._index_env = index_env
        self._index_dbs = index_dbs
        self._write = write

    @property
    def index(self) -> Any:
        if self._index is None:
            self._index = self._index_env.begin(write=self._write)
        return self._index

    def route(self, db: Any) -> Any:
        return self.index if db is not None and id(db) in self._index_dbs else self.inbox

    def get(self, key: bytes, default: Any = None, db: Any = None) -> Any:
        return self.route(db).get(key, default, db=db)

    def put(self, key: bytes, value: bytes, db: Any = None, **kw: Any) -> Any:
        return self.route(db).put(key, value, db=db, **kw)

    def delete(self, key: bytes, db: Any = None) -> Any:
        return self.route(db).delete(key, db=db)

    def cursor(self, db: Any = None) -> Any:
        return self.route(db).cursor(db=db)

    def stat(self, db: Any) -> Any:
        return self.route(db).stat(db)

    def drop(self, db: Any, delete: bool = True) -> Any:
        return self.route(db).drop(db, delete=delete)

    def finish(self, commit: bool) -> None:
        """Inbox first (durable), then the index; any failure aborts what is left."""
        index, self._index = self._index, None
        try:
            if commit:
                self.inbox.commit()
            else:
                self.inbox.abort()
        except BaseException:
            if index is not None:
                index.abort()
            raise
        if index is not None:
            if commit:
                index.commit()
            else:
                index.abort()


Txn = Txn2


def _is_enospc(e: BaseException) -> bool:
    text = str(e)
    return (
        isinstance(e, lmdb.DiskError)
        or "No space left" in text
        or "ENOSPC" in text
        or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    )


class Store:
    def __init__(self, path: str | os.PathLike[str], *, initial_map_bytes: int = 1 << 30) -> None:
        self.path = Path(path)
        self._initial_map = max(initial_map_bytes, 1 << 20)
        self._gate = _Gate()
        self.available = True
        self.last_error: str | None = None
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.path}: {e.strerror}") from None
        self._open()

    def _open(self) -> None:
        data = self.path / "data.mdb"
        size = max(self._initial_map, data.stat().st_size if data.exists() else 0)
        index_path = self.path / "index"
        index_data = index_path / "data.mdb"
        index_size = max(self._initial_map, index_data.stat().st_size if index_data.exists() else 0)
        try:
            index_path.mkdir(mode=0o700, exist_ok=True)
            self.env = lmdb.open(
                str(self.path),
                map_size=size,
                max_dbs=len(DB_NAMES) + 2,
                max_readers=512,
                readahead=False,
                mode=0o600,
            )
            # Derived state: no fsync (see "Two environments" above).
            self.index_env = lmdb.open(
                str(index_path),
                map_size=index_size,
                max_dbs=len(INDEX_DB_NAMES) + 2,
                max_readers=512,
                readahead=False,
                mode=0o600,
                sync=False,
                metasync=False,
            )
            inbox_dbs = [self.env.open_db(n.encode()) for n in DB_NAMES]
            index_dbs = [self.index_env.open_db(n.encode()) for n in INDEX_DB_NAMES]
        except (lmdb.Error, OSError) as e:
            raise StoreError(f"cannot open the store at {self.path}: {e}") from None
        self.dbs = DBs(*inbox_dbs, *index_dbs)
        self._index_ids = frozenset(id(db) for db in index_dbs)
        self.envs = (self.env, self.index_env)

    def _txn(self, write: bool) -> Txn2:
        return Txn2(self.env.begin(write=write), self.index_env, self._index_ids, write)

    def close(self) -> None:
        with self._gate.exclusive():
            self.index_env.sync(True)
            self.index_env.close()
            self.env.close()

    # -- reads ------------------------------------------------------------------------------
    def read(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in a read transaction (blocking: call from a worker thread in the server)."""
        for _ in range(3):
            try:
                with self._gate.shared():
                    txn = self._txn(write=False)
                    try:
                        result: T = fn(txn)
                    finally:
                        txn.finish(commit=False)
                    return result
            except lmdb.MapResizedError:
                self._adopt_map_size()
        raise StoreError("the store map keeps being resized by another process")

    # -- writes -----------------------------------------------------------------------------
    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in its own durable write transaction."""
        result = self.write_batch([fn])[0]
        if isinstance(result, BaseException):
            raise result
        return cast(T, result)

    def write_batch(self, fns: list[Callable[[Txn], Any]]) -> list[Any]:
        """Run every fn in one durable transaction; each slot gets its result or exception.

        StoreFull / StoreError fill every slot when the commit itself fails.
        """
        try:
            return self._commit(fns)
        except _OperationFailed:
            # Replay one by one so only the faulty operation fails.
            out: list[Any] = []
            for fn in fns:
                try:
                    out.append(self._commit([fn])[0])
                except _OperationFailed as e:
                    out.append(e.error)
                except StoreError as e:
                    out.append(e)
            return out
        except StoreError as e:
            return [e] * len(fns)

    def _commit(self, fns: list[Callable[[Txn], Any]]) -> list[Any]:
        for _ in range(40):
            try:
                with self._gate.shared():
                    txn = self._txn(write=True)
                    try:
                        results = []
                        for fn in fns:
                            try:
                                results.append(fn(txn))
                            except lmdb.Error:
                                raise
                            except Exception as e:
                                raise _OperationFailed(e) from e
                    except BaseException:
                        txn.finish(commit=False)
                        raise
                    txn.finish(commit=True)
                self._set_available()
                return results
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except lmdb.PanicError as e:
                self._mark_unavailable(f"store panicked: {e}")
                self._reopen()
                raise StoreFull(f"store failed and was reopened: {e}") from None
            except lmdb.Error as e:
                if _is_enospc(e):
                    self._mark_unavailable("disk full")
                    raise StoreFull("no space left on the store's disk") from None
                self._mark_unavailable(f"store write failed: {e}")
                raise StoreError(f"store write failed: {e}") from None
        raise StoreFull("the store map could not grow far enough")

    def _grow(self) -> None:
        with self._gate.exclusive():
            for env in self.envs:
                info, stat = env.info(), env.stat()
                current = info["map_size"]
                used = (info["last_pgno"] + 1) * stat["psize"]
                if used < current * 0.75:
                    continue  # this one still has room; the other is the full one
                if current >= MAX_MAP_BYTES:
                    self._mark_unavailable("map full at its maximum size")
                    raise StoreFull("the store map is at its maximum size")
                new = min(current * 2, MAX_MAP_BYTES)
                env.set_mapsize(new)
                log.info("store map grown", extra={"fields": {"map_bytes": new}})

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            for env in self.envs:
                env.set_mapsize(0)

    def _reopen(self) -> None:
        with self._gate.exclusive():
            try:
                for env in self.envs:
                    env.close()
            finally:
                self._open()

    def _mark_unavailable(self, why: str) -> None:
        if self.available:
            log.error("store unavailable", extra={"fields": {"reason": why}})
        self.available = False
        self.last_error = why

    def _set_available(self) -> None:
        if not self.available:
            log.warning("store available again")
        self.available = True
        self.last_error = None

    def size_bytes(self) -> int:
        total = 0
        for path in (self.path / "data.mdb", self.path / "index" / "data.mdb"):
            try:
                total += path.stat().st_blocks * 512
            except OSError:
                pass
        return total


class _OperationFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Pending(Generic[T]):
    __slots__ = ("fn", "done", "result")

    def __init__(self, fn: Callable[[Txn], T]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None


class Steps(Protocol):
    """An operation spread over several group commits, one `step` per commit (intake.py)."""

    result: Any

    def step(self, txn: Txn) -> Any:
        """Do one step in `txn`; must not change the operation (the commit may fail or be
        retried): what it did is handed to `committed` once the commit is durable."""

    def committed(self, step: Any) -> bool:
        """The step is durable; True when the operation is over (its waiter gets `result`)."""

    def failed(self, error: BaseException) -> bool:
        """The step was not committed (its waiter gets `error` now); True to keep stepping,
        to finish what earlier steps made durable."""


class _Active:
    __slots__ = ("op", "done", "error", "not_before")

    def __init__(self, op: Steps) -> None:
        self.op = op
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.not_before = 0.0


# After a failed step (disk full, say), the operation's next step waits this long.
STEP_RETRY_SECONDS = 1.0


class GroupCommitter:
    """The server's single writer: batches whatever is queued into one durable commit, plus
    one step of every multi-step operation in progress."""

    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: list[_Pending[Any]] = []
        self._active: list[_Active] = []
        self._wakeup = trio.Event()
        self._closed = False
        self.commits = 0
        self.operations = 0

    async def submit(self, fn: Callable[[Txn], T]) -> T:
        """Queue `fn`, wait for the commit that contains it, return its result or raise."""
        if self._closed:
            raise StoreError("the store is closing")
        item: _Pending[T] = _Pending(fn)
        self._queue.append(item)
        self._wakeup.set()
        await item.done.wait()
        if isinstance(item.result, BaseException):
            raise item.result
        return item.result  # type: ignore[no-any-return]

    async def submit_steps(self, op: Steps) -> Any:
        """Run `op` one step per commit until it is over; its result, or the first failure.
        The writer owns the operation: a cancelled waiter does not stop it halfway."""
        if self._closed:
            raise StoreError("the store is closing")
        active = _Active(op)
        self._active.append(active)
        self._wakeup.set()
        await active.done.wait()
        if active.error is not None:
            raise active.error
        return op.result

    def _due(self) -> tuple[list[_Active], float | None]:
        now = trio.current_time()
        due = [a for a in self._active if a.not_before <= now][: self.max_batch]
        later = [a.not_before for a in self._active if a.not_before > now]
        return due, (min(later) if later else None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            steps, wake_at = self._due()
            if not self._queue and not steps:
                if self._closed and not self._active:
                    return
                with trio.move_on_at(wake_at if wake_at is not None else float("inf")):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            batch = self._queue[: self.max_batch - len(steps)]
            del self._queue[: len(batch)]
            fns = [a.op.step for a in steps] + [p.fn for p in batch]
            # Not cancellable: a commit in flight finishes and its waiters are told.
            with trio.CancelScope(shield=True):
                results = await trio.to_thread.run_sync(self.store.write_batch, fns)
            self.commits += 1
            self.operations += len(fns)
            for active, r in zip(steps, results[: len(steps)], strict=True):
                self._stepped(active, r)
            for p, r in zip(batch, results[len(steps) :], strict=True):
                p.result = r
                p.done.set()

    def _stepped(self, active: _Active, result: Any) -> None:
        if isinstance(result, BaseException):
            if not active.done.is_set():
                active.error = result
                active.done.set()
            # A closing writer leaves what it cannot finish to the recovery at the next start.
            if active.op.failed(result) and not self._closed:
                active.not_before = trio.current_time() + STEP_RETRY_SECONDS
                return
        elif not active.op.committed(result):
            return
        self._active.remove(active)
        active.done.set()

    def close(self) -> None:
        """Finish what is queued and the operations in progress, then let `run` return."""
        self._closed = True
        self._wakeup.set()
