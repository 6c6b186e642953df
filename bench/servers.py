"""Starting, probing, measuring and stopping the servers under test.

Every server runs in its own session (process group) pinned to SERVER_CPU with taskset; the load
generators run on LOAD_CPU. Every process started here is recorded in `_live` and stopped by
`stop_all()`, which run.py calls in a `finally` and on SIGINT/SIGTERM: a failed run leaves nothing
behind. Only processes this module started are ever signalled (by their own process group).
What is started by other means (a PostgreSQL cluster, haproxy: bench/pgrows.py) registers its own
stop with `on_stop_all`, and `stop_all()` runs those too, after the servers.

CPU and memory are read from /proc: CPU as utime+stime+cutime+cstime summed over the server's
process tree (so importer children and a onefile bootloader's child count too), memory as
Private_Clean+Private_Dirty from smaps_rollup summed over the same tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadgen import get

SERVER_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_live: list[Server] = []
_stops: list[Callable[[], None]] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of pid, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        st = _stat(pid)
        if st is not None:
            total += st[1]
    return total / CLK_TCK


def cpu_ticks(cpu: str) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU since boot, from /proc/stat (idle and iowait = idle)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            fields = [int(x) for x in line.split()[1:9]]
            return sum(fields) - fields[3] - fields[4], sum(fields)
    raise LookupError(f"cpu{cpu} not in /proc/stat")


def memory_mib(root: int) -> tuple[float, float] | None:
    """(private, anonymous) MiB over the tree: Private_Clean+Private_Dirty, and Anonymous (heap,
    stacks: what is not a mapped file such as LMDB's data file)."""
    private_kb = anon_kb = 0
    seen = False
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        seen = True
        for line in text.splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private_kb += int(line.split()[1])
            elif line.startswith("Anonymous:"):
                anon_kb += int(line.split()[1])
    return (round(private_kb / 1024, 1), round(anon_kb / 1024, 1)) if seen else None


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        if self in _live:
            _live.remove(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Anything left in the group (the server or its children) is ours: kill it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


class StartError(Exception):
    pass


def start(
    name: str,
    argv: list[str],
    log_path: Path,
    ready_port: int,
    ready_path: str,
    need_200: bool = True,
    timeout: float = 30.0,
    cpu: str = SERVER_CPU,
) -> Server:
    """Exec argv pinned to `cpu`; return once GET ready_path answers (200, unless need_200 is
    false), polled every 5 ms: ready_seconds is exec to that answer."""
    log = open(log_path, "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    server = Server(name, proc, log_path)
    _live.append(server)
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        answer = get(ready_port, ready_path, timeout=0.5)
        if answer is not None and (answer[0] == 200 or not need_200):
            server.ready_seconds = time.perf_counter() - t0
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    server.stop()
    why = "exited" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
    tail = server.log_tail()
    last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "empty log")
    raise StartError(f"{name} {why} ({last[:200]}); log tail:\n{tail}")


def on_stop_all(stop: Callable[[], None]) -> None:
    """Have `stop_all()` call `stop` (until `forget(stop)`): for what `start` did not start."""
    _stops.append(stop)


def forget(stop: Callable[[], None]) -> None:
    if stop in _stops:
        _stops.remove(stop)


def stop_all() -> None:
    for server in list(_live):
        server.stop(grace=5.0)
    for stop in reversed(list(_stops)):
        forget(stop)
        stop()
