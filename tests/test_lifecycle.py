"""lifecycle.py: how a stored delivery moves, told as the operator sees it.

Read top to bottom, these tests are the lifecycle: the table and the diagram generated from it,
then one test per rule of spec §5 as `inbox show` / `inbox retry` would show it, then the
record's on-disk JSON, which must stay the one the first release wrote.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import lifecycle
from appliance.errors import IllegalTransition
from appliance.lifecycle import TRANSITIONS, Event
from appliance.record import AttemptEntry, Outcome, Record, State, decode_record, encode_record

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0

# The lifecycle as a reader should learn it, written out by hand: the code's table must say
# exactly this (adding or dropping a transition is a spec change, so it changes this test too).
EXPECTED_TABLE = {
    (State.RECEIVING, Event.COMPLETE): State.PENDING,
    (State.PENDING, Event.START): State.IMPORTING,
    (State.PENDING, Event.RETRY): State.PENDING,
    (State.IMPORTING, Event.SUCCEED): State.DONE,
    (State.IMPORTING, Event.FAIL): State.PENDING,
    (State.IMPORTING, Event.KILL): State.DEAD,
    (State.IMPORTING, Event.REQUEUE): State.PENDING,
    (State.DEAD, Event.RETRY): State.PENDING,
}


def fresh(flows: tuple[str, ...] = ("a", "b"), at: float = T0) -> Record:
    return lifecycle.accept(
        1, received_at=at, run_id="r1", ghost_user_id="g1", flows=flows, body_bytes=64
    )


def attempt(
    rec: Record,
    outcome: Outcome,
    *,
    now: float,
    summary: str = "",
    max_attempts: int = 5,
    retry_in: float = 30.0,
) -> Record:
    """Start an attempt at `now` and end it one second later with `outcome`."""
    running = lifecycle.start(rec, now)
    return lifecycle.finish(
        running,
        outcome,
        summary=summary or {"success": "exit 0", "retry": "exit 1", "dead": "exit 65"}[outcome],
        duration=1.0,
        now=now + 1,
        max_attempts=max_attempts,
        retry_in=retry_in,
    )


def interrupted(rec: Record, *, now: float) -> Record:
    """Start an attempt at `now`; the appliance crashes; recovery requeues it a second later."""
    return lifecycle.requeue(lifecycle.start(rec, now), now + 1, "interrupted: appliance stopped")


def dead_after_retries(max_attempts: int = 2) -> Record:
    rec = fresh()
    for i in range(max_attempts):
        rec = attempt(rec, Outcome.RETRY, now=T0 + 100 * i, max_attempts=max_attempts)
    assert rec.state is State.DEAD
    return rec


# -- the table and its diagram ---------------------------------------------------------------
def test_docs_lifecycle_md_is_the_generated_diagram() -> None:
    on_disk = (ROOT / "docs" / "LIFECYCLE.md").read_text()
    assert on_disk == lifecycle.diagram(), (
        "docs/LIFECYCLE.md is stale: run `python -m appliance.lifecycle > docs/LIFECYCLE.md`"
    )


def test_the_table_is_the_documented_lifecycle() -> None:
    assert TRANSITIONS == EXPECTED_TABLE
    doc = lifecycle.diagram()
    for (src, event), dst in EXPECTED_TABLE.items():
        assert f"| {src.value} | {event.value} | {dst.value} |" in doc
        assert f"    {src.value} --> {dst.value}: {event.value}" in doc
    assert "    [*] --> pending" in doc and "    [*] --> receiving" in doc
    assert "    done --> [*]" in doc and "dead --> [*]" not in doc  # dead waits for an operator


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_next_state_follows_the_table_and_refuses_everything_else(
    state: State, event: Event
) -> None:
    if (state, event) in EXPECTED_TABLE:
        assert lifecycle.next_state(state, event) is EXPECTED_TABLE[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as err:
            lifecycle.next_state(state, event)
        assert (err.value.state, err.value.event) == (state.value, event.value)
        assert str(err.value) == f"{event.value} is not allowed in state {state.value}"


# -- birth -----------------------------------------------------------------------------------
def test_accept_is_pending_due_at_once_and_never_attempted() -> None:
    rec = lifecycle.accept(
        9,
        received_at=T0,
        run_id="r",
        ghost_user_id="g",
        flows=("x", "y"),
        duplicate_flows=3,
        in_body_duplicates=1,
        body_bytes=200,
    )
    assert (rec.state, rec.next_at, rec.attempts, rec.reruns) == (State.PENDING, T0, (), 0)
    assert (rec.flows, rec.duplicate_flows, rec.in_body_duplicates) == (("x", "y"), 3, 1)


def test_receive_then_complete_is_pending_with_the_claimed_flows() -> None:
    rec = lifecycle.receive(
        4, received_at=T0, run_id="r", ghost_user_id="g", flow_count=5, body_bytes=900
    )
    assert (rec.state, rec.flows, rec.flow_count) == (State.RECEIVING, (), 5)
    # while it is being received it cannot run, be retried or be purged
    with pytest.raises(IllegalTransition):
        lifecycle.start(rec, T0 + 1)
    assert lifecycle.why_not_retry(rec, body_kept=True) == "still being received"
    with pytest.raises(IllegalTransition):
        lifecycle.purge(rec, T0 + 1)

    done = lifecycle.complete(rec, ("a", "c", "e"), examined=5)
    assert done.state is State.PENDING
    assert done.flows == ("a", "c", "e")
    assert done.duplicate_flows == 5 - 3
    assert done.flow_count is None and done.next_at == T0  # due at once, FIFO by arrival
    with pytest.raises(IllegalTransition):
        lifecycle.complete(done, ("a",), examined=1)  # only a receiving record completes


# -- attempts --------------------------------------------------------------------------------
def test_start_numbers_attempts_one_two_three() -> None:
    rec = fresh()
    first = lifecycle.start(rec, T0 + 5)
    assert first.state is State.IMPORTING
    assert first.attempts == (AttemptEntry(n=1, started_at=T0 + 5),)  # running: no outcome yet
    rec = lifecycle.finish(
        first,
        Outcome.RETRY,
        summary="exit 1",
        duration=1.0,
        now=T0 + 6,
        max_attempts=5,
        retry_in=1.0,
    )
    rec = interrupted(rec, now=T0 + 10)
    rec = attempt(rec, Outcome.SUCCESS, now=T0 + 20)
    assert [a.n for a in rec.attempts] == [1, 2, 3]
    assert [a.outcome for a in rec.attempts] == [
        Outcome.RETRY,
        Outcome.INTERRUPTED,
        Outcome.SUCCESS,
    ]
    assert [a.started_at for a in rec.attempts] == [T0 + 5, T0 + 10, T0 + 20]


def test_success_is_done_with_done_at() -> None:
    running = lifecycle.start(fresh(), T0 + 1)
    rec = lifecycle.finish(
        running,
        Outcome.SUCCESS,
        summary="exit 0",
        duration=2.34567,
        now=T0 + 3.5,
        max_attempts=5,
        retry_in=30,
    )
    assert rec.state is State.DONE and rec.done_at == T0 + 3.5 and rec.dead_at is None
    assert rec.last_attempt == AttemptEntry(
        n=1,
        started_at=T0 + 1,
        ended_at=T0 + 3.5,
        outcome=Outcome.SUCCESS,
        summary="exit 0",
        duration=2.346,  # `inbox show` prints milliseconds
    )
    assert rec.flows == ("a", "b")  # the flow ids stay claimed


def test_retryable_failure_backs_off_to_pending() -> None:
    rec = attempt(fresh(), Outcome.RETRY, now=T0 + 10, retry_in=45.0, summary="exit 75")
    assert rec.state is State.PENDING
    assert rec.next_at == T0 + 11 + 45.0  # ended at T0+11, due retry_in later
    assert rec.last_attempt is not None
    assert (rec.last_attempt.outcome, rec.last_attempt.summary) == (Outcome.RETRY, "exit 75")
    assert rec.dead_at is None and rec.done_at is None
    assert lifecycle.counted_attempts(rec) == 1


def test_rejection_is_dead_at_once() -> None:
    rec = attempt(fresh(), Outcome.DEAD, now=T0 + 10, max_attempts=99)
    assert rec.state is State.DEAD and rec.dead_at == T0 + 11 and rec.done_at is None
    assert rec.last_attempt is not None
    assert (rec.last_attempt.outcome, rec.last_attempt.summary) == (Outcome.DEAD, "exit 65")


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_retryable_failure_that_uses_up_max_attempts_is_dead(max_attempts: int) -> None:
    rec = fresh()
    for i in range(max_attempts - 1):
        rec = attempt(rec, Outcome.RETRY, now=T0 + 100 * i, max_attempts=max_attempts)
        assert rec.state is State.PENDING, f"attempt {i + 1} of {max_attempts} is not the last"
    rec = attempt(rec, Outcome.RETRY, now=T0 + 1000, max_attempts=max_attempts, summary="exit 1")
    assert rec.state is State.DEAD and rec.dead_at == T0 + 1001
    assert len(rec.attempts) == max_attempts
    assert rec.last_attempt is not None and rec.last_attempt.outcome is Outcome.DEAD
    assert rec.last_attempt.summary == f"exit 1; max_attempts ({max_attempts}) reached"


def test_interrupted_attempts_do_not_count_against_max_attempts_and_add_reruns() -> None:
    rec = interrupted(fresh(), now=T0 + 10)
    assert rec.state is State.PENDING
    assert rec.next_at == T0 + 11  # re-run at once, no backoff
    assert rec.reruns == 1
    assert rec.last_attempt == AttemptEntry(
        n=1,
        started_at=T0 + 10,
        ended_at=T0 + 11,
        outcome=Outcome.INTERRUPTED,
        summary="interrupted: appliance stopped",
    )
    rec = interrupted(rec, now=T0 + 20)
    assert rec.reruns == 2 and lifecycle.counted_attempts(rec) == 0
    # two interruptions, then a retryable failure with max_attempts 2: one failure, not three
    rec = attempt(rec, Outcome.RETRY, now=T0 + 30, max_attempts=2)
    assert rec.state is State.PENDING and lifecycle.counted_attempts(rec) == 1
    rec = attempt(rec, Outcome.RETRY, now=T0 + 100, max_attempts=2)
    assert rec.state is State.DEAD and len(rec.attempts) == 4 and rec.reruns == 2


def test_requeue_is_only_for_a_running_attempt() -> None:
    for rec in (fresh(), attempt(fresh(), Outcome.SUCCESS, now=T0), dead_after_retries()):
        with pytest.raises(IllegalTransition):
            lifecycle.requeue(rec, T0 + 500, "stop")


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.RETRY, Outcome.DEAD])
def test_finish_refuses_a_record_that_is_not_importing(outcome: Outcome) -> None:
    receiving = lifecycle.receive(2, received_at=T0, run_id="r", ghost_user_id="g", flow_count=3)
    not_running = [
        fresh(),
        receiving,
        attempt(fresh(), Outcome.RETRY, now=T0),  # pending again, after a failure
        interrupted(fresh(), now=T0),  # pending again, after a crash
        attempt(fresh(), Outcome.SUCCESS, now=T0),
        dead_after_retries(),
    ]
    for rec in not_running:
        with pytest.raises(IllegalTransition):
            lifecycle.finish(
                rec, outcome, summary="x", duration=1, now=T0 + 500, max_attempts=3, retry_in=1
            )


def test_finish_refuses_interrupted_as_an_importer_outcome() -> None:
    running = lifecycle.start(fresh(), T0)
    with pytest.raises(IllegalTransition):
        lifecycle.finish(
            running,
            Outcome.INTERRUPTED,
            summary="x",
            duration=1,
            now=T0 + 1,
            max_attempts=3,
            retry_in=1,
        )


# -- operators -------------------------------------------------------------------------------
def test_operator_retry_of_dead_gives_a_fresh_budget() -> None:
    dead = dead_after_retries(max_attempts=2)
    assert lifecycle.why_not_retry(dead, body_kept=True) is None
    rec = lifecycle.retry(dead, T0 + 5000, body_kept=True)
    assert rec.state is State.PENDING and rec.next_at == T0 + 5000
    assert rec.dead_at is None and rec.retry_base == 2 and rec.manual_retries == 1
    assert rec.attempts == dead.attempts  # the history stays for `inbox show`
    assert lifecycle.counted_attempts(rec) == 0
    assert "dead_at" not in json.loads(encode_record(rec))
    # the old failures no longer count: one more failure is attempt 1 of a new budget of 2
    rec = attempt(rec, Outcome.RETRY, now=T0 + 6000, max_attempts=2)
    assert rec.state is State.PENDING
    rec = attempt(rec, Outcome.RETRY, now=T0 + 7000, max_attempts=2)
    assert rec.state is State.DEAD and [a.n for a in rec.attempts] == [1, 2, 3, 4]
    # and a second operator retry counts too
    again = lifecycle.retry(rec, T0 + 8000, body_kept=True)
    assert again.manual_retries == 2 and again.retry_base == 4


def test_operator_retry_of_pending_makes_it_due_now_and_keeps_its_budget() -> None:
    waiting = attempt(fresh(), Outcome.RETRY, now=T0, retry_in=3600, max_attempts=2)
    assert waiting.next_at == T0 + 1 + 3600
    rec = lifecycle.retry(waiting, T0 + 60, body_kept=True)
    assert rec.state is State.PENDING and rec.next_at == T0 + 60 and rec.manual_retries == 1
    assert rec.retry_base is None and lifecycle.counted_attempts(rec) == 1
    rec = attempt(rec, Outcome.RETRY, now=T0 + 61, max_attempts=2)
    assert rec.state is State.DEAD  # hurrying a waiting delivery is not a fresh budget


def test_operator_retry_refusals_say_why() -> None:
    running = lifecycle.start(fresh(), T0)
    receiving = lifecycle.receive(2, received_at=T0, run_id="r", ghost_user_id="g", flow_count=3)
    done = attempt(fresh(), Outcome.SUCCESS, now=T0)
    dead = dead_after_retries()
    refused = [
        (done, True, "already imported (retrying would import its flow ids twice)"),
        (done, False, "already imported (retrying would import its flow ids twice)"),
        (running, True, "importing now"),
        (receiving, True, "still being received"),
        (lifecycle.purge(dead, T0 + 9000), False, "body purged; cannot be retried"),
    ]
    for rec, kept, why in refused:
        assert lifecycle.why_not_retry(rec, body_kept=kept) == why
        with pytest.raises(IllegalTransition) as err:
            lifecycle.retry(rec, T0 + 10_000, body_kept=kept)
        assert why in str(err.value)


def test_purge_drops_bodies_of_done_and_dead_only_and_keeps_the_flow_ids() -> None:
    for rec in (attempt(fresh(), Outcome.SUCCESS, now=T0), dead_after_retries()):
        purged = lifecycle.purge(rec, T0 + 9000)
        assert purged.purged_at == T0 + 9000
        assert (purged.state, purged.flows, purged.attempts) == (rec.state, rec.flows, rec.attempts)
    receiving = lifecycle.receive(2, received_at=T0, run_id="r", ghost_user_id="g", flow_count=3)
    for rec in (fresh(), lifecycle.start(fresh(), T0), receiving):
        with pytest.raises(IllegalTransition):
            lifecycle.purge(rec, T0 + 9000)


def test_prune_keeps_a_done_record_and_its_flow_ids() -> None:
    done = attempt(fresh(), Outcome.SUCCESS, now=T0)
    pruned = lifecycle.prune(done, T0 + 86400)
    assert pruned.body_pruned_at == T0 + 86400
    assert (pruned.state, pruned.flows, pruned.done_at) == (State.DONE, ("a", "b"), done.done_at)


# -- the record on disk ----------------------------------------------------------------------
FLOAT = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=12)


@st.composite
def records(draw: st.DrawFn) -> Record:
    """A record reached by a random sequence of events the table allows."""
    flows = tuple(draw(st.lists(TEXT, unique=True, max_size=6)))
    base: dict[str, Any] = {
        "received_at": draw(FLOAT),
        "run_id": draw(TEXT),
        "ghost_user_id": draw(TEXT),
        "in_body_duplicates": draw(st.integers(0, 5)),
        "body_bytes": draw(st.integers(0, 10**7)),
    }
    seq = draw(st.integers(1, 2**40))
    if draw(st.booleans()):
        rec = lifecycle.accept(seq, flows=flows, duplicate_flows=draw(st.integers(0, 5)), **base)
    else:
        count = len(flows) + draw(st.integers(0, 5))
        rec = lifecycle.receive(seq, flow_count=count, **base)
        if draw(st.booleans()):
            rec = lifecycle.complete(rec, flows, examined=count)
    steps: dict[State, list[Callable[[Record], Record]]] = {
        State.RECEIVING: [],
        State.PENDING: [
            lambda r: lifecycle.start(r, draw(FLOAT)),
            lambda r: lifecycle.retry(r, draw(FLOAT), body_kept=True),
        ],
        State.IMPORTING: [
            lambda r: lifecycle.finish(
                r,
                draw(st.sampled_from([Outcome.SUCCESS, Outcome.RETRY, Outcome.DEAD])),
                summary=draw(TEXT),
                duration=draw(st.floats(0, 1e5)),
                now=draw(FLOAT),
                max_attempts=draw(st.integers(1, 4)),
                retry_in=draw(st.floats(0, 1e5)),
            ),
            lambda r: lifecycle.requeue(r, draw(FLOAT), draw(TEXT)),
        ],
        State.DONE: [
            lambda r: lifecycle.prune(r, draw(FLOAT)),
            lambda r: lifecycle.purge(r, draw(FLOAT)),
        ],
        State.DEAD: [  # an operator retries a dead letter only while its body is kept
            lambda r: (
                r if r.purged_at is not None else lifecycle.retry(r, draw(FLOAT), body_kept=True)
            ),
            lambda r: lifecycle.purge(r, draw(FLOAT)),
        ],
    }
    for _ in range(draw(st.integers(0, 12))):
        choices = steps[rec.state]
        if not choices:
            break
        rec = draw(st.sampled_from(choices))(rec)
    return rec


@settings(max_examples=300, deadline=None)
@given(records(), st.text(max_size=20))
def test_a_record_reads_back_as_written(rec: Record, delivery_id: str) -> None:
    raw = encode_record(rec)
    assert decode_record(raw) == rec
    assert decode_record(memoryview(raw), delivery_id) == dataclasses.replace(
        rec, delivery_id=delivery_id
    )
    doc = json.loads(raw)
    assert "delivery_id" not in doc  # derived when read, never stored
    # keys the first release wrote only once they had a value are still omitted without one
    for key in ("retry_base", "manual_retries", "done_at", "dead_at", "flow_count"):
        assert (key in doc) == (getattr(rec, key) is not None)


FIRST_RELEASE = [
    # dead at once: the importer exited 65
    (
        '{"seq":3,"received_at":1700000000.5,"run":"r1","user":"g1","state":"dead",'
        '"flows":["a","b"],"duplicate_flows":1,"in_body_duplicates":0,"body_bytes":120,'
        '"attempts":[{"n":1,"started_at":1700000001.0,"ended_at":1700000002.0,'
        '"outcome":"dead","summary":"exit 65","duration":1.0}],'
        '"next_at":1700000000.5,"reruns":0,"dead_at":1700000002.0}',
        Record(
            seq=3,
            received_at=1700000000.5,
            run_id="r1",
            ghost_user_id="g1",
            state=State.DEAD,
            flows=("a", "b"),
            duplicate_flows=1,
            in_body_duplicates=0,
            body_bytes=120,
            attempts=(
                AttemptEntry(
                    n=1,
                    started_at=1700000001.0,
                    ended_at=1700000002.0,
                    outcome=Outcome.DEAD,
                    summary="exit 65",
                    duration=1.0,
                ),
            ),
            next_at=1700000000.5,
            reruns=0,
            dead_at=1700000002.0,
        ),
    ),
    # just accepted (inbox.new_record's layout)
    (
        '{"seq":1,"received_at":1700000000.25,"run":"r","user":"g","state":"pending",'
        '"flows":["f1"],"duplicate_flows":0,"in_body_duplicates":2,"body_bytes":64,'
        '"attempts":[],"next_at":1700000000.25,"reruns":0}',
        Record(
            seq=1,
            received_at=1700000000.25,
            run_id="r",
            ghost_user_id="g",
            state=State.PENDING,
            flows=("f1",),
            next_at=1700000000.25,
            in_body_duplicates=2,
            body_bytes=64,
        ),
    ),
    # interrupted (no duration), then dead with max_attempts 1 - the first release left that
    # attempt's outcome "retry" - then an operator retry (dead_at popped), done, pruned
    (
        '{"seq":7,"received_at":1700000000.0,"run":"r","user":"g","state":"done",'
        '"flows":["x"],"duplicate_flows":0,"in_body_duplicates":0,"body_bytes":10,'
        '"attempts":[{"n":1,"started_at":1700000001.0,"outcome":"interrupted",'
        '"summary":"interrupted: appliance stopped","ended_at":1700000002.0},'
        '{"n":2,"started_at":1700000003.0,"ended_at":1700000004.0,"outcome":"retry",'
        '"summary":"exit 1; max_attempts (1) reached","duration":0.25},'
        '{"n":3,"started_at":1700000010.0,"ended_at":1700000011.0,"outcome":"success",'
        '"summary":"exit 0","duration":0.5}],'
        '"next_at":1700000009.0,"reruns":1,"retry_base":2,"manual_retries":1,'
        '"done_at":1700000011.0,"body_pruned_at":1700090000.0}',
        Record(
            seq=7,
            received_at=1700000000.0,
            run_id="r",
            ghost_user_id="g",
            state=State.DONE,
            flows=("x",),
            body_bytes=10,
            attempts=(
                AttemptEntry(
                    1,
                    1700000001.0,
                    1700000002.0,
                    Outcome.INTERRUPTED,
                    "interrupted: appliance stopped",
                ),
                AttemptEntry(
                    2,
                    1700000003.0,
                    1700000004.0,
                    Outcome.RETRY,
                    "exit 1; max_attempts (1) reached",
                    0.25,
                ),
                AttemptEntry(3, 1700000010.0, 1700000011.0, Outcome.SUCCESS, "exit 0", 0.5),
            ),
            next_at=1700000009.0,
            reruns=1,
            retry_base=2,
            manual_retries=1,
            done_at=1700000011.0,
            body_pruned_at=1700090000.0,
        ),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), FIRST_RELEASE)
def test_a_record_the_first_release_wrote_reads_and_writes_back_unchanged(
    raw: str, expected: Record
) -> None:
    rec = decode_record(raw.encode(), "inst-3")
    assert rec == dataclasses.replace(expected, delivery_id="inst-3")
    assert json.loads(encode_record(rec)) == json.loads(raw)


def test_a_first_release_dead_record_is_retried_with_a_fresh_budget() -> None:
    # dead after max_attempts 1, as the first release wrote it: last outcome "retry"
    raw = (
        b'{"seq":5,"received_at":1700000000.0,"run":"r","user":"g","state":"dead",'
        b'"flows":["x"],"duplicate_flows":0,"in_body_duplicates":0,"body_bytes":10,'
        b'"attempts":[{"n":1,"started_at":1700000001.0,"ended_at":1700000002.0,'
        b'"outcome":"retry","summary":"exit 1; max_attempts (1) reached","duration":1.0}],'
        b'"next_at":1700000000.0,"reruns":0,"dead_at":1700000002.0}'
    )
    dead = decode_record(raw)
    assert dead.state is State.DEAD and lifecycle.counted_attempts(dead) == 1
    rec = lifecycle.retry(dead, T0 + 100, body_kept=True)
    assert rec.retry_base == 1 and lifecycle.counted_attempts(rec) == 0
    rec = attempt(rec, Outcome.RETRY, now=T0 + 200, max_attempts=2)
    assert rec.state is State.PENDING and rec.last_attempt is not None
    assert rec.last_attempt.n == 2
