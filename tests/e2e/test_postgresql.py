"""The PostgreSQL store end to end: real `ct-appliance serve` processes on a real PostgreSQL
database (a fresh one per test in the session cluster, tests/pgcluster.py), the real CLI, real
importer processes (spec §5 across appliances, §7 `db migrate`, `db import-lmdb`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from appliance.pgschema import SCHEMA_VERSION

from ..conftest import Appliance, delivery
from ..pgcluster import PgCluster

# Records every successful run (never dedupes, so a second run of a delivery shows). A flow id
# starting "poison" exits 65 until the file `cured` exists; one starting "hang" hangs while the
# file `hang` exists (its pid in `hang.pid`).
IMPORTER = textwrap.dedent(
    """\
    import json, os, sys, time
    doc = json.load(sys.stdin)
    state = os.environ["STATE_DIR"]
    flows = doc["flow_ids"]
    if any(f.startswith("poison") for f in flows) and not os.path.exists(
        os.path.join(state, "cured")
    ):
        print("cannot import", flows, file=sys.stderr)
        sys.exit(65)
    if any(f.startswith("hang") for f in flows) and os.path.exists(os.path.join(state, "hang")):
        with open(os.path.join(state, "hang.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    line = (json.dumps(doc) + "\\n").encode()
    fd = os.open(os.path.join(state, "imported.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line)
    os.fsync(fd)
    os.close(fd)
    print("imported", len(flows), "flow ids of", doc["delivery_id"])
    """
)


class Importer:
    """The importer above, with its state directory (shared by every appliance given it)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "importer"
        self.dir.mkdir(exist_ok=True)
        self.script = self.dir / "importer.py"
        self.script.write_text(IMPORTER)

    def config(self, **importer: Any) -> dict[str, Any]:
        return {
            "importer": {
                "command": [sys.executable, str(self.script)],
                "env": {"STATE_DIR": str(self.dir)},
                **importer,
            }
        }

    def flag(self, name: str, on: bool) -> None:
        path = self.dir / name
        if on:
            path.write_text("1")
        else:
            path.unlink(missing_ok=True)

    def imported(self) -> list[dict[str, Any]]:
        path = self.dir / "imported.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def imported_flows(self) -> list[str]:
        return [f for doc in self.imported() for f in doc["flow_ids"]]


def pg_store(dsn: str, **postgresql: Any) -> dict[str, Any]:
    """Config overrides for the PostgreSQL store at `dsn`."""
    pg = {"dsn": {"value": dsn}, "pool_size": 4, "lease_seconds": 30, **postgresql}
    return {"store": {"backend": "postgresql", "postgresql": pg}}


def dbname_of(dsn: str) -> str:
    return dsn.split("dbname=")[1].split()[0]


def serve_refused(app: Appliance, timeout: float = 30.0) -> tuple[int, str]:
    """Start `serve`, expecting it to refuse: its exit code and its `cannot start` error."""
    app.start(wait=False)
    assert app.proc is not None
    try:
        code = app.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"serve did not exit within {timeout} s:\n{app.logs()}") from None
    errors = [
        str(line.get("error"))
        for line in app.log_lines()
        if line.get("level") in ("error", "critical") and line.get("msg") == "cannot start"
    ]
    assert errors, f"serve exited {code} without a `cannot start` error line:\n{app.logs()}"
    return code, errors[-1]


def accepted_id(app: Appliance, body: bytes) -> str:
    r = app.post(body)
    assert r.status_code == 200 and r.json()["status"] == "accepted", (
        f"expected accepted from {app.url}, got {r.status_code} {r.text}\n{app.logs()[-3000:]}"
    )
    return str(r.json()["delivery_id"])


def assert_duplicate(app: Appliance, body: bytes, what: str) -> None:
    r = app.post(body)
    assert (r.status_code, r.json().get("status")) == (200, "duplicate"), (
        f"{what}: expected 200 duplicate from {app.url}, got {r.status_code} {r.text}"
    )


def log_since(app: Appliance, msg: str, start: int) -> dict[str, Any] | None:
    """The first log line with `msg` among the lines after the first `start` ones."""
    for line in app.log_lines()[start:]:
        if line.get("msg") == msg:
            return line
    return None


def inbox_of(app: Appliance) -> dict[str, Any]:
    """The running server's inbox counts (GET /status)."""
    counts: dict[str, Any] = httpx.get(app.admin + "/status", timeout=10).json()["inbox"]
    return counts


def instance_of(delivery_id: str) -> str:
    return delivery_id.rpartition("-")[0]


def seq_of(delivery_id: str) -> int:
    return int(delivery_id.rpartition("-")[2])


# -- (a) schema ---------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_serve_refuses_a_schema_it_cannot_use(
    make_appliance: Any, pg_dsn: str, pg_cluster: PgCluster
) -> None:
    app = make_appliance(pg_store(pg_dsn))

    code, error = serve_refused(app)
    assert code != 0, f"serve on a database without the schema exited 0:\n{app.logs()}"
    assert "db migrate" in error, f"the refusal does not say to run `db migrate`: {error!r}"
    cli = app.cli("inbox", "list", check=False)
    assert cli.returncode != 0 and "db migrate" in cli.stdout + cli.stderr, (
        f"`inbox list` on an un-migrated database: exit {cli.returncode}\n{cli.stdout}{cli.stderr}"
    )

    first = app.cli_json("db", "migrate")
    assert first == {"schema_version_before": 0, "schema_version": SCHEMA_VERSION}, first
    again = app.cli_json("db", "migrate")
    assert again == {"schema_version_before": SCHEMA_VERSION, "schema_version": SCHEMA_VERSION}
    text = app.cli("db", "migrate").stdout
    assert "nothing to do" in text, f"a second `db migrate` should say nothing to do: {text!r}"

    app.start()  # the migrated database is served
    assert app.post(delivery(["schema-1"])).json()["status"] == "accepted"
    assert app.stop() == 0

    db = dbname_of(pg_dsn)
    newer = SCHEMA_VERSION + 1
    pg_cluster.sql(f"UPDATE ct_meta SET value = '{newer}' WHERE key = 'schema_version'", db)
    code, error = serve_refused(app)
    assert code != 0, f"serve on a newer schema exited 0:\n{app.logs()}"
    assert "newer" in error and str(newer) in error, (
        f"the refusal of a newer schema ({newer}) should say it is newer: {error!r}"
    )


# -- (b) one server, operated through the CLI ---------------------------------------------------


def test_server_on_postgresql_answers_imports_and_is_operated_by_the_cli(
    make_appliance: Any, pg_dsn: str, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    app = make_appliance({**pg_store(pg_dsn), **imp.config()})
    app.cli("db", "migrate")
    app.start()

    # Accept, duplicate, a second page of the same run with one new flow id.
    run = "run-pg-tour"
    page1 = delivery(["tour-1", "tour-2"], run=run)
    did1 = accepted_id(app, page1)
    assert_duplicate(app, page1, "the same page again")
    page2 = delivery(["tour-2", "tour-3"], run=run)
    r = app.post(page2)
    assert r.json()["status"] == "accepted", r.text
    did2 = r.json()["delivery_id"]
    assert instance_of(did1) == instance_of(did2) and seq_of(did2) > seq_of(did1)

    app.wait_for(lambda: len(imp.imported()) == 2, what="both pages imported")
    by_id = {d["delivery_id"]: d for d in imp.imported()}
    assert by_id[did1]["flow_ids"] == ["tour-1", "tour-2"]
    assert by_id[did2]["flow_ids"] == ["tour-3"], "page 2 carries only its new flow id"
    assert by_id[did1]["user_config"] == {"currency": "USD"}

    listed = {row["delivery_id"]: row for row in app.cli_json("inbox", "list")}
    assert set(listed) == {did1, did2}, listed
    assert {row["state"] for row in listed.values()} == {"done"}
    shown = app.cli_json("inbox", "show", did2)
    assert shown["state"] == "done" and shown["flow_ids"] == ["tour-3"], shown
    assert [a["outcome"] for a in shown["attempt_log"]] == ["success"], shown["attempt_log"]
    assert "imported 1 flow ids" in shown["attempt_log"][0]["output"]["stdout"], shown
    assert app.cli("inbox", "show", did2, "--body").stdout.count("tour-3") >= 1

    shown_flows = app.cli("flows", "show", "tour-2", "nope", "--json", check=False)
    assert shown_flows.returncode == 1, "`flows show` exits 1 when a flow id is unknown"
    flows = {row["flow_id"]: row for row in json.loads(shown_flows.stdout)}
    assert flows["tour-2"]["known"] and flows["tour-2"]["delivery_id"] == did1, flows
    assert flows["tour-2"]["state"] == "done" and flows["tour-2"]["imported_at"], flows
    assert flows["nope"]["known"] is False, flows

    runs = {row["run_id"]: row for row in app.cli_json("runs", "list")}
    assert run in runs, runs
    shown_run = app.cli_json("runs", "show", run)
    expected = {"pages": 3, "accepted_pages": 2, "duplicate_pages": 1}
    expected |= {"flows_new": 3, "flows_duplicate": 3}
    assert {k: shown_run[k] for k in expected} == expected, shown_run

    # Pause through the CLI: the running server notices within ~2 s and starts nothing.
    lines = len(app.log_lines())
    app.cli("importer", "pause")
    paused_at = time.monotonic()  # the flag is committed once the command returns
    app.wait_for(lambda: log_since(app, "importer paused", lines), timeout=5, what="pause")
    noticed = time.monotonic() - paused_at
    assert noticed < 2.5, f"the server noticed the pause {noticed:.2f} s after it was set"
    held = accepted_id(app, delivery(["tour-held"]))
    time.sleep(1.5)
    assert "tour-held" not in imp.imported_flows(), "imported while paused"
    assert app.cli_json("inbox", "show", held)["state"] == "pending"
    status = app.cli_json("status")
    assert status["importer_paused"] is True and status["inbox"]["pending"] == 1, status["inbox"]
    app.cli("importer", "resume")
    resumed_at = time.monotonic()
    app.wait_for(lambda: "tour-held" in imp.imported_flows(), timeout=10, what="resume")
    took = time.monotonic() - resumed_at
    assert took < 3.5, f"imported {took:.1f} s after the resume (a resume is seen within 2 s)"

    # A dead delivery, listed as dead, brought back by `inbox retry`.
    dead = accepted_id(app, delivery(["poison-1"]))
    app.wait_for(lambda: inbox_of(app)["dead"] == 1, timeout=10, what="a dead delivery")
    assert [r["delivery_id"] for r in app.cli_json("inbox", "list", "--state", "dead")] == [dead]
    shown = app.cli_json("inbox", "show", dead)
    assert shown["state"] == "dead" and "65" in shown["attempt_log"][0]["result"], shown
    assert "cannot import" in shown["attempt_log"][0]["output"]["stderr"], shown

    # `status --json` (through the running server's /status): inbox, store, appliances.
    status = app.cli_json("status")
    assert status["store"] == {"backend": "postgresql", "error": None}, status["store"]
    inbox = status["inbox"]
    assert (inbox["dead"], inbox["pending"], inbox["paused"]) == (1, 0, False), inbox
    assert inbox["total"] == 4 and inbox["flows"] == 5, inbox
    assert [d["delivery_id"] for d in status["recent_dead"]] == [dead], status["recent_dead"]
    name = f"{socket.gethostname()}:{app.port}"  # <hostname>:<first listen port>
    mine = [a for a in status["appliances"] if a.get("self")]
    assert [a["name"] for a in mine] == [name], f"{name} in {status['appliances']}"
    assert app.proc is not None and mine[0]["pid"] == app.proc.pid, status["appliances"]

    imp.flag("cured", True)
    out = app.cli_json("inbox", "retry", dead)
    retried_at = time.monotonic()
    assert out == [{"delivery_id": dead, "result": "queued"}], out
    app.wait_for(lambda: "poison-1" in imp.imported_flows(), timeout=10, what="retried import")
    took = time.monotonic() - retried_at
    assert took < 3.5, f"imported {took:.1f} s after `inbox retry` (picked up within 2 s)"
    assert app.cli_json("inbox", "show", dead)["state"] == "done"
    assert app.cli_json("inbox", "list", "--state", "dead") == []

    assert sorted(imp.imported_flows()) == sorted(
        ["tour-1", "tour-2", "tour-3", "tour-held", "poison-1"]
    ), "every flow id imported exactly once"
    assert app.stop() == 0, app.logs()[-3000:]


# -- (c) two appliances, one database -----------------------------------------------------------


def test_two_appliances_on_one_database_claim_each_flow_id_once(
    make_appliance: Any, pg_dsn: str, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    cfg = {**pg_store(pg_dsn), **imp.config(concurrency=2)}
    a = make_appliance(cfg, sub="a")
    b = make_appliance(cfg, sub="b")
    a.cli("db", "migrate")
    a.start()
    b.start()

    body = delivery(["shared-1", "shared-2"])
    did = accepted_id(a, body)
    assert_duplicate(b, body, "posted to A, then to B")
    assert_duplicate(a, body, "posted to A, then to B, then to A")
    overlap = b.post(delivery(["shared-2", "shared-3"]))
    assert overlap.json()["status"] == "accepted", overlap.text
    assert instance_of(overlap.json()["delivery_id"]) == instance_of(did), "one store, one name"

    # Many deliveries through both: each flow id claimed and imported once, by either.
    ids = [f"both-{i}" for i in range(40)]
    with httpx.Client() as client:
        pairs = [((a, b) if i % 2 else (b, a), delivery([f])) for i, f in enumerate(ids)]
        answers = [first.post(body, client=client).json()["status"] for (first, _), body in pairs]
        assert answers == ["accepted"] * 40
        again = [then.post(body, client=client).json()["status"] for (_, then), body in pairs]
        assert again == ["duplicate"] * 40, "re-posted to the other appliance"

        # The same delivery posted to both at the same moment: one claims it, once.
        def both(body: bytes) -> list[str]:
            with ThreadPoolExecutor(2) as pool:
                got = pool.map(lambda app: app.post(body, client=client).json(), (a, b))
                return sorted(str(doc["status"]) for doc in got)

        raced = [f"race-{i}" for i in range(20)]
        answers2 = [both(delivery([f, f"{f}-x"])) for f in raced]
        assert answers2 == [["accepted", "duplicate"]] * 20, answers2
    want = sorted(["shared-1", "shared-2", "shared-3", *ids, *raced, *(f"{f}-x" for f in raced)])
    a.wait_for(lambda: len(imp.imported_flows()) >= len(want), what="imports")
    time.sleep(0.5)  # a double import would show now
    assert sorted(imp.imported_flows()) == want

    host = socket.gethostname()
    seen = httpx.get(a.admin + "/status", timeout=10).json()["appliances"]
    names = sorted(x["name"] for x in seen)
    assert names == sorted([f"{host}:{a.port}", f"{host}:{b.port}"]), f"A's /status: {seen}"
    assert [x["name"] for x in seen if x["self"]] == [f"{host}:{a.port}"], seen
    assert b.cli_json("flows", "show", "shared-1")[0]["delivery_id"] == did
    assert a.stop() == 0 and b.stop() == 0


# -- (d) moving an LMDB store into PostgreSQL ----------------------------------------------------


def test_import_lmdb_moves_a_store_and_keeps_its_delivery_ids(
    make_appliance: Any, pg_dsn: str, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    lmdb = make_appliance(imp.config(concurrency=2, timeout_seconds=120), sub="lmdb").start()
    store = lmdb.tmp / "store"
    run = "run-old"
    bodies = {
        "done1": delivery(["old-1a", "old-1b"], run=run),
        "done2": delivery(["old-2"], run=run),
        "dead": delivery(["poison-old"], run=run),
        "hang": delivery(["hang-old"]),
        "pend4": delivery(["old-4"]),
        "pend5": delivery(["old-5"]),
    }
    ids: dict[str, str] = {}
    for key in ("done1", "done2"):
        ids[key] = accepted_id(lmdb, bodies[key])
    lmdb.wait_for(lambda: len(imp.imported()) == 2, what="LMDB imports")
    ids["dead"] = accepted_id(lmdb, bodies["dead"])
    lmdb.wait_for(lambda: inbox_of(lmdb)["dead"] == 1, what="a dead delivery")
    imp.flag("hang", True)
    ids["hang"] = accepted_id(lmdb, bodies["hang"])
    hang_pid = imp.dir / "hang.pid"
    lmdb.wait_for(lambda: hang_pid.exists() and hang_pid.read_text(), what="hanging import")
    lines = len(lmdb.log_lines())
    lmdb.cli("importer", "pause")
    lmdb.wait_for(lambda: log_since(lmdb, "importer paused", lines), what="pause")
    for key in ("pend4", "pend5"):
        ids[key] = accepted_id(lmdb, bodies[key])
    old_instance = instance_of(ids["done1"])
    states = {r["delivery_id"]: r["state"] for r in lmdb.cli_json("inbox", "list")}
    assert [states[ids[k]] for k in ("done1", "done2", "dead", "hang", "pend4", "pend5")] == [
        "done",
        "done",
        "dead",
        "importing",
        "pending",
        "pending",
    ], states

    pg = make_appliance({**pg_store(pg_dsn), **imp.config(concurrency=2)}, sub="pg")
    pg.cli("db", "migrate")

    # Refused while a server runs on the LMDB store; nothing is written.
    busy = pg.cli("db", "import-lmdb", str(store), check=False)
    said = busy.stdout + busy.stderr
    assert busy.returncode == 1 and "server is running" in said and "Traceback" not in said, (
        f"import-lmdb with a server running: exit {busy.returncode}\n{said}"
    )
    assert pg.cli_json("inbox", "list") == [], "a refused import-lmdb left deliveries behind"

    # A crash leaves the hanging import `importing` in the LMDB store.
    lmdb.kill9()
    imp.flag("hang", False)
    os.kill(int(hang_pid.read_text()), signal.SIGKILL)

    moved = pg.cli_json("db", "import-lmdb", str(store))
    expected = {"deliveries": 6, "flow_ids": 7, "runs": 4, "requeued": 1, "last_seq": 6}
    assert {k: moved[k] for k in expected} == expected, moved
    assert moved["instance"] != old_instance, moved

    pg.start()
    status = httpx.get(pg.admin + "/status", timeout=10).json()
    assert status["importer_paused"] is True, "the pause flag moves with the store"
    inbox = status["inbox"]
    assert (inbox["pending"], inbox["dead"], inbox["total"]) == (3, 1, 6), inbox
    rows = {r["delivery_id"]: r for r in pg.cli_json("inbox", "list")}
    assert set(rows) == set(ids.values()), f"delivery ids changed in the move: {rows}"
    states = {k: (rows[i]["state"], rows[i]["reruns"]) for k, i in ids.items()}
    assert states == {
        "done1": ("done", 0),
        "done2": ("done", 0),
        "dead": ("dead", 0),
        "hang": ("pending", 1),  # left importing by the crash: a rerun
        "pend4": ("pending", 0),
        "pend5": ("pending", 0),
    }, states
    assert "65" in str(rows[ids["dead"]]["last_result"]), rows[ids["dead"]]
    done1 = pg.cli_json("inbox", "show", ids["done1"])
    assert done1["state"] == "done" and done1["flow_ids"] == ["old-1a", "old-1b"], done1
    assert "imported 2 flow ids" in done1["attempt_log"][0]["output"]["stdout"], done1
    old_run = pg.cli_json("runs", "show", run)
    assert (old_run["pages"], old_run["flows_new"]) == (3, 4), old_run

    with httpx.Client() as client:
        for key, body in bodies.items():
            r = pg.post(body, client=client)
            assert (r.status_code, r.json().get("status")) == (200, "duplicate"), (
                f"{key} ({ids[key]}) re-posted after the move: {r.status_code} {r.text}"
            )

    pg.cli("importer", "resume")
    pg.wait_for(
        lambda: {"old-4", "old-5", "hang-old"} <= set(imp.imported_flows()),
        what="the pending and interrupted deliveries imported on PostgreSQL",
    )
    by_id = {d["delivery_id"]: d for d in imp.imported()}
    assert by_id[ids["hang"]]["attempt"] == 2, by_id[ids["hang"]]
    assert by_id[ids["pend4"]]["flow_ids"] == ["old-4"]
    flows = pg.cli_json("flows", "show", "old-1a", "old-5")
    assert [(f["delivery_id"], f["state"]) for f in flows] == [
        (ids["done1"], "done"),
        (ids["pend5"], "done"),
    ], flows

    new = accepted_id(pg, delivery(["new-after-move"]))
    assert instance_of(new) == moved["instance"] != old_instance, (new, moved)
    assert seq_of(new) > moved["last_seq"], new
    pg.wait_for(lambda: "new-after-move" in imp.imported_flows(), what="new import")
    assert sorted(imp.imported_flows()) == sorted(
        ["old-1a", "old-1b", "old-2", "hang-old", "old-4", "old-5", "new-after-move"]
    ), "each flow id imported once, across the move"

    again = pg.cli("db", "import-lmdb", str(store), check=False)
    assert again.returncode == 1 and "already holds deliveries" in again.stdout + again.stderr, (
        f"a second import-lmdb: exit {again.returncode}\n{again.stdout}{again.stderr}"
    )
    assert inbox_of(pg)["total"] == 7, "the refused import changed nothing"
    assert pg.stop() == 0, pg.logs()[-3000:]
