"""The dispatcher: runs the importer for stored deliveries, FIFO, `importer.concurrency` at once.

One task in the server's nursery. It never holds state the store does not also hold: a seq is
marked `importing` in a commit before its attempt starts, and the attempt's result (and, for a
success, the delivery becoming `done`) is committed in one transaction after it ends. A crash in
between leaves the record `importing`; at the next start `recover_txn` returns it to pending and
it is re-run with the same delivery id and the next attempt number (counted as a rerun).

It wakes when a delivery is accepted, when an attempt ends, when a backoff expires, and at least
once a second so that `inbox retry` and `importer pause|resume` from the CLI take effect within 2 s.
`ack: imported` requests wait here (`wait_imported`) for the outcome of the deliveries they need.

Every time it reads or stores comes from one `Clock` (clock.py), and every wait is a trio wait,
so tests drive backoff and polling with `trio.testing.MockClock` (tests/test_dispatcher.py runs
the store's worker-thread calls inline there, so virtual time moves only when all tasks wait).
What a result does to a record is decided by lifecycle.py, inside the backend's write.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .clock import Clock, TrioWallClock
from .config import ImporterConfig
from .durations import rfc3339
from .errors import StoreError
from .importer import Attempt, AttemptResult, CommandAttempt, enable_subreaper, retry_delay
from .logs import fields
from .payload import THREAD_PARSE_BYTES, importer_document
from .record import Outcome, PauseState, Record, State
from .runtime import Runtime

T = TypeVar("T")

log = logging.getLogger("ct_appliance.importer")

POLL_SECONDS = 1.0
RECLAIM_SECONDS = 5.0  # how often a shared store is asked for expired import leases
PRUNE_EVERY_SECONDS = 3600.0


class _Waiter:
    def __init__(self, seqs: set[int]) -> None:
        self.remaining = set(seqs)
        self.outcome: str | None = None
        self.event = trio.Event()

    def resolve(self, seq: int, state: State | None) -> None:
        if self.outcome is not None:
            return
        if state is State.DONE:
            self.remaining.discard(seq)
            if not self.remaining:
                self.outcome = "done"
        elif state is State.DEAD:
            self.outcome = "dead: importer rejected the delivery"
        else:
            self.outcome = "importer failed; will retry"
        if self.outcome is not None:
            self.event.set()


def make_attempt(cfg: ImporterConfig) -> Attempt:
    """The attempt kind the config names: `importer.url` or `importer.command`."""
    if cfg.url is not None:
        from .httpattempt import HttpAttempt  # httpx is imported only when it is used

        return HttpAttempt(cfg)
    return CommandAttempt(cfg)


class Dispatcher:
    def __init__(self, rt: Runtime, clock: Clock | None = None) -> None:
        self.rt = rt
        self.backend = rt.backend
        self.clock = clock or TrioWallClock()
        self.cfg: ImporterConfig = rt.live.config.importer
        self.attempt: Attempt = make_attempt(self.cfg)
        self.paused = False
        self.running: dict[int, trio.CancelScope] = {}
        self._wakeup = trio.Event()
        self._stopping = False
        self._idle = trio.Event()
        self._waiters: dict[int, list[_Waiter]] = {}
        self._last_prune = 0.0
        self._retired: list[Attempt] = []
        # Shared store (PostgreSQL): when each running attempt's lease runs out, as far as
        # this process knows (trio time), and the attempts cancelled for losing it.
        self._leased_until: dict[int, float] = {}
        self._lost: set[int] = set()
        self._importing: set[int] = set()  # attempts whose importer runs now (cancellable)
        self._last_reclaim = 0.0
        enable_subreaper()

    # -- control ----------------------------------------------------------------------------
    def notify(self) -> None:
        """A delivery was stored: look at the queue now, if a look could start it. Paused, or
        with every slot busy, it waits: a finishing attempt looks again, and the poll notices
        a resume within POLL_SECONDS. (Each look is a worker-thread hand-off and a read, which
        a paused or busy importer would otherwise pay once per group commit for nothing.)"""
        if not self.paused and len(self.running) < self.cfg.concurrency:
            self._wakeup.set()

    def _wake(self) -> None:
        self._wakeup.set()

    def reconfigure(self, cfg: ImporterConfig) -> None:
        """New attempts use the new settings; running attempts finish under the old ones."""
        self._retired.append(self.attempt)
        self.cfg = cfg
        self.attempt = make_attempt(cfg)
        self._wake()

    async def stop(self, grace: float) -> None:
        """Start nothing new; give running attempts `grace` seconds, then kill them."""
        self._stopping = True
        self._wake()
        if self.running:
            log.info("waiting for running imports", extra=fields(running=len(self.running)))
            with trio.move_on_after(grace):
                while self.running:
                    await self._idle.wait()
            for scope in self.running.values():
                scope.cancel()
            while self.running:
                await self._idle.wait()
        for attempt in [*self._retired, self.attempt]:
            await attempt.aclose()

    # -- main loop --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        rerun = await self._commit(
            lambda: self.backend.recover_imports(self.clock.now()), "recover interrupted imports"
        )
        self._rerun(rerun or [], "re-running deliveries interrupted by a stop or crash")
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.backend.lease_seconds is not None:
                nursery.start_soon(self._keep_leases, self.backend.lease_seconds)
            while not self._stopping:
                wake = await self._tick(nursery)
                poll = trio.current_time() + POLL_SECONDS
                at = poll if wake is None else min(poll, self.clock.deadline(wake))
                with trio.move_on_at(at):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()

    async def _tick(self, nursery: trio.Nursery) -> float | None:
        """One look at the store: the pause flag and what is due, then start it all in one
        commit. Returns when the next backoff expires (None: nothing waiting)."""
        free = self.cfg.concurrency - len(self.running)
        exclude = set(self.running)
        now = self.clock.now()

        def look() -> tuple[PauseState, list[int], float | None]:
            state = self.backend.paused()
            if state.paused or free <= 0 or self._stopping:
                return state, [], None
            return (state, *self.backend.due(now, free, exclude))

        try:
            state, ready, wake = await trio.to_thread.run_sync(look)
        except StoreError:
            return None  # the database is unreachable: look again at the next poll
        await self._reclaim(now)
        if state.paused != self.paused:
            self.paused = state.paused
            what = "importer paused" if self.paused else "importer resumed"
            log.warning(what, extra=fields(paused=state.paused, at=state.at, by=state.by))
        await self._maybe_prune()
        if not ready or self.paused or self._stopping:
            return wake
        # A lease runs from the start's commit: counting from before it errs on the safe side.
        leased_until = trio.current_time() + (self.backend.lease_seconds or 0.0)
        try:
            started = await self.backend.start(ready, self.clock.now())
        except StoreError:
            return None  # nothing started; the store probe brings writes back, we look again
        for seq, item in zip(ready, started, strict=True):
            if item is None:
                continue
            scope = trio.CancelScope()
            self.running[seq] = scope
            self._leased_until[seq] = leased_until
            nursery.start_soon(self._run_attempt, item.record, item.body, scope)
        return wake

    async def _run_attempt(self, rec: Record, body: bytes, scope: trio.CancelScope) -> None:
        seq, attempt_no = rec.seq, len(rec.attempts)
        cfg, attempt = self.cfg, self.attempt
        try:
            try:
                build = functools.partial(
                    importer_document,
                    body,
                    delivery_id=rec.delivery_id,
                    attempt=attempt_no,
                    received_at=rfc3339(rec.received_at),
                    new_flow_ids=list(rec.flows),
                )
                # A big body is parsed on a worker thread, as on the request path.
                big = len(body) > THREAD_PARSE_BYTES
                doc = await trio.to_thread.run_sync(build) if big else build()
            except (ValueError, KeyError) as e:
                result = AttemptResult(Outcome.DEAD, f"stored body unreadable: {e}", 0.0)
            else:
                self._importing.add(seq)
                with scope:
                    try:
                        result = await attempt(doc)
                    except Exception as e:  # a bug in an attempt kind: retried, never fatal
                        log.exception("import attempt failed unexpectedly")
                        result = AttemptResult(Outcome.RETRY, f"internal error: {e!r}"[:200], 0.0)
                self._importing.discard(seq)  # from here on only its result is written
                if scope.cancelled_caught:
                    why = "interrupted: appliance stopping"
                    if seq in self._lost:
                        why = "interrupted: its lease could not be renewed (store unreachable)"
                    requeued = await self._commit(
                        lambda: self.backend.requeue(seq, self.clock.now(), why),
                        "record an interrupted import",
                    )
                    if requeued:  # its record counts a rerun: so does import_reruns_total
                        self.rt.metrics.import_reruns.inc()
                    log.warning(
                        "import interrupted; stays pending",
                        extra=fields(delivery_id=rec.delivery_id, attempt=attempt_no, reason=why),
                    )
                    return
            delay = retry_delay(result, attempt_no, cfg)
            state = await self._commit(
                lambda: self.backend.finish(
                    seq,
                    result.outcome,
                    summary=result.summary,
                    duration=result.duration,
                    output=result.output,
                    now=self.clock.now(),
                    max_attempts=cfg.max_attempts,
                    retry_in=delay,
                ),
                "record an import attempt's result",
            )
            if state is None:
                return  # stopping with the store still refusing writes: re-run at next start
            metric = {State.DONE: "success", State.DEAD: "dead"}.get(state, "retry")
            self.rt.metrics.imported(metric, result.duration)
            level = logging.INFO if state is State.DONE else logging.WARNING
            log.log(
                level,
                "import attempt",
                extra=fields(
                    delivery_id=rec.delivery_id,
                    attempt=attempt_no,
                    result=result.summary,
                    state=state.value,
                    duration_ms=round(result.duration * 1000, 1),
                    flows=len(rec.flows),
                    retry_in_seconds=round(delay, 1) if state is State.PENDING else None,
                    stderr_tail=result.output.get("stderr", "")[-2048:] or None,
                ),
            )
            for waiter in self._waiters.get(seq, []):
                waiter.resolve(seq, state)
        finally:
            del self.running[seq]
            self._leased_until.pop(seq, None)
            self._lost.discard(seq)
            self._importing.discard(seq)
            self._idle.set()
            self._idle = trio.Event()
            self._wake()

    async def _reclaim(self, now: float) -> None:
        """Shared store: attempts another appliance stopped renewing go back to pending."""
        if self.backend.lease_seconds is None or now - self._last_reclaim < RECLAIM_SECONDS:
            return
        self._last_reclaim = now
        try:
            taken = await self.backend.reclaim(now)
        except StoreError:
            return
        if taken:
            self._rerun(taken, "re-running deliveries whose appliance stopped renewing their lease")
            self._wake()

    def _rerun(self, seqs: list[int], why: str) -> None:
        """Deliveries put back to pending after an attempt was cut short: each is a rerun."""
        self.rt.metrics.import_reruns.inc(len(seqs))
        if seqs:
            log.warning(why, extra=fields(deliveries=len(seqs)))

    async def _keep_leases(self, lease: float) -> None:
        """Renew the leases of running attempts every lease / 3. An attempt whose lease could
        not be renewed is cancelled a sixth of a lease before it runs out (it stays pending for
        whoever takes it next), so no attempt ever runs on a lease another appliance may take."""
        last_renew = trio.current_time()
        while True:
            await trio.sleep(lease / 6)
            now = trio.current_time()
            if self.running and now - last_renew >= lease / 3:
                asked, sent = trio.current_time(), list(self.running)
                try:
                    held = await self.backend.renew(sent)
                except StoreError as e:
                    log.error("cannot renew import leases", extra=fields(error=str(e)))
                else:
                    last_renew = now
                    for seq in sent:  # not those started while the renewal was on its way
                        if seq not in self._leased_until or seq not in self._importing:
                            continue  # its importer has ended: `finish` checks the lease
                        if seq in held:
                            self._leased_until[seq] = asked + lease
                        else:
                            self._lose(seq, "another appliance holds its lease")
            for seq, until in list(self._leased_until.items()):
                if trio.current_time() > until - lease / 6:
                    self._lose(seq, "its lease could not be renewed in time")

    def _lose(self, seq: int, why: str) -> None:
        """Cancel an attempt whose importer still runs on a lease that is, or soon may be,
        another appliance's. One whose importer has ended is left to `finish`, which records
        its result only if the lease is still this appliance's."""
        scope = self.running.get(seq)
        if scope is None or seq in self._lost or seq not in self._importing:
            return
        self._lost.add(seq)
        log.error("cancelling an import attempt", extra=fields(seq=seq, reason=why))
        scope.cancel()

    async def _maybe_prune(self) -> None:
        now = self.clock.now()
        if now - self._last_prune < PRUNE_EVERY_SECONDS:
            return
        self._last_prune = now
        cutoff = now - self.rt.live.config.store.retention_days * 86400
        try:
            pruned = await self.backend.prune(cutoff, now)
        except StoreError:
            self._last_prune = 0.0  # try again at the next tick
            return
        if pruned:
            log.info("retention pruned bodies of imported deliveries", extra=fields(count=pruned))

    async def _commit(self, write: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Commit bookkeeping that must not be lost (an attempt's result): while the store
        refuses writes (disk full) keep the result in memory and retry every second. Only a
        stop gives up; the record then stays `importing` and the next start re-runs it."""
        failures = 0
        while True:
            try:
                return await write()
            except StoreError as e:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.error(
                        "cannot record importer bookkeeping; retrying",
                        extra=fields(what=what, error=str(e), tries=failures),
                    )
                if self._stopping and failures >= 3:
                    return None
                await trio.sleep(1.0)

    # -- ack: imported ----------------------------------------------------------------------
    async def wait_imported(self, seqs: set[int], bound: float) -> str:
        """'done' once every seq is imported; otherwise why not, at the first failure or bound."""
        waiter = _Waiter(seqs)
        for seq in seqs:
            self._waiters.setdefault(seq, []).append(waiter)
        try:
            self._wake()
            # The import may run in another appliance sharing the store: look at the states
            # once a second as well as waiting for this dispatcher's own results.
            deadline = trio.current_time() + bound
            while waiter.outcome is None and trio.current_time() < deadline:
                try:
                    states = await trio.to_thread.run_sync(
                        self.backend.states, set(waiter.remaining)
                    )
                except StoreError:
                    states = {}
                for seq, state in states.items():
                    if state in (State.DONE, State.DEAD):
                        waiter.resolve(seq, state)
                with trio.move_on_at(min(deadline, trio.current_time() + POLL_SECONDS)):
                    await waiter.event.wait()
            return waiter.outcome or f"not imported within {bound:g} s"
        finally:
            for seq in seqs:
                lst = self._waiters.get(seq, [])
                if waiter in lst:
                    lst.remove(waiter)
                if not lst:
                    self._waiters.pop(seq, None)
