"""Importer dispatch end to end: real importer processes run by a real server (spec §5, §6)."""

from __future__ import annotations

import json
import os
import random
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from ..conftest import Appliance, delivery, sign

RECORDING_IMPORTER = textwrap.dedent(
    """\
    import json, os, sys, time
    doc = json.load(sys.stdin)
    state = os.environ["STATE_DIR"]
    with open(os.path.join(state, "attempts.jsonl"), "a") as f:
        f.write(json.dumps({"delivery_id": doc["delivery_id"], "attempt": doc["attempt"],
                            "at": time.time(), "env_attempt": os.environ["CT_ATTEMPT"],
                            "env_count": os.environ["CT_FLOW_COUNT"]}) + "\\n")
    mode = open(os.path.join(state, "mode")).read().strip()
    print("stdout of attempt", doc["attempt"])
    print("stderr of attempt", doc["attempt"], file=sys.stderr)
    if mode == "fail-twice" and doc["attempt"] <= 2:
        sys.exit(75)
    if mode == "dataerr":
        sys.exit(65)
    if mode == "fail":
        sys.exit(1)
    if mode.startswith("sleep"):
        time.sleep(float(mode.split()[1]))
    if mode == "hang":
        import subprocess
        child = subprocess.Popen(["sleep", "1000"])
        open(os.path.join(state, "pids"), "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(1000)
    with open(os.path.join(state, "imported.jsonl"), "a") as f:
        f.write(json.dumps(doc) + "\\n")
    """
)


class Importer:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "importer"
        self.dir.mkdir(exist_ok=True)
        self.script = self.dir / "importer.py"
        self.script.write_text(RECORDING_IMPORTER)
        self.mode("ok")

    def mode(self, mode: str) -> None:
        (self.dir / "mode").write_text(mode)

    def _lines(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def attempts(self) -> list[dict[str, Any]]:
        return self._lines("attempts.jsonl")

    def imported(self) -> list[dict[str, Any]]:
        return self._lines("imported.jsonl")

    def config(self, **importer: Any) -> dict[str, Any]:
        return {
            "importer": {
                "command": [sys.executable, str(self.script)],
                "env": {"STATE_DIR": str(self.dir)},
                **importer,
            }
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().split()
    return stat[2] != "Z"


def test_fails_twice_then_succeeds_with_backoff(make_appliance: Any, tmp_path: Path) -> None:
    imp = Importer(tmp_path)
    imp.mode("fail-twice")
    app = make_appliance(imp.config(backoff_initial_seconds=0.6, backoff_max_seconds=5)).start()
    r = app.post(delivery(["ft-1", "ft-2", "ft-3"]))
    did = r.json()["delivery_id"]
    app.wait_for(lambda: imp.imported(), what="import")
    shown = app.cli_json("inbox", "show", did)
    assert shown["state"] == "done"
    assert [a["outcome"] for a in shown["attempt_log"]] == ["retry", "retry", "success"]
    assert shown["attempt_log"][0]["result"] == "exit 75"
    assert "stderr of attempt 1" in shown["attempt_log"][0]["output"]["stderr"]
    times = [a["at"] for a in imp.attempts()]
    assert [a["attempt"] for a in imp.attempts()] == [1, 2, 3]
    assert [a["env_attempt"] for a in imp.attempts()] == ["1", "2", "3"]
    # Exponential with jitter in [75 %, 100 %]: >= 0.45 s, then >= 0.9 s.
    assert times[1] - times[0] >= 0.45 and times[2] - times[1] >= 0.9, times
    assert [d["flow_ids"] for d in imp.imported()] == [["ft-1", "ft-2", "ft-3"]]
    doc = imp.imported()[0]
    assert doc["delivery_id"] == did and doc["attempt"] == 3
    assert doc["user_config"] == {"currency": "USD"} and doc["partner_config"] == {"tier": "gold"}
    metrics = httpx.get(app.admin + "/metrics").text
    assert 'ct_appliance_imports_total{result="retry"} 2.0' in metrics
    assert 'ct_appliance_imports_total{result="success"} 1.0' in metrics


def test_exit_65_is_dead_at_once_and_inbox_retry_brings_it_back(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    imp.mode("dataerr")
    app = make_appliance(imp.config()).start()
    did = app.post(delivery(["dead-1"])).json()["delivery_id"]
    app.wait_for(lambda: app.cli_json("inbox", "list", "--state", "dead"), what="dead")
    shown = app.cli_json("inbox", "show", did)
    assert shown["state"] == "dead" and len(shown["attempt_log"]) == 1
    assert "65" in shown["attempt_log"][0]["result"]
    imp.mode("ok")
    retried_at = time.monotonic()
    app.cli("inbox", "retry", did)
    app.wait_for(lambda: imp.imported(), timeout=10, what="import after retry")
    assert time.monotonic() - retried_at < 3.0  # picked up within 2 s plus the run itself
    assert app.cli_json("inbox", "show", did)["state"] == "done"
    assert app.cli_json("flows", "show", "dead-1")[0]["state"] == "done"


def test_hanging_importer_and_its_children_are_killed_at_timeout_then_retried(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    imp.mode("hang")
    app = make_appliance(imp.config(timeout_seconds=1.5)).start()
    did = app.post(delivery(["hang-1"])).json()["delivery_id"]
    pids_file = imp.dir / "pids"
    app.wait_for(lambda: pids_file.exists() and pids_file.read_text(), what="importer start")
    parent, child = map(int, pids_file.read_text().split())
    imp.mode("ok")
    app.wait_for(lambda: imp.imported(), timeout=15, what="retry after timeout")
    assert not _alive(parent) and not _alive(child)
    shown = app.cli_json("inbox", "show", did)
    assert "timed out" in shown["attempt_log"][0]["result"]
    assert shown["state"] == "done" and len(shown["attempt_log"]) == 2


def test_kill_9_during_import_reruns_same_delivery_id(make_appliance: Any, tmp_path: Path) -> None:
    imp = Importer(tmp_path)
    imp.mode("sleep 3")
    app = make_appliance(imp.config()).start()
    did = app.post(delivery(["k9i-1", "k9i-2"])).json()["delivery_id"]
    app.wait_for(lambda: imp.attempts(), what="importer running")
    app.kill9()
    imp.mode("ok")
    app.start()
    app.wait_for(lambda: len(imp.attempts()) >= 2 and imp.imported(), what="re-run")
    attempts = imp.attempts()
    assert {a["delivery_id"] for a in attempts} == {did}
    assert [a["attempt"] for a in attempts][:2] == [1, 2]
    shown = app.cli_json("inbox", "show", did)
    assert shown["state"] == "done" and shown["reruns"] == 1
    assert shown["attempt_log"][0]["outcome"] == "interrupted"
    metrics = httpx.get(app.admin + "/metrics").text
    assert "ct_appliance_import_reruns_total 1.0" in metrics
    # The first importer (orphaned by the kill) may also have finished: every record carries
    # the same delivery id, so a partner deduping on it imports each flow once.
    assert {d["delivery_id"] for d in imp.imported()} == {did}


async def test_thousand_overlapping_deliveries_each_flow_imported_once(
    make_appliance: Any, tmp_path: Path
) -> None:
    app = make_appliance({"importer": {"concurrency": 4}})
    await trio.to_thread.run_sync(app.start)
    rng = random.Random(11)
    pool = [f"ov-{i}" for i in range(4000)]
    bodies = [delivery(rng.sample(pool, 10)) for _ in range(1000)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32), timeout=60) as client:
        sem = trio.Semaphore(32)

        async def send(body: bytes) -> None:
            async with sem:
                headers = {"X-Cointracker-Signature": sign(body)}
                r = await client.post(app.url, content=body, headers=headers)
                assert r.status_code == 200

        async with trio.open_nursery() as nursery:
            for body in bodies:
                nursery.start_soon(send, body)

    def drained() -> bool:
        counts = httpx.get(app.admin + "/status").json()["inbox"]
        return counts["pending"] == 0 and counts["importing"] == 0

    await trio.to_thread.run_sync(lambda: app.wait_for(drained, timeout=240, what="drain"))
    docs = app.imported_docs()
    seen: dict[str, str] = {}
    for doc in docs:
        for flow in doc["flow_ids"]:
            assert flow not in seen, f"{flow} imported twice"
            seen[flow] = doc["delivery_id"]
    assert set(seen) == {f for b in bodies for f in json.loads(b)["flow_ids"]}


def test_ack_imported_is_500_while_importer_fails_and_200_once_it_succeeds(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    imp.mode("fail")
    app = make_appliance(
        {"ack": "imported", **imp.config(backoff_initial_seconds=0.3, backoff_max_seconds=1)}
    ).start()
    body = delivery(["ack-1", "ack-2"])
    r = app.post(body)
    assert r.status_code == 500 and r.json()["error"] == "import_failed"
    imp.mode("ok")
    r = app.post(body)  # CoinTracker's retry of the same delivery
    assert r.status_code == 200, r.text
    assert [d["flow_ids"] for d in imp.imported()] == [["ack-1", "ack-2"]]
    r = app.post(delivery(["ack-3"]))
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    assert imp.imported()[-1]["flow_ids"] == ["ack-3"]


def test_rebuild_index_gives_the_same_answers(appliance: Appliance) -> None:
    flows = [f"rb-{i}" for i in range(40)]
    for i in range(0, 40, 4):
        appliance.post(delivery(flows[i : i + 6]))  # overlapping pages
    appliance.wait_for(lambda: len(appliance.imported_docs()) == 10, what="imports")
    before = appliance.cli_json("flows", "show", *flows, "unknown-flow", check=False)
    assert [f["known"] for f in before] == [True] * 40 + [False]
    refused = appliance.cli("rebuild-index", check=False)
    assert refused.returncode == 1 and "running" in refused.stderr
    assert appliance.stop() == 0
    rebuilt = appliance.cli_json("rebuild-index")
    assert rebuilt["flow_ids"] == 40
    after = appliance.cli_json("flows", "show", *flows, "unknown-flow", check=False)
    assert after == before
    appliance.start()
    assert appliance.post(delivery(flows[:6])).json() == {"status": "duplicate"}


def test_paused_imports_still_accept_and_run_nothing_until_resume(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path)
    app = make_appliance(imp.config()).start()
    app.cli("importer", "pause")
    time.sleep(1.5)
    ids = [app.post(delivery([f"p-{i}"])).json()["delivery_id"] for i in range(5)]
    assert all(ids)
    time.sleep(2.5)
    assert imp.attempts() == []
    status = app.cli("status").stdout
    assert "IMPORTS PAUSED" in status
    assert "ct_appliance_importer_paused 1.0" in httpx.get(app.admin + "/metrics").text
    assert any(line.get("msg") == "importer paused" for line in app.log_lines())
    # Survives a restart.
    assert app.stop() == 0
    app.start()
    time.sleep(1.5)
    assert imp.attempts() == []
    app.cli("importer", "resume")
    app.wait_for(lambda: len(imp.imported()) == 5, timeout=15, what="imports after resume")
    assert [d["delivery_id"] for d in imp.imported()] == ids  # FIFO by arrival


def test_purge_drops_old_bodies_but_flow_ids_stay_known(appliance: Appliance) -> None:
    did = appliance.post(delivery(["purge-1", "purge-2"])).json()["delivery_id"]
    appliance.wait_for(lambda: appliance.imported_docs(), what="import")
    assert appliance.cli_json("inbox", "show", did, "--body")["body"] is not None
    time.sleep(1.1)
    purged = appliance.cli_json("inbox", "purge", "--older-than", "1s")
    assert purged["purged"] == 1
    shown = appliance.cli_json("inbox", "show", did, "--body")
    assert shown["body"] is None and shown["flow_ids"] == ["purge-1", "purge-2"]
    assert appliance.post(delivery(["purge-1", "purge-2"])).json() == {"status": "duplicate"}
    assert all(f["known"] for f in appliance.cli_json("flows", "show", "purge-1", "purge-2"))
