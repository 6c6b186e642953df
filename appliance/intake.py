"""Accepting a delivery: its flow ids are claimed in slices, one slice per group commit.

Theory of operation
-------------------
A delivery with 400,000 flow ids used to be claimed in one write transaction, and every other
delivery waited the second that took. `Acceptance` is a multi-step operation of the group
commit (committer.py): each commit runs one step of it, at most `SLICE` flow ids, beside whatever
else is queued, so small deliveries keep being answered while a big one is claimed.

Each step is exact for the same reason a single transaction was: one writer runs the steps in
commit order, and flow ids are claimed by adding index entries with ``overwrite=False``
(`flowindex.Lookup.claim`; the index's layout and why it is exact: flowindex.py).

    probe    until one flow id is new, the steps only look (a retry of a big delivery stores
             nothing and answers `duplicate` when the last slice has been looked at)
    claim    the step that meets the first new id takes the delivery's seq. If that step is
             also the last one, the record is stored whole at once: a one-step delivery
             (almost all of them) is stored exactly as before. Otherwise the record is stored
             `receiving` with the body, and the new ids of every slice are kept durably as a
             part (inbox `parts` db: seq + part number -> JSON list), in the slice's commit.
    finish   one more step, which claims nothing, writes the record `pending` with all its new
             flow ids, queues it and drops the parts. Only then is the sender answered.

What a crash or a failed commit leaves is always importable, never lost:
* A failed step was not committed; the in-memory position only moves when `committed` is told
  the step is durable. The sender is answered the failure (503) at once. If parts were already
  committed, the operation stays with the writer and finishes with the ids claimed so far (they
  are owned by this delivery now; CoinTracker's retry claims the rest as a new delivery).
* After a crash, `flowindex.recover` replays the parts into the index (claims of the last
  commit may not have reached the unsynced index) and finishes every `receiving` record from
  its parts, before the server accepts anything.
* The index's applied-seq watermark stays sound: a finish step claims nothing, and any other
  step that claims for a seq below the watermark belongs to a `receiving` record, whose parts
  are replayed at every start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import lifecycle
from .flowindex import Lookup
from .inbox import Inbox, seq_key
from .record import Accepted, Incoming
from .store import Txn

# Flow ids claimed per commit: a few milliseconds of index work per step.
SLICE = 2048


@dataclass(slots=True)
class Step:
    """What one step did, applied to the operation only once its commit is durable."""

    pos: int
    seq: int | None
    new: list[str] = field(default_factory=list)
    owners: set[int] = field(default_factory=set)
    part: bool = False
    done: Accepted | None = None


class Acceptance:
    """One delivery being accepted; a `committer.Steps` operation of the group commit."""

    def __init__(self, inbox: Inbox, item: Incoming, slice_ids: int = SLICE) -> None:
        self.inbox = inbox
        self.item = item
        self.ids = item.delivery.flow_ids
        self.slice = slice_ids
        self.pos = 0
        self.seq: int | None = None
        self.new: list[str] = []
        self.owners: set[int] = set()
        self.parts = 0
        self.cut_short = False
        self.result: Accepted | None = None

    # -- one step, inside one write transaction; changes nothing on self -------------------
    def step(self, txn: Txn) -> Step:
        if self.parts and (self.cut_short or self.pos >= len(self.ids)):
            return Step(self.pos, self.seq, done=self._finish_txn(txn))
        ib, dbs, ids = self.inbox, self.inbox.dbs, self.ids
        pos, seq, end = self.pos, self.seq, min(self.pos + self.slice, len(ids))
        step = Step(pos, seq)
        lookup = Lookup(ib, txn)
        want = self.item.want_owners
        if seq is None:
            owner_of = lookup.owner
            while pos < end:
                owner = owner_of(ids[pos])
                if owner is None:
                    break
                if want:
                    step.owners.add(owner)
                pos += 1
            if pos < end:
                seq = ib.next_seq_txn(txn)
        if seq is not None:
            step.new, claimed_by = lookup.claim(seq, ids[pos:end], want)
            step.owners |= claimed_by
            pos = end
        step.pos, step.seq = pos, seq
        last = pos == len(ids)
        d, at = self.item.delivery, self.item.received_at
        if seq is None:
            if last:
                dup = len(ids)
                ib.count_page_txn(txn, d.cost_basis_run_id, d.ghost_user_id, at, 0, dup)
                owners = frozenset(self.owners | step.owners)
                step.done = Accepted("duplicate", None, None, 0, dup, owners)
            return step
        if self.seq is None:  # this step took the seq
            txn.index.put(b"applied_seq", seq_key(seq), db=dbs.index_meta)
            if last:  # and claimed the last slice: the record is stored whole at once
                step.done = self._store_txn(txn, seq, step.new, len(ids), step.owners)
                return step
            ib.begin_receiving_txn(txn, seq, self.item)
        if step.new:
            ib.put_part_txn(txn, seq, self.parts, step.new)
            txn.claims.setdefault(seq, set()).update(step.new)  # for later lookups in txn
            step.part = True
        return step

    def _finish_txn(self, txn: Txn) -> Accepted:
        assert self.seq is not None
        self.inbox.complete_txn(txn, self.seq, tuple(self.new), self.pos)
        return self._accepted(self.seq, len(self.new), self.pos, set())

    def _store_txn(
        self, txn: Txn, seq: int, new: list[str], examined: int, owners: set[int]
    ) -> Accepted:
        """A delivery claimed in one step: stored whole, pending, at once."""
        item, d = self.item, self.item.delivery
        rec = lifecycle.accept(
            seq,
            received_at=item.received_at,
            run_id=d.cost_basis_run_id,
            ghost_user_id=d.ghost_user_id,
            flows=tuple(new),
            duplicate_flows=examined - len(new),
            in_body_duplicates=d.in_body_duplicates,
            body_bytes=len(item.body),
        )
        self.inbox.store_accepted_txn(txn, rec, item.body)
        return self._accepted(seq, len(new), examined, owners)

    def _accepted(self, seq: int, new: int, examined: int, owners: set[int]) -> Accepted:
        delivery_id = self.inbox.delivery_id_of(seq)
        return Accepted(
            "accepted", delivery_id, seq, new, examined - new, frozenset(self.owners | owners)
        )

    # -- what the writer tells us ----------------------------------------------------------
    def committed(self, step: Step) -> bool:
        """The step is durable: take it in. True when the delivery is fully accepted."""
        self.pos, self.seq = step.pos, step.seq
        self.new += step.new
        self.owners |= step.owners
        self.parts += step.part
        if step.part and step.seq is not None:  # before the writer's next transaction
            self.inbox.receiving.setdefault(step.seq, set()).update(step.new)
        if step.done is not None:
            if self.seq is not None:
                self.inbox.receiving.pop(self.seq, None)  # its record now holds every id
            self.result = step.done
            return True
        return False

    def failed(self, error: BaseException) -> bool:
        """The step was not committed. True to keep stepping: parts are durable, so the
        delivery is finished with the flow ids claimed so far (its sender gets `error`)."""
        if not self.parts:
            return False
        self.cut_short = True
        return True


def accept_txn(inbox: Inbox, txn: Txn, item: Incoming) -> Accepted:
    """Every step of one delivery inside one transaction (no writer task: the CLI, tests and
    bench loaders; the server goes through the group commit, one step per commit). The
    operation is made here, so a transaction that is retried starts it afresh."""
    op = Acceptance(inbox, item, slice_ids=max(1, len(item.delivery.flow_ids)))
    while not op.committed(op.step(txn)):
        pass
    assert op.result is not None
    return op.result
