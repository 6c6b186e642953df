"""How a delivery moves once stored: the transition table and the pure functions that apply it.

The rules this module enforces (spec §5):

1. A record is born `pending` (`accept`) or, for a delivery claimed over several commits,
   `receiving` (`receive`); `complete` makes a receiving record pending with every flow id it
   claimed. Nothing else leaves `receiving`.
2. Only a `pending` record may start an attempt (`start`), and each attempt is numbered once.
3. A running attempt ends exactly one way (`finish`): success -> done; a retryable failure ->
   pending after a backoff; a rejection, or a retryable failure that uses up
   `importer.max_attempts`, -> dead (`kill`). An attempt cut short by a crash or a stop
   (`requeue`) -> pending at once and counts a rerun: the one documented case where flow ids
   may reach the importer twice (import_reruns_total).
4. `done` is final: its flow ids were imported, and retrying would import them twice.
5. `dead` leaves only by an operator's retry (`retry`), with a fresh attempt budget, and only
   while its body is kept. An operator retry of a pending record makes it due now.
6. Flow ids are never dropped: prune and purge remove bodies and outputs, never a record.

Every function takes a record and returns a new one; none touches a store. A backend loads a
record, applies one of these, and stores the result with its index entries in one transaction
(inbox.py), so what a backend can do to a record is exactly what `TRANSITIONS` allows.
`docs/LIFECYCLE.md` is generated from the table (`python -m appliance.lifecycle`; a test keeps
the two equal).
"""

from __future__ import annotations

import dataclasses
import sys
from enum import StrEnum

from .errors import IllegalTransition
from .record import AttemptEntry, Outcome, Record, State


class Event(StrEnum):
    COMPLETE = "complete"  # the last slice of a big delivery is claimed
    START = "start"  # the dispatcher runs the importer
    SUCCEED = "succeed"  # the importer imported it
    FAIL = "fail"  # a retryable failure, attempts left: back off
    KILL = "kill"  # rejected, or a retryable failure with no attempt left
    REQUEUE = "requeue"  # the attempt was cut short (crash, stop): re-run, counted
    RETRY = "retry"  # an operator: dead -> pending, or a waiting delivery due now


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.RECEIVING, Event.COMPLETE): State.PENDING,
    (State.PENDING, Event.START): State.IMPORTING,
    (State.PENDING, Event.RETRY): State.PENDING,
    (State.IMPORTING, Event.SUCCEED): State.DONE,
    (State.IMPORTING, Event.FAIL): State.PENDING,
    (State.IMPORTING, Event.KILL): State.DEAD,
    (State.IMPORTING, Event.REQUEUE): State.PENDING,
    (State.DEAD, Event.RETRY): State.PENDING,
}

# Where a record begins (no state before it).
INITIAL = (State.PENDING, State.RECEIVING)


def next_state(state: State, event: Event) -> State:
    """The state `event` leads to from `state`; IllegalTransition when the table says no."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state.value, event.value) from None


def _move(rec: Record, event: Event, **changes: object) -> Record:
    return dataclasses.replace(rec, state=next_state(rec.state, event), **changes)  # type: ignore[arg-type]


# -- birth -------------------------------------------------------------------------------------
def accept(
    seq: int,
    *,
    received_at: float,
    run_id: str,
    ghost_user_id: str,
    flows: tuple[str, ...],
    duplicate_flows: int = 0,
    in_body_duplicates: int = 0,
    body_bytes: int = 0,
) -> Record:
    """A delivery stored whole: pending, due at once, never attempted."""
    return Record(
        seq=seq,
        received_at=received_at,
        run_id=run_id,
        ghost_user_id=ghost_user_id,
        state=State.PENDING,
        flows=flows,
        next_at=received_at,
        duplicate_flows=duplicate_flows,
        in_body_duplicates=in_body_duplicates,
        body_bytes=body_bytes,
    )


def receive(
    seq: int,
    *,
    received_at: float,
    run_id: str,
    ghost_user_id: str,
    flow_count: int,
    in_body_duplicates: int = 0,
    body_bytes: int = 0,
) -> Record:
    """A big delivery whose flow ids are being claimed slice by slice (intake.py)."""
    return dataclasses.replace(
        accept(
            seq,
            received_at=received_at,
            run_id=run_id,
            ghost_user_id=ghost_user_id,
            flows=(),
            in_body_duplicates=in_body_duplicates,
            body_bytes=body_bytes,
        ),
        state=State.RECEIVING,
        flow_count=flow_count,
    )


def complete(rec: Record, flows: tuple[str, ...], examined: int) -> Record:
    """receiving -> pending with the flow ids its slices claimed, out of `examined`."""
    return _move(
        rec,
        Event.COMPLETE,
        flows=flows,
        duplicate_flows=examined - len(flows),
        flow_count=None,
        next_at=rec.received_at,
    )


# -- the importer ------------------------------------------------------------------------------
def start(rec: Record, now: float) -> Record:
    """pending -> importing, with a new attempt in the log."""
    attempt = AttemptEntry(n=len(rec.attempts) + 1, started_at=now)
    return _move(rec, Event.START, attempts=(*rec.attempts, attempt))


def counted_attempts(rec: Record) -> int:
    """Attempts that count against `importer.max_attempts`: failures since the last
    operator retry (interruptions do not count)."""
    since = rec.attempts[rec.retry_base or 0 :]
    return sum(1 for a in since if a.outcome in (Outcome.RETRY, Outcome.DEAD))


def _close(
    rec: Record, outcome: Outcome, summary: str, now: float, duration: float | None
) -> Record:
    last = rec.last_attempt
    if last is None or last.outcome is not None:
        raise IllegalTransition(rec.state.value, f"end of attempt {len(rec.attempts)}")
    took = round(duration, 3) if duration is not None else None
    ended = dataclasses.replace(last, ended_at=now, outcome=outcome, summary=summary, duration=took)
    return dataclasses.replace(rec, attempts=(*rec.attempts[:-1], ended))


def finish(
    rec: Record,
    outcome: Outcome,
    *,
    summary: str,
    duration: float,
    now: float,
    max_attempts: int,
    retry_in: float,
) -> Record:
    """An attempt ended with the importer's `outcome` (success, retry or dead)."""
    if outcome is Outcome.SUCCESS:
        return _move(_close(rec, outcome, summary, now, duration), Event.SUCCEED, done_at=now)
    if outcome is Outcome.DEAD:
        return kill(rec, summary=summary, duration=duration, now=now)
    if outcome is not Outcome.RETRY:
        raise IllegalTransition(rec.state.value, f"finish with outcome {outcome.value}")
    closed = _close(rec, Outcome.RETRY, summary, now, duration)
    if counted_attempts(closed) >= max_attempts:
        why = f"{summary}; max_attempts ({max_attempts}) reached"
        return kill(rec, summary=why, duration=duration, now=now)
    return _move(closed, Event.FAIL, next_at=now + retry_in)


def kill(rec: Record, *, summary: str, duration: float, now: float) -> Record:
    """importing -> dead: the importer rejected it, or its attempts are used up."""
    return _move(_close(rec, Outcome.DEAD, summary, now, duration), Event.KILL, dead_at=now)


def requeue(rec: Record, now: float, why: str) -> Record:
    """importing -> pending at once: the attempt was cut short (a crash, a stop)."""
    closed = rec
    if rec.last_attempt is not None and rec.last_attempt.outcome is None:
        closed = _close(rec, Outcome.INTERRUPTED, why, now, None)
    return _move(closed, Event.REQUEUE, next_at=now, reruns=rec.reruns + 1)


# -- operators ---------------------------------------------------------------------------------
def why_not_retry(rec: Record, *, body_kept: bool) -> str | None:
    """Why an operator's retry is refused (the CLI prints it), or None when it is allowed."""
    if rec.state is State.DONE:
        return "already imported (retrying would import its flow ids twice)"
    if rec.state is State.IMPORTING:
        return "importing now"
    if rec.state is State.RECEIVING:
        return "still being received"
    if rec.state is State.DEAD and (not body_kept or rec.purged_at is not None):
        return "body purged; cannot be retried"
    return None


def retry(rec: Record, now: float, *, body_kept: bool) -> Record:
    """An operator's retry: dead -> pending with a fresh attempt budget; pending -> due now."""
    why = why_not_retry(rec, body_kept=body_kept)
    if why is not None:
        raise IllegalTransition(rec.state.value, f"retry ({why})")
    changes: dict[str, object] = {"next_at": now, "manual_retries": (rec.manual_retries or 0) + 1}
    if rec.state is State.DEAD:
        changes.update(retry_base=len(rec.attempts), dead_at=None)
    return _move(rec, Event.RETRY, **changes)


def prune(rec: Record, now: float) -> Record:
    """Retention dropped the body of an imported delivery (its flow ids stay claimed)."""
    if rec.state is not State.DONE:
        raise IllegalTransition(rec.state.value, "prune")
    return dataclasses.replace(rec, body_pruned_at=now)


def purge(rec: Record, now: float) -> Record:
    """`inbox purge` dropped the body and attempt outputs of a done (or dead) delivery."""
    if rec.state not in (State.DONE, State.DEAD):
        raise IllegalTransition(rec.state.value, "purge")
    return dataclasses.replace(rec, purged_at=now)


# -- the diagram in docs/LIFECYCLE.md ----------------------------------------------------------
def diagram() -> str:
    """docs/LIFECYCLE.md: a Mermaid state diagram and a table, both from `TRANSITIONS`."""
    lines = [
        "# Delivery lifecycle",
        "",
        "Generated from `appliance/lifecycle.py` (`TRANSITIONS`) by",
        "`python -m appliance.lifecycle > docs/LIFECYCLE.md`; `tests/test_lifecycle.py` fails",
        "when the two differ. The rules are at the top of that module.",
        "",
        "```mermaid",
        "stateDiagram-v2",
    ]
    lines += [f"    [*] --> {s.value}" for s in INITIAL]
    for (src, event), dst in TRANSITIONS.items():
        lines.append(f"    {src.value} --> {dst.value}: {event.value}")
    finals = [s for s in State if not any(src is s for src, _ in TRANSITIONS)]
    lines += [f"    {s.value} --> [*]" for s in finals]
    lines += ["```", "", "| from | event | to |", "|---|---|---|"]
    for (src, event), dst in TRANSITIONS.items():
        lines.append(f"| {src.value} | {event.value} | {dst.value} |")
    lines += [
        "",
        "Every other (state, event) pair is refused with `IllegalTransition`.",
        f"Final: {', '.join(s.value for s in finals)}. `dead` waits for an operator "
        "(`ct-appliance inbox retry`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(diagram())
