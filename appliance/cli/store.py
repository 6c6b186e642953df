"""CLI commands over the store: inbox, flows, runs, rebuild-index, importer pause|resume.

They open the LMDB environment directly (safe beside a running server: LMDB serialises
writers across processes, and the server's dispatcher re-reads the queue and the pause flag
at least once a second, so a retry or a pause made here takes effect within 2 s).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import flowindex
from ..durations import format_age, parse_duration
from ..errors import CommandFailed
from ..inbox import Inbox, rfc3339
from ..lifecycle import Transitions
from ..store import Store
from .common import EXIT_FAILED, EXIT_OK, emit, load, table, when

SERVER_LOCK = "server.lock"


def open_store(args: argparse.Namespace, *, must_exist: bool = True) -> tuple[Store, Inbox]:
    cfg = load(args).config
    path = Path(cfg.store.path)
    if must_exist and not (path / "data.mdb").exists():
        raise CommandFailed(f"no store at {path} (has the appliance run with this config?)")
    store = Store(path, initial_map_bytes=cfg.store.initial_map_bytes)
    return store, Inbox(store)


@contextlib.contextmanager
def exclusive_store(store_path: Path) -> Iterator[None]:
    """Hold the store's server lock exclusively, failing if a server holds it (shared)."""
    fd = os.open(store_path / SERVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CommandFailed(
                "the server is running on this store; stop it first (systemctl stop ct-appliance)"
            ) from None
        yield
    finally:
        os.close(fd)


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    last = rec["attempts"][-1] if rec["attempts"] else {}
    return {
        "delivery_id": rec["delivery_id"],
        "state": rec["state"],
        "received_at": when(rec["received_at"]),
        "cost_basis_run_id": rec["run"],
        "flows": len(rec["flows"]),
        "duplicates": rec.get("duplicate_flows", 0),
        "attempts": len(rec["attempts"]),
        "last_result": last.get("summary"),
        "next_attempt_at": when(rec.get("next_at")) if rec["state"] == "pending" else None,
        "reruns": rec.get("reruns", 0),
    }


def inbox(args: argparse.Namespace) -> int:
    return {"list": _list, "show": _show, "retry": _retry, "purge": _purge}[args.action](args)


def _list(args: argparse.Namespace) -> int:
    store, ib = open_store(args)
    rows = [_row(r) for r in ib.records(state=args.state, limit=args.limit)]
    cols = ["delivery_id", "state", "received_at", "cost_basis_run_id", "flows", "attempts"]
    emit(args, rows, lambda: table(rows, [*cols, "last_result"]))
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    store, ib = open_store(args)
    seq = ib.find(args.id)
    if seq is None:
        raise CommandFailed(f"no delivery {args.id}")
    tr = Transitions(ib)

    def read(txn: Any) -> dict[str, Any]:
        rec = ib.record_txn(txn, seq)
        assert rec is not None
        for a in rec["attempts"]:
            a["output"] = tr.output_txn(txn, seq, a["n"])
        body = ib.body_txn(txn, seq)
        rec["body"] = body.decode("utf-8", "replace") if body is not None else None
        return rec

    rec = store.read(read)
    doc = _row(rec) | {
        "flow_ids": rec["flows"],
        "in_body_duplicates": rec.get("in_body_duplicates", 0),
        "body_bytes": rec.get("body_bytes"),
        "body_kept": rec["body"] is not None,
        "imported_at": when(rec.get("done_at")),
        "attempt_log": [
            {
                "attempt": a["n"],
                "started_at": when(a.get("started_at")),
                "ended_at": when(a.get("ended_at")),
                "outcome": a.get("outcome", "running"),
                "result": a.get("summary"),
                "duration_seconds": a.get("duration"),
                "output": a.get("output"),
            }
            for a in rec["attempts"]
        ],
    }
    if args.body:
        doc["body"] = rec["body"]

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


def _retry(args: argparse.Namespace) -> int:
    store, ib = open_store(args)
    tr = Transitions(ib)
    if not args.ids and not args.dead:
        raise CommandFailed("give delivery ids or --dead")
    seqs: list[tuple[str, int | None]] = [(i, ib.find(i)) for i in args.ids]
    if args.dead:
        seqs += [(None, s) for s in store.read(tr.dead_seqs_txn)]  # type: ignore[misc]
    results = []
    now = time.time()
    for given, seq in seqs:
        if seq is None:
            results.append({"delivery_id": given, "result": "not found"})
            continue
        outcome = store.write(functools.partial(tr.retry_txn, seq=seq, now=now))
        results.append({"delivery_id": ib.delivery_id_of(seq), "result": outcome})
    emit(args, results, lambda: table(results, ["delivery_id", "result"]))
    return EXIT_OK if all(r["result"] == "queued" for r in results) else EXIT_FAILED


def _purge(args: argparse.Namespace) -> int:
    age = parse_duration(args.older_than)
    store, ib = open_store(args)
    tr = Transitions(ib)
    cutoff = time.time() - age
    purged = store.write(lambda txn: tr.purge_txn(txn, cutoff, args.include_dead))
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
    store, ib = open_store(args)
    rows = ib.flows(args.flow_ids)
    for r in rows:
        for k in ("received_at", "imported_at"):
            if r.get(k):
                r[k] = rfc3339(r[k])
    cols = ["flow_id", "known", "delivery_id", "state", "received_at", "imported_at"]
    emit(args, rows, lambda: table(rows, cols))
    return EXIT_OK if all(r["known"] for r in rows) else EXIT_FAILED


def _run_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": r["run_id"],
        "ghost_user_id": r.get("ghost_user_id"),
        "pages": r["pages"],
        "accepted_pages": r["accepted_pages"],
        "duplicate_pages": r["duplicate_pages"],
        "flows_new": r["flows_new"],
        "flows_duplicate": r["flows_duplicate"],
        "first_seen": when(r.get("first_seen")),
        "last_seen": when(r.get("last_seen")),
    }


def runs(args: argparse.Namespace) -> int:
    store, ib = open_store(args)
    if args.action == "list":
        rows = [_run_row(r) for r in ib.runs(args.limit)]
        cols = ["run_id", "pages", "flows_new", "flows_duplicate", "first_seen", "last_seen"]
        emit(args, rows, lambda: table(rows, cols))
        return EXIT_OK
    run = ib.run(args.run_id)
    if run is None:
        raise CommandFailed(f"no run {args.run_id}")
    doc = _run_row(run)
    emit(args, doc, lambda: "\n".join(f"{k:16} {v}" for k, v in doc.items()))
    return EXIT_OK


def rebuild_index(args: argparse.Namespace) -> int:
    store, ib = open_store(args)
    started = time.monotonic()
    with exclusive_store(store.path):
        claimed = flowindex.rebuild(ib)
    doc = {"flow_ids": claimed, "seconds": round(time.monotonic() - started, 3)}
    emit(args, doc, lambda: f"rebuilt the flow index: {claimed} flow ids in {doc['seconds']} s")
    return EXIT_OK


def importer(args: argparse.Namespace) -> int:
    store, ib = open_store(args, must_exist=False)
    tr = Transitions(ib)
    paused = args.action == "pause"
    store.write(lambda txn: tr.set_paused_txn(txn, paused, f"cli (uid {os.getuid()})"))
    if paused:
        print(
            "importer paused: deliveries are still accepted and queued; a running import "
            "finishes. Resume with: ct-appliance importer resume"
        )
    else:
        print("importer resumed: queued deliveries will be imported")
    return EXIT_OK
