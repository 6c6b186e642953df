"""Accepting deliveries into the PostgreSQL store: one transaction per group commit.

Each appliance group-commits its own accepts (pgcommit.py): its writer task takes everything
queued and runs it as ONE transaction on a worker thread: `accept_txn`, a pipeline of
statements, then COMMIT, with `synchronous_commit` on.

`accept_txn` claims each delivery's flow ids with `INSERT INTO ct_flows ... ON CONFLICT DO
NOTHING RETURNING` in the same transaction as its record and body. The primary key makes the
claim exact between appliances: a second transaction inserting the same id waits for the first
to end and then does nothing, so a delivery posted to A and re-posted to B is a `duplicate` on
B. Within a batch, statements run in order, so a later delivery sees the claims of an earlier
one. Runs are added to with one upsert per run, in run-id order (one lock order for every
appliance); a deadlock between appliances anyway is run again by pgdb.py.

Nothing is ever `receiving` here: every accept is one transaction, so a crash leaves nothing to
finish. A delivery with more than BIG_DELIVERY flow ids is claimed in a transaction of its own
(pgbackend.py), beside the group commits, so it never holds up small ones.
"""

from __future__ import annotations

from typing import Any

import psycopg

from . import lifecycle
from .inbox import Epochs
from .record import Accepted, Incoming, encode_record

Conn = psycopg.Connection[Any]

BIG_DELIVERY = 2048  # more flow ids than this: claimed in a transaction of its own

RUN_COLUMNS = (
    "run_id, ghost_user_id, first_seen, last_seen, pages, accepted_pages, duplicate_pages, "
    "flows_new, flows_duplicate"
)
_UPSERT_RUN = (
    f"INSERT INTO ct_runs ({RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (run_id) DO UPDATE SET last_seen = greatest(ct_runs.last_seen, "
    "EXCLUDED.last_seen), first_seen = least(ct_runs.first_seen, EXCLUDED.first_seen), "
    "pages = ct_runs.pages + EXCLUDED.pages, "
    "accepted_pages = ct_runs.accepted_pages + EXCLUDED.accepted_pages, "
    "duplicate_pages = ct_runs.duplicate_pages + EXCLUDED.duplicate_pages, "
    "flows_new = ct_runs.flows_new + EXCLUDED.flows_new, "
    "flows_duplicate = ct_runs.flows_duplicate + EXCLUDED.flows_duplicate"
)


def accept_txn(conn: Conn, items: list[Incoming], *, names: Epochs, by: str) -> list[Accepted]:
    """Claim and store every item, in order, in the transaction `conn` is in; `by` is the
    appliance (its ct_counters row)."""
    seqs = [
        int(r[0])
        for r in conn.execute("SELECT nextval('ct_seq') FROM generate_series(1, %s)", (len(items),))
    ]
    with conn.pipeline() as pipe:
        claims = [
            conn.execute(
                "INSERT INTO ct_flows (flow_id, seq) SELECT unnest(%s::text[]), %s "
                "ON CONFLICT DO NOTHING RETURNING flow_id",
                (list(item.delivery.flow_ids), seq),
            )
            for item, seq in zip(items, seqs, strict=True)
        ]
        pipe.sync()
        claimed = [{r[0] for r in cur.fetchall()} for cur in claims]
    out: list[Accepted] = []
    rows: list[tuple[Any, ...]] = []
    bodies: list[tuple[int, bytes]] = []
    runs: dict[str, list[Any]] = {}
    new_total = 0
    for item, seq, got in zip(items, seqs, claimed, strict=True):
        d, ids = item.delivery, item.delivery.flow_ids
        new = tuple(f for f in ids if f in got)
        dup = len(ids) - len(new)
        owners: frozenset[int] = frozenset()
        if item.want_owners and dup:
            owners = _owners(conn, [f for f in ids if f not in got])
        _count_run(runs, item, len(new), dup)
        if not new:
            out.append(Accepted("duplicate", None, None, 0, len(ids), owners))
            continue
        rec = lifecycle.accept(
            seq,
            received_at=item.received_at,
            run_id=d.cost_basis_run_id,
            ghost_user_id=d.ghost_user_id,
            flows=new,
            duplicate_flows=dup,
            in_body_duplicates=d.in_body_duplicates,
            body_bytes=len(item.body),
        )
        rows.append((seq, rec.state.value, rec.received_at, rec.next_at, encode_record(rec)))
        bodies.append((seq, item.body))
        new_total += len(new)
        out.append(Accepted("accepted", names.delivery_id_of(seq), seq, len(new), dup, owners))
    with conn.pipeline(), conn.cursor() as cur:
        if rows:
            cur.executemany(
                "INSERT INTO ct_deliveries (seq, state, received_at, next_at, record) "
                "VALUES (%s, %s, %s, %s, %s)",
                rows,
            )
            cur.executemany("INSERT INTO ct_bodies (seq, body) VALUES (%s, %s)", bodies)
            cur.execute(
                "INSERT INTO ct_counters (name, flows, deliveries) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET flows = ct_counters.flows + EXCLUDED.flows, "
                "deliveries = ct_counters.deliveries + EXCLUDED.deliveries",
                (by, new_total, len(rows)),
            )
        cur.executemany(_UPSERT_RUN, [runs[k] for k in sorted(runs)])
    return out


def _owners(conn: Conn, flow_ids: list[str]) -> frozenset[int]:
    """The deliveries holding these flow ids (`ack: imported` waits for their imports)."""
    found = conn.execute(
        "SELECT DISTINCT seq FROM ct_flows WHERE flow_id = ANY(%s)", (flow_ids,)
    ).fetchall()
    return frozenset(int(r[0]) for r in found)


def _count_run(runs: dict[str, list[Any]], item: Incoming, new: int, dup: int) -> None:
    """One more page of a run in this batch (the row `_UPSERT_RUN` adds to ct_runs)."""
    d, at = item.delivery, item.received_at
    row = runs.get(d.cost_basis_run_id)
    if row is None:
        row = [d.cost_basis_run_id, d.ghost_user_id, at, at, 0, 0, 0, 0, 0]
        runs[d.cost_basis_run_id] = row
    row[2], row[3] = min(row[2], at), max(row[3], at)
    row[4] += 1
    row[5] += int(new > 0)
    row[6] += int(new == 0)
    row[7] += new
    row[8] += dup
