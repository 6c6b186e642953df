"""Importers that misbehave, as real processes (spec §6): one that never exits, one that leaves
a grandchild behind, one that floods its output, one that dies by a signal. What an operator
sees is asserted through `ct-appliance inbox show --json`."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ..conftest import Appliance, delivery
from .helpers import Stopwatch, alive, report, rss_kib

ABUSIVE_IMPORTER = textwrap.dedent(
    """\
    import json, os, signal, subprocess, sys, time
    doc = json.load(sys.stdin)
    state = os.environ["STATE_DIR"]
    mode = open(os.path.join(state, "mode")).read().strip()
    def note(name, text):
        with open(os.path.join(state, name), "a") as f:
            f.write(text + "\\n")
    note("attempts", f"{doc['delivery_id']} {doc['attempt']} {mode}")
    if mode == "hang":
        # Ignores SIGTERM (so only the KILL after the grace ends it) and has a child too.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "1000"])
        note("pids", f"{os.getpid()} {child.pid}")
        while True:
            time.sleep(1)
    if mode in ("daemon", "setsid-daemon"):
        # The classic double fork; the grandchild keeps stdout open and outlives its parent.
        if os.fork() == 0:
            if mode == "setsid-daemon":
                os.setsid()
            if os.fork() == 0:
                note("pids", str(os.getpid()))
                time.sleep(1000)
                os._exit(0)
            os._exit(0)
        os.wait()
        print("started a daemon")
        sys.exit(0)
    if mode == "flood":
        chunk = b"o" * (1 << 20)
        for _ in range(256):
            os.write(1, chunk)
        for _ in range(128):
            os.write(2, b"e" * (1 << 20))
        os.write(1, b"THE END OF STDOUT\\n")
        os.write(2, b"THE END OF STDERR\\n")
        sys.exit(0)
    if mode == "signal" and doc["attempt"] == 1:
        print("about to die", flush=True)
        os.kill(os.getpid(), getattr(signal, doc["flow_ids"][0].split("-")[1]))
    note("imported", f"{doc['delivery_id']} {' '.join(doc['flow_ids'])}")
    """
)


class Importer:
    def __init__(self, tmp: Path, mode: str) -> None:
        self.dir = tmp / "importer"
        self.dir.mkdir(exist_ok=True)
        self.script = self.dir / "importer.py"
        self.script.write_text(ABUSIVE_IMPORTER)
        self.mode(mode)

    def mode(self, mode: str) -> None:
        (self.dir / "mode").write_text(mode)

    def lines(self, name: str) -> list[str]:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []

    def config(self, **importer: Any) -> dict[str, Any]:
        return {
            "importer": {
                "command": [sys.executable, str(self.script)],
                "env": {"STATE_DIR": str(self.dir)},
                "backoff_initial_seconds": 0.2,
                "backoff_max_seconds": 0.5,
                **importer,
            }
        }


def test_importer_that_never_exits_is_killed_with_its_children_and_retried(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path, "hang")
    app: Appliance = make_appliance(imp.config(timeout_seconds=1)).start()
    did = app.post(delivery(["hang-1"])).json()["delivery_id"]
    app.wait_for(lambda: imp.lines("pids"), what="the importer and its child")
    parent, child = map(int, imp.lines("pids")[0].split())
    started = time.monotonic()
    app.wait_for(lambda: not alive(parent) and not alive(child), timeout=10, what="kill")
    killed_after = round(time.monotonic() - started, 2)
    imp.mode("ok")
    app.wait_for(lambda: imp.lines("imported"), timeout=10, what="the retry")
    shown = app.cli_json("inbox", "show", did)
    assert shown["state"] == "done"
    first, second = shown["attempt_log"]
    assert first["outcome"] == "retry"
    assert first["result"] == "timed out after 1 s; process group killed"
    # 1 s timeout, then TERM (ignored), then KILL 2 s later.
    assert 2.5 <= first["duration_seconds"] < 5, first
    assert second["outcome"] == "success"
    assert app.proc is not None and app.proc.poll() is None
    report(
        "importer_hang",
        killed_after_seconds=killed_after,
        attempt_seconds=first["duration_seconds"],
    )


def test_grandchild_left_behind_does_not_outlive_the_attempt(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path, "daemon")
    app: Appliance = make_appliance(imp.config(timeout_seconds=30)).start()
    did = app.post(delivery(["daemon-1"])).json()["delivery_id"]
    app.wait_for(lambda: imp.lines("pids"), what="the grandchild")
    grandchild = int(imp.lines("pids")[0])

    def finished() -> Any:
        shown = app.cli_json("inbox", "show", did)
        return shown if shown["state"] != "importing" and shown["attempt_log"] else None

    shown = app.wait_for(finished, timeout=10, what="the attempt to end")
    assert shown["state"] == "done", shown
    (attempt,) = shown["attempt_log"]
    assert attempt["outcome"] == "success" and attempt["result"] == "exit 0"
    assert "started a daemon" in attempt["output"]["stdout"]
    # It held stdout open: the attempt still ends within the 2 s allowed after the exit.
    assert attempt["duration_seconds"] < 3, attempt
    app.wait_for(lambda: not alive(grandchild), timeout=5, what="the grandchild to be killed")


def test_setsid_daemon_grandchild_does_not_outlive_the_attempt(
    make_appliance: Any, tmp_path: Path
) -> None:
    """A grandchild that also left the process group (setsid) and keeps stdout open.

    Regression test: such a grandchild is in no process group the appliance kills, and once lived
    on after its attempt; since 68d5047 the server is a child subreaper and sweeps orphans."""
    imp = Importer(tmp_path, "setsid-daemon")
    app: Appliance = make_appliance(imp.config(timeout_seconds=30)).start()
    did = app.post(delivery(["setsid-1"])).json()["delivery_id"]
    app.wait_for(lambda: imp.lines("pids"), what="the grandchild")
    grandchild = int(imp.lines("pids")[0])
    try:

        def finished() -> Any:
            shown = app.cli_json("inbox", "show", did)
            return shown if shown["state"] != "importing" and shown["attempt_log"] else None

        shown = app.wait_for(finished, timeout=10, what="the attempt to end")
        assert shown["state"] == "done", shown
        assert shown["attempt_log"][0]["duration_seconds"] < 3  # not held open by the pipe
        time.sleep(1.0)
        survived = alive(grandchild)
        report("importer_setsid_daemon", grandchild_survived_attempt=survived)
        assert not survived, "a setsid'd grandchild outlived its importer attempt"
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_importer_flooding_hundreds_of_mb_keeps_memory_bounded(
    make_appliance: Any, tmp_path: Path
) -> None:
    imp = Importer(tmp_path, "flood")
    app: Appliance = make_appliance(imp.config()).start()
    assert app.proc is not None
    pid = app.proc.pid
    app.post(delivery(["warm-up"]))  # let the first request's allocations settle
    imp.mode("ok")
    app.wait_for(lambda: imp.lines("imported"), what="warm-up import")
    imp.mode("flood")
    baseline = rss_kib(pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clock = Stopwatch()
    did = app.post(delivery(["flood-1"])).json()["delivery_id"]
    try:

        def finished() -> Any:
            shown = app.cli_json("inbox", "show", did)
            return shown if shown["state"] == "done" else None

        shown = app.wait_for(finished, timeout=60, what="the flood to end")
    finally:
        stop.set()
        sampler.join()
    seconds = clock()
    (attempt,) = shown["attempt_log"]
    out, err = attempt["output"]["stdout"], attempt["output"]["stderr"]
    assert out.endswith("THE END OF STDOUT\n") and err.endswith("THE END OF STDERR\n")
    cut_out = f"[... {256 * (1 << 20) + 18 - 65536} bytes cut ...]\n"
    cut_err = f"[... {128 * (1 << 20) + 18 - 65536} bytes cut ...]\n"
    assert out.startswith(cut_out) and len(out) == len(cut_out) + 65536
    assert err.startswith(cut_err) and len(err) == len(cut_err) + 65536
    growth_mib = round((peak - baseline) / 1024, 1)
    report(
        "importer_flood",
        flooded_mib=384,
        rss_baseline_mib=round(baseline / 1024, 1),
        rss_peak_mib=round(peak / 1024, 1),
        rss_growth_mib=growth_mib,
        seconds=seconds,
    )
    assert growth_mib < 32, (baseline, peak)
    assert httpx.get(app.admin + "/healthz").status_code == 200


SIGNALS = ("SIGKILL", "SIGSEGV", "SIGTERM")


def test_importer_killed_by_a_signal_is_retried(make_appliance: Any, tmp_path: Path) -> None:
    imp = Importer(tmp_path, "signal")
    app: Appliance = make_appliance(imp.config()).start()
    ids = [app.post(delivery([f"sig-{name}"])).json()["delivery_id"] for name in SIGNALS]
    app.wait_for(lambda: len(imp.lines("imported")) == len(SIGNALS), timeout=20, what="the retries")
    for did, name in zip(ids, SIGNALS, strict=True):
        shown = app.cli_json("inbox", "show", did)
        assert shown["state"] == "done"
        first, second = shown["attempt_log"]
        assert (first["outcome"], first["result"]) == ("retry", f"killed by signal {name}")
        assert "about to die" in first["output"]["stdout"]
        assert second["outcome"] == "success"
