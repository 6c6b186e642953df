"""What the PostgreSQL store answers without writing: each function runs inside one
transaction `conn` is in (pgdb.Db.read), and decodes records with the store's instance ids."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from .inbox import Epochs
from .pgintake import RUN_COLUMNS, flow_keys
from .record import (
    FlowOwner,
    InboxSummary,
    PauseState,
    Record,
    RecordDetail,
    RunStats,
    State,
    decode_record,
)

Conn = psycopg.Connection[Any]
NOW = "extract(epoch from clock_timestamp())"  # the database's clock: leases, heartbeats


def record(row: Sequence[Any], names: Epochs) -> Record:
    """A record from a (seq, record) row."""
    return decode_record(row[1], names.delivery_id_of(int(row[0])))


def due(
    conn: Conn, now: float, limit: int, exclude: Iterable[int]
) -> tuple[list[int], float | None]:
    ready = conn.execute(
        "SELECT seq FROM ct_deliveries WHERE state = 'pending' AND next_at <= %s "
        "AND NOT (seq = ANY(%s)) ORDER BY seq LIMIT %s",
        (now, list(exclude), limit),
    ).fetchall()
    wake = conn.execute(
        "SELECT min(next_at) FROM ct_deliveries WHERE state = 'pending' AND next_at > %s",
        (now,),
    ).fetchone()
    return [int(r[0]) for r in ready], (float(wake[0]) if wake and wake[0] else None)


def states(conn: Conn, seqs: set[int]) -> dict[int, State | None]:
    rows = conn.execute(
        "SELECT seq, state FROM ct_deliveries WHERE seq = ANY(%s)", (list(seqs),)
    ).fetchall()
    found = {int(r[0]): State(r[1]) for r in rows}
    return {s: found.get(s) for s in seqs}


def paused(conn: Conn) -> PauseState:
    row = conn.execute("SELECT paused, at, by FROM ct_pause WHERE id = 1").fetchone()
    return PauseState(bool(row[0]), row[1], row[2]) if row is not None else PauseState()


def has_body(conn: Conn, seq: int) -> bool:
    return conn.execute("SELECT 1 FROM ct_bodies WHERE seq = %s", (seq,)).fetchone() is not None


def summary(conn: Conn) -> InboxSummary:
    """Counts from the partial indexes and the per-appliance counters (never a count(*) over
    every delivery or flow id: that is not a status query at 100 M)."""
    counts = dict(
        conn.execute(
            "SELECT 'pending', count(*) FROM ct_deliveries WHERE state = 'pending' "
            "UNION ALL SELECT 'importing', count(*) FROM ct_deliveries "
            "WHERE state = 'importing' UNION ALL SELECT 'dead', count(*) "
            "FROM ct_deliveries WHERE state = 'dead'"
        ).fetchall()
    )
    totals = conn.execute(
        "SELECT coalesce(sum(flows), 0), coalesce(sum(deliveries), 0) FROM ct_counters"
    ).fetchone()
    oldest = conn.execute(
        "SELECT received_at FROM ct_deliveries WHERE state IN ('pending', 'importing') "
        "ORDER BY seq LIMIT 1"
    ).fetchone()
    runs = conn.execute("SELECT count(*) FROM ct_runs").fetchone()
    size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert totals is not None and runs is not None and size is not None
    pending, importing, dead = (int(counts[k]) for k in ("pending", "importing", "dead"))
    total = int(totals[1])
    return InboxSummary(
        pending=pending,
        importing=importing,
        done=max(0, total - pending - importing - dead),
        dead=dead,
        receiving=0,
        total=total,
        flows=int(totals[0]),
        runs=int(runs[0]),
        oldest_pending_at=float(oldest[0]) if oldest else None,
        size_bytes=int(size[0]),
        paused=paused(conn).paused,
    )


def records(
    conn: Conn, names: Epochs, state: State | None, limit: int, newest_first: bool
) -> list[Record]:
    where = "WHERE state = %s" if state is not None else ""
    order = "DESC" if newest_first else "ASC"
    query = f"SELECT seq, record FROM ct_deliveries {where} ORDER BY seq {order} LIMIT %s"
    params = (state.value, limit) if state is not None else (limit,)
    return [record(r, names) for r in conn.execute(query, params).fetchall()]


def exists(conn: Conn, seq: int) -> bool:
    return conn.execute("SELECT 1 FROM ct_deliveries WHERE seq = %s", (seq,)).fetchone() is not None


def detail(conn: Conn, names: Epochs, seq: int) -> RecordDetail | None:
    row = conn.execute("SELECT seq, record FROM ct_deliveries WHERE seq = %s", (seq,)).fetchone()
    if row is None:
        return None
    rec = record(row, names)
    outs = dict(conn.execute("SELECT n, output FROM ct_outputs WHERE seq = %s", (seq,)).fetchall())
    body = conn.execute("SELECT body FROM ct_bodies WHERE seq = %s", (seq,)).fetchone()
    outputs = tuple(json.loads(bytes(outs[a.n])) if a.n in outs else None for a in rec.attempts)
    return RecordDetail(rec, outputs, bytes(body[0]) if body else None)


def dead_seqs(conn: Conn) -> list[int]:
    rows = conn.execute("SELECT seq FROM ct_deliveries WHERE state = 'dead' ORDER BY seq")
    return [int(r[0]) for r in rows.fetchall()]


def flows(conn: Conn, names: Epochs, flow_ids: Sequence[str]) -> list[FlowOwner]:
    keys = flow_keys(flow_ids)
    by_key = dict(
        conn.execute("SELECT flow_id, seq FROM ct_flows WHERE flow_id = ANY(%b)", (keys,))
    )
    owners = {f: by_key[k] for f, k in zip(flow_ids, keys, strict=True) if k in by_key}
    rows = conn.execute(
        "SELECT seq, record FROM ct_deliveries WHERE seq = ANY(%s)", (list(set(owners.values())),)
    ).fetchall()
    recs = {int(r[0]): record(r, names) for r in rows}
    return [
        FlowOwner(f, owners.get(f), recs.get(owners[f]) if f in owners else None) for f in flow_ids
    ]


def runs(conn: Conn, limit: int) -> list[RunStats]:
    rows = conn.execute(
        f"SELECT {RUN_COLUMNS} FROM ct_runs ORDER BY last_seen DESC LIMIT %s", (limit,)
    ).fetchall()
    return [_run(r) for r in rows]


def run(conn: Conn, run_id: str) -> RunStats | None:
    row = conn.execute(f"SELECT {RUN_COLUMNS} FROM ct_runs WHERE run_id = %s", (run_id,))
    found = row.fetchone()
    return _run(found) if found is not None else None


def peers(conn: Conn, me: str, seen_seconds: float) -> list[dict[str, Any]]:
    """The appliances with a heartbeat in the last `seen_seconds` (this one included)."""
    rows = conn.execute(
        f"SELECT name, version, pid, started_at, {NOW} - seen_at FROM ct_appliances "
        f"WHERE seen_at > {NOW} - %s ORDER BY name",
        (seen_seconds,),
    ).fetchall()
    return [
        {
            "name": r[0],
            "version": r[1],
            "pid": r[2],
            "started_at": r[3],
            "seen_seconds_ago": round(float(r[4]), 1),
            "self": r[0] == me,
        }
        for r in rows
    ]


def size_bytes(conn: Conn) -> int:
    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def _run(row: Sequence[Any]) -> RunStats:
    return RunStats(
        run_id=row[0],
        ghost_user_id=row[1],
        first_seen=float(row[2]),
        last_seen=float(row[3]),
        pages=int(row[4]),
        accepted_pages=int(row[5]),
        duplicate_pages=int(row[6]),
        flows_new=int(row[7]),
        flows_duplicate=int(row[8]),
    )
