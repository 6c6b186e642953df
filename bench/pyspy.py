"""BENCH_PROFILE: py-spy samples each Python server during its saturation run.

The profile is what SPEC §10 asks for when a target is missed: where the server's time goes under
the same load the table measures. py-spy (PyPI) is installed on first use into var/bench/tools,
never into .venv; it samples at 200 Hz with --nonblocking (the server is not paused), from the
load CPU, aggregated by function. Figures of a profiled run are a little lower; the report says so.

Output per server and round, var/bench/profile-round<N>-<variant>.*:
  BENCH_PROFILE=1    .txt, collapsed stacks (for flamegraph tools or speedscope), and a summary
                     in the report: the functions with the most samples, on top of the stack
                     (self) and anywhere in it (total);
  BENCH_PROFILE=svg  .svg, py-spy's own flame graph (the report links it).
BENCH_PROFILE_GIL=1 keeps only the samples of the thread holding the GIL (py-spy --gil): where the
one core's Python time goes, without the worker threads waiting in C (an LMDB commit's fsync).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from servers import LOAD_CPU

PY_SPY_VERSION = "0.4.3"
# Path prefixes cut from frames: installed packages, the standard library, this checkout.
_PREFIXES = ("site-packages/", f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/",
             f"{Path(__file__).resolve().parent.parent}/")  # fmt: skip


def ensure_py_spy(tools: Path) -> str:
    found = shutil.which("py-spy") or (
        str(tools / "bin" / "py-spy") if (tools / "bin" / "py-spy").exists() else None
    )
    if found:
        return found
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(tools), f"py-spy=={PY_SPY_VERSION}"],
        check=True,
    )  # fmt: skip
    return str(tools / "bin" / "py-spy")


def start(py_spy: str, pid: int, seconds: int, out: Path, gil: bool) -> subprocess.Popen[bytes]:
    """Record `seconds` of pid into out: an SVG flame graph if out ends in .svg, else raw."""
    fmt = "flamegraph" if out.suffix == ".svg" else "raw"
    argv = [
        "taskset", "-c", LOAD_CPU, py_spy, "record", "--pid", str(pid), "--duration",
        str(seconds), "--rate", "200", "--nonblocking", "--function", "--format", fmt,
        "--output", str(out), *(["--gil"] if gil else []),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize(path: Path, top: int = 12) -> str:
    if path.suffix == ".svg":
        return f"{path.name}: flame graph in {path} (open in a browser)"
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";")]
        samples += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            total_count[frame] += count
    if not samples:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {samples} samples", "", "| self % | function | | total % | function |",
             "|---:|---|---|---:|---|"]  # fmt: skip
    selfs = self_count.most_common(top)
    totals = [kv for kv in total_count.most_common(top + 8) if not kv[0].startswith("<")][:top]
    for i in range(max(len(selfs), len(totals))):
        s = selfs[i] if i < len(selfs) else ("", 0)
        t = totals[i] if i < len(totals) else ("", 0)
        lines.append(
            f"| {s[1] * 100 / samples:.1f} | {s[0]} | | {t[1] * 100 / samples:.1f} | {t[0]} |"
        )
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'func (/long/path/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in _PREFIXES:
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{name} ({file})" if file else name
