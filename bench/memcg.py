"""BENCH_MEMORY_MAX=1G: the seeded rows' store copy and server run in a memory cgroup with that
hard limit, as the unit's `MemoryMax=` puts them (systemd counts the page cache of the mapped
LMDB files too, which is what the index's working set is made of).

cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`, what this container offers), whichever
is mounted writable at /sys/fs/cgroup; the row says which, and the peak the group reached.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


class Group:
    def __init__(self, name: str, limit: int) -> None:
        v2 = (ROOT / "cgroup.controllers").exists()
        self.kind = "v2" if v2 else "v1"
        self.dir = (ROOT if v2 else ROOT / "memory") / name
        self.dir.mkdir(exist_ok=True)
        (self.dir / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        self.limit = limit

    def argv(self, argv: list[str]) -> list[str]:
        """argv run inside the group (the shell joins it, then execs)."""
        procs = str(self.dir / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def peak_mib(self) -> float | None:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            path = self.dir / name
            if path.exists():
                return round(int(path.read_text()) / (1 << 20), 1)
        return None

    def describe(self) -> str:
        peak = self.peak_mib()
        return f"in a memory cgroup ({self.kind}) limited to {self.limit >> 20} MiB" + (
            f", peak {peak:.0f} MiB" if peak is not None else ""
        )

    def remove(self) -> None:
        try:
            os.rmdir(self.dir)
        except OSError:
            pass  # a process is still in it; the next run reuses the name
