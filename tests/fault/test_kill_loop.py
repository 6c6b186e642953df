"""Jepsen-style kill loop: senders post unique flow ids while the server is kill -9'd at random
moments; afterwards every acknowledged flow id was imported under exactly one delivery id.

History kept by the test (the oracle):
  sent     every flow id put in a body that went out (answered or not);
  acked    every flow id of a body answered 2xx (accepted or duplicate).
Record kept by the importer: every run's document, re-runs included (it never dedupes).

  lost        = acked - imported          must be empty (spec §5.1, §5.2)
  unexpected  = imported - sent           must be empty
  each flow id imported under exactly one delivery_id                      (spec §5.3, §5.4)
  re-runs (one delivery_id in the record more than once) are counted and reported; each one
  must be backed by an `interrupted` attempt the inbox recorded (reruns > 0).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from appliance.lmdbbackend import LmdbBackend
from appliance.record import State

from ..conftest import Appliance, delivery, sign
from .helpers import Stopwatch, metric, read_record, recording_importer, report, wait_drained

CYCLES = 60
SENDERS = 6
LOOP_BUDGET_SECONDS = 120.0


class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.acked_bodies: list[bytes] = []
        self.unanswered: list[bytes] = []  # bodies still without a 2xx when the loop ended
        self.answers: Counter[str] = Counter()


def sender(n: int, app: Appliance, history: History, stop: threading.Event, seed: float) -> None:
    """Posts new flow ids, retrying a body until it is answered 2xx (as CoinTracker does), and
    now and then re-sends an acknowledged body (the duplicate path)."""
    rng = random.Random(seed)
    seq = 0
    body: bytes | None = None
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            if body is None:
                if history.acked_bodies and rng.random() < 0.1:
                    body = rng.choice(history.acked_bodies)
                else:
                    seq += 1
                    flows = [f"kl-{n}-{seq}-{k}" for k in range(rng.randint(1, 4))]
                    body = delivery(flows, run=f"kill-loop-{n}")
                    with history.lock:
                        history.sent.update(flows)
            try:
                r = client.post(
                    app.url, content=body, headers={"X-Cointracker-Signature": sign(body)}
                )
            except httpx.HTTPError as e:
                history.answers[type(e).__name__] += 1
                time.sleep(0.02)  # the server is down: back off a little, then retry the body
                continue
            history.answers[str(r.status_code)] += 1
            if r.status_code == 200:
                with history.lock:
                    history.acked.update(_flows_of(body))
                    history.acked_bodies.append(body)
                body = None
                time.sleep(rng.uniform(0.01, 0.06))  # paced, so the importers keep up
            else:
                assert r.status_code == 503, (r.status_code, r.text)  # draining/starting only
                time.sleep(0.02)
    if body is not None:
        with history.lock:
            history.unanswered.append(body)


def _flows_of(body: bytes) -> list[str]:
    flows: list[str] = json.loads(body)["flow_ids"]
    return flows


def test_kill_9_loop_loses_nothing_and_imports_each_flow_once(
    make_appliance: Any, tmp_path: Path
) -> None:
    clock = Stopwatch()
    overrides, record = recording_importer(
        tmp_path, concurrency=4, backoff_initial_seconds=0.05, backoff_max_seconds=0.2
    )
    app: Appliance = make_appliance(overrides)
    rng = random.Random(20260926)
    history = History()
    stop = threading.Event()
    reruns_metric = 0.0
    cycles = 0
    threads = [
        threading.Thread(target=sender, args=(n, app, history, stop, rng.random()), daemon=True)
        for n in range(SENDERS)
    ]
    for t in threads:
        t.start()
    try:
        while cycles < CYCLES and clock() < LOOP_BUDGET_SECONDS:
            app.start()
            # Re-runs are counted once, when the dispatcher starts: read before the next kill.
            reruns_metric += metric(app, "ct_appliance_import_reruns_total")
            time.sleep(rng.uniform(0.05, 0.5))
            app.kill9()
            cycles += 1
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    loop_seconds = clock()

    # Final start: no more kills. Resend what never got an answer, then drain the importers.
    app.start()
    reruns_metric += metric(app, "ct_appliance_import_reruns_total")
    for body in history.unanswered:
        r = app.post(body)
        assert r.status_code == 200, r.text
        history.acked.update(_flows_of(body))
    counts = wait_drained(app, timeout=120)
    assert counts["dead"] == 0, counts
    time.sleep(0.5)  # an importer orphaned by the last kill may still be writing
    assert app.stop() == 0

    runs = read_record(record)
    imported_by: dict[str, set[str]] = defaultdict(set)
    for doc in runs:
        for flow in doc["flow_ids"]:
            imported_by[flow].add(doc["delivery_id"])
    imported = set(imported_by)
    lost = history.acked - imported
    unexpected = imported - history.sent
    split = {f: ids for f, ids in imported_by.items() if len(ids) > 1}
    record_reruns = sum(c - 1 for c in Counter(d["delivery_id"] for d in runs).values())

    backend = LmdbBackend(app.tmp / "store")
    try:
        records = backend.records(limit=10**7)
    finally:
        backend.close()
    inbox_reruns = sum(r.reruns for r in records)
    states = Counter(r.state for r in records)
    by_id = {r.delivery_id: r for r in records}

    report(
        "kill_loop",
        cycles=cycles,
        senders=SENDERS,
        seconds=clock(),
        loop_seconds=loop_seconds,
        flow_ids_sent=len(history.sent),
        flow_ids_acked=len(history.acked),
        flow_ids_imported=len(imported),
        deliveries=len(records),
        importer_runs=len(runs),
        lost=len(lost),
        unexpected=len(unexpected),
        split=len(split),
        record_reruns=record_reruns,
        inbox_reruns=inbox_reruns,
        reruns_metric_sum=reruns_metric,
        answers=dict(history.answers),
    )
    assert cycles >= 50, f"only {cycles} kill cycles in {LOOP_BUDGET_SECONDS} s"
    owner = {f: r for r in records for f in r.flows}
    assert not lost, f"{len(lost)} acknowledged flow ids never imported: " + "; ".join(
        f"{f} in {owner[f].delivery_id} {owner[f].state} {owner[f].attempts}"
        if f in owner
        else f"{f} not in the store"
        for f in sorted(lost)[:5]
    )
    assert not unexpected, f"imported but never sent: {sorted(unexpected)[:10]}"
    assert not split, f"flow ids imported under two delivery ids: {list(split.items())[:5]}"
    assert states == {State.DONE: len(records)}, states
    # Every run in the record belongs to a stored delivery and carries exactly its new flow ids.
    for doc in runs:
        assert doc["flow_ids"] == list(by_id[doc["delivery_id"]].flows), doc["delivery_id"]
    # A delivery imported twice was interrupted by a kill (a counted re-run), never otherwise.
    twice = {i for i, c in Counter(d["delivery_id"] for d in runs).items() if c > 1}
    assert all(by_id[i].reruns >= 1 for i in twice)
    assert record_reruns <= inbox_reruns == reruns_metric
    assert len(history.acked) > 500  # the loop did real work
