"""How one importer attempt runs, and what its result means (spec §6).

Two attempt kinds share one result type and one dispatcher (dispatcher.py):

* `CommandAttempt` runs ``importer.command`` (argv, no shell) in a new session, writes the
  importer document to stdin, keeps the last 64 KiB of stdout and stderr, and on the timeout
  kills the whole process group (TERM, then KILL). After the importer exits, what is left of its
  process group is killed too, so a forked child cannot outlive its attempt.
  A descendant that also left the group (setsid) is reparented to the appliance, which makes
  itself a child subreaper (`enable_subreaper`), and is killed by `sweep_orphans` when its
  attempt ends: no importer process outlives its attempt.
* `HttpAttempt` (httpattempt.py) POSTs the same document to ``importer.url``.

Outcomes: "success" (exit 0 / 2xx), "dead" (exit 65 EX_DATAERR / 4xx other than 408 and 429 /
a spawn the delivery's own data makes impossible, E2BIG), "retry" (anything else).
`backoff()` is the retry schedule; it is a plain function.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .config import ImporterConfig
from .record import Outcome

TAIL_BYTES = 64 * 1024
EX_DATAERR = 65
_PASS_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")


@dataclass
class AttemptResult:
    outcome: Outcome  # success | retry | dead
    summary: str  # one line for tables and logs: "exit 0", "killed after 30 s", "HTTP 503"
    duration: float
    output: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None


class Attempt(Protocol):
    async def __call__(self, doc: dict[str, Any]) -> AttemptResult: ...

    async def aclose(self) -> None: ...


def backoff(attempt: int, cfg: ImporterConfig, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1`: exponential from backoff_initial_seconds, capped at
    backoff_max_seconds, with jitter drawn from the top quarter so it never drops below 75 %."""
    base = min(cfg.backoff_max_seconds, cfg.backoff_initial_seconds * 2 ** max(0, attempt - 1))
    return float(base * (rng or random).uniform(0.75, 1.0))


def retry_delay(result: AttemptResult, attempt: int, cfg: ImporterConfig) -> float:
    delay = backoff(attempt, cfg)
    if result.retry_after is not None:
        delay = max(delay, result.retry_after)
    return min(delay, cfg.backoff_max_seconds)


def importer_env(cfg: ImporterConfig, doc: dict[str, Any]) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(cfg.env)
    env.update(
        CT_DELIVERY_ID=doc["delivery_id"],
        CT_ATTEMPT=str(doc["attempt"]),
        CT_COST_BASIS_RUN_ID=doc["cost_basis_run_id"],
        CT_GHOST_USER_ID=doc["ghost_user_id"],
        CT_FLOW_COUNT=str(len(doc["flow_ids"])),
    )
    return env


class _Tail:
    def __init__(self) -> None:
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * TAIL_BYTES:
            del self.data[: len(self.data) - TAIL_BYTES]

    def text(self) -> str:
        kept = bytes(self.data[-TAIL_BYTES:])
        prefix = f"[... {self.total - len(kept)} bytes cut ...]\n" if self.total > len(kept) else ""
        return prefix + kept.decode("utf-8", "replace")


_LIVE_PIDS: set[int] = set()  # importer processes of attempts still running
# Spawns in flight: the child exists before its pid is known, and must never be taken for an
# orphan (reaping it here would make trio see exit status 0 for a killed importer).
_SPAWNING = 0
PR_SET_CHILD_SUBREAPER = 36


def enable_subreaper() -> bool:
    """Make orphaned descendants of importers children of this process (Linux prctl)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def sweep_orphans() -> int:
    """Kill and reap our child processes that are not a running importer: descendants that
    escaped their importer's process group and were reparented to us. Returns how many.
    Skipped while a spawn is in flight (its child is not yet in _LIVE_PIDS); the next attempt
    to end sweeps again."""
    if _SPAWNING:
        return 0
    me, killed = os.getpid(), 0
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        if pid in _LIVE_PIDS:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) < 2 or int(fields[1]) != me:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, os.WNOHANG)  # a zombie now or at the next sweep
        except ChildProcessError:
            pass
    return killed


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class CommandAttempt:
    def __init__(self, cfg: ImporterConfig) -> None:
        assert cfg.command is not None
        self.cfg = cfg
        self.argv = list(cfg.command)

    async def aclose(self) -> None:
        return None

    async def __call__(self, doc: dict[str, Any]) -> AttemptResult:
        started = time.monotonic()
        stdin = json.dumps(doc).encode()
        global _SPAWNING
        _SPAWNING += 1
        try:
            proc = await trio.lowlevel.open_process(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=importer_env(self.cfg, doc),
                start_new_session=True,
            )
        except OSError as e:
            return _spawn_failed(e, self.argv[0], time.monotonic() - started)
        except ValueError as e:  # e.g. a NUL in an environment value: no retry can fix it
            return AttemptResult(
                Outcome.DEAD, f"cannot start the importer: {e}", time.monotonic() - started
            )
        else:
            _LIVE_PIDS.add(proc.pid)
        finally:
            _SPAWNING -= 1
        out, err = _Tail(), _Tail()
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_feed, proc.stdin, stdin)
                nursery.start_soon(_drain, proc.stdout, out)
                nursery.start_soon(_drain, proc.stderr, err)
                with trio.move_on_after(self.cfg.timeout_seconds) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    await _terminate_group(proc)
                # Whatever the importer forked is killed with its group, closing the pipes;
                # a process that left the group cannot hold the attempt open past 2 s.
                _killpg(proc.pid, signal.SIGKILL)
                nursery.cancel_scope.deadline = trio.current_time() + 2.0
        finally:
            if proc.returncode is None:
                _killpg(proc.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await proc.wait()
            _LIVE_PIDS.discard(proc.pid)
            sweep_orphans()
        duration = time.monotonic() - started
        output = {"stdout": out.text(), "stderr": err.text()}
        code = proc.returncode
        if timed_out:
            summary = f"timed out after {self.cfg.timeout_seconds:g} s; process group killed"
            return AttemptResult(Outcome.RETRY, summary, duration, output)
        if code == 0:
            return AttemptResult(Outcome.SUCCESS, "exit 0", duration, output)
        if code == EX_DATAERR:
            return AttemptResult(Outcome.DEAD, "exit 65 (EX_DATAERR: permanent)", duration, output)
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return AttemptResult(Outcome.RETRY, f"killed by signal {name}", duration, output)
        return AttemptResult(Outcome.RETRY, f"exit {code}", duration, output)


def _spawn_failed(e: OSError, command: str, duration: float) -> AttemptResult:
    """What an OSError at spawn means for the delivery.

    E2BIG (argument list and environment past the kernel's limit) comes from the delivery's own
    data (its ids travel in the environment): the same delivery fails the same way every time,
    so it is dead at once rather than burning every attempt.
    Everything else is retried. ENOENT, EACCES, ENOEXEC, ENAMETOOLONG concern the configured
    command, which the operator can fix (install it, chmod it, reload) without touching the
    delivery, and the retry then succeeds. EMFILE, ENFILE, ENOMEM, EAGAIN are the machine's
    state of the moment and pass by themselves.
    """
    if e.errno == errno.E2BIG:
        return AttemptResult(
            Outcome.DEAD, "cannot start the importer: argument list too long (E2BIG)", duration
        )
    name = errno.errorcode.get(e.errno or 0, "")
    why = f"{e.strerror} ({name})" if name else str(e.strerror or e)
    return AttemptResult(Outcome.RETRY, f"cannot start {command}: {why}", duration)


async def _terminate_group(proc: trio.Process) -> None:
    _killpg(proc.pid, signal.SIGTERM)
    with trio.move_on_after(2.0):
        await proc.wait()
    _killpg(proc.pid, signal.SIGKILL)


async def _feed(stream: Any, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the importer closed stdin early; its exit status says what happened
    finally:
        await stream.aclose()


async def _drain(stream: Any, tail: _Tail) -> None:
    try:
        while chunk := await stream.receive_some(65536):
            tail.add(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
