"""`ct-appliance db import-lmdb PATH`: move an embedded LMDB store into the PostgreSQL store.

The LMDB store is held exclusively (no server may run on it) and made consistent first (the
same recovery a server start does). Everything is then copied in ONE PostgreSQL transaction,
with COPY, so the database either holds the whole store or nothing of it:

* every record, as it is (attempts, reruns, dead letters, done times), with its body and its
  attempts' output; a record left `importing` by the stopped server goes back to pending as a
  rerun, exactly as the server's own start would have done;
* every flow id claimed, from the records that claimed them (the index is derived state);
* the runs' counts and the importer pause flag;
* the store's instance ids: delivery ids the LMDB store handed out keep naming the same
  deliveries, and a new instance id names the deliveries stored from now on, so no delivery id
  is ever handed out twice (the same rule as `restore`).

The database must be migrated and hold no deliveries: this is a move, not a merge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jsoncodec, lifecycle
from .errors import CommandFailed
from .inbox import begin_epoch, key_seq
from .lmdbbackend import LmdbBackend
from .pgdb import Db
from .pgintake import flow_keys
from .record import State, encode_record
from .store import Txn

IMPORTED_BY = "import-lmdb"  # the ct_counters row of the imported flow ids


@dataclass(frozen=True)
class Imported:
    deliveries: int
    flows: int
    runs: int
    requeued: int
    last_seq: int
    instance: str
    seconds: float


def import_lmdb(path: Path, db: Db) -> Imported:
    """Copy the LMDB store at `path` into the (migrated, empty) database of `db`."""
    if not (path / "data.mdb").exists():
        raise CommandFailed(f"no LMDB store at {path}")
    started = time.monotonic()
    backend = LmdbBackend(path)
    try:
        with backend.maintenance():  # StoreLocked while a server runs on it
            backend.recover()
            return backend.store.read(
                lambda txn: db.run(lambda conn: _copy(backend, txn, conn, started))
            )
    finally:
        backend.close()


def _copy(backend: LmdbBackend, txn: Txn, conn: Any, started: float) -> Imported:
    from . import pgschema

    pgschema.check(conn)
    if conn.execute("SELECT EXISTS (SELECT 1 FROM ct_deliveries)").fetchone()[0]:
        raise CommandFailed(
            "the database already holds deliveries: import-lmdb moves a store into an empty "
            "database (this is a move, not a merge)"
        )
    inbox = backend.inbox
    now = time.time()
    deliveries = flows = requeued = last_seq = 0
    with conn.cursor() as cur:
        with cur.copy(
            "COPY ct_deliveries (seq, state, received_at, next_at, done_at, body_kept, record) "
            "FROM STDIN"
        ) as copy:
            for key, raw in inbox.iter_records_txn(txn):
                rec = inbox.decode(key, raw)
                if rec.state is State.IMPORTING:
                    rec = lifecycle.requeue(rec, now, "interrupted: store moved to PostgreSQL")
                    requeued += 1
                kept = inbox.has_body_txn(txn, rec.seq)
                row = (rec.seq, rec.state.value, rec.received_at, rec.next_at, rec.done_at, kept)
                copy.write_row((*row, encode_record(rec)))
                deliveries += 1
                last_seq = rec.seq
        with cur.copy("COPY ct_flows (flow_id, seq) FROM STDIN") as copy:
            for key, raw in inbox.iter_records_txn(txn):
                seq = key_seq(key)
                for flow_key in flow_keys(jsoncodec.loads_stored(raw)["flows"]):
                    copy.write_row((flow_key, seq))
                    flows += 1
        with cur.copy("COPY ct_bodies (seq, body) FROM STDIN") as copy:
            for key, _ in inbox.iter_records_txn(txn):
                body = inbox.body_txn(txn, key_seq(key))
                if body is not None:
                    copy.write_row((key_seq(key), body))
        with cur.copy("COPY ct_outputs (seq, n, output) FROM STDIN") as copy:
            for key, raw in inbox.iter_records_txn(txn):
                seq = key_seq(key)
                for attempt in jsoncodec.loads_stored(raw).get("attempts", ()):
                    output = inbox.output_txn(txn, seq, int(attempt["n"]))
                    if output is not None:
                        copy.write_row((seq, int(attempt["n"]), jsoncodec.dumps(output)))
        runs = inbox.runs_txn(txn, limit=1 << 62)
        with cur.copy(
            "COPY ct_runs (run_id, ghost_user_id, first_seen, last_seen, pages, accepted_pages, "
            "duplicate_pages, flows_new, flows_duplicate) FROM STDIN"
        ) as copy:
            for r in runs:
                copy.write_row(
                    (r.run_id, r.ghost_user_id, r.first_seen, r.last_seen, r.pages)
                    + (r.accepted_pages, r.duplicate_pages, r.flows_new, r.flows_duplicate)
                )
    pause = inbox.paused_txn(txn)
    conn.execute(
        "INSERT INTO ct_pause (id, paused, at, by) VALUES (1, %s, %s, %s) "
        "ON CONFLICT (id) DO UPDATE SET paused = EXCLUDED.paused, at = EXCLUDED.at, "
        "by = EXCLUDED.by",
        (pause.paused, pause.at, pause.by),
    )
    conn.execute(
        "INSERT INTO ct_counters (name, flows, deliveries) VALUES (%s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET flows = EXCLUDED.flows, "
        "deliveries = EXCLUDED.deliveries",
        (IMPORTED_BY, flows, deliveries),
    )
    instance = _names(conn, inbox.epochs, last_seq + 1)
    if last_seq:
        conn.execute("SELECT setval('ct_seq', %s)", (last_seq,))
    return Imported(
        deliveries, flows, len(runs), requeued, last_seq, instance, time.monotonic() - started
    )


def _names(conn: Any, epochs: tuple[tuple[int, str], ...], first_new: int) -> str:
    """The LMDB store's instance ids name its seqs; a new one names seqs from `first_new`."""
    meta: dict[bytes, bytes] = {b"instance": epochs[0][1].encode()}
    if len(epochs) > 1:
        meta[b"epochs"] = jsoncodec.dumps([[s, i] for s, i in epochs[1:]])
    new = begin_epoch(meta.get, meta.__setitem__, first_new)
    for key, value in meta.items():
        conn.execute(
            "INSERT INTO ct_meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key.decode(), value.decode()),
        )
    return new
