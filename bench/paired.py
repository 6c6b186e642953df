"""make bench-paired: the request path's cost against bare Hypercorn-trio (or against another
build of ct-appliance), with both servers on CPU 0 at the same time.

    python bench/paired.py                          # durable accept vs bare, 5 rounds of 8 s
    python bench/paired.py --against /tmp/old.sh    # this build vs another (A/B of a change)

Why: on a shared VM the speed of CPU 0 moves by ±20 % from one 8 s run to the next (other
tenants, steal), so two servers measured one after the other differ by more than most changes
do. Here both run at once: each gets its own wrk on CPU 1 (half the connections each, unique
ids each), and the figure is the ratio of their CPU per request over the same seconds, so what
slows the core slows both. Taken this way the ratio moves by about ±0.02 between rounds.

It is a CPU ratio, the "× bare by CPU" column of `make bench` taken concurrently, not a
throughput ratio: two servers sharing a core each run at about half speed, so the appliance's
group commits are larger than when it has the core alone, which flatters it slightly (the
per-commit costs are spread over more deliveries). `make bench` remains the published table;
this is the tool for deciding whether a change to the request path helps.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import load  # noqa: E402
import payloads  # noqa: E402
import servers  # noqa: E402
import variants  # noqa: E402
from variants import Ctx  # noqa: E402

CONNECTIONS = 32  # per server: the 64 of `make bench`, shared
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _start(ctx: Ctx, exe: str | None, rdir: Path) -> tuple[servers.Server, str]:
    rdir.mkdir(parents=True)
    if exe is None:
        server, port = variants.start_bare("bare", rdir / "server.log")
        return server, f"http://127.0.0.1:{port}{variants.WEBHOOK_PATH}"
    ctx.app_exe = Path(exe)
    server, url, _ = variants.start_app(ctx, rdir, rdir / "store", pause=True)
    return server, url


def _main_thread_seconds(pid: int) -> float:
    """CPU seconds of the process's first thread: the event loop (the rest are worker threads,
    the group commit's among them)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _load(url: str, file: Path, seconds: int, out: dict[str, Any], key: str) -> None:
    out[key] = load.wrk(url, file, seconds, CONNECTIONS)


def one_round(
    ctx: Ctx, a: str | None, b: str, seconds: int, n: int
) -> tuple[float, float, float, float]:
    """(A's CPU ms per request, B's, A's over B's, B's event-loop thread's ms per request)
    with A and B loaded at the same time."""
    rdir = ctx.work / f"round{n}"
    sa, ua = _start(ctx, a, rdir / "a")
    try:
        sb, ub = _start(ctx, b, rdir / "b")
        try:
            warm: dict[str, Any] = {}
            _load(ua, ctx.files["warm-a"], 1, warm, "a")
            _load(ub, ctx.files["warm-b"], 1, warm, "b")
            ca, cb = servers.cpu_seconds(sa.pid), servers.cpu_seconds(sb.pid)
            lb = _main_thread_seconds(sb.pid)
            got: dict[str, Any] = {}
            threads = [
                threading.Thread(target=_load, args=(ua, ctx.files["sat-a"], seconds, got, "a")),
                threading.Thread(target=_load, args=(ub, ctx.files["sat-b"], seconds, got, "b")),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ma = 1000 * (servers.cpu_seconds(sa.pid) - ca) / got["a"]["requests"]
            mb = 1000 * (servers.cpu_seconds(sb.pid) - cb) / got["b"]["requests"]
            loop_b = 1000 * (_main_thread_seconds(sb.pid) - lb) / got["b"]["requests"]
            for key, row in got.items():
                if row["errors"].get("status") or row.get("wraps"):
                    print(f"  warning: {key} had errors or re-sent ids: {row['errors']}")
        finally:
            sb.stop()
    finally:
        sa.stop()
    return ma, mb, ma / mb, loop_b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=str(HERE.parent / ".venv" / "bin" / "ct-appliance"))
    parser.add_argument("--against", help="another ct-appliance command (default: bare)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=int, default=2500, help="sizes the request files")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ct-paired-"))
    try:
        ctx = Ctx(
            root=HERE.parent, work=work, secret=secrets.token_hex(16), files={},
            app_exe=Path(args.app), binary=Path(), webhook_exe=None,
        )  # fmt: skip
        for name, count in (("warm", args.rate), ("sat", args.seconds * args.rate)):
            for side in ("a", "b"):
                path = work / f"requests-{name}-{side}.txt"
                payloads.write_file(path, count, ctx.secret.encode())
                ctx.files[f"{name}-{side}"] = path
        label = args.against or "bare Hypercorn-trio"
        print(f"A = {label}, B = {args.app}: CPU ms per request, both on CPU 0 at once")
        ratios = []
        for n in range(1, args.rounds + 1):
            ma, mb, r, loop_b = one_round(ctx, args.against, args.app, args.seconds, n)
            ratios.append(r)
            print(
                f"round {n}: A {ma:.3f}  B {mb:.3f} (event loop {loop_b:.3f}, worker threads "
                f"{mb - loop_b:.3f})  B x A by CPU {r:.3f}",
                flush=True,
            )
        print(
            f"B x A by CPU: median {statistics.median(ratios):.3f}, "
            f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds"
        )
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
