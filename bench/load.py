"""Driving a server: wrk (closed loop) and loadgen.py (open loop, exactly-once), on LOAD_CPU."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from servers import LOAD_CPU, pinned

HERE = Path(__file__).resolve().parent
REPLAY_LUA = HERE / "replay.lua"
LOADGEN = HERE / "loadgen.py"
SIG_HEADER = "X-Cointracker-Signature"


class LoadError(Exception):
    pass


def wrk(url: str, request_file: Path, seconds: int, connections: int) -> dict[str, Any]:
    """Closed-loop saturation: `connections` keep-alive connections, each sending its next
    request as soon as the previous answer arrived, for `seconds`."""
    argv = pinned(LOAD_CPU, [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(REPLAY_LUA), url, "--", str(request_file), SIG_HEADER,
    ])  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Only wrk (and taskset, which exec'd it) was reaped in between: its own CPU time.
    wrk_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            result: dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
            dur = int(result["duration_us"]) / 1e6
            result["rps"] = int(result["requests"]) / dur if dur else 0.0
            result["wrk_cpu_pct"] = wrk_cpu * 100 / dur if dur else None
            return result
    raise LoadError(f"wrk gave no result (exit {done.returncode}): {done.stderr.strip()[-500:]}")


def _loadgen(args: list[str], timeout: float) -> dict[str, Any]:
    argv = pinned(LOAD_CPU, [sys.executable, str(LOADGEN), *args])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise LoadError(f"loadgen failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def paced(url: str, request_file: Path, rate: float, seconds: float) -> dict[str, Any]:
    return _loadgen(
        ["paced", url, str(request_file), "--rate", str(rate), "--seconds", str(seconds)],
        timeout=seconds + 60,
    )


def once(url: str, request_file: Path, concurrency: int, timeout: float = 300) -> dict[str, Any]:
    return _loadgen(
        ["once", url, str(request_file), "--concurrency", str(concurrency)], timeout=timeout
    )


def once_async(url: str, request_file: Path, concurrency: int) -> subprocess.Popen[str]:
    """Start an exactly-once post in the background (the import variant polls meanwhile)."""
    args = ["once", url, str(request_file), "--concurrency", str(concurrency)]
    argv = pinned(LOAD_CPU, [sys.executable, str(LOADGEN), *args])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
