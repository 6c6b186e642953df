"""make bench: throughput, latency, CPU, memory and start-up of ct-appliance against its ceiling
(bare Hypercorn-trio) and a peer (Debian's webhook), in one table of medians.

Each round runs every variant once (in rotated order), each on a server started for it, pinned to
CPU 0, driven from CPU 1: a 1 s wrk warm-up, wrk saturation at 64 connections, then loadgen.py
paced at 100 requests/s (open loop, latency from the scheduled send). Ratios to the bare
server are taken within each round, then the median over rounds is reported. Start-up (exec to
/readyz 200) is measured apart, several runs each. Every server started is stopped, even on error.

Settings (environment variables; BENCH_QUICK=1 shrinks everything for development):
  BENCH_ROUNDS=3 BENCH_SATURATION_SECONDS=8 BENCH_PACED_SECONDS=8 BENCH_PACED_RATE=100
  BENCH_WARMUP_SECONDS=1 BENCH_CONNECTIONS=64 BENCH_STARTUP_RUNS=5 BENCH_IMPORT_DELIVERIES=1000
  BENCH_VARIANTS=bare,app,dup,idx1m,idx10m,idx100m,webhook,import,importhttp,pg1,pg2
                 (and, only when named: pg1-10m,pg2-10m; bench/pgrows.py)
  BENCH_MEMORY_MAX=1G (the seeded rows' server in a memory cgroup with that limit; bench/memcg.py)
  BENCH_MAX_RATE=5000 (sizes the unique-id request files)
  BENCH_APP_EXE=.venv/bin/ct-appliance (the ct-appliance command to serve the app variants with)
  BENCH_PROFILE=1|svg (py-spy samples each Python server's saturation run; see bench/pyspy.py)
  BENCH_PROFILE_GIL=1 (only the thread holding the GIL)
Results: printed, and saved under var/bench/ (results-*.json, results-*.md, latest.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import load  # noqa: E402
import memcg  # noqa: E402
import payloads  # noqa: E402
import pgrows  # noqa: E402
import pyspy  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
import variants  # noqa: E402
from variants import Ctx, NotAvailable, Variant  # noqa: E402

ROOT = HERE.parent
RESULTS = ROOT / "var" / "bench"
DEBIAN_TOOLS = {"wrk": "wrk", "webhook": "webhook"}
IMPORT_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    warmup_seconds: int
    saturation_seconds: int
    paced_seconds: float
    paced_rate: float
    connections: int
    startup_runs: int
    import_deliveries: int
    variants: list[str] | None
    max_rate: int
    profile: str  # "", "1" (collapsed stacks and a summary) or "svg" (flame graphs)
    profile_gil: bool

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        quick = env.get("BENCH_QUICK", "") not in ("", "0")

        def num(name: str, default: float, quick_default: float | None = None) -> float:
            if name in env:
                return float(env[name])
            return quick_default if quick and quick_default is not None else default

        chosen = env.get("BENCH_VARIANTS")
        profile = env.get("BENCH_PROFILE", "")
        return cls(
            quick=quick,
            rounds=int(num("BENCH_ROUNDS", 3, 1)),
            warmup_seconds=int(num("BENCH_WARMUP_SECONDS", 1)),
            saturation_seconds=int(num("BENCH_SATURATION_SECONDS", 8, 3)),
            paced_seconds=num("BENCH_PACED_SECONDS", 8, 3),
            paced_rate=num("BENCH_PACED_RATE", 100),
            connections=int(num("BENCH_CONNECTIONS", 64)),
            startup_runs=int(num("BENCH_STARTUP_RUNS", 5, 2)),
            import_deliveries=int(num("BENCH_IMPORT_DELIVERIES", 1000, 200)),
            variants=[v.strip() for v in chosen.split(",") if v.strip()] if chosen else None,
            max_rate=int(num("BENCH_MAX_RATE", 5000)),
            profile="svg" if profile == "svg" else "" if profile in ("", "0") else "1",
            profile_gil=env.get("BENCH_PROFILE_GIL", "") not in ("", "0"),
        )


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """Install wrk and webhook from Debian when missing (apt-get update once, then install)."""
    missing = [pkg for tool, pkg in DEBIAN_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        say(f"missing {' '.join(missing)}; run: sudo apt-get install -y {' '.join(missing)}")
        return
    say(f"installing {' '.join(missing)} from Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


# --- one variant, one round ---------------------------------------------------------------------


def _cpu_by_part(parts: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(servers.cpu_seconds(pid) for pid in pids) for name, pids in parts.items()}


def run_http(ctx: Ctx, s: Settings, v: Variant, rdir: Path) -> dict[str, Any]:
    assert v.start is not None
    target = v.start(ctx, rdir)
    server = target.server
    every = [server, *target.others]
    parts = target.cpu_parts or {"server": [server.pid]}
    try:
        row: dict[str, Any] = {
            "kind": "http",
            "ready_s": server.ready_seconds,
            "notes": list(target.notes),
        }
        if s.warmup_seconds > 0:
            load.wrk(target.url, target.warm, s.warmup_seconds, s.connections)
        probe0 = target.probe() if target.probe else {}
        core0, gen0 = servers.cpu_ticks(servers.SERVER_CPU), servers.cpu_ticks(servers.LOAD_CPU)
        spy = None
        if ctx.py_spy and v.key != "webhook":
            out = RESULTS / f"profile-{rdir.name}.{'svg' if s.profile == 'svg' else 'txt'}"
            out.unlink(missing_ok=True)
            spy = pyspy.start(ctx.py_spy, server.pid, s.saturation_seconds, out, s.profile_gil)
        by0, t0 = _cpu_by_part(parts), time.perf_counter()
        sat = load.wrk(target.url, target.sat, s.saturation_seconds, s.connections)
        by1, t1 = _cpu_by_part(parts), time.perf_counter()
        cpu0, cpu1 = sum(by0.values()), sum(by1.values())
        probe1 = target.probe() if target.probe else {}
        if spy is not None:
            _, err = spy.communicate(timeout=60)
            if out.exists():
                row["profile"] = str(out)
            else:
                row["notes"].append(f"py-spy: {err.decode(errors='replace').strip()[-200:]}")
        core1, gen1 = servers.cpu_ticks(servers.SERVER_CPU), servers.cpu_ticks(servers.LOAD_CPU)
        paced = load.loadgen(
            "paced", target.url, str(target.paced), "--rate", str(s.paced_rate),
            "--seconds", str(s.paced_seconds), timeout=s.paced_seconds + 60,
        )  # fmt: skip
        memory = [m for srv in every if (m := servers.memory_mib(srv.pid))]
        row["private_mib"], row["anon_mib"] = (
            (sum(m[0] for m in memory), sum(m[1] for m in memory)) if memory else (None, None)
        )
        if target.group is not None:
            row["notes"].append(target.group.describe())
        probed = {name: probe1[name] - probe0.get(name, 0) for name in probe1}
        if probed.get("checkpoints"):
            rnd = rdir.name.split("-")[0]
            row["notes"].append(f"{rnd}: a PostgreSQL checkpoint started during saturation")
        for srv in every:
            if not srv.alive():
                raise RuntimeError(f"{v.key} server died; log tail:\n{srv.log_tail()}")
    finally:
        for srv in every:
            srv.stop()
        variants.remove_store(target.store)
        if target.group is not None:
            target.group.remove()
        if target.cleanup is not None:
            target.cleanup()
    requests = int(sat["requests"])
    if target.cpu_parts:
        row["cpu_parts_ms"] = {
            name: (by1[name] - by0[name]) * 1000 / requests if requests else None for name in parts
        }
    if probed and requests:
        row["probe_per_request"] = {name: n / requests for name, n in probed.items()}
    non2xx = sum(n for st, n in sat["statuses"].items() if not st.startswith("2"))
    sock_errors = sum(n for k, n in sat["errors"].items() if k != "status")
    paced_non2xx = sum(n for st, n in paced["statuses"].items() if not st.startswith("2"))
    row.update(
        rps=sat["rps"],
        sat_p50_ms=sat["p50_us"] / 1000,
        sat_p99_ms=sat["p99_us"] / 1000,
        paced_p50_ms=paced["p50_ms"],
        paced_p99_ms=paced["p99_ms"],
        cpu_ms=(cpu1 - cpu0) * 1000 / requests if requests else None,
        busy_pct=(cpu1 - cpu0) * 100 / (t1 - t0),
        # Work on the server's CPU that was not the server's: other tenants of a shared machine.
        other_pct=max(
            0.0,
            ((core1[0] - core0[0]) / servers.CLK_TCK - (cpu1 - cpu0))
            * 100
            / max((core1[1] - core0[1]) / servers.CLK_TCK, 1e-9),
        ),
        load_cpu_pct=(gen1[0] - gen0[0]) * 100 / max(gen1[1] - gen0[1], 1),
        wrk_cpu_pct=sat.get("wrk_cpu_pct"),
        paced_lag_ms=paced.get("send_lag_max_ms"),
        errors=non2xx + sock_errors + paced_non2xx + int(paced["errors"]),
        sat_raw=sat,
        paced_raw=paced,
    )
    _check_path(v.key, row, sat, paced)
    return row


def _check_path(key: str, row: dict[str, Any], sat: dict[str, Any], paced: dict[str, Any]) -> None:
    """Say so when a run did not measure the path it claims to (wrapped ids, 401s, ...)."""
    answered = sum(sat["statuses"].values()) or 1
    if "401" in sat["statuses"]:
        row["notes"].append(f"{sat['statuses']['401']} answers were 401 (signature rejected)")
    if key == "app" or key.startswith(("idx", "pg")):
        if sat["wraps"]:
            row["notes"].append("request file wrapped: raise BENCH_MAX_RATE")
        if sat["duplicate"] > answered * 0.01:
            row["notes"].append(
                f"{sat['duplicate'] * 100 / answered:.0f}% duplicate answers under saturation"
            )
        if paced["duplicate"]:
            row["notes"].append(f"{paced['duplicate']} duplicate answers in the paced run")
    if key == "dup" and sat["accepted"]:
        row["notes"].append(f"{sat['accepted']} accepted answers on the duplicate path")


def run_import(ctx: Ctx, rdir: Path, http: bool) -> dict[str, Any]:
    """Deliveries imported per second: post the import file at concurrency 8 while the importer
    runs, until /status counts them all done. `http`: importer.url pointing at a trivial service
    (the bare ASGI server, on the load CPU) instead of the /bin/true command."""
    store = rdir / "store"
    service, importer_url = None, None
    if http:
        service, port = variants.start_bare(
            "import-service", rdir / "service.log", servers.LOAD_CPU
        )
        importer_url = f"http://127.0.0.1:{port}/import"
    try:
        server, url, admin = variants.start_app(ctx, rdir, store, False, importer_url)
        try:
            cpu0 = servers.cpu_seconds(server.pid)
            posted = load.loadgen(
                "once", url, str(ctx.files["import"]), "--concurrency", "8",
                "--until-done", f"http://127.0.0.1:{admin}/status",
                "--timeout-seconds", str(IMPORT_TIMEOUT_SECONDS),
                timeout=IMPORT_TIMEOUT_SECONDS + 300,
            )  # fmt: skip
            cpu1 = servers.cpu_seconds(server.pid)
            memory = servers.memory_mib(server.pid) or (None, None)
        finally:
            server.stop()
    finally:
        if service is not None:
            service.stop()
        variants.remove_store(store)
    n, done, elapsed = int(posted["accepted"]), int(posted["done"]), float(posted["done_s"])
    notes = [f"{n} deliveries posted at concurrency 8 while importing"]
    if done < n:
        notes.append(f"only {done}/{n} imported after {IMPORT_TIMEOUT_SECONDS:.0f} s")
    return {
        "kind": "import",
        "rps": done / elapsed,
        "cpu_ms": (cpu1 - cpu0) * 1000 / done if done else None,
        "busy_pct": (cpu1 - cpu0) * 100 / elapsed,
        "private_mib": memory[0],
        "anon_mib": memory[1],
        "post_s": posted["elapsed_s"],
        "drain_s": elapsed,
        "ready_s": server.ready_seconds,
        "errors": sum(v for k, v in posted["statuses"].items() if not k.startswith("2"))
        + int(posted["errors"]),
        "notes": notes,
    }


# --- start-up ------------------------------------------------------------------------------------


def measure_startup(ctx: Ctx, s: Settings) -> dict[str, dict[str, Any]]:
    """exec → /readyz 200, on a fresh store each time (bare: exec → first 200, for reference)."""
    out: dict[str, dict[str, Any]] = {}
    cases: list[tuple[str, str, Path | None]] = [
        ("script", "ct-appliance serve (console script)", ctx.app_exe)
    ]
    cases.append(("binary", "dist/ct-appliance serve (onefile binary)", ctx.binary))
    cases.append(("bare", "bare Hypercorn-trio script (reference)", None))
    for key, label, exe in cases:
        times: list[float] = []
        reason = None
        for i in range(s.startup_runs):
            rdir = ctx.work / f"startup-{key}-{i}"
            rdir.mkdir()
            try:
                if exe is None:
                    server, _ = variants.start_bare("bare", rdir / "server.log")
                else:
                    if ctx.app_reason:
                        raise NotAvailable(ctx.app_reason)
                    if not exe.exists():
                        raise NotAvailable(f"{variants.rel(exe, ctx.root)} not built (make binary)")
                    cfg = rdir / "config.yaml"
                    _, admin = variants.app_config(ctx, cfg, rdir / "store")
                    server = servers.start(key, [str(exe), "serve", "--config", str(cfg)],
                                           rdir / "server.log", admin, "/readyz")  # fmt: skip
                times.append(server.ready_seconds or 0.0)
                server.stop()
            except NotAvailable as e:
                reason = f"not available: {e}"
                break
            except servers.StartError as e:
                reason = f"FAILED: {str(e).splitlines()[0]}"
                break
            finally:
                shutil.rmtree(rdir, ignore_errors=True)
        if times:
            out[key] = {"label": label, "median_s": report.median(times), "min_s": min(times),
                        "max_s": max(times), "runs": len(times)}  # fmt: skip
        else:
            out[key] = {"label": label, "unavailable": reason or "not run"}
    return out


# --- the whole run --------------------------------------------------------------------------------


def make_files(ctx: Ctx, s: Settings) -> int:
    secret = ctx.secret.encode()
    sizes = {
        "small": 2000,
        "warm": max(1, s.warmup_seconds) * s.max_rate,
        "sat": s.saturation_seconds * s.max_rate,
        "paced": int(s.paced_rate * s.paced_seconds) + 10,
        "import": s.import_deliveries,
    }
    body = 0
    for name, count in sizes.items():
        path = ctx.work / f"requests-{name}.txt"
        body = payloads.write_file(path, count, secret)
        ctx.files[name] = path
    return body


def main() -> int:
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        return 0
    s = Settings.from_env()
    os.sched_setaffinity(0, {int(servers.LOAD_CPU)})
    # Every way out runs the `finally` below, which stops the servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    ensure_tools()
    if shutil.which("wrk") is None:
        say("wrk is required")
        return 1
    results_dir = RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ct-bench-"))
    ctx = Ctx(
        root=ROOT,
        work=work,
        secret="bench-" + secrets.token_hex(16),
        files={},
        app_exe=Path(os.environ.get("BENCH_APP_EXE", ROOT / ".venv" / "bin" / "ct-appliance")),
        binary=ROOT / "dist" / "ct-appliance",
        webhook_exe=shutil.which("webhook"),
        memory_max=memcg.parse_size(os.environ["BENCH_MEMORY_MAX"])
        if os.environ.get("BENCH_MEMORY_MAX")
        else None,
    )
    started = time.time()
    try:
        if s.profile:
            ctx.py_spy = pyspy.ensure_py_spy(RESULTS / "tools")
        machine = report.machine(ROOT, work, ctx.app_exe)
        every = [*variants.lmdb_variants(), *pgrows.rows()]
        chosen = [v for v in every if (v.key in s.variants if s.variants else v.default)]
        unknown = set(s.variants or ()) - {v.key for v in every}
        if unknown:
            say(f"BENCH_VARIANTS: no such variant {', '.join(sorted(unknown))}")
            return 2
        keys = ", ".join(v.key for v in chosen)
        say(f"work directory {work}; {s.rounds} round(s); variants {keys}")
        body = make_files(ctx, s)
        say(f"request files written ({body} byte bodies, 50 flow ids each)")
        ctx.app_reason = variants.check_app(ctx)
        if ctx.app_reason:
            say(f"ct-appliance variants not available: {ctx.app_reason}")
        for v in chosen:
            if v.seed_flows is not None:
                say(f"seeding a store with {v.seed_flows:,} flow ids")
                variants.seed_template(ctx, v.seed_flows)
                if v.seed_flows in ctx.seed_seconds:
                    say(f"  seeded in {ctx.seed_seconds[v.seed_flows]:.1f} s")
        for v in chosen:
            if v.prepare is not None:
                say(f"preparing {v.key}")
                v.prepare(ctx)
        for flows, seed in ctx.pg_seeds.items():
            say(f"  PostgreSQL template, {flows:,} ids: {pgrows.describe_seed(seed)}")
        for flows, why in ctx.pg_reasons.items():
            say(f"  PostgreSQL template, {flows:,} ids: not available: {why}")
        rounds: list[dict[str, dict[str, Any]]] = []
        reasons: dict[str, str] = {}
        for r in range(s.rounds if chosen else 0):
            shift = r % len(chosen) if chosen else 0
            order = chosen[shift:] + chosen[:shift]
            rnd: dict[str, dict[str, Any]] = {}
            for v in order:
                if v.key in reasons:
                    continue
                rdir = work / f"round{r + 1}-{v.key}"
                rdir.mkdir()
                t0 = time.perf_counter()
                try:
                    row = rnd[v.key] = (
                        run_import(ctx, rdir, http=v.key == "importhttp")
                        if v.kind == "import"
                        else run_http(ctx, s, v, rdir)
                    )
                    p99 = row.get("paced_p99_ms")
                    paced = f", paced p99 {p99:.1f} ms" if p99 else ""
                    say(f"round {r + 1} {v.key}: {row['rps']:,.0f}/s{paced} "
                        f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
                except NotAvailable as e:
                    reasons[v.key] = str(e)
                    say(f"round {r + 1} {v.key}: not available: {e}")
                except (
                    servers.StartError,
                    load.LoadError,
                    RuntimeError,
                    subprocess.SubprocessError,
                    OSError,
                ) as e:
                    rnd[v.key] = {"error": str(e).splitlines()[0][:300], "notes": []}
                    say(f"round {r + 1} {v.key}: FAILED: {e}")
            rounds.append(rnd)
        report.add_ratios(rounds)
        say("measuring start-up")
        startup = measure_startup(ctx, s)
        rows = report.aggregate(chosen, rounds, reasons)
        text = render(s, machine, rows, rounds, startup, ctx, time.time() - started)
        print(text)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (results_dir / f"results-{stamp}.md").write_text(text)
        (results_dir / "latest.md").write_text(text)
        raw = {"settings": s.__dict__, "machine": machine, "rounds": rounds, "rows": rows,
               "startup": startup, "seed_seconds": ctx.seed_seconds,
               "pg_seeds": ctx.pg_seeds}  # fmt: skip
        (results_dir / f"results-{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
        say(f"saved var/bench/results-{stamp}.md and .json")
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def render(
    s: Settings,
    machine: dict[str, str],
    rows: list[dict[str, Any]],
    rounds: list[dict[str, dict[str, Any]]],
    startup: dict[str, dict[str, Any]],
    ctx: Ctx,
    seconds: float,
) -> str:
    mode = "QUICK (development) run" if s.quick else "full run"
    lines = [
        f"## ct-appliance benchmark — {time.strftime('%Y-%m-%d %H:%M %Z')} — {mode}",
        "",
        f"Medians of {s.rounds} round(s); saturation: wrk, {s.connections} connections, "
        f"{s.saturation_seconds} s after a {s.warmup_seconds} s warm-up; paced: "
        f"{s.paced_rate:.0f} requests/s for {s.paced_seconds:.0f} s, open loop, latency from the "
        f"scheduled send. Server on CPU {servers.SERVER_CPU}, load on CPU {servers.LOAD_CPU}. "
        f"Whole run {seconds / 60:.1f} min.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        "",
        report.table(rows),
        "",
        "× bare: the variant's req/s over the bare server's in the same round (median of rounds). "
        "× bare by CPU: bare's CPU per request over the variant's, same round: the ratio if each "
        "had its core to itself (robust to other tenants; overstates a server that waits on fsync "
        "rather than computes, see srv CPU %). "
        "CPU ms/req: server process tree utime+stime (children included) over the saturation run / "
        "requests answered. private MiB: Private_Clean+Private_Dirty (smaps_rollup) after the run; "
        "anon MiB: its Anonymous part (heap, stacks; not LMDB's mapped file). "
        "ready s: exec to the first /readyz 200 of that variant's servers. "
        "errors: non-2xx and socket errors, all rounds. other on CPU 0 %: busy time of the "
        "server's CPU during saturation that was not the server's (other tenants of a shared "
        "machine; high = a noisy figure). Import row: deliveries imported per second.",
        "",
        report.notes(rows, s.rounds),
        "",
        report.startup_table(startup),
        "",
    ]
    if ctx.seed_seconds:
        lines += [
            "Seeding (bulk loader, once per run): "
            + ", ".join(f"{n:,} ids in {t:.1f} s" for n, t in ctx.seed_seconds.items()),
            "",
        ]
    if ctx.pg_seeds:
        lines += [
            "PostgreSQL templates (var/bench/seed-cache/pg-*): "
            + "; ".join(f"{n:,} ids: {pgrows.describe_seed(d)}" for n, d in ctx.pg_seeds.items()),
            "",
        ]
    if any(r["key"].startswith("pg") for r in rows):
        lines += [report.pg_table(rows), ""]
    lines += [report.targets(rows, startup), ""]
    profiles = [p for rnd in rounds for r in rnd.values() if (p := r.get("profile"))]
    if profiles:
        gil = "; GIL holder only" if s.profile_gil else ""
        lines += [f"### Profiles (py-spy{gil}: figures above were taken under it)", ""]
        for path in profiles:
            lines += [pyspy.summarize(Path(path)), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; every server started was stopped")
        sys.exit(130)
