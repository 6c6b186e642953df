"""Spec §5 over the pure lifecycle: an inbox driven the way a backend drives it.

The model is a store without LMDB: records by seq, the flow-id index (flow id -> the seq that
claimed it), which bodies are gone, and what the outside world saw:

- acknowledged: flow ids of deliveries answered `accepted` or `duplicate`;
- imported: how many times a flow id was part of an importer run that imported it. A run
  that finished with success imported its flow ids. A run cut short by a crash may have
  imported them before the crash (Hypothesis decides): the documented rerun case, so such an
  extra import must be covered by the record's `reruns`.

Rules apply lifecycle.py exactly where the backend does (lmdbbackend.py, intake.py), check
what a user or operator would then see, and the invariants hold after every step. At the end
every record is driven to completion (the importer succeeds from then on; dead deliveries are
retried by an operator while their body is kept), and every acknowledged flow id must then be
imported, or stand in a dead delivery whose body was purged (§5.2), never imported twice
except for a counted rerun (§5.3).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appliance import lifecycle
from appliance.errors import IllegalTransition
from appliance.lifecycle import INITIAL, TRANSITIONS
from appliance.record import Outcome, Record, State, decode_record, encode_record

ALPHABET = [f"f{i:02d}" for i in range(30)]
FLOW_IDS = st.lists(st.sampled_from(ALPHABET), unique=True, max_size=8)
REACHABLE = set(INITIAL) | set(TRANSITIONS.values())
WHY = "interrupted: appliance stopped"


class InboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_700_000_000.0
        self.next_seq = 1
        self.records: dict[int, Record] = {}
        self.index: dict[str, int] = {}  # flow id -> seq of the record that claimed it
        self.parts: dict[int, list[str]] = {}  # receiving: flow ids claimed so far
        self.rest: dict[int, tuple[list[str], list[str]]] = {}  # receiving: (all ids, slice 2)
        self.body_gone: set[int] = set()
        self.acknowledged: set[str] = set()
        self.imported: Counter[str] = Counter()
        self.handed: dict[int, tuple[str, ...]] = {}  # importing: flow ids the importer has
        self.failures: Counter[int] = Counter()  # failed attempts since the last operator retry
        # True only once the invariants held after the last step: a failed step leaves it
        # False, so teardown's final drive cannot mask that failure with one of its own
        self.consistent = True

    # -- helpers -----------------------------------------------------------------------------
    def seqs(self, *states: State) -> list[int]:
        return [s for s, r in self.records.items() if r.state in states]

    def due(self) -> list[int]:
        return [s for s in self.seqs(State.PENDING) if self.records[s].next_at <= self.now]

    def pick(self, data: st.DataObject, seqs: list[int]) -> int:
        self.consistent = False
        return data.draw(st.sampled_from(sorted(seqs)))

    def claim(self, ids: list[str], seq: int) -> list[str]:
        """Claim like the store: the new flow ids are those the index does not know."""
        new = [f for f in ids if f not in self.index]
        for f in new:
            self.index[f] = seq
        return new

    def store_whole(self, ids: list[str], new: list[str], seq: int) -> None:
        rec = lifecycle.accept(
            seq,
            received_at=self.now,
            run_id="run",
            ghost_user_id="user",
            flows=tuple(new),
            duplicate_flows=len(ids) - len(new),
        )
        assert (rec.state, rec.next_at, rec.attempts) == (State.PENDING, self.now, ())
        assert rec.duplicate_flows == len(ids) - len(new)
        self.records[seq] = rec

    def run_importer(self, seq: int) -> None:
        rec = lifecycle.start(self.records[seq], self.now)
        assert rec.state is State.IMPORTING and rec.last_attempt is not None
        assert rec.last_attempt.n == len(rec.attempts) and rec.last_attempt.outcome is None
        self.records[seq] = rec
        self.handed[seq] = rec.flows

    def end(self, seq: int, outcome: Outcome, max_attempts: int, retry_in: float) -> Record:
        before = self.records[seq]
        rec = lifecycle.finish(
            before,
            outcome,
            summary=f"exit {outcome.value}",
            duration=0.5,
            now=self.now,
            max_attempts=max_attempts,
            retry_in=retry_in,
        )
        handed = self.handed.pop(seq)
        if outcome is Outcome.SUCCESS:
            self.imported.update(handed)
        assert len(rec.attempts) == len(before.attempts) and rec.last_attempt is not None
        assert rec.last_attempt.ended_at == self.now
        self.records[seq] = rec
        return rec

    # -- deliveries --------------------------------------------------------------------------
    @rule(ids=FLOW_IDS)
    def accept(self, ids: list[str]) -> None:
        self.consistent = False
        seq = self.next_seq
        new = self.claim(ids, seq)
        if new:  # accepted: a record with the new flow ids, in arrival order
            self.next_seq += 1
            self.store_whole(ids, new, seq)
        # accepted or duplicate, the sender is answered 200: every one of its ids is ours now
        self.acknowledged.update(ids)

    @rule(ids=st.lists(st.sampled_from(ALPHABET), unique=True, min_size=2, max_size=12))
    def begin_big_delivery(self, ids: list[str]) -> None:
        """A delivery claimed over two commits (intake.py): the first slice's commit takes a
        seq only if it claims something; otherwise the second slice decides alone."""
        self.consistent = False
        half = len(ids) // 2
        seq = self.next_seq
        new = self.claim(ids[:half], seq)
        if not new:
            new = self.claim(ids[half:], seq)
            if new:
                self.next_seq += 1
                self.store_whole(ids, new, seq)
            self.acknowledged.update(ids)
            return
        self.next_seq += 1
        rec = lifecycle.receive(
            seq, received_at=self.now, run_id="run", ghost_user_id="user", flow_count=len(ids)
        )
        assert (rec.state, rec.flows, rec.flow_count) == (State.RECEIVING, (), len(ids))
        self.records[seq] = rec
        self.parts[seq] = new
        self.rest[seq] = (ids, ids[len(ids) // 2 :])

    @precondition(lambda self: bool(self.rest))
    @rule(data=st.data())
    def finish_big_delivery(self, data: st.DataObject) -> None:
        seq = self.pick(data, list(self.rest))
        ids, second = self.rest.pop(seq)
        flows = self.parts.pop(seq) + self.claim(second, seq)
        rec = lifecycle.complete(self.records[seq], tuple(flows), examined=len(ids))
        assert (rec.state, rec.flows, rec.flow_count) == (State.PENDING, tuple(flows), None)
        assert rec.duplicate_flows == len(ids) - len(flows)
        self.records[seq] = rec
        self.acknowledged.update(ids)

    # -- the dispatcher and the importer -------------------------------------------------------
    @rule(seconds=st.sampled_from([0.5, 1.0, 10.0, 60.0, 600.0]))
    def time_passes(self, seconds: float) -> None:
        self.consistent = False
        self.now += seconds

    @precondition(lambda self: bool(self.due()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self.run_importer(self.pick(data, self.due()))

    @precondition(lambda self: bool(self.seqs(State.IMPORTING)))
    @rule(data=st.data())
    def importer_succeeds(self, data: st.DataObject) -> None:
        rec = self.end(self.pick(data, self.seqs(State.IMPORTING)), Outcome.SUCCESS, 3, 1.0)
        assert rec.state is State.DONE and rec.done_at == self.now

    @precondition(lambda self: bool(self.seqs(State.IMPORTING)))
    @rule(
        data=st.data(),
        max_attempts=st.integers(1, 4),
        retry_in=st.sampled_from([0.0, 1.0, 30.0]),
    )
    def importer_fails(self, data: st.DataObject, max_attempts: int, retry_in: float) -> None:
        seq = self.pick(data, self.seqs(State.IMPORTING))
        self.failures[seq] += 1  # interrupted attempts never count; failures always do
        rec = self.end(seq, Outcome.RETRY, max_attempts, retry_in)
        assert rec.last_attempt is not None
        assert lifecycle.counted_attempts(rec) == self.failures[seq]
        if self.failures[seq] >= max_attempts:
            assert rec.state is State.DEAD and rec.dead_at == self.now
            assert rec.last_attempt.summary is not None
            assert rec.last_attempt.summary.endswith(f"max_attempts ({max_attempts}) reached")
        else:
            assert rec.state is State.PENDING and rec.next_at == self.now + retry_in
            assert rec.last_attempt.outcome is Outcome.RETRY

    @precondition(lambda self: bool(self.seqs(State.IMPORTING)))
    @rule(data=st.data(), max_attempts=st.integers(1, 4))
    def importer_rejects(self, data: st.DataObject, max_attempts: int) -> None:
        seq = self.pick(data, self.seqs(State.IMPORTING))
        self.failures[seq] += 1
        rec = self.end(seq, Outcome.DEAD, max_attempts, 1.0)
        assert rec.state is State.DEAD and rec.dead_at == self.now

    @rule(data=st.data())
    def crash_and_recover(self, data: st.DataObject) -> None:
        """kill -9 and restart: unfinished big deliveries are completed with what they claimed
        (their sender got no answer and will retry); every running attempt is requeued, and
        the importer may have imported its flow ids before the crash."""
        self.consistent = False
        for seq in sorted(self.rest):
            ids, _ = self.rest.pop(seq)
            flows = tuple(self.parts.pop(seq))
            rec = lifecycle.complete(self.records[seq], flows, examined=len(ids))
            assert rec.state is State.PENDING and rec.flows == flows
            self.records[seq] = rec
        for seq in self.seqs(State.IMPORTING):
            handed = self.handed.pop(seq)
            if data.draw(st.booleans(), label=f"importer imported {seq} before the crash"):
                self.imported.update(handed)
            before = self.records[seq]
            rec = lifecycle.requeue(before, self.now, WHY)
            assert rec.state is State.PENDING and rec.next_at == self.now
            assert rec.reruns == before.reruns + 1
            assert rec.last_attempt is not None
            assert rec.last_attempt.outcome is Outcome.INTERRUPTED
            self.records[seq] = rec

    # -- operators ---------------------------------------------------------------------------
    @precondition(lambda self: bool(self.records))
    @rule(data=st.data())
    def operator_retry(self, data: st.DataObject) -> None:
        seq = self.pick(data, list(self.records))
        before = self.records[seq]
        kept = seq not in self.body_gone
        allowed = before.state is State.PENDING or (before.state is State.DEAD and kept)
        assert (lifecycle.why_not_retry(before, body_kept=kept) is None) == allowed
        if not allowed:
            with pytest.raises(IllegalTransition):
                lifecycle.retry(before, self.now, body_kept=kept)
            return
        rec = lifecycle.retry(before, self.now, body_kept=kept)
        assert rec.state is State.PENDING and rec.next_at == self.now
        assert rec.attempts == before.attempts and rec.flows == before.flows
        if before.state is State.DEAD:  # a fresh budget
            self.failures[seq] = 0
            assert rec.dead_at is None and lifecycle.counted_attempts(rec) == 0
        self.records[seq] = rec

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data())
    def purge(self, data: st.DataObject) -> None:
        seq = self.pick(data, list(self.records))
        before = self.records[seq]
        if before.state not in (State.DONE, State.DEAD):
            with pytest.raises(IllegalTransition):
                lifecycle.purge(before, self.now)
            return
        rec = lifecycle.purge(before, self.now)
        assert rec.purged_at == self.now
        assert (rec.state, rec.flows, rec.attempts) == (before.state, before.flows, before.attempts)
        self.records[seq] = rec
        self.body_gone.add(seq)

    @precondition(lambda self: bool(self.seqs(State.DONE)))
    @rule(data=st.data())
    def prune(self, data: st.DataObject) -> None:
        """Retention drops the body of an imported delivery (the backend prunes done only)."""
        seq = self.pick(data, self.seqs(State.DONE))
        before = self.records[seq]
        rec = lifecycle.prune(before, self.now)
        assert rec.body_pruned_at == self.now
        assert (rec.state, rec.flows, rec.attempts) == (before.state, before.flows, before.attempts)
        self.records[seq] = rec
        self.body_gone.add(seq)

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data())
    def what_a_state_refuses(self, data: st.DataObject) -> None:
        """Every step the record's state does not allow raises and changes nothing."""
        seq = self.pick(data, list(self.records))
        rec = self.records[seq]
        refused: list[Callable[[], object]] = []
        if rec.state is not State.PENDING:
            refused.append(lambda: lifecycle.start(rec, self.now))
        if rec.state is not State.IMPORTING:
            refused.append(lambda: lifecycle.requeue(rec, self.now, WHY))
            for outcome in (Outcome.SUCCESS, Outcome.RETRY, Outcome.DEAD):
                refused.append(
                    functools.partial(
                        lifecycle.finish,
                        rec,
                        outcome,
                        summary="x",
                        duration=1,
                        now=self.now,
                        max_attempts=3,
                        retry_in=1,
                    )
                )
        if rec.state is not State.RECEIVING:
            refused.append(lambda: lifecycle.complete(rec, rec.flows, len(rec.flows)))
        for step in refused:
            with pytest.raises(IllegalTransition):
                step()
        assert self.records[seq] is rec

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def section_5_holds(self) -> None:
        self.consistent = False
        claimed_by = Counter(f for rec in self.records.values() for f in rec.flows)
        assert all(n == 1 for n in claimed_by.values()), "a flow id in two records' flows"
        for seq, rec in self.records.items():
            assert rec.state in REACHABLE
            for f in rec.flows:
                assert self.index[f] == seq
            assert [a.n for a in rec.attempts] == list(range(1, len(rec.attempts) + 1))
            running = [a for a in rec.attempts if a.outcome is None]
            if rec.state is State.IMPORTING:
                assert running == [rec.attempts[-1]]
            else:
                assert running == []
            if rec.state is State.DONE:
                assert rec.done_at is not None and rec.last_attempt is not None
                assert rec.last_attempt.outcome is Outcome.SUCCESS
                assert all(self.imported[f] >= 1 for f in rec.flows)
            else:
                assert rec.done_at is None
            assert (rec.dead_at is not None) == (rec.state is State.DEAD)
            if rec.state is State.DEAD:
                assert rec.last_attempt is not None
                assert rec.last_attempt.outcome is Outcome.DEAD
            assert (rec.state is State.RECEIVING) == (seq in self.parts)
            assert (rec.state is State.IMPORTING) == (seq in self.handed)
            assert decode_record(encode_record(rec)) == rec
        for f, seq in self.index.items():
            rec = self.records[seq]
            assert f in rec.flows or f in self.parts.get(seq, ())
        for f in self.acknowledged:
            seq = self.index[f]  # claimed, by exactly one record (the index maps to one)
            assert f in self.records[seq].flows or f in self.parts.get(seq, ())
        for f, n in self.imported.items():
            assert n <= 1 + self.records[self.index[f]].reruns, f"{f} imported {n} times"
        self.consistent = True

    def teardown(self) -> None:
        if self.consistent:
            self.drain()

    def drain(self) -> None:
        """Run every delivery to its end: the importer succeeds from now on, senders of cut
        short deliveries are answered, and an operator retries every dead delivery it can."""
        for seq in sorted(self.rest):
            self.finish_big_delivery_now(seq)
        for seq in self.seqs(State.IMPORTING):
            self.end(seq, Outcome.SUCCESS, 3, 1.0)
        for seq in self.seqs(State.DEAD):
            if seq not in self.body_gone:
                self.records[seq] = lifecycle.retry(self.records[seq], self.now, body_kept=True)
        for seq in self.seqs(State.PENDING):
            self.now = max(self.now, self.records[seq].next_at)
            self.run_importer(seq)
            self.end(seq, Outcome.SUCCESS, 3, 1.0)
        self.section_5_holds()
        for seq, rec in self.records.items():
            assert rec.state is State.DONE or (rec.state is State.DEAD and seq in self.body_gone)
        for f in self.acknowledged:
            rec = self.records[self.index[f]]
            if self.imported[f] == 0:
                assert rec.state is State.DEAD and rec.seq in self.body_gone, f
            assert self.imported[f] <= 1 + rec.reruns, f

    def finish_big_delivery_now(self, seq: int) -> None:
        ids, second = self.rest.pop(seq)
        flows = self.parts.pop(seq) + self.claim(second, seq)
        self.records[seq] = lifecycle.complete(self.records[seq], tuple(flows), len(ids))
        self.acknowledged.update(ids)


InboxMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCase = InboxMachine.TestCase
