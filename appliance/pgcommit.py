"""The server's group commit of accepts into the PostgreSQL store (one per appliance).

A request appends its delivery to a queue and sleeps; the writer task (`run`) takes everything
queued, runs it as ONE transaction on a worker thread (pgintake.accept_txn through pgdb.Db),
then wakes every waiter with its own answer, or with the error that failed the transaction
(StoreUnavailable: 503 for each). Requests arriving during a commit form the next batch, so
nobody waits on a commit it does not need beyond the one in flight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio

from .errors import StoreUnavailable
from .record import Accepted, Incoming

MAX_BATCH = 64  # deliveries per group commit
MAX_BATCH_FLOWS = 16384  # flow ids per group commit (a few ms of index work)
ANSWER_WITHIN_SECONDS = 15.0  # a delivery waiting longer for its commit is answered 503


class _Pending:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: Incoming) -> None:
        self.item = item
        self.done = trio.Event()
        self.result: Accepted | None = None
        self.error: BaseException | None = None


class PgCommitter:
    """The server's group commit of accepts: `run` until `close`, `submit` from requests.
    `run_batch(items)` runs one transaction (blocking: it is handed to a worker thread)."""

    def __init__(self, run_batch: Callable[[list[Incoming]], list[Accepted]]) -> None:
        self.run_batch = run_batch
        self.commits = 0
        self._queue: list[_Pending] = []
        self._wakeup = trio.Event()
        self._closing = False

    async def submit(self, item: Incoming) -> Accepted:
        pending = _Pending(item)
        self._queue.append(pending)
        self._wakeup.set()
        with trio.move_on_after(ANSWER_WITHIN_SECONDS):
            await pending.done.wait()
        if not pending.done.is_set():
            # A commit that never ends (a synchronous standby gone): the sender gets a 503 and
            # retries. If the commit lands later, the retry is answered `duplicate`.
            raise StoreUnavailable(
                f"postgresql: no commit within {ANSWER_WITHIN_SECONDS:.0f} s; retry later"
            )
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def close(self) -> None:
        """Commit what is queued, then let `run` return."""
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            await self._commit(self._take())

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        flows = 0
        while self._queue and len(batch) < MAX_BATCH:
            size = len(self._queue[0].item.delivery.flow_ids)
            if batch and flows + size > MAX_BATCH_FLOWS:
                break
            batch.append(self._queue.pop(0))
            flows += size
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        items = [p.item for p in batch]
        try:
            results = await trio.to_thread.run_sync(functools.partial(self.run_batch, items))
        except Exception as e:  # StoreError: 503 for each; anything else: 500 for each
            for p in batch:
                p.error = e
        else:
            self.commits += 1
            for p, result in zip(batch, results, strict=True):
                p.result = result
        for p in batch:
            p.done.set()
