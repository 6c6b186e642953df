"""Medians over rounds, ratios taken within rounds, the table, the spec §10 targets, the machine."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from servers import LOAD_CPU

Row = dict[str, Any]

COLUMNS = [
    # key, header, format
    ("rps", "req/s", "{:,.0f}"),
    ("ratio", "× bare", "{:.2f}"),
    ("cpu_ratio", "× bare by CPU", "{:.2f}"),
    ("sat_p50_ms", "sat p50 ms", "{:.1f}"),
    ("sat_p99_ms", "sat p99 ms", "{:.1f}"),
    ("paced_p50_ms", "100/s p50 ms", "{:.1f}"),
    ("paced_p99_ms", "100/s p99 ms", "{:.1f}"),
    ("cpu_ms", "CPU ms/req", "{:.3f}"),
    ("busy_pct", "srv CPU %", "{:.0f}"),
    ("private_mib", "private MiB", "{:.0f}"),
    ("anon_mib", "anon MiB", "{:.0f}"),
    ("ready_s", "ready s", "{:.2f}"),
    ("errors", "errors", "{:d}"),
    ("other_pct", "other on CPU 0 %", "{:.0f}"),
]


def median(values: list[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def empty_row(key: str) -> str | None:
    """The row on an empty database that a seeded PostgreSQL row (pg1-10m) compares with."""
    m = re.fullmatch(r"(pg\d+)-\d+m", key)
    return m.group(1) if m else None


def add_ratios(rounds: list[dict[str, Row]]) -> None:
    """Each round's req/s over the same round's bare (and seeded over the same round's app).

    The CPU ratio is bare's CPU per request over the variant's: what the ratio would be if both
    had a whole core to themselves, and so far less sensitive to other tenants of the machine.
    It overstates a server that also waits (on fsync) rather than computes: compare srv CPU %."""
    for rnd in rounds:
        bare = rnd.get("bare", {}).get("rps")
        bare_cpu = rnd.get("bare", {}).get("cpu_ms")
        app = rnd.get("app", {}).get("rps")
        for key, row in rnd.items():
            if row.get("rps") is None:
                continue
            if bare and row.get("kind") == "http":
                row["ratio"] = row["rps"] / bare
            if bare_cpu and row.get("kind") == "http" and row.get("cpu_ms"):
                row["cpu_ratio"] = bare_cpu / row["cpu_ms"]
            if app and key.startswith(("idx", "pg")):
                row["ratio_to_app"] = row["rps"] / app
            empty = rnd.get(empty_row(key) or "", {}).get("rps")
            if empty:
                row["ratio_to_empty"] = row["rps"] / empty


def aggregate(
    variants: list[Any], rounds: list[dict[str, Row]], reasons: dict[str, str]
) -> list[Row]:
    out = []
    for v in variants:
        rows = [rnd[v.key] for rnd in rounds if v.key in rnd]
        ok = [r for r in rows if not r.get("error")]
        agg: Row = {"key": v.key, "label": v.label, "rounds": len(ok)}
        if not ok:
            failed = next((r["error"] for r in rows if r.get("error")), None)
            if v.key in reasons or not failed:
                agg["unavailable"] = "not available: " + reasons.get(v.key, "not run")
            else:
                agg["unavailable"] = f"FAILED in every round: {failed}"
            out.append(agg)
            continue
        for key, _, _ in COLUMNS:
            if key == "errors":
                agg[key] = sum(r.get("errors", 0) for r in ok)
            else:
                agg[key] = median([r.get(key) for r in ok])
        agg["ratio_to_app"] = median([r.get("ratio_to_app") for r in ok])
        agg["ratio_to_empty"] = median([r.get("ratio_to_empty") for r in ok])
        parts = {name for r in ok for name in r.get("cpu_parts_ms", {})}
        agg["cpu_parts_ms"] = {
            name: median([r.get("cpu_parts_ms", {}).get(name) for r in ok]) for name in parts
        }
        probed = {name for r in ok for name in r.get("probe_per_request", {})}
        agg["probe_per_request"] = {
            name: median([r.get("probe_per_request", {}).get(name) for r in ok]) for name in probed
        }
        agg["paced_lag_ms"] = max((r.get("paced_lag_ms") or 0 for r in ok), default=None)
        agg["load_cpu_pct"] = median([r.get("load_cpu_pct") for r in ok])
        agg["wrk_cpu_pct"] = median([r.get("wrk_cpu_pct") for r in ok])
        agg["rps_by_round"] = [round(r["rps"]) if r.get("rps") else None for r in rows]
        agg["p99_by_round"] = [r.get("paced_p99_ms") for r in rows]
        agg["other_by_round"] = [r.get("other_pct") for r in rows]
        agg["post_s"] = median([r.get("post_s") for r in ok])
        agg["drain_s"] = median([r.get("drain_s") for r in ok])
        agg["notes"] = sorted({n for r in rows for n in r.get("notes", [])})
        agg["failed_rounds"] = [r["error"] for r in rows if r.get("error")]
        out.append(agg)
    return out


def table(rows: list[Row]) -> str:
    head = "| variant | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        if "unavailable" in row:
            lines.append(f"| {row['label']} | {row['unavailable']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[Row], rounds: int) -> str:
    out = []
    for row in rows:
        if "unavailable" in row:
            continue
        extra = []
        if row["rounds"] < rounds:
            failed = "; ".join(row["failed_rounds"])[:300]
            extra.append(f"{row['rounds']}/{rounds} rounds succeeded: {failed}")
        extra.extend(row["notes"])
        if (row.get("paced_lag_ms") or 0) > 5:
            extra.append(
                f"paced generator up to {row['paced_lag_ms']:.0f} ms late in the worst round "
                "(counted in its latency)"
            )
        if (row.get("wrk_cpu_pct") or 0) > 80:
            extra.append(f"wrk used {row['wrk_cpu_pct']:.0f}% of its CPU: it may be the limit")
        other_load = (row.get("load_cpu_pct") or 0) - (row.get("wrk_cpu_pct") or 0)
        if other_load > 20:
            extra.append(f"CPU {LOAD_CPU} (load) also {other_load:.0f}% busy with other work")

        def series(key: str, fmt: str, row: Row = row) -> str:
            return ", ".join("–" if v is None else fmt.format(v) for v in row.get(key, []))

        text = f"- {row['label']}: req/s by round {series('rps_by_round', '{:,}')}"
        if any(v is not None for v in row.get("p99_by_round", [])):
            text += f"; 100/s p99 ms {series('p99_by_round', '{:.1f}')}"
        if any(v is not None for v in row.get("other_by_round", [])):
            text += f"; other on CPU 0 % {series('other_by_round', '{:.0f}')}"
        if row.get("drain_s") is not None:
            text += (
                f"; posting took {row['post_s']:.1f} s, importing all {row['drain_s']:.1f} s"
                " (medians)"
            )
        out.append(text + "".join(f"; {e}" for e in extra))
    return "\n".join(out)


def _fmt(v: float | None, f: str) -> str:
    return "–" if v is None else f.format(v)


def targets(rows: list[Row], startup: dict[str, Row]) -> str:
    by = {r["key"]: r for r in rows if "unavailable" not in r}
    lines = ["| spec §10 target | measured | verdict |", "|---|---:|---|"]

    def line(what: str, value: float | None, fmt: str, ok: bool, absent: str = "") -> None:
        verdict = f"n/a{absent}" if value is None else ("met" if ok else "MISSED")
        lines.append(f"| {what} | {_fmt(value, fmt)} | {verdict} |")

    ratio = by.get("app", {}).get("ratio")
    line("durable accept ≥ 0.6 × bare (aim 0.75)", ratio, "{:.2f}", (ratio or 0) >= 0.6)
    for key in sorted((k for k in by if k.startswith("idx")), key=len):
        r, floor = by[key].get("ratio_to_app"), 0.8 if key == "idx100m" else 0.9
        line(f"{by[key]['label']}: ≥ {floor} × empty store", r, "{:.2f}", (r or 0) >= floor)
    for key in ("pg1", "pg1-10m"):
        r = by.get(key, {}).get("ratio")
        if key in by:
            line(f"{by[key]['label']}: ≥ 0.4 × bare (issue 15 first floor)", r, "{:.2f}",
                 (r or 0) >= 0.4)  # fmt: skip
    p99 = by.get("app", {}).get("paced_p99_ms")
    line("p99 at 100 deliveries/s ≤ 20 ms", p99, "{:.1f} ms", (p99 or 1e9) <= 20)
    binary = startup.get("binary", {}).get("median_s")
    line(
        "binary start-up to /readyz ≤ 1.5 s",
        binary,
        "{:.2f} s",
        (binary or 1e9) <= 1.5,
        " (no dist/ct-appliance)",
    )
    mem = by.get("idx10m", {}).get("private_mib")
    line("private memory ≤ 120 MiB at 10 M ids", mem, "{:.0f} MiB", (mem or 1e9) <= 120)
    for key, n in (("idx10m", "10"), ("idx100m", "100")):
        anon = by.get(key, {}).get("anon_mib")
        line(f"anonymous memory ≤ 120 MiB at {n} M ids", anon, "{:.0f} MiB", (anon or 1e9) <= 120)
    return "\n".join(lines)


def pg_table(rows: list[Row]) -> str:
    """The PostgreSQL rows against bare and the LMDB `app` row, and where their CPU goes."""
    by = {r["key"]: r for r in rows if "unavailable" not in r}
    app_cpu = by.get("app", {}).get("cpu_ms")
    lines = [
        "### PostgreSQL store (issue 15)",
        "",
        "| row | req/s | × bare | × LMDB app | × same row, empty database | CPU ms/req "
        "appliances | PostgreSQL | haproxy | all | × LMDB app's CPU | WAL KiB/req "
        "| full-page images/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row["key"].startswith("pg"):
            continue
        if "unavailable" in row:
            lines.append(f"| {row['label']} | {row['unavailable']} |" + " |" * 11)
            continue
        parts = row.get("cpu_parts_ms", {})
        wal = row.get("probe_per_request", {})
        total = row.get("cpu_ms")
        cells = [
            _fmt(row.get("rps"), "{:,.0f}"),
            _fmt(row.get("ratio"), "{:.2f}"),
            _fmt(row.get("ratio_to_app"), "{:.2f}"),
            _fmt(row.get("ratio_to_empty"), "{:.2f}"),
            _fmt(parts.get("appliances"), "{:.3f}"),
            _fmt(parts.get("postgresql"), "{:.3f}"),
            _fmt(parts.get("haproxy"), "{:.3f}"),
            _fmt(total, "{:.3f}"),
            _fmt(total / app_cpu if total and app_cpu else None, "{:.2f}"),
            _fmt(wal["wal_bytes"] / 1024 if "wal_bytes" in wal else None, "{:.1f}"),
            _fmt(wal.get("wal_fpi"), "{:.1f}"),
        ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are taken within each round (median over rounds). The appliances, PostgreSQL and "
        "haproxy all run on CPU 0, the one core the bare and LMDB rows get, and wrk on CPU 1: "
        "the ratios compare the same CPU budget, and CPU ms/req is every server-side process "
        "per delivery. On this two-core machine a second appliance cannot be faster than one: "
        "it shares that core with the first, with PostgreSQL and with haproxy, so pg2 measures "
        "the cost of two appliances and a proxy, not how N appliances scale on N machines. "
        "PostgreSQL runs with fsync and synchronous_commit on and tests/pgcluster.py's "
        "settings (shared_buffers 128MB, the default max_wal_size 1GB and checkpoint_timeout "
        "5min). Each round starts it on a fresh copy of its template, just after a checkpoint: "
        "the first change to each page then writes the whole page to the WAL (full-page "
        "images/req). At 10 M random ids that is about one image per new id; with the default "
        "max_wal_size a checkpoint follows every ~530 MB of WAL, so under sustained load it "
        "stays at a similar order (docs/BENCHMARKS.md, issue 15).",
    ]
    return "\n".join(lines)


def startup_table(startup: dict[str, Row]) -> str:
    lines = ["| exec → ready | median s | min s | max s | runs |", "|---|---:|---:|---:|---:|"]
    for row in startup.values():
        if row.get("unavailable"):
            lines.append(f"| {row['label']} | {row['unavailable']} | | | |")
        else:
            lines.append(
                f"| {row['label']} | {row['median_s']:.2f} | {row['min_s']:.2f} | "
                f"{row['max_s']:.2f} | {row['runs']} |"
            )
    return "\n".join(lines)


def _first(cmd: list[str], any_exit: bool = False) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "–"
    if done.returncode != 0 and not any_exit:
        return "–"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "–"


def machine(root: Path, work: Path, app_exe: Path) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        "?",
    )
    mem_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    os_name = "?"
    if Path("/etc/os-release").exists():
        for ln in Path("/etc/os-release").read_text().splitlines():
            if ln.startswith("PRETTY_NAME="):
                os_name = ln.split("=", 1)[1].strip('"')
    fs = _first(["sh", "-c", f"df -T {work} | tail -1 | awk '{{print $2}}'"])
    commit = _first(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "appliance"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": f"{os.cpu_count()} × {model}",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "wrk": _first(["wrk", "-v"], any_exit=True).split(" Copyright")[0]
        if shutil.which("wrk")
        else "–",
        "webhook": _first(["webhook", "-version"]) if shutil.which("webhook") else "–",
        "ct-appliance": _first([str(app_exe), "--version"]) if app_exe.exists() else "–",
        "commit": commit + (" + uncommitted appliance/ changes" if dirty else ""),
        "store filesystem": fs,
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
