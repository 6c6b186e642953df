"""Backup under load and restore, as an operator does it: the real server, real sockets, the
real CLI (spec §7 `backup DEST`, `restore SRC [--force]`)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..conftest import Appliance, delivery


@dataclass
class Posted:
    body: bytes
    flow: str
    answered_at: float  # time.monotonic() once the answer was in
    status: int
    doc: dict[str, Any]

    @property
    def delivery_id(self) -> str:
        return str(self.doc["delivery_id"])


def seq_of(delivery_id: str) -> int:
    return int(delivery_id.rpartition("-")[2])


class Load:
    """Threads posting new signed deliveries (one new flow id each) until stopped."""

    def __init__(self, app: Appliance, threads: int = 1) -> None:
        self.app = app
        self.posted: list[Posted] = []
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        try:
            with httpx.Client() as client:
                while not self.stopping.is_set():
                    flow = f"flow-{uuid.uuid4().hex}"
                    body = delivery([flow])
                    r = self.app.post(body, client=client)
                    answer = Posted(body, flow, time.monotonic(), r.status_code, r.json())
                    with self.lock:
                        self.posted.append(answer)
                    time.sleep(0.02)
        except BaseException as e:  # seen by the test, not lost in a thread
            self.errors.append(e)

    def count(self) -> int:
        with self.lock:
            return len(self.posted)

    def wait_more(self, n: int, timeout: float = 20) -> None:
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"load stalled at {self.count()}"
            time.sleep(0.02)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def ids(app: Appliance, state: str) -> set[str]:
    rows = app.cli_json("inbox", "list", "--state", state, "--limit", "100000")
    return {r["delivery_id"] for r in rows}


def test_backup_under_load_and_restore_into_a_new_store(
    make_appliance: Any, tmp_path: Path
) -> None:
    importer = {"importer": {"concurrency": 4}}
    old = make_appliance(importer, sub="old").start()
    early = [old.post(delivery([f"early-{i}"])).json()["delivery_id"] for i in range(5)]
    old.wait_for(lambda: ids(old, "done") == set(early), what="the early imports")
    old.cli("importer", "pause")  # from here on, every delivery stays pending

    dest = tmp_path / "backup-1"
    with Load(old) as load:
        load.wait_more(20)
        backup_began = time.monotonic()
        made = json.loads(old.cli("backup", str(dest), "--json").stdout)
        load.wait_more(20)  # and the server kept accepting after it
    assert not load.errors, load.errors
    assert old.stop() == 0
    posted = load.posted
    assert {p.status for p in posted} == {200}
    assert {p.doc["status"] for p in posted} == {"accepted"}
    last_seq = made["last_seq"]
    assert made["last_delivery_id"] in {p.delivery_id for p in posted}
    assert sorted(p.name for p in dest.iterdir()) == ["backup.json", "data.mdb"]
    acked_before = [p for p in posted if p.answered_at < backup_began]
    in_backup = [p for p in posted if seq_of(p.delivery_id) <= last_seq]
    lost = [p for p in posted if seq_of(p.delivery_id) > last_seq]
    assert acked_before and lost
    assert {seq_of(p.delivery_id) for p in acked_before} <= set(range(1, last_seq + 1))
    assert len(in_backup) + len(early) == last_seq == made["deliveries"]

    again = old.cli("backup", str(dest), check=False)
    assert again.returncode == 1 and "holds a backup" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    # The old store is still there: a restore onto it needs --force.
    refused = old.cli("restore", str(dest), check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr

    new = make_appliance(importer, sub="new")
    restored = json.loads(new.cli("restore", str(dest), "--json").stdout)
    assert (restored["last_seq"], restored["first_seq"]) == (last_seq, last_seq + 1)
    text_out = new.cli("restore", str(dest), "--force").stdout
    assert "flow index  rebuilt from the inbox when the server starts" in text_out
    new.start()

    # The restored store is the backup: imported stays imported, pending stays pending (the
    # importer's pause was backed up too), under the delivery ids the old server gave.
    assert ids(new, "done") == set(early)
    assert ids(new, "pending") == {p.delivery_id for p in in_backup}
    # Acknowledged before the backup began, or in it at all: CoinTracker's retry is a duplicate.
    with httpx.Client() as client:
        for p in in_backup + acked_before:
            r = new.post(p.body, client=client)
            assert (r.status_code, r.json()["status"]) == (200, "duplicate"), p.delivery_id
        # Acknowledged by the lost store after the backup's seq: not here, accepted anew, under
        # ids the old server never handed out although the seqs are the same.
        reposted = [new.post(p.body, client=client).json() for p in lost]
    assert {r["status"] for r in reposted} == {"accepted"}
    new_ids = {r["delivery_id"] for r in reposted}
    old_ids = {p.delivery_id for p in posted} | set(early)
    assert not new_ids & old_ids
    assert {seq_of(i) for i in new_ids} & {seq_of(p.delivery_id) for p in lost}
    assert new.cli("inbox", "show", lost[0].delivery_id, check=False).returncode == 1
    assert new.cli("inbox", "show", in_backup[-1].delivery_id).returncode == 0

    # No restore while a server runs on the store, --force or not.
    busy = new.cli("restore", str(dest), "--force", check=False)
    assert busy.returncode == 1 and "stop it first" in busy.stderr

    # Resumed: the pending deliveries of the backup and the re-sent lost ones are imported,
    # each once; what the old server imported is not imported again.
    new.cli("importer", "resume")
    want = {p.delivery_id for p in in_backup} | new_ids
    new.wait_for(lambda: {d["delivery_id"] for d in new.imported_docs()} == want, 60, "imports")
    flows = [f for d in new.imported_docs() for f in d["flow_ids"]]
    assert sorted(flows) == sorted(p.flow for p in posted)
    assert new.stop() == 0
