"""The server's single writer: group commit over the store (store.py).

A request appends its operation to a queue and sleeps; one writer task takes everything
queued, runs it all in ONE write transaction on a worker thread (`Store.write_batch`), commits
once, then wakes every waiter with its own result. Requests arriving during a commit form the
next batch; nobody waits on a commit it does not need beyond the one in flight.

An operation may also span several commits (`Steps`, used by intake.py for deliveries with
many flow ids): each commit runs one step of every such operation in progress beside whatever
is queued, so a long operation never holds the writer for long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import trio

from .errors import StoreError
from .store import MAX_BATCH, Store, Txn

T = TypeVar("T")


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
