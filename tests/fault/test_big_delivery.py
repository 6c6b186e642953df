"""One huge signed delivery must not stall everybody else (issue 13, item 7).

A delivery with 400,000 flow ids used to be claimed in one write transaction: over a second
in which every other delivery waited for the writer. Now it is claimed in slices, one per
group commit, so small deliveries' commits interleave with it. Exactly-once holds across the
slices: small deliveries that share flow ids with the big one, sent while it commits, and a
retry of the big one, leave every flow id imported once.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from ..conftest import delivery
from .helpers import read_record, recording_importer, report, wait_drained

BIG = 400_000


def test_small_deliveries_keep_answering_while_a_huge_one_commits(make_appliance: Any) -> None:
    tmp_cfg: dict[str, Any] = {}
    app = make_appliance(tmp_cfg)
    importer, record = recording_importer(app.tmp)
    app.config["importer"].update(importer["importer"])
    app.write_config()
    app.start()

    big_ids = [f"big-{i:07d}" for i in range(BIG)]
    big_body = delivery(big_ids, run="run-big")
    small: list[tuple[float, float, int, str]] = []  # sent, answered, status, result
    big: dict[str, Any] = {}
    stop = threading.Event()
    # One pool shared by the sender threads (a client per request would spend the test
    # process's CPU on TLS set-up it never uses, and slow the senders, not the server).
    pool = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=500))

    def send_small(n: int) -> None:
        # Every small delivery also carries two ids of the big one, from its tail.
        shared = [big_ids[BIG - 1 - 2 * n], big_ids[BIG - 2 - 2 * n]]
        body = delivery(shared + [f"small-{n}-{i}" for i in range(48)], run="run-small")
        sent = time.monotonic()
        r = app.post(body, client=pool)
        small.append((sent, time.monotonic(), r.status_code, r.json().get("status", "")))

    def pace_small() -> None:
        """Open loop: one small delivery every 20 ms, each on its own thread, whether or not the
        earlier ones have been answered."""
        threads = []
        n = 0
        while not stop.is_set():
            n += 1
            t = threading.Thread(target=send_small, args=(n,), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.02)
        for t in threads:
            t.join(60)
        pace_small.sent = n  # type: ignore[attr-defined]

    def send_big() -> None:
        with httpx.Client(timeout=120) as client:
            big["sent"] = time.monotonic()
            r = app.post(big_body, client=client)
            big["answered"] = time.monotonic()
            big["status"], big["doc"] = r.status_code, r.json()

    sender = threading.Thread(target=pace_small, daemon=True)
    sender.start()
    time.sleep(0.5)
    bigger = threading.Thread(target=send_big, daemon=True)
    bigger.start()
    bigger.join(120)
    time.sleep(0.5)
    stop.set()
    sender.join(30)
    pool.close()

    assert big["status"] == 200 and big["doc"]["status"] == "accepted", big
    assert small and {s for _, _, s, _ in small} == {200}
    end = big["answered"]
    # Small deliveries sent while the big one's flow ids were being claimed, 0.8 s to 0.3 s
    # before it was answered (the last 0.3 s leave room for its final step, which writes
    # its 400,000-id record, ~0.1 s): in one big transaction they all waited for it.
    window = [(s, a) for s, a, _, _ in small if end - 0.8 <= s <= end - 0.3]
    before = sum(1 for _, a in window if a < end)
    during = sorted(a - s for s, a, _, _ in small if big["sent"] <= s <= end)
    report(
        "big_delivery",
        flow_ids=BIG,
        body_mib=round(len(big_body) / (1 << 20), 1),
        big_seconds=round(end - big["sent"], 2),
        small_during=len(during),
        small_max_ms_during=round(during[-1] * 1000, 1) if during else None,
        small_p50_ms_during=round(during[len(during) // 2] * 1000, 1) if during else None,
        small_p99_ms_during=round(during[int(len(during) * 0.99)] * 1000, 1) if during else None,
        window=len(window),
        window_answered_before_big=before,
    )
    assert len(window) >= 5, window
    assert before >= 0.8 * len(window), (before, len(window))

    # A retry of the big delivery is a duplicate: every id is known.
    r = app.post(big_body)
    assert r.status_code == 200 and r.json() == {"status": "duplicate"}
    # Exactly once across the slices, the small deliveries and the retry.
    wait_drained(app, timeout=120)
    seen: dict[str, str] = {}
    for doc in read_record(record):
        for fid in doc["flow_ids"]:
            assert fid not in seen, f"{fid} imported by {seen[fid]} and {doc['delivery_id']}"
            seen[fid] = doc["delivery_id"]
    sent = pace_small.sent  # type: ignore[attr-defined]
    assert len(small) == sent
    smalls = {f"small-{n}-{i}" for n in range(1, sent + 1) for i in range(48)}
    assert set(seen) == set(big_ids) | smalls
    runs = {r["run_id"]: r for r in app.cli_json("runs", "list")}
    assert runs["run-big"]["pages"] == 2 and runs["run-big"]["duplicate_pages"] == 1
    assert runs["run-big"]["flows_new"] + runs["run-small"]["flows_new"] == len(seen)
    assert json.loads(app.cli("inbox", "list", "--json").stdout)  # readable afterwards


def test_kill_9_while_a_huge_delivery_is_claimed_loses_nothing(make_appliance: Any) -> None:
    """kill -9 while the slices of a 400,000-id delivery are being committed: the sender got
    no answer; at restart the delivery is finished with the flow ids it had claimed, and the
    sender's retry claims the rest. Every flow id is imported exactly once."""
    app = make_appliance()
    importer, record = recording_importer(app.tmp)
    app.config["importer"].update(importer["importer"])
    app.write_config()
    app.start()
    assert app.proc is not None
    big_ids = [f"k-{i:07d}" for i in range(BIG)]
    body = delivery(big_ids, run="run-killed")
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["status"] = app.post(body).status_code
        except httpx.HTTPError as e:
            outcome["error"] = type(e).__name__

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    app.wait_for(
        lambda: httpx.get(app.admin + "/status", timeout=5).json()["inbox"]["receiving"],
        timeout=60,
        what="the big delivery to be receiving",
    )
    app.kill9()
    sender.join(30)
    assert "status" not in outcome, outcome  # no answer: CoinTracker will retry

    app.start()
    recovered = [
        line for line in app.log_lines() if line.get("msg") == "flow index recovered from the inbox"
    ]
    assert recovered and recovered[-1]["finished_receiving"] == 1, recovered
    r = app.post(body)  # CoinTracker's retry
    assert r.status_code == 200
    wait_drained(app, timeout=120)
    docs = read_record(record)
    seen: dict[str, str] = {}
    for doc in docs:
        for fid in doc["flow_ids"]:
            assert fid not in seen, f"{fid} imported by {seen[fid]} and {doc['delivery_id']}"
            seen[fid] = doc["delivery_id"]
    assert set(seen) == set(big_ids)
    report(
        "big_delivery_kill9",
        flow_ids=BIG,
        claimed_before_kill=len(docs[0]["flow_ids"]) if docs else 0,
        deliveries_imported=len(docs),
        retry=r.json()["status"],
    )
