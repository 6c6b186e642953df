"""Crashes during start-up and index recovery (spec §5.4, §5.5).

The flow index (`store/index`) is derived state: the server catches it up from the inbox at start
(`flowindex.recover`), or rebuilds it when it cannot trust it. These tests kill -9 the server
at random moments of its start-up, including while it replays a large index, and take the index
away while the server is stopped; the store must open every time with every acknowledged
delivery, and the duplicate answers must be the same as before."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from appliance import payload
from appliance.inbox import Inbox
from appliance.intake import accept_txn
from appliance.record import Incoming, PauseState
from appliance.store import Store

from ..conftest import Appliance, delivery
from .helpers import Stopwatch, report

SEED_DELIVERIES = 20_000
SEED_FLOWS_EACH = 10
RECOVERED = "flow index recovered from the inbox"


def seed(store_path: Path, deliveries: int = SEED_DELIVERIES) -> list[bytes]:
    """A store holding `deliveries` accepted deliveries (written as the server writes them),
    importer paused so the backlog stays put; returns a sample of the bodies."""
    store = Store(store_path)
    try:
        inbox = Inbox(store)
        paused = PauseState(True, time.time(), "fault test")
        store.write(lambda txn: inbox.set_paused_txn(txn, paused))
        sample: list[bytes] = []
        now = time.time()
        for start in range(0, deliveries, 1000):
            items = []
            for i in range(start, min(start + 1000, deliveries)):
                body = delivery(
                    [f"seed-{i}-{k}" for k in range(SEED_FLOWS_EACH)], run=f"seed-{i % 50}"
                )
                items.append(Incoming(payload.parse(body), body, now))
                if i % 997 == 0:
                    sample.append(body)
            store.write(lambda txn, items=items: [accept_txn(inbox, txn, it) for it in items])
    finally:
        store.close()
    return sample


def flows_of(body: bytes) -> list[str]:
    flows: list[str] = json.loads(body)["flow_ids"]
    return flows


def test_kill_9_during_start_up_and_index_replay(make_appliance: Any) -> None:
    clock = Stopwatch()
    app: Appliance = make_appliance()
    sample = seed(app.tmp / "store")
    app.start()
    acked = []
    for i in range(20):
        body = delivery([f"live-{i}-a", f"live-{i}-b"])
        assert app.post(body).json()["status"] == "accepted"
        acked.append(body)
    app.kill9()
    rng = random.Random(7)
    kills = 0
    replays_cut = 0
    started_at = time.monotonic()
    for cycle in range(30):
        done_before = app.logs().count(RECOVERED)
        if cycle % 3 == 0:
            # Take the index away: the next start replays all 200,000 flow ids from the inbox.
            # (It may not exist: starts killed before they opened the store leave none.)
            shutil.rmtree(app.tmp / "store" / "index", ignore_errors=True)
        app.start(wait=False)
        time.sleep(rng.uniform(0.0, 1.5))
        assert app.proc is not None
        if app.proc.poll() is not None:
            raise AssertionError(f"server exited {app.proc.returncode}:\n{app.logs()[-3000:]}")
        app.kill9()
        kills += 1
        if cycle % 3 == 0 and app.logs().count(RECOVERED) == done_before:
            replays_cut += 1  # killed before the replay finished (it logs when it has)
    loop_seconds = round(time.monotonic() - started_at, 1)

    # One full replay, timed: how long the window the kills above aimed at is.
    shutil.rmtree(app.tmp / "store" / "index")
    started = time.monotonic()
    app.start()
    replay_start_seconds = round(time.monotonic() - started, 2)
    app.kill9()

    # The store opens without a repair step, and every acknowledged delivery is there.
    shown = app.cli_json("flows", "show", *flows_of(acked[0]), *flows_of(sample[3]))
    assert all(f["known"] for f in shown)
    started = time.monotonic()
    app.start()
    start_seconds = round(time.monotonic() - started, 2)
    with httpx.Client() as client:
        for body in acked + sample:
            assert app.post(body, client=client).json() == {"status": "duplicate"}
        assert app.post(delivery(["after-kills"]), client=client).json()["status"] == "accepted"
    counts = httpx.get(app.admin + "/status").json()["inbox"]
    assert counts["total"] == SEED_DELIVERIES + len(acked) + 1
    assert counts["flows"] == SEED_DELIVERIES * SEED_FLOWS_EACH + 2 * len(acked) + 1
    assert app.stop() == 0
    report(
        "kill_during_start_up",
        kills=kills,
        replays_started=10,
        replays_killed_before_done=replays_cut,
        flow_ids_indexed=counts["flows"],
        start_seconds=start_seconds,
        start_with_full_replay_seconds=replay_start_seconds,
        loop_seconds=loop_seconds,
        seconds=clock(),
    )


def test_index_deleted_while_stopped_is_rebuilt_with_the_same_answers(
    make_appliance: Any,
) -> None:
    app: Appliance = make_appliance().start()
    pages = [["a", "b", "c"], ["c", "d"], ["d", "e", "f", "a"], ["g"]]
    first = [app.post(delivery(p, run="r-1")).json() for p in pages]
    assert [r["status"] for r in first] == ["accepted"] * 4
    names = [f for p in pages for f in p] + ["never-sent"]
    app.wait_for(lambda: len(app.imported_docs()) == 4, what="imports")
    before = app.cli_json("flows", "show", *names, check=False)
    assert app.stop() == 0

    shutil.rmtree(app.tmp / "store" / "index")
    app.start()
    recovered = [line for line in app.log_lines() if line.get("msg") == RECOVERED]
    assert recovered and recovered[-1]["replayed_flow_ids"] == 7, recovered
    after = app.cli_json("flows", "show", *names, check=False)
    assert after == before  # same owner delivery, state and import time for every flow id
    for p in pages:
        assert app.post(delivery(p, run="r-1")).json() == {"status": "duplicate"}
    r = app.post(delivery(["f", "g", "h"], run="r-1")).json()
    assert r["status"] == "accepted"
    assert app.cli_json("inbox", "show", r["delivery_id"])["flow_ids"] == ["h"]
    app.wait_for(lambda: len(app.imported_docs()) == 5, what="import of h")
    imported = [f for d in app.imported_docs() for f in d["flow_ids"]]
    assert sorted(imported) == sorted(set(imported)) == sorted("abcdefgh")

    # The same after a kill -9 with the index gone (not trusted, not clean).
    app.kill9()
    shutil.rmtree(app.tmp / "store" / "index")
    app.start()
    assert app.post(delivery(["a", "h"], run="r-1")).json() == {"status": "duplicate"}
    again = app.cli_json("flows", "show", *names, check=False)
    assert [f.get("delivery_id") for f in again] == [f.get("delivery_id") for f in after]
    assert app.stop() == 0


def corrupt(index_data: Path, *, keep_meta_pages: bool, seed: int) -> None:
    """Garbage over the index file: all of it, or every page but the two meta pages (what a
    power loss can leave of pages written without fsync)."""
    raw = bytearray(index_data.read_bytes())
    start = 2 * 4096 if keep_meta_pages else 0
    raw[start:] = random.Random(seed).randbytes(len(raw) - start)
    index_data.write_bytes(bytes(raw))


def test_a_corrupt_index_is_deleted_and_rebuilt_at_start(make_appliance: Any) -> None:
    """Garbage in store/index/data.mdb used to stop the service (MDB_INVALID at open; a
    drop() of a garbage tree when the index was not trusted). The index is derived state: it
    is deleted and rebuilt from the inbox, the log says why and how long it took, and the
    answers are the same."""
    app: Appliance = make_appliance().start()
    bodies = [delivery([f"c-{i}-{k}" for k in range(20)], run="r-c") for i in range(300)]
    with httpx.Client(timeout=30) as client:
        assert {app.post(b, client=client).json()["status"] for b in bodies} == {"accepted"}
    index_data = app.tmp / "store" / "index" / "data.mdb"

    # 1. Clean stop, then the whole file garbage: it cannot be opened.
    assert app.stop() == 0
    corrupt(index_data, keep_meta_pages=False, seed=1)
    app.start()
    rebuilt = [
        line for line in app.log_lines() if line.get("msg") == "flow index rebuilt from the inbox"
    ]
    assert rebuilt and rebuilt[-1]["reason"].startswith("could not be opened"), rebuilt
    assert rebuilt[-1]["replayed_flow_ids"] == 300 * 20 and "seconds" in rebuilt[-1]
    with httpx.Client(timeout=30) as client:
        assert {app.post(b, client=client).json()["status"] for b in bodies} == {"duplicate"}

    # 2. kill -9, the machine "restarts" (another boot id), and every page but the metas is
    #    garbage: the index is not trusted, and its tree must not be walked.
    app.kill9()
    store = Store(app.tmp / "store")
    store.write(lambda t: t.put(b"boot_id", b"an-earlier-boot", db=store.dbs.index_meta))
    store.close()
    corrupt(index_data, keep_meta_pages=True, seed=2)
    app.start()
    rebuilt = [
        line for line in app.log_lines() if line.get("msg") == "flow index rebuilt from the inbox"
    ]
    # The named databases sit in that tree too, so opening them may already fail.
    reason = rebuilt[-1]["reason"] if len(rebuilt) == 2 else ""
    assert "restarted" in reason or reason.startswith("could not be opened"), rebuilt
    with httpx.Client(timeout=30) as client:
        assert {app.post(b, client=client).json()["status"] for b in bodies} == {"duplicate"}
    r = app.post(delivery(["c-0-0", "c-new"], run="r-c")).json()
    assert r["status"] == "accepted"
    assert app.cli_json("inbox", "show", r["delivery_id"])["flow_ids"] == ["c-new"]
    assert app.stop() == 0
    report("corrupt_index", deliveries=300, flow_ids=6000, rebuild_seconds=rebuilt[-1]["seconds"])
