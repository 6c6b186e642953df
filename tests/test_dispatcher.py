"""dispatcher.py over a real LMDB store, in virtual time.

The importer is the one seam: a scripted in-process `Attempt` answers each call with the next
queued result, after "running" for a scripted number of seconds, and records the virtual time
(`trio.current_time()`) of each call and the document it got. Real subprocess and HTTP attempts
are covered end to end in tests/e2e.

Every test runs under `MockClock(autojump_threshold=0)` (pytest-trio's `autojump_clock`): the
dispatcher's backoff, polling and grace waits cost no real time. Worker threads run inline here
(`inline_threads`): an autojump clock also jumps while a task waits for a thread, so a store
commit on a thread could let virtual time leap past a deadline that the dispatcher had not yet
armed. Inline, virtual time moves only when every task waits for time, and the times below are
exact. The store is the real LMDB one. A real-time watchdog fails a test that hangs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml

from appliance import config
from appliance.clock import TrioWallClock
from appliance.dispatcher import Dispatcher
from appliance.durations import rfc3339
from appliance.importer import AttemptResult
from appliance.lmdbbackend import LmdbBackend
from appliance.metrics import Metrics
from appliance.payload import parse
from appliance.record import Incoming, Outcome, Record, State
from appliance.runtime import Live, Runtime
from appliance.server import make_verifier

SECRET = "dispatcher-test-secret-" + "cd" * 16  # >= 32 bytes
REAL_SECONDS_LIMIT = 20.0
EPS = 1e-6  # float rounding of virtual times
_thread_run_sync = trio.to_thread.run_sync  # the watchdog's real thread


async def _inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
    """`trio.to_thread.run_sync` without the thread: same checkpoints, same result."""
    await trio.lowlevel.checkpoint_if_cancelled()
    result = fn(*args)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return result


@pytest.fixture(autouse=True)
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)


# -- the scripted importer ------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    outcome: Outcome
    seconds: float = 1.0
    summary: str = ""
    retry_after: float | None = None
    raises: bool = False  # a bug in the attempt kind: the call raises instead of answering


def ok(seconds: float = 1.0) -> Step:
    return Step(Outcome.SUCCESS, seconds, "exit 0")


def fail(seconds: float = 1.0, retry_after: float | None = None) -> Step:
    return Step(Outcome.RETRY, seconds, "exit 1", retry_after)


def broken(seconds: float = 1.0) -> Step:
    return Step(Outcome.RETRY, seconds, "", raises=True)


def reject(seconds: float = 1.0) -> Step:
    return Step(Outcome.DEAD, seconds, "exit 65 (EX_DATAERR: permanent)")


@dataclass
class Call:
    doc: dict[str, Any]
    started: float
    ended: float | None = None
    cancelled: bool = False


class ScriptedAttempt:
    """An `Attempt`: each call takes the next step (then `default`) and records itself."""

    def __init__(self, steps: list[Step], default: Step | None = None) -> None:
        self.steps = list(steps)
        self.default = default or ok()
        self.calls: list[Call] = []
        self.running = 0
        self.max_running = 0
        self.closed = False
        self._changed = trio.Event()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def __call__(self, doc: dict[str, Any]) -> AttemptResult:
        call = Call(doc, trio.current_time())
        self.calls.append(call)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self._signal()
        step = self.steps.pop(0) if self.steps else self.default
        try:
            await trio.sleep(step.seconds)
            call.ended = trio.current_time()
            if step.raises:
                raise RuntimeError("bug in the attempt kind")
            output = {"stdout": "", "stderr": f"scripted {step.summary}"}
            return AttemptResult(step.outcome, step.summary, step.seconds, output, step.retry_after)
        except trio.Cancelled:
            call.cancelled = True
            raise
        finally:
            self.running -= 1
            self._signal()

    async def aclose(self) -> None:
        self.closed = True

    async def wait_calls(self, n: int) -> Call:
        """Until the n-th call has started (no deadline: the watchdog bounds it)."""
        while len(self.calls) < n:
            await self._changed.wait()
        return self.calls[n - 1]


# -- the harness ----------------------------------------------------------------------------------
def write_config(tmp_path: Path, importer: dict[str, Any]) -> Path:
    doc = {
        "auth": {"hmac": {"secrets": [{"value": SECRET}]}},
        "store": {"path": str(tmp_path / "store")},
        "importer": {
            "command": ["/bin/true"],
            "backoff_initial_seconds": 30,
            "backoff_max_seconds": 600,
            "shutdown_grace_seconds": 5,
            **importer,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


@dataclass
class Harness:
    rt: Runtime
    backend: LmdbBackend
    clock: TrioWallClock
    dispatcher: Dispatcher
    attempt: ScriptedAttempt
    nursery: trio.Nursery
    extra: list[Dispatcher] = field(default_factory=list)

    async def deliver(self, flow_ids: list[str], notify: bool = True, **extra: Any) -> int:
        """Accept a delivery as the webhook would; its seq."""
        doc = {
            "flow_ids": flow_ids,
            "cost_basis_run_id": "run-1",
            "ghost_user_id": "ghost-1",
            "user_config": {"currency": "USD"},
            **extra,
        }
        body = json.dumps(doc).encode()
        result = await self.backend.accept(Incoming(parse(body), body, self.clock.now()))
        assert result.status == "accepted" and result.seq is not None, result
        if notify:
            self.dispatcher.notify()
        return result.seq

    def record(self, seq: int) -> Record:
        detail = self.backend.detail(seq)
        assert detail is not None
        return detail.record

    async def until_state(self, seq: int, state: State, within: float = 1000.0) -> Record:
        """Look at the store every virtual 0.1 s until the delivery is in `state`."""
        for _ in range(int(within * 10)):
            if (rec := self.record(seq)).state is state:
                return rec
            await trio.sleep(0.1)
        raise AssertionError(f"not {state} within {within:g} virtual s: {self.record(seq)}")


async def _watchdog(done: threading.Event) -> None:
    ended = await _thread_run_sync(done.wait, REAL_SECONDS_LIMIT, abandon_on_cancel=True)
    if not ended:
        raise AssertionError(f"test still running after {REAL_SECONDS_LIMIT:g} s of real time")


@asynccontextmanager
async def dispatching(
    tmp_path: Path,
    steps: list[Step] | None = None,
    *,
    default: Step | None = None,
    before_run: Callable[[Harness], Awaitable[None]] | None = None,
    **importer: Any,
) -> AsyncIterator[Harness]:
    """A store, its writer and a dispatcher with a scripted importer, in one nursery."""
    path = write_config(tmp_path, importer)
    cfg = config.load(path).config
    backend = LmdbBackend(cfg.store.path, serving=True)
    done = threading.Event()
    try:
        rt = Runtime(Live(cfg, make_verifier(cfg)), backend, Metrics(), str(path))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watchdog, done)
            await nursery.start(backend.run_writer)
            clock = TrioWallClock()
            dispatcher = Dispatcher(rt, clock=clock)
            attempt = ScriptedAttempt(steps or [], default)
            dispatcher.attempt = attempt
            rt.dispatcher = dispatcher
            h = Harness(rt, backend, clock, dispatcher, attempt, nursery)
            if before_run is not None:
                await before_run(h)
            await nursery.start(dispatcher.run)
            yield h
            for d in [h.dispatcher, *h.extra]:
                await d.stop(0)
            backend.stop_writes()
            nursery.cancel_scope.cancel()
    finally:
        done.set()
        backend.close()


# -- backoff and attempts -------------------------------------------------------------------------
async def test_a_failed_attempt_waits_its_backoff_and_retry_after_can_only_raise_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    steps = [
        fail(2, retry_after=1),  # below the backoff: the backoff wins
        fail(2),
        fail(2, retry_after=400),  # above the backoff: the importer's wish wins
        fail(2, retry_after=10_000),  # past backoff_max_seconds: capped at 600
        ok(2),
    ]
    async with dispatching(tmp_path, steps) as h:
        seq = await h.deliver(["f1", "f2"])
        await h.attempt.wait_calls(5)
        rec = await h.until_state(seq, State.DONE)
    calls = h.attempt.calls
    assert [c.doc["attempt"] for c in calls] == [1, 2, 3, 4, 5]
    assert {c.doc["delivery_id"] for c in calls} == {rec.delivery_id}
    gaps = []
    for before, after in zip(calls, calls[1:], strict=False):
        assert before.ended is not None
        gaps.append(after.started - before.ended)
    # attempt 1: 0.75..1.0 x 30 s; attempt 2: 0.75..1.0 x 60 s; then retry_after 400; then 600.
    for gap, (low, high) in zip(gaps, [(22.5, 30), (45, 60), (400, 400), (600, 600)], strict=True):
        assert low - EPS <= gap <= high + EPS, gaps
    assert [a.outcome for a in rec.attempts] == [Outcome.RETRY] * 4 + [Outcome.SUCCESS]
    assert [a.n for a in rec.attempts] == [1, 2, 3, 4, 5]
    assert rec.reruns == 0


async def test_max_attempts_makes_it_dead_and_nothing_runs_it_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, default=fail(1), max_attempts=3) as h:
        seq = await h.deliver(["f1"])
        rec = await h.until_state(seq, State.DEAD)
        await trio.sleep(3 * 600 + 100)  # past any backoff the config allows
        assert len(h.attempt.calls) == 3
        assert h.backend.dead_seqs() == [seq]
        listed = h.backend.records(state=State.DEAD)
    assert [r.seq for r in listed] == [seq]
    assert rec.state is State.DEAD and rec.dead_at is not None
    assert [a.outcome for a in rec.attempts] == [Outcome.RETRY, Outcome.RETRY, Outcome.DEAD]
    last = rec.attempts[-1].summary
    assert last is not None and last.startswith("exit 1")
    assert last.endswith("max_attempts (3) reached")


async def test_an_attempt_that_raises_is_a_retry_and_the_dispatcher_keeps_running(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, [broken(), ok()]) as h:
        seq = await h.deliver(["f1"])
        rec = await h.until_state(seq, State.DONE)
    first, second = rec.attempts
    assert first.outcome is Outcome.RETRY and first.summary is not None
    assert first.summary.startswith("internal error: RuntimeError('bug in the attempt kind')")
    assert second.outcome is Outcome.SUCCESS and len(h.attempt.calls) == 2


async def test_a_rejected_delivery_is_dead_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, [reject()]) as h:
        seq = await h.deliver(["f1"])
        rec = await h.until_state(seq, State.DEAD)
        await trio.sleep(1000)
        assert len(h.attempt.calls) == 1
        detail = h.backend.detail(seq)
    assert rec.attempts[-1].summary == "exit 65 (EX_DATAERR: permanent)"
    assert detail is not None  # what `inbox show` prints: the attempt's captured output
    assert detail.outputs == ({"stdout": "", "stderr": "scripted exit 65 (EX_DATAERR: permanent)"},)


async def test_success_is_done_and_the_importer_gets_only_the_new_flow_ids(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path) as h:
        first = await h.deliver(["a", "b"], note="kept")
        second = await h.deliver(["b", "c", "c"])  # "b" is claimed by the first delivery
        done = [await h.until_state(s, State.DONE) for s in (first, second)]
    docs = [c.doc for c in h.attempt.calls]
    assert [d["delivery_id"] for d in docs] == [r.delivery_id for r in done]
    assert all(d["delivery_id"] for d in docs)
    assert [d["attempt"] for d in docs] == [1, 1]
    assert [d["flow_ids"] for d in docs] == [["a", "b"], ["c"]]
    assert docs[0]["received_at"] == rfc3339(done[0].received_at)
    assert docs[0]["cost_basis_run_id"] == "run-1" and docs[0]["ghost_user_id"] == "ghost-1"
    assert docs[0]["user_config"] == {"currency": "USD"} and docs[0]["partner_config"] == {}
    assert docs[0]["extra"] == {"note": "kept"} and docs[1]["extra"] == {}
    for rec in done:
        assert rec.done_at is not None
        assert [(a.outcome, a.summary) for a in rec.attempts] == [(Outcome.SUCCESS, "exit 0")]
    assert h.attempt.closed  # stop closes the attempt


# -- pause, concurrency ---------------------------------------------------------------------------
async def test_pause_holds_new_attempts_and_resume_restarts_them_within_2_s(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, [fail(1)]) as h:
        first = await h.deliver(["f1"])
        await h.attempt.wait_calls(1)
        # Backing off for >= 22.5 s; pause well before it is due. Nothing tells the dispatcher:
        # it must see the flag itself, as when `ct-appliance importer pause` sets it.
        await h.until_state(first, State.PENDING)
        await h.backend.set_paused(True, "operator", h.clock.now())
        await trio.sleep(2)
        assert h.dispatcher.paused  # seen by polling within 2 s
        second = await h.deliver(["f2"])  # accepted and notified while paused
        await trio.sleep(700)  # past the first one's backoff
        assert len(h.attempt.calls) == 1
        assert h.backend.summary().paused
        assert [h.record(s).state for s in (first, second)] == [State.PENDING, State.PENDING]

        resumed = trio.current_time()
        await h.backend.set_paused(False, "operator", h.clock.now())  # again without notify
        call = await h.attempt.wait_calls(2)
        assert call.started - resumed <= 2.0
        assert call.doc["delivery_id"] == h.record(first).delivery_id  # FIFO: oldest first
        for s in (first, second):
            await h.until_state(s, State.DONE)
        assert not h.dispatcher.paused
    assert len(h.attempt.calls) == 3


async def test_concurrency_2_runs_two_at_once_and_never_more(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, default=ok(10), concurrency=2) as h:
        seqs = [await h.deliver([f"f{i}"]) for i in range(5)]
        for s in seqs:
            await h.until_state(s, State.DONE)
    assert h.attempt.max_running == 2
    # Each once, oldest first: two at 0 s, the next two when those end at 10 s, then the last.
    # (Attempts started in one tick run in whatever order trio schedules them.)
    waves: dict[float, set[str]] = {}
    for c in h.attempt.calls:
        waves.setdefault(round(c.started - h.attempt.calls[0].started, 3), set()).add(
            c.doc["delivery_id"]
        )
    ids = [h.backend.delivery_id(s) for s in seqs]
    assert waves == {0.0: set(ids[:2]), 10.0: set(ids[2:4]), 20.0: {ids[4]}}


# -- ack: imported ----------------------------------------------------------------------------------
async def test_wait_imported_answers_done_or_why_not(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    steps = [ok(5), fail(1), reject(1), ok(1), ok(100)]
    async with dispatching(tmp_path, steps) as h:
        seq = await h.deliver(["a"])
        t0 = trio.current_time()
        assert await h.dispatcher.wait_imported({seq}, 60) == "done"
        assert 5 <= trio.current_time() - t0 < 60
        assert h.record(seq).state is State.DONE

        t0 = trio.current_time()
        assert await h.dispatcher.wait_imported({seq}, 60) == "done"  # already imported
        assert trio.current_time() - t0 < 1

        retried = await h.deliver(["b"])
        outcome = await h.dispatcher.wait_imported({retried}, 60)
        assert outcome == "importer failed; will retry"

        dead = await h.deliver(["c"])  # due at once, while "b" backs off
        outcome = await h.dispatcher.wait_imported({dead}, 600)
        assert outcome == "dead: importer rejected the delivery"
        assert h.record(dead).state is State.DEAD
        assert await h.dispatcher.wait_imported({retried}, 600) == "done"  # after its backoff

        slow = await h.deliver(["d"])  # the importer takes 100 s
        t0 = trio.current_time()
        outcome = await h.dispatcher.wait_imported({slow}, 10)
        assert outcome == "not imported within 10 s"
        assert trio.current_time() - t0 == pytest.approx(10)
        assert h.record(slow).state is State.IMPORTING
        assert await h.dispatcher.wait_imported({slow}, 200) == "done"


async def test_wait_imported_of_several_deliveries_waits_for_all(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, [ok(5), ok(50)]) as h:
        seqs = {await h.deliver(["a"]), await h.deliver(["b"])}
        t0 = trio.current_time()
        assert await h.dispatcher.wait_imported(seqs, 30) == "not imported within 30 s"
        assert await h.dispatcher.wait_imported(seqs, 100) == "done"
        assert trio.current_time() - t0 >= 55
        assert h.dispatcher._waiters == {}  # nothing left behind


# -- stop, restart ----------------------------------------------------------------------------------
async def test_stop_requeues_an_attempt_cut_short_and_the_next_start_reruns_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, [ok(1000)]) as h:
        seq = await h.deliver(["a"])
        await h.attempt.wait_calls(1)
        t0 = trio.current_time()
        await h.dispatcher.stop(5)
        assert trio.current_time() - t0 == pytest.approx(5)
        first = h.attempt
        assert first.calls[0].cancelled and first.closed
        rec = h.record(seq)
        assert rec.state is State.PENDING and rec.reruns == 1
        (entry,) = rec.attempts
        assert entry.outcome is Outcome.INTERRUPTED
        assert entry.summary == "interrupted: appliance stopping"
        await trio.sleep(100)
        assert len(first.calls) == 1  # a stopped dispatcher starts nothing

        # The next start runs the same delivery again, as attempt 2.
        again = Dispatcher(h.rt, clock=h.clock)
        again.attempt = second = ScriptedAttempt([ok(1)])
        h.extra.append(again)
        await h.nursery.start(again.run)
        rec = await h.until_state(seq, State.DONE)
    assert [c.doc["attempt"] for c in second.calls] == [2]
    assert second.calls[0].doc["delivery_id"] == rec.delivery_id
    assert [a.outcome for a in rec.attempts] == [Outcome.INTERRUPTED, Outcome.SUCCESS]


async def test_stop_lets_an_attempt_that_ends_within_the_grace_finish(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with dispatching(tmp_path, [ok(3)]) as h:
        seq = await h.deliver(["a"])
        await h.attempt.wait_calls(1)
        t0 = trio.current_time()
        await h.dispatcher.stop(10)
        assert trio.current_time() - t0 < 3 + EPS  # it ended within 3 s, not at the grace
        rec = h.record(seq)
    assert not h.attempt.calls[0].cancelled
    assert rec.state is State.DONE and rec.reruns == 0


async def test_an_attempt_a_crash_left_running_is_rerun_at_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    seqs: list[int] = []

    async def crashed_mid_attempt(h: Harness) -> None:
        seq = await h.deliver(["a"], notify=False)
        started = await h.backend.start([seq], h.clock.now())  # importing, never finished
        assert started[0] is not None
        seqs.append(seq)

    async with dispatching(tmp_path, before_run=crashed_mid_attempt) as h:
        (seq,) = seqs
        rec = await h.until_state(seq, State.DONE)
        reruns = h.rt.metrics.registry.get_sample_value("ct_appliance_import_reruns_total")
    assert reruns == 1
    assert rec.reruns == 1
    assert [(a.outcome, a.summary) for a in rec.attempts] == [
        (Outcome.INTERRUPTED, "interrupted: appliance stopped"),
        (Outcome.SUCCESS, "exit 0"),
    ]
    assert [c.doc["attempt"] for c in h.attempt.calls] == [2]
