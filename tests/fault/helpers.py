"""What the fault tests share: a recording importer, drain and metric helpers, /proc readings."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from ..conftest import Appliance

# Appends every run's document (one line, one write(2) on an O_APPEND descriptor, fsync'd) and
# never dedupes, so the record shows re-runs as well as imports. -I -S keeps it fast.
RECORDING_IMPORTER = textwrap.dedent(
    """\
    import os, sys
    data = sys.stdin.buffer.read().strip() + b"\\n"
    fd = os.open(os.environ["RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    """
)


def recording_importer(tmp: Path, **importer: Any) -> tuple[dict[str, Any], Path]:
    """Config overrides for the recording importer, and the path of its record."""
    script = tmp / "record_importer.py"
    script.write_text(RECORDING_IMPORTER)
    record = tmp / "record.jsonl"
    cfg = {
        "importer": {
            "command": [sys.executable, "-I", "-S", str(script)],
            "env": {"RECORD": str(record)},
            **importer,
        }
    }
    return cfg, record


def read_record(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def inbox_counts(app: Appliance) -> dict[str, Any]:
    counts: dict[str, Any] = httpx.get(app.admin + "/status", timeout=10).json()["inbox"]
    return counts


def wait_drained(app: Appliance, timeout: float = 60.0) -> dict[str, Any]:
    """Until the running server's inbox has nothing pending or importing."""

    def drained() -> dict[str, Any] | None:
        counts = inbox_counts(app)
        return counts if counts["pending"] == 0 and counts["importing"] == 0 else None

    result: dict[str, Any] = app.wait_for(drained, timeout=timeout, what="importers drained")
    return result


def metric(app: Appliance, name: str) -> float:
    """The value of an unlabelled (or first-labelled) sample of `name` on /metrics."""
    for line in httpx.get(app.admin + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` (VmRSS in /proc/PID/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.started, 1)


FIGURES = Path(__file__).resolve().parents[2] / "var" / "fault-figures.jsonl"


def report(test: str, **figures: Any) -> None:
    """Print a test's figures and append them to var/fault-figures.jsonl (for RELIABILITY.md)."""
    line = json.dumps({"test": test, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures})
    print(f"\nFIGURES {line}")
    FIGURES.parent.mkdir(exist_ok=True)
    with FIGURES.open("a") as f:
        f.write(line + "\n")
