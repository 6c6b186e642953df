"""The write-ahead inbox and the flow-id index: what a record is and how it moves.

Theory of operation
-------------------
Sub-databases of the one LMDB environment (see store.py):

    deliveries  seq (8 bytes, big-endian)  -> delivery record (JSON)
    bodies      seq                        -> raw body bytes, exactly as received and verified
    attempts    seq + attempt (4 bytes)    -> captured output of one importer attempt
    parts       seq + part (4 bytes)       -> new flow ids (JSON list) of one committed slice
                                              of a delivery still `receiving` (intake.py)
    flows       flow key                   -> seq of the delivery that claimed the flow id
                                              (index environment, see store.py)
    index_meta  applied_seq, boot_id, clean -> how far the index has applied the inbox
    queue       seq                        -> (next attempt time, importing flag) while the
                                              delivery is pending or importing
    dead        seq                        -> b"" while the delivery is dead
    done        done time (ms) + seq       -> b"" until retention prunes the body
    runs        run key                    -> per cost_basis_run_id record (JSON)
    state       name                       -> store-wide values (instance id, importer paused)

* `seq` grows by one per stored delivery and gives FIFO order. The delivery id shown to users
  and importers is ``<instance>-<seq>``, where the instance id is drawn once when the store is
  created, so ids never repeat even if a store is wiped and recreated.
* Accepting a delivery is a group-commit operation of one step (a big delivery: one step per
  slice of flow ids, see intake.py): for every distinct flow id of the body,
  ``put(flow key, seq, overwrite=False)`` claims it if nobody has (one C call answers "was it
  new"). If at least one was new, the record, the body and a queue entry are written in the
  same transaction; otherwise nothing but the run record changes and the answer is
  `duplicate`. Because one writer runs these in commit order, two overlapping deliveries can
  never both claim a flow id, and the answer is exact.
* Only the new flow ids are kept in the record: they are exactly what the importer must see,
  and replaying records in seq order (`rebuild_index`) re-derives the flow index exactly.
* Flow keys: ``=`` + UTF-8 bytes, or ``#`` + SHA-256 of them when longer than LMDB's key limit.
* A delivery is done (imported) or dead only through the importer's commits; its flow ids stay
  claimed forever, even after retention prunes its body.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .payload import Delivery
from .store import Store, Txn

MAX_RAW_KEY = 480
STATES = ("pending", "importing", "done", "dead")


def seq_key(seq: int) -> bytes:
    return struct.pack(">Q", seq)


def key_seq(key: bytes) -> int:
    return int(struct.unpack(">Q", key)[0])


def flow_key(flow_id: str) -> bytes:
    raw = flow_id.encode()
    if len(raw) <= MAX_RAW_KEY:
        return b"=" + raw
    return b"#" + hashlib.sha256(raw).digest()


run_key = flow_key


def queue_value(next_at: float, importing: bool) -> bytes:
    return struct.pack(">dB", next_at, importing)


def parse_queue_value(raw: bytes) -> tuple[float, bool]:
    next_at, importing = struct.unpack(">dB", raw)
    return float(next_at), bool(importing)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def instance_id(store: Store) -> str:
    """The store's instance id, created on first use."""

    def get_or_make(txn: Txn) -> str:
        value = txn.get(b"instance", db=store.dbs.state)
        if value is None:
            value = os.urandom(4).hex().encode()
            txn.put(b"instance", value, db=store.dbs.state)
        return str(value.decode())

    found = store.read(lambda txn: txn.get(b"instance", db=store.dbs.state))
    return found.decode() if found is not None else store.write(get_or_make)


def delivery_id(instance: str, seq: int) -> str:
    return f"{instance}-{seq:010d}"


def parse_delivery_id(text: str) -> int | None:
    _, _, num = text.rpartition("-")
    return int(num) if num.isdigit() else None


def new_record(
    seq: int,
    *,
    received_at: float,
    run: str,
    user: str,
    flows: list[str],
    duplicate_flows: int = 0,
    in_body_duplicates: int = 0,
    body_bytes: int = 0,
) -> dict[str, Any]:
    """The delivery record as stored, pending and never attempted (the one place its layout
    is written; the bench's bulk loader builds its records here too)."""
    return {
        "seq": seq,
        "received_at": received_at,
        "run": run,
        "user": user,
        "state": "pending",
        "flows": flows,
        "duplicate_flows": duplicate_flows,
        "in_body_duplicates": in_body_duplicates,
        "body_bytes": body_bytes,
        "attempts": [],
        "next_at": received_at,
        "reruns": 0,
    }


@dataclass(frozen=True, slots=True)
class Incoming:
    delivery: Delivery
    body: bytes
    received_at: float
    want_owners: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    status: str  # "accepted" | "duplicate"
    delivery_id: str | None
    seq: int | None
    new: int
    duplicate: int
    owners: frozenset[int] = field(default_factory=frozenset)


class Inbox:
    """Transaction bodies over one Store. Methods named `*_txn` run inside a given txn."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dbs = store.dbs
        self.instance = instance_id(store)

    def delivery_id_of(self, seq: int) -> str:
        return delivery_id(self.instance, seq)

    # -- intake (the steps themselves are in intake.py) -------------------------------------
    def next_seq_txn(self, txn: Txn) -> int:
        with txn.cursor(db=self.dbs.deliveries) as cur:
            return key_seq(cur.key()) + 1 if cur.last() else 1

    def begin_receiving_txn(self, txn: Txn, seq: int, item: Incoming) -> None:
        """A delivery claimed over several commits: its body and a `receiving` record now."""
        d = item.delivery
        rec = new_record(
            seq,
            received_at=item.received_at,
            run=d.cost_basis_run_id,
            user=d.ghost_user_id,
            flows=[],
            in_body_duplicates=d.in_body_duplicates,
            body_bytes=len(item.body),
        )
        rec["state"], rec["flow_count"] = "receiving", len(d.flow_ids)
        self.put_record_txn(txn, rec)
        txn.put(seq_key(seq), item.body, db=self.dbs.bodies)

    def put_part_txn(self, txn: Txn, seq: int, part: int, flows: list[str]) -> None:
        txn.put(seq_key(seq) + struct.pack(">I", part), _dumps(flows), db=self.dbs.parts)

    def drop_parts_txn(self, txn: Txn, seq: int) -> None:
        prefix = seq_key(seq)
        with txn.cursor(db=self.dbs.parts) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                ok = cur.delete()

    def store_record_txn(
        self,
        txn: Txn,
        seq: int,
        *,
        received_at: float,
        run: str,
        user: str,
        flows: list[str],
        duplicate_flows: int,
        in_body_duplicates: int,
        body: bytes | None,
        body_bytes: int,
    ) -> None:
        """The record as the importer will take it: pending, queued, its run counted. `body`
        is None when it was stored already (a delivery that was `receiving`)."""
        record = new_record(
            seq,
            received_at=received_at,
            run=run,
            user=user,
            flows=flows,
            duplicate_flows=duplicate_flows,
            in_body_duplicates=in_body_duplicates,
            body_bytes=body_bytes,
        )
        skey = seq_key(seq)
        txn.put(skey, _dumps(record), db=self.dbs.deliveries)
        if body is not None:
            txn.put(skey, body, db=self.dbs.bodies)
        txn.put(skey, queue_value(received_at, False), db=self.dbs.queue)
        self.count_run_txn(txn, run, user, received_at, len(flows), duplicate_flows)

    def count_run_txn(
        self, txn: Txn, run_id: str, user: str, now: float, new: int, dup: int
    ) -> None:
        key = run_key(run_id)
        raw = txn.get(key, db=self.dbs.runs)
        if raw is None:
            run: dict[str, Any] = {
                "run_id": run_id,
                "ghost_user_id": user,
                "pages": 0,
                "accepted_pages": 0,
                "duplicate_pages": 0,
                "flows_new": 0,
                "flows_duplicate": 0,
                "first_seen": now,
            }
        else:
            run = json.loads(raw)
        run["pages"] += 1
        run["accepted_pages" if new else "duplicate_pages"] += 1
        run["flows_new"] += new
        run["flows_duplicate"] += dup
        run["last_seen"] = now
        txn.put(key, _dumps(run), db=self.dbs.runs)

    def receiving_txn(self, txn: Txn) -> dict[int, list[str]]:
        """Deliveries still `receiving` (a crash or a failed commit cut them short) with the
        new flow ids of their committed parts, in order."""
        out: dict[int, list[str]] = {}
        with txn.cursor(db=self.dbs.parts) as cur:
            for key, raw in cur:
                out.setdefault(key_seq(key[:8]), []).extend(json.loads(raw))
        return out

    def finish_receiving_txn(self, txn: Txn) -> int:
        """At start: every `receiving` delivery becomes pending with the flow ids it claimed
        (its sender was not answered, and its retry claims the rest). Returns how many."""
        finished = 0
        for seq, flows in self.receiving_txn(txn).items():
            self.drop_parts_txn(txn, seq)
            rec = self.record_txn(txn, seq)
            if rec is None or rec["state"] != "receiving":
                continue
            self.store_record_txn(
                txn,
                seq,
                received_at=rec["received_at"],
                run=rec["run"],
                user=rec["user"],
                flows=flows,
                duplicate_flows=rec["flow_count"] - len(flows),
                in_body_duplicates=rec["in_body_duplicates"],
                body=None,
                body_bytes=rec["body_bytes"],
            )
            finished += 1
        return finished

    # -- records ----------------------------------------------------------------------------
    def record_txn(self, txn: Txn, seq: int) -> dict[str, Any] | None:
        raw = txn.get(seq_key(seq), db=self.dbs.deliveries)
        if raw is None:
            return None
        rec: dict[str, Any] = json.loads(raw)
        rec["delivery_id"] = delivery_id(self.instance, seq)
        return rec

    def put_record_txn(self, txn: Txn, rec: dict[str, Any]) -> None:
        body = {k: v for k, v in rec.items() if k != "delivery_id"}
        txn.put(seq_key(rec["seq"]), _dumps(body), db=self.dbs.deliveries)

    def body_txn(self, txn: Txn, seq: int) -> bytes | None:
        raw = txn.get(seq_key(seq), db=self.dbs.bodies)
        return bytes(raw) if raw is not None else None

    def find(self, id_or_seq: str) -> int | None:
        seq = parse_delivery_id(id_or_seq)
        if seq is None:
            return None
        exists = self.store.read(lambda txn: txn.get(seq_key(seq), db=self.dbs.deliveries))
        return seq if exists is not None else None

    def records(
        self, *, state: str | None = None, limit: int = 50, newest_first: bool = True
    ) -> list[dict[str, Any]]:
        def scan(txn: Txn) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            db = {"pending": self.dbs.queue, "importing": self.dbs.queue, "dead": self.dbs.dead}
            source = db.get(state or "", self.dbs.deliveries)
            with txn.cursor(db=source) as cur:
                ok = cur.last() if newest_first else cur.first()
                while ok and len(out) < limit:
                    rec = self.record_txn(txn, key_seq(cur.key()))
                    if rec is not None and (state is None or rec["state"] == state):
                        out.append(rec)
                    ok = cur.prev() if newest_first else cur.next()
            return out

        return self.store.read(scan)

    def counts(self) -> dict[str, Any]:
        def count(txn: Txn) -> dict[str, Any]:
            total = txn.stat(self.dbs.deliveries)["entries"]
            queued = txn.stat(self.dbs.queue)["entries"]
            dead = txn.stat(self.dbs.dead)["entries"]
            with txn.cursor(db=self.dbs.parts) as cur:  # keys only: one seq per delivery
                receiving = len({k[:8] for k in cur.iternext(values=False)})
            importing = 0
            oldest: float | None = None
            with txn.cursor(db=self.dbs.queue) as cur:
                for key, raw in cur:
                    importing += parse_queue_value(raw)[1]
                    if oldest is None:
                        rec = self.record_txn(txn, key_seq(key))
                        oldest = rec["received_at"] if rec else None
            return {
                "pending": queued - importing,
                "importing": importing,
                "done": total - queued - dead - receiving,
                "dead": dead,
                "receiving": receiving,
                "total": total,
                "flows": txn.stat(self.dbs.flows)["entries"],
                "runs": txn.stat(self.dbs.runs)["entries"],
                "oldest_pending_at": oldest,
            }

        return self.store.read(count)

    # -- flows and runs ---------------------------------------------------------------------
    def flows(self, flow_ids: list[str]) -> list[dict[str, Any]]:
        def look(txn: Txn) -> list[dict[str, Any]]:
            out = []
            for fid in flow_ids:
                owner = txn.get(flow_key(fid), db=self.dbs.flows)
                if owner is None:
                    out.append({"flow_id": fid, "known": False})
                    continue
                rec = self.record_txn(txn, key_seq(owner)) or {}
                out.append(
                    {
                        "flow_id": fid,
                        "known": True,
                        "delivery_id": delivery_id(self.instance, key_seq(owner)),
                        "state": rec.get("state", "unknown"),
                        "received_at": rec.get("received_at"),
                        "imported_at": rec.get("done_at") if rec.get("state") == "done" else None,
                        "cost_basis_run_id": rec.get("run"),
                    }
                )
            return out

        return self.store.read(look)

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        def scan(txn: Txn) -> list[dict[str, Any]]:
            with txn.cursor(db=self.dbs.runs) as cur:
                rows = [json.loads(v) for _, v in cur]
            rows.sort(key=lambda r: r.get("last_seen", 0), reverse=True)
            return rows[:limit]

        return self.store.read(scan)

    def run(self, run_id: str) -> dict[str, Any] | None:
        raw = self.store.read(lambda txn: txn.get(run_key(run_id), db=self.dbs.runs))
        return json.loads(raw) if raw is not None else None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def probe_txn(store: Store) -> Any:
    """A tiny write used to learn whether the store takes writes again after a full disk."""

    def probe(txn: Txn) -> None:
        txn.put(b"probe", struct.pack(">d", time.time()), db=store.dbs.state)

    return probe
