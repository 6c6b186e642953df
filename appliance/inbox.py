"""The write-ahead inbox and the flow-id index: what a record is and how it moves.

Theory of operation
-------------------
Sub-databases of the one LMDB environment (see store.py):

    deliveries  seq (8 bytes, big-endian)  -> delivery record (JSON, record.encode_record)
    bodies      seq                        -> raw body bytes, exactly as received and verified
    attempts    seq + attempt (4 bytes)    -> captured output of one importer attempt
    parts       seq + part (4 bytes)       -> new flow ids (JSON list) of one committed slice
                                              of a delivery still `receiving` (intake.py)
    flows, flows_exact, index_meta         -> the flow-id index (its own environment, see
                                              store.py; its layout: flowindex.py)
    queue       seq                        -> (next attempt time, importing flag) while the
                                              delivery is pending or importing
    dead        seq                        -> b"" while the delivery is dead
    done        done time (ms) + seq       -> b"" until retention prunes the body
    runs        run key                    -> per cost_basis_run_id record (JSON)
    state       name                       -> store-wide values (instance id, importer paused)

* `seq` grows by one per stored delivery and gives FIFO order. The delivery id shown to users
  and importers is ``<instance>-<seq>``, where the instance id is drawn once when the store is
  created, so ids never repeat even if a store is wiped and recreated.
* A store restored from a backup taken at seq N hands out N+1, N+2, ... again, which the lost
  store may already have given to other deliveries (and its importer has seen those ids). So
  `restore` begins an instance epoch (`begin_epoch`): seqs from N+1 on are named by a new
  instance id, kept in `state` as a list of (first seq, instance). Every seq is named by the
  epoch it falls in: ids of the backup's deliveries stay what they were (an importer that
  deduplicates on `delivery_id` recognises a re-run), new ids are distinct from every id the
  lost store handed out, and `seq_of` resolves an id only under the instance of its epoch.
* Accepting a delivery is a group-commit operation of one step (a big delivery: one step per
  slice of flow ids, see intake.py): the distinct flow ids of the body are claimed in the
  flow index (flowindex.py: one ``putmulti`` with ``overwrite=False``, exact through the
  claiming deliveries' records). If at least one was new, the record, the body and a queue
  entry are written in the same transaction; otherwise nothing but the run record changes and the answer is
  `duplicate`. Because one writer runs these in commit order, two overlapping deliveries can
  never both claim a flow id, and the answer is exact.
* Only the new flow ids are kept in the record: they are exactly what the importer must see,
  and replaying records in seq order (`rebuild_index`) re-derives the flow index exactly.
* Flow keys (run ids in `runs`, whole flow ids in the index's `flows_exact`): ``=`` + UTF-8
  bytes, or ``#`` + SHA-256 of them when longer than LMDB's key limit.
* A delivery is done (imported) or dead only through the importer's commits; its flow ids stay
  claimed forever, even after retention prunes its body.
* A record changes by load -> apply -> store: `update_txn` loads it, applies one function of
  lifecycle.py, and `save_txn` writes it with the entries that follow from its state (queue
  while pending or importing, dead while dead, done once imported), so those indexes can never
  disagree with the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator

from . import jsoncodec, lifecycle
from .record import (
    InboxSummary,
    Incoming,
    PauseState,
    Record,
    RunStats,
    State,
    decode_pause,
    decode_record,
    decode_run,
    encode_pause,
    encode_record,
    encode_run,
)
from .store import Store, Txn

MAX_RAW_KEY = 480
QUEUED = (State.PENDING, State.IMPORTING)


def seq_key(seq: int) -> bytes:
    return struct.pack(">Q", seq)


def key_seq(key: bytes) -> int:
    return int(struct.unpack(">Q", key[:8])[0])


def flow_key(flow_id: str) -> bytes:
    """The key of a flow id in the index (and of a run id in `runs`)."""
    raw = flow_id.encode()
    if len(raw) <= MAX_RAW_KEY:
        return b"=" + raw
    return b"#" + hashlib.sha256(raw).digest()


def queue_value(next_at: float, importing: bool) -> bytes:
    return struct.pack(">dB", next_at, importing)


def parse_queue_value(raw: bytes) -> tuple[float, bool]:
    next_at, importing = struct.unpack(">dB", raw)
    return float(next_at), bool(importing)


def attempt_key(seq: int, n: int) -> bytes:
    return seq_key(seq) + struct.pack(">I", n)


def done_key(rec: Record) -> bytes:
    return struct.pack(">Q", int((rec.done_at or 0.0) * 1000)) + seq_key(rec.seq)


def instance_id(store: Store) -> str:
    """The store's first instance id, created on first use."""
    found = store.read(lambda txn: txn.get(b"instance", db=store.dbs.state))
    if found is not None:
        return str(found.decode())
    return store.write(lambda txn: instance_id_txn(txn, store))


def instance_id_txn(txn: Txn, store: Store) -> str:
    value = txn.get(b"instance", db=store.dbs.state)
    if value is None:
        value = os.urandom(4).hex().encode()
        txn.put(b"instance", value, db=store.dbs.state)
    return str(value.decode())


def read_epochs(get: Callable[[bytes], bytes | None]) -> tuple[tuple[int, str], ...]:
    """(first seq, instance) of each epoch, oldest first, from `state` as `get` reads it: the
    store's first instance names every seq from 1 until a restore begins the next epoch.
    Empty while the store has no instance."""
    first = get(b"instance")
    if first is None:
        return ()
    later = get(b"epochs")
    rest = [(int(s), str(i)) for s, i in json.loads(later)] if later is not None else []
    return ((1, bytes(first).decode()), *rest)


def instance_epochs(store: Store) -> tuple[tuple[int, str], ...]:
    instance_id(store)  # created on first use
    return store.read(lambda txn: read_epochs(lambda key: txn.get(key, db=store.dbs.state)))


def begin_epoch(
    get: Callable[[bytes], bytes | None], put: Callable[[bytes, bytes], object], first_seq: int
) -> str:
    """A new instance id, distinct from the store's others, names seqs from `first_seq` on;
    returns it. For `restore` (the backup ends at first_seq - 1), in one write transaction
    over `state` (`get`, `put`) of a store no server holds. Epochs that began at or after
    first_seq are dropped: no seq of theirs is in this store."""
    if get(b"instance") is None:
        put(b"instance", os.urandom(4).hex().encode())
    epochs = read_epochs(get)
    taken = {instance for _, instance in epochs}
    new = os.urandom(4).hex()
    while new in taken:
        new = os.urandom(4).hex()
    later = [[s, i] for s, i in epochs[1:] if s < first_seq] + [[first_seq, new]]
    put(b"epochs", jsoncodec.dumps(later))
    return new


def delivery_id(instance: str, seq: int) -> str:
    return f"{instance}-{seq:010d}"


class Epochs:
    """The instance ids that name a store's seqs (`read_epochs`): delivery ids both ways."""

    def __init__(self, epochs: tuple[tuple[int, str], ...]) -> None:
        self.epochs = epochs
        self.instance = epochs[-1][1]  # names the deliveries stored from now on
        self._current_from = epochs[-1][0]

    def instance_of(self, seq: int) -> str:
        """The instance id that names `seq`: the one of the epoch it falls in."""
        if seq >= self._current_from:
            return self.instance
        return next((i for first, i in reversed(self.epochs) if first <= seq), self.epochs[0][1])

    def delivery_id_of(self, seq: int) -> str:
        return delivery_id(self.instance_of(seq), seq)

    def seq_of(self, text: str) -> int | None:
        """The seq a delivery id names in this store, or None when its instance is not the
        one of that seq's epoch (a bare seq is taken as is)."""
        instance, dash, num = text.rpartition("-")
        if not num.isdigit():
            return None
        seq = int(num)
        return seq if not dash or instance == self.instance_of(seq) else None


class Inbox:
    """Transaction bodies over one Store. Methods named `*_txn` run inside a given txn."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dbs = store.dbs
        self.names = Epochs(instance_epochs(store))  # changes only by a restore, server stopped
        self.epochs = self.names.epochs
        self.instance = self.names.instance  # names the deliveries stored from now on
        # Flow ids claimed by each delivery this process is accepting over several commits,
        # as committed so far (intake.py keeps it; flowindex.Lookup reads it).
        self.receiving: dict[int, set[str]] = {}

    def instance_of(self, seq: int) -> str:
        return self.names.instance_of(seq)

    def delivery_id_of(self, seq: int) -> str:
        return self.names.delivery_id_of(seq)

    def seq_of(self, text: str) -> int | None:
        return self.names.seq_of(text)

    # -- records: load -> apply -> store ----------------------------------------------------
    def load_txn(self, txn: Txn, seq: int) -> Record | None:
        raw = txn.get(seq_key(seq), db=self.dbs.deliveries)
        return decode_record(raw, self.delivery_id_of(seq)) if raw is not None else None

    def decode(self, key: bytes, raw: bytes) -> Record:
        """A record as found by a cursor over `deliveries`."""
        return decode_record(raw, self.delivery_id_of(key_seq(key)))

    def save_txn(self, txn: Txn, rec: Record, before: Record | None) -> None:
        """Store `rec` (which was `before`) and the index entries its state implies."""
        dbs, skey = self.dbs, seq_key(rec.seq)
        txn.put(skey, encode_record(rec), db=dbs.deliveries)
        old = before.state if before is not None else None
        if rec.state in QUEUED:
            txn.put(skey, queue_value(rec.next_at, rec.state is State.IMPORTING), db=dbs.queue)
        elif old in QUEUED:
            txn.delete(skey, db=dbs.queue)
        if rec.state is State.DEAD and old is not State.DEAD:
            txn.put(skey, b"", db=dbs.dead)
        elif old is State.DEAD and rec.state is not State.DEAD:
            txn.delete(skey, db=dbs.dead)
        if rec.state is State.DONE and old is not State.DONE:
            txn.put(done_key(rec), b"", db=dbs.done)  # until retention prunes the body

    def update_txn(
        self, txn: Txn, seq: int, apply: Callable[[Record], Record]
    ) -> tuple[Record | None, Record | None]:
        """Load the record, apply a lifecycle function, store the result: (before, after)."""
        before = self.load_txn(txn, seq)
        if before is None:
            return None, None
        after = apply(before)
        self.save_txn(txn, after, before)
        return before, after

    def body_txn(self, txn: Txn, seq: int) -> bytes | None:
        raw = txn.get(seq_key(seq), db=self.dbs.bodies)
        return bytes(raw) if raw is not None else None

    def has_body_txn(self, txn: Txn, seq: int) -> bool:
        with txn.cursor(db=self.dbs.bodies) as cur:
            return bool(cur.set_key(seq_key(seq)))

    # -- intake (the steps themselves are in intake.py) -------------------------------------
    def next_seq_txn(self, txn: Txn) -> int:
        with txn.cursor(db=self.dbs.deliveries) as cur:
            return key_seq(cur.key()) + 1 if cur.last() else 1

    def store_accepted_txn(self, txn: Txn, rec: Record, body: bytes) -> None:
        """A delivery stored whole: pending, queued, its body kept and its run counted."""
        self.save_txn(txn, rec, None)
        txn.put(seq_key(rec.seq), body, db=self.dbs.bodies)
        self.count_run_txn(txn, rec, len(rec.flows), rec.duplicate_flows)

    def begin_receiving_txn(self, txn: Txn, seq: int, item: Incoming) -> None:
        """A delivery claimed over several commits: its body and a `receiving` record now."""
        d = item.delivery
        rec = lifecycle.receive(
            seq,
            received_at=item.received_at,
            run_id=d.cost_basis_run_id,
            ghost_user_id=d.ghost_user_id,
            flow_count=len(d.flow_ids),
            in_body_duplicates=d.in_body_duplicates,
            body_bytes=len(item.body),
        )
        self.save_txn(txn, rec, None)
        txn.put(seq_key(seq), item.body, db=self.dbs.bodies)

    def complete_txn(self, txn: Txn, seq: int, flows: tuple[str, ...], examined: int) -> None:
        """A `receiving` delivery becomes pending with the flow ids it claimed; parts go."""
        self.drop_parts_txn(txn, seq)
        _, rec = self.update_txn(txn, seq, lambda r: lifecycle.complete(r, flows, examined))
        if rec is not None:
            self.count_run_txn(txn, rec, len(rec.flows), rec.duplicate_flows)

    def put_part_txn(self, txn: Txn, seq: int, part: int, flows: list[str]) -> None:
        txn.put(attempt_key(seq, part), jsoncodec.dumps(flows), db=self.dbs.parts)

    def parts_of_txn(self, txn: Txn, seq: int) -> list[str]:
        """The new flow ids of the committed parts of delivery `seq` (receiving)."""
        prefix, out = seq_key(seq), []
        with txn.cursor(db=self.dbs.parts) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                out.extend(json.loads(cur.value()))
                ok = cur.next()
        return out

    def drop_parts_txn(self, txn: Txn, seq: int) -> None:
        prefix = seq_key(seq)
        with txn.cursor(db=self.dbs.parts) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                ok = cur.delete()

    def receiving_txn(self, txn: Txn) -> dict[int, list[str]]:
        """Deliveries still `receiving` (a crash or a failed commit cut them short) with the
        new flow ids of their committed parts, in order."""
        out: dict[int, list[str]] = {}
        with txn.cursor(db=self.dbs.parts) as cur:
            for key, raw in cur:
                out.setdefault(key_seq(key), []).extend(json.loads(raw))
        return out

    def finish_receiving_txn(self, txn: Txn) -> int:
        """At start: every `receiving` delivery becomes pending with the flow ids it claimed
        (its sender was not answered, and its retry claims the rest). Returns how many."""
        finished = 0
        for seq, flows in self.receiving_txn(txn).items():
            rec = self.load_txn(txn, seq)
            if rec is None or rec.state is not State.RECEIVING:
                self.drop_parts_txn(txn, seq)
                continue
            self.complete_txn(txn, seq, tuple(flows), rec.flow_count or len(flows))
            finished += 1
        return finished

    def count_run_txn(self, txn: Txn, rec: Record, new: int, dup: int) -> None:
        self.count_page_txn(txn, rec.run_id, rec.ghost_user_id, rec.received_at, new, dup)

    def count_page_txn(
        self, txn: Txn, run_id: str, user: str, now: float, new: int, dup: int
    ) -> None:
        key, runs = flow_key(run_id), self.dbs.runs
        run = txn.staged(runs, key)
        if run is None:
            raw = txn.get(key, db=runs)
            run = decode_run(raw) if raw is not None else RunStats(run_id, user, now, now)
        txn.stage(runs, key, run.counted(now, new, dup), encode_run)

    # -- the importer's queue ---------------------------------------------------------------
    def due_txn(
        self, txn: Txn, now: float, limit: int, exclude: set[int]
    ) -> tuple[list[int], float | None]:
        """Up to `limit` pending seqs due now, FIFO; and the earliest future due time."""
        ready: list[int] = []
        wake: float | None = None
        with txn.cursor(db=self.dbs.queue) as cur:
            for key, raw in cur:
                seq = key_seq(key)
                next_at, importing = parse_queue_value(raw)
                if importing or seq in exclude:
                    continue
                if next_at <= now:
                    ready.append(seq)
                    if len(ready) >= limit:
                        break
                elif wake is None or next_at < wake:
                    wake = next_at
        return ready, wake

    def importing_txn(self, txn: Txn) -> list[int]:
        with txn.cursor(db=self.dbs.queue) as cur:
            return [key_seq(k) for k, v in cur if parse_queue_value(v)[1]]

    def dead_seqs_txn(self, txn: Txn) -> list[int]:
        with txn.cursor(db=self.dbs.dead) as cur:
            return [key_seq(k) for k in cur.iternext(keys=True, values=False)]

    def put_output_txn(self, txn: Txn, seq: int, n: int, output: dict[str, str]) -> None:
        txn.put(attempt_key(seq, n), jsoncodec.dumps(output), db=self.dbs.attempts)

    def drop_output_txn(self, txn: Txn, seq: int, n: int) -> None:
        txn.delete(attempt_key(seq, n), db=self.dbs.attempts)

    def output_txn(self, txn: Txn, seq: int, n: int) -> dict[str, str] | None:
        raw = txn.get(attempt_key(seq, n), db=self.dbs.attempts)
        return json.loads(raw) if raw is not None else None

    def set_paused_txn(self, txn: Txn, state: PauseState) -> None:
        txn.put(b"importer_paused", encode_pause(state), db=self.dbs.state)

    def paused_txn(self, txn: Txn) -> PauseState:
        return decode_pause(txn.get(b"importer_paused", db=self.dbs.state))

    # -- reads ------------------------------------------------------------------------------
    def records_txn(
        self, txn: Txn, state: State | None, limit: int, newest_first: bool
    ) -> list[Record]:
        out: list[Record] = []
        index = {State.PENDING: self.dbs.queue, State.IMPORTING: self.dbs.queue}
        source = self.dbs.dead if state is State.DEAD else index.get(state, self.dbs.deliveries)  # type: ignore[arg-type]
        with txn.cursor(db=source) as cur:
            ok = cur.last() if newest_first else cur.first()
            while ok and len(out) < limit:
                rec = self.load_txn(txn, key_seq(cur.key()))
                if rec is not None and (state is None or rec.state is state):
                    out.append(rec)
                ok = cur.prev() if newest_first else cur.next()
        return out

    def iter_records_txn(self, txn: Txn, after: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """(seq key, encoded record) from seq `after + 1` on, in seq order."""
        with txn.cursor(db=self.dbs.deliveries) as cur:
            if cur.set_range(seq_key(after + 1)):
                yield from cur

    def summary_txn(self, txn: Txn, *, size_bytes: int) -> InboxSummary:
        dbs = self.dbs
        total = txn.stat(dbs.deliveries)["entries"]
        queued = txn.stat(dbs.queue)["entries"]
        dead = txn.stat(dbs.dead)["entries"]
        with txn.cursor(db=dbs.parts) as cur:  # keys only: one seq per delivery
            receiving = len({k[:8] for k in cur.iternext(values=False)})
        importing = 0
        oldest: float | None = None
        with txn.cursor(db=dbs.queue) as cur:
            for key, raw in cur:
                importing += parse_queue_value(raw)[1]
                if oldest is None:
                    rec = self.load_txn(txn, key_seq(key))
                    oldest = rec.received_at if rec else None
        return InboxSummary(
            pending=queued - importing,
            importing=importing,
            done=total - queued - dead - receiving,
            dead=dead,
            receiving=receiving,
            total=total,
            flows=txn.stat(dbs.flows)["entries"] + txn.stat(dbs.flows_exact)["entries"],
            runs=txn.stat(dbs.runs)["entries"],
            oldest_pending_at=oldest,
            size_bytes=size_bytes,
            paused=self.paused_txn(txn).paused,
        )

    def runs_txn(self, txn: Txn, limit: int) -> list[RunStats]:
        with txn.cursor(db=self.dbs.runs) as cur:
            rows = [decode_run(v) for _, v in cur]
        rows.sort(key=lambda r: r.last_seen, reverse=True)
        return rows[:limit]

    def run_txn(self, txn: Txn, run_id: str) -> RunStats | None:
        key = flow_key(run_id)
        staged: RunStats | None = txn.staged(self.dbs.runs, key)
        if staged is not None:
            return staged
        raw = txn.get(key, db=self.dbs.runs)
        return decode_run(raw) if raw is not None else None


def probe_txn(store: Store) -> Callable[[Txn], None]:
    """A tiny write used to learn whether the store takes writes again after a full disk."""

    def probe(txn: Txn) -> None:
        txn.put(b"probe", struct.pack(">d", time.time()), db=store.dbs.state)

    return probe
