"""A store written by the first release (f601ff2) opens, reads and moves on with typed records.

tests/snapshots/store-f601ff2.json is that release's store in every state, dumped database by
database (tests/snapshots/make_store_f601ff2.py wrote it with the old code). It is loaded into a
fresh LMDB file here, byte for byte, and opened with today's code.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import lmdb

from appliance.inbox import seq_key
from appliance.lmdbbackend import LmdbBackend
from appliance.payload import Delivery
from appliance.record import Incoming, Outcome, State, decode_record, encode_record
from appliance.store import DB_NAMES

DUMP = Path(__file__).parent / "snapshots" / "store-f601ff2.json"
FIRST_INDEX_DBS = ("flows", "index_meta")  # the first release's index: '=' + id -> 8-byte seq
T = 1_790_000_000.0


def _load(path: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    dbs = json.loads(DUMP.read_text())["databases"]
    out = {
        name: [(base64.b64decode(k), base64.b64decode(v)) for k, v in rows]
        for name, rows in dbs.items()
    }
    for sub, names in ((path, DB_NAMES), (path / "index", FIRST_INDEX_DBS)):
        sub.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(sub), max_dbs=len(names) + 2, map_size=1 << 24)
        with env.begin(write=True) as txn:
            for name in names:
                db = env.open_db(name.encode(), txn=txn)
                for k, v in out[name]:
                    txn.put(k, v, db=db)
        env.close()
    return out


async def test_a_first_release_store_reads_and_moves_on(tmp_path: Path) -> None:
    dumped = _load(tmp_path)
    backend = LmdbBackend(tmp_path)

    # The format is unchanged: every record re-encodes to the JSON the old code wrote.
    for _, raw in dumped["deliveries"]:
        assert json.loads(encode_record(decode_record(raw))) == json.loads(raw)

    # The old index's layout is not today's: it is rebuilt from the inbox, and the cut-short
    # big delivery is finished from its parts.
    out = backend.recover()
    assert out["finished_receiving"] == 1
    assert out["rebuilt"] and out["reason"] == "it has the layout of an older release"
    by_seq = {r.seq: r for r in backend.records(limit=100)}
    assert {s: r.state for s, r in by_seq.items()} == {
        1: State.PENDING,
        2: State.DONE,
        3: State.DEAD,
        4: State.IMPORTING,
        5: State.DONE,
        6: State.DONE,
        7: State.PENDING,
        8: State.PENDING,
    }
    assert by_seq[1].flows == ("p1", "p2") and by_seq[1].in_body_duplicates == 1
    assert by_seq[8].flows == tuple(f"g{n}" for n in range(8)) and by_seq[8].flow_count is None
    assert by_seq[5].body_pruned_at is not None and by_seq[6].purged_at is not None
    dead = by_seq[3]
    assert [a.outcome for a in dead.attempts] == [Outcome.RETRY, Outcome.RETRY, Outcome.DEAD]
    assert (dead.retry_base, dead.manual_retries) == (2, 1)

    summary = backend.summary()
    assert (summary.pending, summary.importing, summary.done, summary.dead) == (3, 1, 3, 1)
    assert summary.paused and backend.paused().by == "cli (uid 0)"
    run = backend.run("run-1")
    assert run is not None and run.duplicate_pages == 1
    shown = backend.detail(3)
    assert shown is not None and shown.outputs[-1] == {
        "stdout": "out exit 65 (EX_DATAERR: permanent)",
        "stderr": "err",
    }

    # A crash left seq 4 importing: it is re-run, its earlier interruption still counted.
    assert await backend.recover_imports(T + 100) == [4]
    assert [r.reruns for r in backend.records(limit=100) if r.seq == 4] == [2]

    # Claims made by the old code still answer: a re-post is a duplicate.
    again = Delivery(("p1", "d1", "g3"), "run-1", "ghost-1", 0)
    assert (await backend.accept(Incoming(again, b"{}", T + 101))).status == "duplicate"

    # Its dead letter retries, its done delivery refuses, and both move on under the table.
    assert await backend.retry(3, T + 102) == "queued"
    assert (await backend.retry(2, T + 102)).startswith("already imported")
    started = await backend.start([3], T + 103)
    assert started[0] is not None and started[0].record.attempts[-1].n == 4
    state = await backend.finish(
        3,
        Outcome.SUCCESS,
        summary="exit 0",
        duration=0.1,
        output={},
        now=T + 104,
        max_attempts=3,
        retry_in=0,
    )
    assert state is State.DONE
    raw = backend.store.read(lambda t: t.get(seq_key(3), db=backend.store.dbs.deliveries))
    assert json.loads(raw)["state"] == "done" and json.loads(raw)["retry_base"] == 3
