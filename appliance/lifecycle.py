"""How a delivery record moves once stored, each step one write transaction.

    pending --start--> importing --success--> done   (flow ids imported; body kept until
       ^                   |                            store.retention_days, then pruned)
       |                   +--exit 65 / 4xx---> dead  (operator: inbox retry -> pending)
       +------retry--------+  (backoff; after importer.max_attempts -> dead)
       +--interrupted------+  (crash or shutdown during an attempt: re-run, same delivery id)

The next attempt time lives in the queue entry, so backoff survives restarts. Pausing is a
flag in the store, so it survives restarts too and the CLI can set it while the server runs.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from .inbox import Inbox, key_seq, parse_queue_value, queue_value, seq_key
from .store import Txn


class Transitions:
    """How a record moves: pending -> importing -> done | pending (retry) | dead.

    Every method runs inside one write transaction handed to it by the group commit (server)
    or by `Store.write` (CLI), so a state change, its queue/dead/done index entries and the
    captured attempt output are always committed together.
    """

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.dbs = inbox.dbs

    def ready_txn(
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

    def start_txn(self, txn: Txn, seq: int, now: float) -> tuple[dict[str, Any], bytes] | None:
        rec = self.inbox.record_txn(txn, seq)
        if rec is None or rec["state"] != "pending":
            return None
        body = self.inbox.body_txn(txn, seq)
        rec["state"] = "importing"
        rec["attempts"].append({"n": len(rec["attempts"]) + 1, "started_at": now})
        self.inbox.put_record_txn(txn, rec)
        txn.put(seq_key(seq), queue_value(rec["next_at"], True), db=self.dbs.queue)
        return rec, body or b""

    def finish_txn(
        self,
        txn: Txn,
        seq: int,
        *,
        outcome: str,
        summary: str,
        duration: float,
        output: dict[str, str],
        now: float,
        max_attempts: int,
        retry_in: float,
    ) -> str:
        """Close the running attempt; returns the delivery's new state."""
        rec = self.inbox.record_txn(txn, seq)
        if rec is None:
            return "missing"
        attempt = rec["attempts"][-1]
        attempt.update(ended_at=now, outcome=outcome, summary=summary, duration=round(duration, 3))
        txn.put(
            seq_key(seq) + struct.pack(">I", attempt["n"]),
            json.dumps(output).encode(),
            db=self.dbs.attempts,
        )
        counted = sum(
            1
            for a in rec["attempts"][rec.get("retry_base", 0) :]
            if a.get("outcome") in ("retry", "dead")
        )
        if outcome == "retry" and counted >= max_attempts:
            outcome = "dead"
            attempt["summary"] = f"{summary}; max_attempts ({max_attempts}) reached"
        skey = seq_key(seq)
        if outcome == "success":
            rec["state"], rec["done_at"] = "done", now
            txn.delete(skey, db=self.dbs.queue)
            txn.put(struct.pack(">Q", int(now * 1000)) + skey, b"", db=self.dbs.done)
        elif outcome == "dead":
            rec["state"], rec["dead_at"] = "dead", now
            txn.delete(skey, db=self.dbs.queue)
            txn.put(skey, b"", db=self.dbs.dead)
        else:
            rec["state"], rec["next_at"] = "pending", now + retry_in
            txn.put(skey, queue_value(rec["next_at"], False), db=self.dbs.queue)
        self.inbox.put_record_txn(txn, rec)
        return str(rec["state"])

    def interrupt_txn(self, txn: Txn, seq: int, now: float, why: str) -> bool:
        """An attempt that did not finish (crash, shutdown): back to pending, counted as rerun."""
        rec = self.inbox.record_txn(txn, seq)
        if rec is None or rec["state"] != "importing":
            return False
        if rec["attempts"]:
            rec["attempts"][-1].update(outcome="interrupted", summary=why, ended_at=now)
        rec["state"], rec["next_at"] = "pending", now
        rec["reruns"] = rec.get("reruns", 0) + 1
        self.inbox.put_record_txn(txn, rec)
        txn.put(seq_key(seq), queue_value(now, False), db=self.dbs.queue)
        return True

    def recover_txn(self, txn: Txn, now: float) -> list[int]:
        """At start: every delivery left `importing` by a crash returns to pending."""
        with txn.cursor(db=self.dbs.queue) as cur:
            stuck = [key_seq(k) for k, v in cur if parse_queue_value(v)[1]]
        return [
            s for s in stuck if self.interrupt_txn(txn, s, now, "interrupted: appliance stopped")
        ]

    def retry_txn(self, txn: Txn, seq: int, now: float) -> str:
        """Operator retry: dead -> pending with a fresh attempt budget; pending -> due now."""
        rec = self.inbox.record_txn(txn, seq)
        if rec is None:
            return "not found"
        state = rec["state"]
        if state == "done":
            return "already imported (retrying would import its flow ids twice)"
        if state == "importing":
            return "importing now"
        if state == "dead" and self.inbox.body_txn(txn, seq) is None:
            return "body purged; cannot be retried"
        if state == "dead":
            txn.delete(seq_key(seq), db=self.dbs.dead)
            rec["retry_base"] = len(rec["attempts"])
            rec.pop("dead_at", None)
        rec["state"], rec["next_at"] = "pending", now
        rec.setdefault("manual_retries", 0)
        rec["manual_retries"] += 1
        self.inbox.put_record_txn(txn, rec)
        txn.put(seq_key(seq), queue_value(now, False), db=self.dbs.queue)
        return "queued"

    def dead_seqs_txn(self, txn: Txn) -> list[int]:
        with txn.cursor(db=self.dbs.dead) as cur:
            return [key_seq(k) for k in cur.iternext(keys=True, values=False)]

    def prune_txn(self, txn: Txn, cutoff: float, limit: int = 5000) -> int:
        """Retention: drop bodies of deliveries imported before `cutoff` (flow ids stay)."""
        pruned = 0
        with txn.cursor(db=self.dbs.done) as cur:
            keys: list[bytes] = []
            for key in cur.iternext(keys=True, values=False):
                if struct.unpack(">Q", key[:8])[0] / 1000 >= cutoff or len(keys) >= limit:
                    break
                keys.append(key)
        for key in keys:
            seq = key_seq(key[8:])
            txn.delete(key, db=self.dbs.done)
            if txn.delete(seq_key(seq), db=self.dbs.bodies):
                pruned += 1
                rec = self.inbox.record_txn(txn, seq)
                if rec is not None:
                    rec["body_pruned_at"] = time.time()
                    self.inbox.put_record_txn(txn, rec)
        return pruned

    def purge_txn(self, txn: Txn, cutoff: float, include_dead: bool) -> int:
        """`inbox purge`: bodies and attempt outputs of old done (and dead) deliveries."""
        purged = 0
        states = ("done", "dead") if include_dead else ("done",)
        with txn.cursor(db=self.dbs.deliveries) as cur:
            victims = []
            for key, raw in cur:
                rec = json.loads(raw)
                if rec["received_at"] >= cutoff:
                    break
                if rec["state"] in states and not rec.get("purged_at"):
                    victims.append(key_seq(key))
        for seq in victims:
            rec = self.inbox.record_txn(txn, seq)
            assert rec is not None
            txn.delete(seq_key(seq), db=self.dbs.bodies)
            for a in rec["attempts"]:
                txn.delete(seq_key(seq) + struct.pack(">I", a["n"]), db=self.dbs.attempts)
            rec["purged_at"] = time.time()
            self.inbox.put_record_txn(txn, rec)
            purged += 1
        return purged

    def set_paused_txn(self, txn: Txn, paused: bool, by: str) -> None:
        doc = {"paused": paused, "at": time.time(), "by": by}
        txn.put(b"importer_paused", json.dumps(doc).encode(), db=self.dbs.state)

    def paused_txn(self, txn: Txn) -> dict[str, Any]:
        raw = txn.get(b"importer_paused", db=self.dbs.state)
        return json.loads(raw) if raw is not None else {"paused": False}

    def output_txn(self, txn: Txn, seq: int, n: int) -> dict[str, str] | None:
        raw = txn.get(seq_key(seq) + struct.pack(">I", n), db=self.dbs.attempts)
        return json.loads(raw) if raw is not None else None
