"""The embedded store as a `Backend`: one LMDB inbox and flow-id index under `store.path`.

    LmdbBackend
    ├── Store           the environments, durable write batches, map growth, full disk (store.py)
    ├── GroupCommitter  the server's single writer: one commit for whatever is queued
    ├── Inbox           the layout: records, bodies, queue, runs, parts (inbox.py)
    ├── Acceptance      a delivery's flow ids claimed slice by slice (intake.py)
    └── flowindex       the derived index: trusted, caught up, or rebuilt at start

Every write is a transaction function that loads records, applies lifecycle.py and stores the
result (`Inbox.update_txn`). In the server it joins the group commit; in a CLI command (no
writer task, no trio imported) it is its own durable transaction, run inline (`run_inline`). The server holds the
store's lock shared while it runs; maintenance commands (`rebuild-index`) hold it exclusively.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import flowindex, lifecycle
from .inbox import Inbox, key_seq, probe_txn, seq_key
from .intake import Acceptance, accept_txn
from .record import (
    Accepted,
    FlowOwner,
    InboxSummary,
    Incoming,
    Outcome,
    PauseState,
    Record,
    RecordDetail,
    RunStats,
    Started,
    State,
)
from .store import Store, Txn

if TYPE_CHECKING:
    import trio

    from .committer import GroupCommitter

T = TypeVar("T")


class LmdbBackend:
    """`backend.Backend` over LMDB. `serving=True` (the server) holds the store's lock shared
    and commits through a `GroupCommitter` that `run_writer` drives."""

    lease_seconds: float | None = None  # one process runs every import: nothing to lease

    def __init__(
        self, path: str | Path, *, initial_map_bytes: int = 1 << 30, serving: bool = False
    ) -> None:
        self.store = Store(path, initial_map_bytes=initial_map_bytes)
        self._lock = contextlib.ExitStack()
        try:
            if serving:
                self._lock.enter_context(self.store.locked(exclusive=False))
            self.inbox = Inbox(self.store)
        except BaseException:
            self._lock.close()
            self.store.close()
            raise
        self.instance = self.inbox.instance
        self.committer: GroupCommitter | None = None
        if serving:
            from .committer import GroupCommitter  # trio: only the server needs it

            self.committer = GroupCommitter(self.store)

    # -- life -------------------------------------------------------------------------------
    def recover(self) -> dict[str, Any]:
        """Before serving (blocking): trust, catch up or rebuild the flow index, and finish
        deliveries a crash left `receiving`. What was done, for the log."""
        return flowindex.recover(self.inbox)

    async def run_writer(self, *, task_status: trio.TaskStatus[None] | None = None) -> None:
        """The single writer, until `stop_writes` (start it with `nursery.start`)."""
        assert self.committer is not None, "open with serving=True"
        if task_status is None:
            await self.committer.run()
        else:
            await self.committer.run(task_status=task_status)

    def stop_writes(self) -> None:
        """Commit what is queued and the accepts in progress, then let `run_writer` return."""
        if self.committer is not None:
            self.committer.close()

    def close(self, *, clean: bool = False) -> None:
        """Close the store; `clean`: after the last write of a clean stop, the index may be
        trusted after a reboot."""
        try:
            if clean:
                flowindex.mark_clean(self.inbox)
        finally:
            self.store.close()
            self._lock.close()

    @contextlib.contextmanager
    def maintenance(self) -> Iterator[None]:
        """Hold the store alone (no server on it), for `rebuild-index`."""
        with self.store.locked(exclusive=True):
            yield

    def rebuild_index(self) -> int:
        """A new flow index from the inbox alone (hold `maintenance`); flow ids claimed."""
        return flowindex.rebuild(self.inbox)

    # -- health -----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.store.available

    @property
    def last_error(self) -> str | None:
        return self.store.last_error

    async def probe(self) -> None:
        await self._write(probe_txn(self.store))

    def size_bytes(self) -> int:
        return self.store.size_bytes()

    async def _write(self, fn: Callable[[Txn], T]) -> T:
        """In the server, join the group commit. Without a writer task (a CLI command, which
        has no event loop to keep responsive) the write is its own durable transaction, run
        inline: such a coroutine never suspends, and `run_inline` drives it without trio."""
        if self.committer is not None:
            return await self.committer.submit(fn)
        return self.store.write(fn)

    # -- intake -----------------------------------------------------------------------------
    async def accept(self, item: Incoming) -> Accepted:
        if self.committer is not None:
            result: Accepted = await self.committer.submit_steps(Acceptance(self.inbox, item))
            return result
        return await self._write(lambda txn: accept_txn(self.inbox, txn, item))

    # -- the dispatcher ---------------------------------------------------------------------
    async def recover_imports(self, now: float) -> list[int]:
        def recover(txn: Txn) -> list[int]:
            why = "interrupted: appliance stopped"
            stuck = self.inbox.importing_txn(txn)
            for seq in stuck:
                self.inbox.update_txn(txn, seq, lambda r: lifecycle.requeue(r, now, why))
            return stuck

        return await self._write(recover)

    def due(self, now: float, limit: int, exclude: set[int]) -> tuple[list[int], float | None]:
        return self.store.read(lambda txn: self.inbox.due_txn(txn, now, limit, exclude))

    async def start(self, seqs: Sequence[int], now: float) -> list[Started | None]:
        def start_all(txn: Txn) -> list[Started | None]:
            out: list[Started | None] = []
            for seq in seqs:
                rec = self.inbox.load_txn(txn, seq)
                if rec is None or rec.state is not State.PENDING:
                    out.append(None)
                    continue
                after = lifecycle.start(rec, now)
                self.inbox.save_txn(txn, after, rec)
                out.append(Started(after, self.inbox.body_txn(txn, seq) or b""))
            return out

        return await self._write(start_all)

    async def reclaim(self, now: float) -> list[int]:
        return []  # only this process starts attempts; `recover_imports` covers a crash

    async def renew(self, seqs: Iterable[int]) -> set[int]:
        return set(seqs)

    async def finish(
        self,
        seq: int,
        outcome: Outcome,
        *,
        summary: str,
        duration: float,
        output: Mapping[str, str],
        now: float,
        max_attempts: int,
        retry_in: float,
    ) -> State | None:
        end = functools.partial(
            lifecycle.finish,
            outcome=outcome,
            summary=summary,
            duration=duration,
            now=now,
            max_attempts=max_attempts,
            retry_in=retry_in,
        )

        def finish(txn: Txn) -> State | None:
            before, after = self.inbox.update_txn(txn, seq, end)
            if before is None or after is None:
                return None
            self.inbox.put_output_txn(txn, seq, len(before.attempts), dict(output))
            return after.state

        return await self._write(finish)

    async def requeue(self, seq: int, now: float, why: str) -> bool:
        def requeue(txn: Txn) -> bool:
            rec = self.inbox.load_txn(txn, seq)
            if rec is None or rec.state is not State.IMPORTING:
                return False
            self.inbox.save_txn(txn, lifecycle.requeue(rec, now, why), rec)
            return True

        return await self._write(requeue)

    async def prune(self, cutoff: float, now: float, limit: int = 5000) -> int:
        def prune(txn: Txn) -> int:
            dbs, pruned = self.inbox.dbs, 0
            with txn.cursor(db=dbs.done) as cur:
                keys: list[bytes] = []
                for key in cur.iternext(keys=True, values=False):
                    if key_seq(key) / 1000 >= cutoff or len(keys) >= limit:  # done time (ms)
                        break
                    keys.append(key)
            for key in keys:
                seq = key_seq(key[8:])
                txn.delete(key, db=dbs.done)
                if txn.delete(seq_key(seq), db=dbs.bodies):
                    pruned += 1
                    self.inbox.update_txn(txn, seq, lambda r: lifecycle.prune(r, now))
            return pruned

        return await self._write(prune)

    def states(self, seqs: set[int]) -> dict[int, State | None]:
        def look(txn: Txn) -> dict[int, State | None]:
            out: dict[int, State | None] = {}
            for seq in seqs:
                rec = self.inbox.load_txn(txn, seq)
                out[seq] = rec.state if rec is not None else None
            return out

        return self.store.read(look)

    def paused(self) -> PauseState:
        return self.store.read(self.inbox.paused_txn)

    # -- operators --------------------------------------------------------------------------
    async def set_paused(self, paused: bool, by: str, now: float) -> None:
        state = PauseState(paused, now, by)
        await self._write(lambda txn: self.inbox.set_paused_txn(txn, state))

    async def retry(self, seq: int, now: float) -> str:
        def retry(txn: Txn) -> str:
            rec = self.inbox.load_txn(txn, seq)
            if rec is None:
                return "not found"
            kept = self.inbox.has_body_txn(txn, seq)
            why = lifecycle.why_not_retry(rec, body_kept=kept)
            if why is not None:
                return why
            self.inbox.save_txn(txn, lifecycle.retry(rec, now, body_kept=kept), rec)
            return "queued"

        return await self._write(retry)

    async def purge(self, cutoff: float, include_dead: bool, now: float) -> int:
        states = (State.DONE, State.DEAD) if include_dead else (State.DONE,)

        def purge(txn: Txn) -> int:
            victims: list[Record] = []
            for key, raw in self.inbox.iter_records_txn(txn):
                rec = self.inbox.decode(key, raw)
                if rec.received_at >= cutoff:
                    break
                if rec.state in states and rec.purged_at is None:
                    victims.append(rec)
            for rec in victims:
                txn.delete(seq_key(rec.seq), db=self.inbox.dbs.bodies)
                for a in rec.attempts:
                    self.inbox.drop_output_txn(txn, rec.seq, a.n)
                self.inbox.save_txn(txn, lifecycle.purge(rec, now), rec)
            return len(victims)

        return await self._write(purge)

    def summary(self) -> InboxSummary:
        size = self.store.size_bytes()
        return self.store.read(lambda txn: self.inbox.summary_txn(txn, size_bytes=size))

    def records(
        self, *, state: State | None = None, limit: int = 50, newest_first: bool = True
    ) -> list[Record]:
        return self.store.read(lambda txn: self.inbox.records_txn(txn, state, limit, newest_first))

    def find(self, delivery_id: str) -> int | None:
        seq = self.inbox.seq_of(delivery_id)  # under the instance of the seq's epoch
        if seq is None:
            return None
        found = self.store.read(lambda txn: self.inbox.load_txn(txn, seq))
        return seq if found is not None else None

    def detail(self, seq: int) -> RecordDetail | None:
        def read(txn: Txn) -> RecordDetail | None:
            rec = self.inbox.load_txn(txn, seq)
            if rec is None:
                return None
            outputs = tuple(self.inbox.output_txn(txn, seq, a.n) for a in rec.attempts)
            return RecordDetail(rec, outputs, self.inbox.body_txn(txn, seq))

        return self.store.read(read)

    def dead_seqs(self) -> list[int]:
        return self.store.read(self.inbox.dead_seqs_txn)

    def flows(self, flow_ids: Sequence[str]) -> list[FlowOwner]:
        return self.store.read(lambda txn: flowindex.owners_txn(self.inbox, txn, flow_ids))

    def runs(self, limit: int = 50) -> list[RunStats]:
        return self.store.read(lambda txn: self.inbox.runs_txn(txn, limit))

    def run(self, run_id: str) -> RunStats | None:
        return self.store.read(lambda txn: self.inbox.run_txn(txn, run_id))

    def delivery_id(self, seq: int) -> str:
        return self.inbox.delivery_id_of(seq)

    def peers(self) -> list[dict[str, Any]]:
        return []


def run_inline(write: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a write of a backend opened without a writer task (the CLI): its coroutine
    never suspends, so no event loop is needed (and none is imported)."""
    coro = write()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a backend write suspended outside an event loop")
