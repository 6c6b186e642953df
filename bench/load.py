"""Driving a server from LOAD_CPU: wrk for closed-loop saturation, loadgen.py for the rest.

wrk (C, one thread) keeps 64 connections busy with a fraction of one core; a Python client on
this two-core machine would saturate its own core before the server does. Everything wrk cannot
do (open-loop pacing, posting a file exactly once, waiting for imports) is loadgen.py.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadgen import SIG_HEADER
from servers import LOAD_CPU

HERE = Path(__file__).resolve().parent


class LoadError(Exception):
    pass


def wrk(url: str, request_file: Path, seconds: int, connections: int) -> dict[str, Any]:
    """Closed-loop saturation: `connections` keep-alive connections, each sending its next
    request as soon as the previous answer arrived, for `seconds`."""
    argv = [
        "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--timeout", "10s", "-s", str(HERE / "replay.lua"), url, "--", str(request_file),
        SIG_HEADER,
    ]  # fmt: skip
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


def loadgen(*args: str, timeout: float) -> dict[str, Any]:
    """Run `loadgen.py ARGS` on LOAD_CPU; its JSON result."""
    argv = ["taskset", "-c", LOAD_CPU, sys.executable, str(HERE / "loadgen.py"), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise LoadError(f"loadgen failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
