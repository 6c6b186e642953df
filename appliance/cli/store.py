"""CLI commands over the store: inbox, flows, runs, rebuild-index, importer pause|resume.

They open the store directly through its `Backend` (safe beside a running server: LMDB
serialises writers across processes, and the server's dispatcher re-reads the queue and the
pause flag at least once a second, so a retry or a pause made here takes effect within 2 s).
Writes are the backend's async operations, run inline (`lmdbbackend.run_inline`): without a
writer task they never suspend, so the CLI imports no event loop.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from ..backend import Backend
from ..backend import open_backend as open_store
from ..configrules import DSN_PATH
from ..durations import format_age, parse_duration
from ..errors import CommandFailed
from ..lmdbbackend import LmdbBackend, run_inline
from ..record import Record, RecordDetail, RunStats, State
from .common import EXIT_FAILED, EXIT_OK, emit, load, table, when


def open_backend(args: argparse.Namespace, *, must_exist: bool = True) -> Backend:
    """The store the config names: the LMDB directory, or the PostgreSQL database (its DSN
    is the one secret these commands read)."""
    cfg = load(args, resolve_only=(DSN_PATH,)).config
    if cfg.store.backend == "postgresql":
        return open_store(cfg, serving=False)
    path = Path(cfg.store.path)
    if must_exist and not (path / "data.mdb").exists():
        raise CommandFailed(f"no store at {path} (has the appliance run with this config?)")
    return LmdbBackend(path, initial_map_bytes=cfg.store.initial_map_bytes)


def _row(rec: Record) -> dict[str, Any]:
    last = rec.last_attempt
    return {
        "delivery_id": rec.delivery_id,
        "state": rec.state.value,
        "received_at": when(rec.received_at),
        "cost_basis_run_id": rec.run_id,
        "flows": len(rec.flows),
        "duplicates": rec.duplicate_flows,
        "attempts": len(rec.attempts),
        "last_result": last.summary if last is not None else None,
        "next_attempt_at": when(rec.next_at) if rec.state is State.PENDING else None,
        "reruns": rec.reruns,
    }


def inbox(args: argparse.Namespace) -> int:
    return {"list": _list, "show": _show, "retry": _retry, "purge": _purge}[args.action](args)


def _list(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    state = State(args.state) if args.state else None
    rows = [_row(r) for r in backend.records(state=state, limit=args.limit)]
    cols = ["delivery_id", "state", "received_at", "cost_basis_run_id", "flows", "attempts"]
    emit(args, rows, lambda: table(rows, [*cols, "last_result"]))
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    seq = backend.find(args.id)
    found = backend.detail(seq) if seq is not None else None
    if found is None:
        raise CommandFailed(f"no delivery {args.id}")
    doc = _detail_doc(found)
    if args.body:
        doc["body"] = _body_text(found)

    def text() -> str:
        lines = [
            f"{k:18} {v}" for k, v in doc.items() if k not in ("attempt_log", "flow_ids", "body")
        ]
        lines.append(
            f"{'flow_ids':18} {', '.join(doc['flow_ids'][:20])}"
            + (f" ... (+{len(doc['flow_ids']) - 20})" if len(doc["flow_ids"]) > 20 else "")
        )
        for a in doc["attempt_log"]:
            lines.append(
                f"\nattempt {a['attempt']}: {a['outcome']} ({a['result']}) "
                f"started {a['started_at']} took {a['duration_seconds']} s"
            )
            for stream in ("stdout", "stderr", "response"):
                out = (a["output"] or {}).get(stream)
                if out:
                    lines.append(f"  --- {stream} (last 64 KiB) ---")
                    lines.extend("  " + line for line in out.rstrip().splitlines()[-40:])
        if args.body:
            lines.append("\n--- body ---\n" + (doc["body"] or "(pruned)"))
        return "\n".join(lines)

    emit(args, doc, text)
    return EXIT_OK


def _body_text(found: RecordDetail) -> str | None:
    return found.body.decode("utf-8", "replace") if found.body is not None else None


def _detail_doc(found: RecordDetail) -> dict[str, Any]:
    rec = found.record
    return _row(rec) | {
        "flow_ids": list(rec.flows),
        "in_body_duplicates": rec.in_body_duplicates,
        "body_bytes": rec.body_bytes,
        "body_kept": found.body is not None,
        "imported_at": when(rec.done_at),
        "attempt_log": [
            {
                "attempt": a.n,
                "started_at": when(a.started_at),
                "ended_at": when(a.ended_at),
                "outcome": a.outcome.value if a.outcome is not None else "running",
                "result": a.summary,
                "duration_seconds": a.duration,
                "output": output,
            }
            for a, output in zip(rec.attempts, found.outputs, strict=True)
        ],
    }


def _retry(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    if not args.ids and not args.dead:
        raise CommandFailed("give delivery ids or --dead")
    seqs: list[tuple[str | None, int | None]] = [(i, backend.find(i)) for i in args.ids]
    if args.dead:
        seqs += [(None, s) for s in backend.dead_seqs()]
    now = time.time()

    async def retry_all() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for given, seq in seqs:
            if seq is None:
                out.append({"delivery_id": given, "result": "not found"})
            else:
                result = await backend.retry(seq, now)
                out.append({"delivery_id": backend.delivery_id(seq), "result": result})
        return out

    results = run_inline(retry_all)
    emit(args, results, lambda: table(results, ["delivery_id", "result"]))
    return EXIT_OK if all(r["result"] == "queued" for r in results) else EXIT_FAILED


def _purge(args: argparse.Namespace) -> int:
    age = parse_duration(args.older_than)
    backend = open_backend(args)
    now = time.time()
    purged = run_inline(lambda: backend.purge(now - age, args.include_dead, now))
    doc = {"purged": purged, "older_than_seconds": age, "include_dead": args.include_dead}
    emit(
        args,
        doc,
        lambda: (
            f"purged bodies and outputs of {purged} deliveries older than "
            f"{format_age(age)} (flow ids stay known)"
        ),
    )
    return EXIT_OK


def flows(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    rows = []
    for found in backend.flows(args.flow_ids):
        rec = found.record
        if found.seq is None:
            rows.append({"flow_id": found.flow_id, "known": False})
            continue
        rows.append(
            {
                "flow_id": found.flow_id,
                "known": True,
                "delivery_id": backend.delivery_id(found.seq),
                "state": rec.state.value if rec is not None else "unknown",
                "received_at": when(rec.received_at) if rec is not None else None,
                "imported_at": when(rec.done_at) if rec is not None else None,
                "cost_basis_run_id": rec.run_id if rec is not None else None,
            }
        )
    cols = ["flow_id", "known", "delivery_id", "state", "received_at", "imported_at"]
    emit(args, rows, lambda: table(rows, cols))
    return EXIT_OK if all(r["known"] for r in rows) else EXIT_FAILED


def _run_row(r: RunStats) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "ghost_user_id": r.ghost_user_id,
        "pages": r.pages,
        "accepted_pages": r.accepted_pages,
        "duplicate_pages": r.duplicate_pages,
        "flows_new": r.flows_new,
        "flows_duplicate": r.flows_duplicate,
        "first_seen": when(r.first_seen),
        "last_seen": when(r.last_seen),
    }


def runs(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    if args.action == "list":
        rows = [_run_row(r) for r in backend.runs(args.limit)]
        cols = ["run_id", "pages", "flows_new", "flows_duplicate", "first_seen", "last_seen"]
        emit(args, rows, lambda: table(rows, cols))
        return EXIT_OK
    run = backend.run(args.run_id)
    if run is None:
        raise CommandFailed(f"no run {args.run_id}")
    doc = _run_row(run)
    emit(args, doc, lambda: "\n".join(f"{k:16} {v}" for k, v in doc.items()))
    return EXIT_OK


def rebuild_index(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    if not isinstance(backend, LmdbBackend):
        raise CommandFailed(
            "the PostgreSQL store has no separate flow index to rebuild: its claims are the "
            "primary key of ct_flows"
        )
    started = time.monotonic()
    with backend.maintenance():
        claimed = backend.rebuild_index()
    doc = {"flow_ids": claimed, "seconds": round(time.monotonic() - started, 3)}
    emit(args, doc, lambda: f"rebuilt the flow index: {claimed} flow ids in {doc['seconds']} s")
    return EXIT_OK


def importer(args: argparse.Namespace) -> int:
    backend = open_backend(args, must_exist=False)
    paused = args.action == "pause"
    by = f"cli (uid {os.getuid()})"
    run_inline(lambda: backend.set_paused(paused, by, time.time()))
    if paused:
        print(
            "importer paused: deliveries are still accepted and queued; a running import "
            "finishes. Resume with: ct-appliance importer resume"
        )
    else:
        print("importer resumed: queued deliveries will be imported")
    return EXIT_OK
