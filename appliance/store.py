"""The LMDB environment under `store.path`, and the one writer that commits to it.

Theory of operation
-------------------
* Durability. The environment is opened with LMDB's defaults for sync: a write transaction's
  commit returns only after its pages and its meta page are fsync'd. A caller learns the outcome
  of its write only after that commit returned, so the HTTP layer can never answer 2xx for a
  delivery that is not on disk (spec §5.1).
* Group commit. Inside the server every write goes through `GroupCommitter` (committer.py):
  whatever is queued runs in ONE write transaction on a worker thread (`write_batch`, called
  through `trio.to_thread.run_sync`, so the transaction never crosses an `await` and stays on
  the thread that opened it) and is committed once.
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
  fsync and with `writemap` (its layout and why: flowindex.py, docs/INDEX.md). One operation sees both through one `Txn` that routes each call to the environment
  owning its database, and the writer commits the inbox FIRST (durable) and the index second.
  The index is derived state (spec §5.4): it records the last inbox seq it has applied, and
  `flowindex.recover` replays newer records after a crash between the two commits. A kill -9
  loses nothing of the index (its pages are in the page cache); a machine that rebooted while
  the index was open and not flushed cannot trust it, so it is rebuilt from the inbox. The win:
  a commit no longer waits on the random B-tree pages that new flow ids dirty (STACK.md: ~4x).
* The index map is allocated, never sparse. With `writemap` LMDB writes dirty pages straight
  into the shared map; a write into a hole of a sparse file on a full disk would be a SIGBUS,
  not an error. So the index file is `posix_fallocate`d to the whole map before the map is
  used or grown: a full disk is an ENOSPC at growth (503, probed until space returns, like
  the inbox). The map grows in steps of 1/32 (at least 8 MiB), so the blocks on disk stay
  within ~3 % of the pages in use (the index's bytes per flow id are measured in blocks).
* Several processes. The server and the CLI may open the same environments (LMDB's lock file
  serialises writers). Each process opens them once; a forked child never touches them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb
import xxhash

from .errors import StoreError, StoreFull, StoreLocked

log = logging.getLogger("ct_appliance.store")

T = TypeVar("T")

DB_NAMES = ("deliveries", "bodies", "attempts", "queue", "dead", "done", "runs", "state", "parts")
INDEX_DB_NAMES = ("flows", "flows_exact", "index_meta")
INDEX_INITIAL_MAP = 1 << 20
INDEX_GROWTH_MIN = 8 << 20
LOCK_FILE = "server.lock"
MAX_BATCH = 512
MAX_MAP_BYTES = 1 << 40
INDEX_FORMAT = b"2"  # flowindex.py; an index without it (or with another) is rebuilt


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
    flows_exact: Any
    index_meta: Any


class Txn:
    """One operation's view of both environments: inbox calls go to the inbox transaction,
    calls naming an index database go to the index transaction (begun on first use)."""

    __slots__ = ("inbox", "_index", "_index_env", "_index_dbs", "_write", "_staged", "claims")

    def __init__(self, inbox: Any, index_env: Any, index_dbs: frozenset[int], write: bool) -> None:
        self.inbox = inbox
        self._index: Any = None
        self._index_env = index_env
        self._index_dbs = index_dbs
        self._write = write
        self._staged: dict[tuple[int, bytes], tuple[Any, Any, Callable[[Any], bytes]]] = {}
        # Flow ids claimed in this transaction by deliveries still receiving (flowindex.py).
        self.claims: dict[int, set[str]] = {}

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

    def stage(self, db: Any, key: bytes, value: Any, encode: Callable[[Any], bytes]) -> None:
        """Write `encode(value)` under `key` at commit, once, whatever was staged before it:
        a value many operations of one group commit update (a run's counters) is decoded and
        encoded once per commit instead of once per operation."""
        self._staged[(id(db), key)] = (db, value, encode)

    def staged(self, db: Any, key: bytes) -> Any:
        """The value staged for `key` in this transaction, or None."""
        entry = self._staged.get((id(db), key))
        return entry[1] if entry is not None else None

    def finish(self, commit: bool) -> None:
        """Staged values, then the inbox (durable), then the index; any failure aborts what
        is left."""
        index, self._index = self._index, None
        try:
            if commit:
                for (_, key), (db, value, encode) in self._staged.items():
                    self.route(db).put(key, encode(value), db=db)
                self.inbox.commit()
            else:
                self.inbox.abort()
        except BaseException:
            self.inbox.abort()  # a no-op after a commit that failed (py-lmdb)
            if index is not None:
                index.abort()
            raise
        if index is not None:
            if commit:
                try:
                    index.commit()
                except lmdb.Error as e:  # the inbox is committed: it must not be run again
                    raise _IndexBehind(e) from e
            else:
                index.abort()


def _delete_index_files(index_path: Path) -> None:
    for name in ("data.mdb", "lock.mdb"):
        try:
            (index_path / name).unlink()
        except FileNotFoundError:
            pass


def _is_enospc(e: BaseException) -> bool:
    text = str(e)
    return (
        isinstance(e, lmdb.DiskError)
        or "No space left" in text
        or "ENOSPC" in text
        or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    )


class Store:
    dbs: DBs  # one object for the life of the Store: a reopen refreshes it in place

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        initial_map_bytes: int = 1 << 30,
        index_keyer: Callable[[str], bytes] | None = None,
    ) -> None:
        """`index_keyer`: a key function for the flow index instead of its seeded XXH3 (tests
        force hash collisions with one; flowindex.py stays exact whatever it returns)."""
        self.path = Path(path)
        self._keyer_override = index_keyer
        self._initial_map = max(initial_map_bytes, 1 << 20)
        self._gate = _Gate()
        self._closed = False
        self.index_reset: str | None = None  # why the index was made anew, if it was
        self.index_keyer: Callable[[str], bytes] = _no_keyer  # set by _open_index
        # Replays the inbox into the index past its applied seq (set by flowindex.recover).
        self.catch_up_index: Callable[[], object] | None = None
        self._catching_up = False
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
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=size,
                max_dbs=len(DB_NAMES) + 2,
                max_readers=512,
                readahead=False,
                mode=0o600,
            )
            inbox_dbs = [self.env.open_db(n.encode()) for n in DB_NAMES]
        except (lmdb.Error, OSError) as e:
            raise StoreError(f"cannot open the store at {self.path}: {e}") from None
        self._open_index()
        dbs = DBs(*inbox_dbs, *self._index_dbs)
        if hasattr(self, "dbs"):  # reopened: readers hold `store.dbs` (the Inbox does)
            self.dbs.__dict__.update(vars(dbs))
        else:
            self.dbs = dbs
        self.envs = (self.env, self.index_env)

    def _open_index(self) -> None:
        """The index environment. It is derived state: one that cannot be opened (garbage
        left by a power loss in a file written without fsync, or an index of an older layout)
        is deleted and made anew, and `index_reset` says why, so the index is rebuilt from
        the inbox."""
        index_path = self.path / "index"
        try:
            index_path.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {index_path}: {e.strerror}") from None
        for attempt in (1, 2):
            data = index_path / "data.mdb"
            size = max(INDEX_INITIAL_MAP, data.stat().st_size if data.exists() else 0)
            env = None
            try:
                # Derived state: no fsync (see "Two environments" above); writemap on an
                # allocated map (see "The index map is allocated").
                env = lmdb.open(
                    str(index_path),
                    map_size=size,
                    max_dbs=len(INDEX_DB_NAMES) + 2,
                    max_readers=512,
                    readahead=False,
                    mode=0o600,
                    sync=False,
                    metasync=False,
                    writemap=True,
                )
                _allocate(data, env.info()["map_size"])
                dbs = [
                    env.open_db(b"flows", integerkey=True),
                    env.open_db(b"flows_exact"),
                    env.open_db(b"index_meta"),
                ]
                keyer = index_keyer(env, dbs[0], dbs[2])
                self.index_env, self._index_dbs = env, dbs
                self.index_keyer = self._keyer_override or keyer
                break
            except OSError as e:
                if env is not None:
                    env.close()
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFull(f"no space left to allocate the flow index map: {e}") from None
                raise StoreError(f"cannot allocate the flow index map at {data}: {e}") from None
            except lmdb.Error as e:
                if env is not None:
                    env.close()
                if attempt == 2:
                    raise StoreError(f"cannot open the flow index at {index_path}: {e}") from None
                why = (
                    "it has the layout of an older release"
                    if isinstance(e, lmdb.IncompatibleError)
                    else f"could not be opened: {e}"
                )
                log.error(
                    "the flow index cannot be used; it is deleted and rebuilt from the inbox",
                    extra={"fields": {"path": str(index_path), "reason": why}},
                )
                self.index_reset = why
                _delete_index_files(index_path)
        self._index_ids = frozenset(id(db) for db in self._index_dbs)

    def reset_index(self, why: str) -> None:
        """Delete the index files and start an empty index: never `drop()` a tree that may be
        corrupt (dropping walks every page of it). No transaction may be open."""
        with self._gate.exclusive():
            self.index_env.close()
            _delete_index_files(self.path / "index")
            self._open_index()
            self.dbs.flows, self.dbs.flows_exact, self.dbs.index_meta = self._index_dbs
            self.envs = (self.env, self.index_env)
        self.index_reset = why

    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the store's lock file: shared while a server runs, exclusive for maintenance
        (`rebuild-index`), so neither can start while the other holds the store."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreLocked(
                    "the server is running on this store; stop it first "
                    "(systemctl stop ct-appliance)"
                    if exclusive
                    else "the store is locked by a maintenance command (rebuild-index)"
                ) from None
            yield
        finally:
            os.close(fd)

    def _txn(self, write: bool) -> Txn:
        return Txn(self.env.begin(write=write), self.index_env, self._index_ids, write)

    def close(self) -> None:
        """Sync the index and close both environments; closing again does nothing."""
        with self._gate.exclusive():
            if self._closed:
                return
            self._closed = True
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
        if self._short_of_room(self.index_env):  # fewer batches aborted by a full index map
            self._grow(only=self.index_env, ahead=True)
        for _ in range(40):
            behind: lmdb.Error | None = None
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
                    try:
                        txn.finish(commit=True)
                    except _IndexBehind as e:
                        behind = e.error
                if behind is not None:
                    if self._catching_up:  # a replay transaction: the inbox holds nothing of it
                        raise behind
                    self._catch_up_index(behind)
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

    def _catch_up_index(self, error: lmdb.Error) -> None:
        """The inbox committed and the index did not (its map filled while LMDB wrote its free
        list, say): the batch's claims are durable in the inbox's records and missing from the
        index. Running the batch again would store its deliveries twice, so it is not: the
        index is caught up from the inbox (`catch_up_index`, set by flowindex.recover) before
        this writer commits anything else, and the batch's results stand."""
        log.warning(
            "the flow index commit failed after the inbox commit; catching the index up",
            extra={"fields": {"error": str(error)}},
        )
        if isinstance(error, lmdb.MapFullError):
            self._grow(only=self.index_env)
        if self.catch_up_index is None:
            self._mark_unavailable("the flow index is behind the inbox")
            raise StoreError("the flow index is behind the inbox: restart to catch it up")
        self._catching_up = True
        try:
            self.catch_up_index()
        finally:
            self._catching_up = False

    def _grow(self, only: Any = None, ahead: bool = False) -> None:
        """After a MapFullError (LMDB does not say which environment): grow each one short of
        room, or both when neither looks short (one transaction needed more than that).
        `ahead`: growing before a batch that may still fit; no room on disk is then no error
        (the batch's own MapFullError, if it comes, says the store is full)."""
        with self._gate.exclusive():
            short = [env for env in self.envs if self._short_of_room(env)]
            for env in [only] if only is not None else short or self.envs:
                current = env.info()["map_size"]
                if current >= MAX_MAP_BYTES:
                    self._mark_unavailable("map full at its maximum size")
                    raise StoreFull("the store map is at its maximum size")
                if env is self.index_env:  # allocated on disk: small steps
                    new = min(current + max(INDEX_GROWTH_MIN, current // 32), MAX_MAP_BYTES)
                    try:
                        _allocate(self.path / "index" / "data.mdb", new)
                    except OSError as e:
                        if ahead:
                            return
                        self._mark_unavailable("disk full")
                        raise StoreFull(f"no space left to grow the flow index: {e}") from None
                else:  # sparse: doubling costs address space, not disk
                    new = min(current * 2, MAX_MAP_BYTES)
                env.set_mapsize(new)
                log.info("store map grown", extra={"fields": {"map_bytes": new}})

    def _short_of_room(self, env: Any) -> bool:
        info = env.info()
        current = info["map_size"]
        free = current - (info["last_pgno"] + 1) * env.stat()["psize"]
        if env is self.index_env:
            return bool(free < max(INDEX_GROWTH_MIN, current // 32))
        return bool(free < current // 4)

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


def _allocate(data: Path, size: int) -> None:
    """Give the index file real blocks up to `size` (see "The index map is allocated")."""
    fd = os.open(data, os.O_RDWR)
    try:
        if os.fstat(fd).st_blocks * 512 < size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def index_keyer(env: Any, flows: Any, meta: Any) -> Callable[[str], bytes]:
    """The index's key function: XXH3-64 of the flow id's UTF-8 bytes, seeded with a random
    seed drawn when the index is created (kept in `index_meta`), as 8 bytes (flowindex.py)."""
    with env.begin(write=True) as txn:
        raw = txn.get(b"hash_seed", db=meta)
        if raw is None:
            if txn.stat(flows)["entries"] or txn.get(b"applied_seq", db=meta) is not None:
                raise lmdb.IncompatibleError("an index without a hash seed")
            raw = os.urandom(8)
            txn.put(b"hash_seed", raw, db=meta)
            txn.put(b"format", INDEX_FORMAT, db=meta)
    seed = int.from_bytes(raw, "big")
    digest = xxhash.xxh3_64_digest

    def keyer(flow_id: str) -> bytes:
        return digest(flow_id.encode(), seed)

    return keyer


def _no_keyer(flow_id: str) -> bytes:
    raise AssertionError("the index is not open")


class _IndexBehind(Exception):
    """The inbox transaction committed and the index transaction did not."""

    def __init__(self, error: lmdb.Error) -> None:
        super().__init__(str(error))
        self.error = error


class _OperationFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
