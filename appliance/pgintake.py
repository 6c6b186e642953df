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

from collections.abc import Sequence
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


def flow_keys(flow_ids: Sequence[str]) -> list[str]:
    """The ct_flows keys of flow ids. PostgreSQL text cannot hold NUL, which a flow id may
    (the LMDB store takes it), so an id holding NUL or a backslash is escaped, one to one:
    backslash -> two backslashes, NUL -> backslash 0. Any other id is its own key: one C-level
    look at the joined ids decides for the whole delivery."""
    joined = "".join(flow_ids)
    if "\x00" not in joined and "\\" not in joined:
        return list(flow_ids)
    return [f.replace("\\", "\\\\").replace("\x00", "\\0") for f in flow_ids]


def accept_txn(conn: Conn, items: list[Incoming], *, names: Epochs, by: str) -> list[Accepted]:
    """Claim and store every item, in order, in the transaction `conn` is in; `by` is the
    appliance (its ct_counters row)."""
    seqs = [
        int(r[0])
        for r in conn.execute("SELECT nextval('ct_seq') FROM generate_series(1, %s)", (len(items),))
    ]
    keyed = [flow_keys(item.delivery.flow_ids) for item in items]
    with conn.pipeline() as pipe:
        claims = [
            conn.execute(
                "INSERT INTO ct_flows (flow_id, seq) SELECT unnest(%b::text[]), %s "
                "ON CONFLICT DO NOTHING RETURNING flow_id",
                (keys, seq),
            )
            for keys, seq in zip(keyed, seqs, strict=True)
        ]
        pipe.sync()
        claimed = [{r[0] for r in cur.fetchall()} for cur in claims]
    out: list[Accepted] = []
    rows: list[tuple[Any, ...]] = []
    bodies: list[tuple[int, bytes]] = []
    runs: dict[str, list[Any]] = {}
    new_total = 0
    for item, seq, keys, got in zip(items, seqs, keyed, claimed, strict=True):
        d, ids = item.delivery, item.delivery.flow_ids
        new = tuple(f for f, k in zip(ids, keys, strict=True) if k in got)
        dup = len(ids) - len(new)
        owners: frozenset[int] = frozenset()
        if item.want_owners and dup:
            owners = _owners(conn, [k for k in keys if k not in got])
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


def _owners(conn: Conn, keys: list[str]) -> frozenset[int]:
    """The deliveries holding these flow keys (`ack: imported` waits for their imports)."""
    query = "SELECT DISTINCT seq FROM ct_flows WHERE flow_id = ANY(%b)"
    found = conn.execute(query, (keys,)).fetchall()
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
