"""The servers under test and how each is set up for one round.

| key        | server                                                  | requests replayed       |
|------------|---------------------------------------------------------|-------------------------|
| bare       | bare_asgi.py: hypercorn.trio.serve, raw ASGI (ceiling)  | small file, cycled      |
| app        | ct-appliance serve, fresh store, HMAC, importer paused  | unique ids, never again |
| dup        | ct-appliance serve, the small file posted once first    | small file: duplicates  |
| idx1m      | ct-appliance serve on a copy of a store with 1 M ids    | unique ids              |
| idx10m     | the same with 10 M ids                                  | unique ids              |
| idx100m    | the same with 100 M ids                                 | unique ids              |
| webhook    | Debian's webhook (adnanh/webhook): HMAC rule, /bin/true | small file, cycled      |
| import     | ct-appliance serve, importer /bin/true: post N, drain   | unique ids              |
| importhttp | the same, importer.url: bare_asgi.py answering 200      | unique ids              |
| pg1        | ct-appliance serve on PostgreSQL (bench/pgrows.py)      | unique ids              |
| pg2        | two of them on one database, behind haproxy             | unique ids, to haproxy  |
| pg1-10m    | pg1 on a copy of a database holding 10 M claimed ids    | unique ids              |
| pg2-10m    | pg2 on the same                                         | unique ids, to haproxy  |

Imports are paused for the accept variants (`ct-appliance importer pause`), so that they measure
the accept path alone; the import variants measure the other half. Seeded stores are built by the
bulk loader (`python bench/seed.py --config CFG --flows N`: the flow ids reach the index in
random order, through the appliance's own rebuild), kept in var/bench/seed-cache/ between runs
(`seed_cache_dir`), and copied for each round, so every round starts from the same index. The
PostgreSQL rows (bench/pgrows.py) do the same with a PostgreSQL data directory. Rows with
`default=False` run only when BENCH_VARIANTS names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import load
import memcg
import servers
from servers import LOAD_CPU, SERVER_CPU, Server, free_port

HERE = Path(__file__).resolve().parent
WEBHOOK_PATH = "/webhooks/cointracker"


@dataclass
class Ctx:
    root: Path
    work: Path
    secret: str
    files: dict[str, Path]
    app_exe: Path
    binary: Path
    webhook_exe: str | None
    app_reason: str | None = None
    templates: dict[int, Path] = field(default_factory=dict)
    template_reasons: dict[int, str] = field(default_factory=dict)
    seed_seconds: dict[int, float] = field(default_factory=dict)
    py_spy: str | None = None
    memory_max: int | None = None  # BENCH_MEMORY_MAX: seeded rows run in a memory cgroup
    pg_templates: dict[int, Path] = field(default_factory=dict)  # flows -> PostgreSQL data dir
    pg_reasons: dict[int, str] = field(default_factory=dict)
    pg_seeds: dict[int, dict[str, Any]] = field(default_factory=dict)  # flows -> how it was seeded


@dataclass
class Target:
    server: Server
    url: str
    warm: Path
    sat: Path
    paced: Path
    notes: list[str]
    store: Path | None = None
    group: memcg.Group | None = None  # the memory cgroup the server runs in, if any
    others: list[Server] = field(default_factory=list)  # the row's other appliances (pg2)
    # CPU accounting by part ("appliances", "postgresql", ...): process-tree roots; None: server
    cpu_parts: dict[str, list[int]] | None = None
    cleanup: Callable[[], None] | None = None  # after the servers stop (database, haproxy)
    probe: Callable[[], dict[str, float]] | None = None  # counters read around saturation


class NotAvailable(Exception):
    pass


def rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


# --- ct-appliance -------------------------------------------------------------------------------


def app_config(
    ctx: Ctx,
    cfg_path: Path,
    store: Path,
    importer_url: str | None = None,
    dsn: str | None = None,
) -> tuple[int, int]:
    """Write a SPEC §3 config for a loopback server; return (webhook port, admin port).
    `dsn`: the PostgreSQL store (store.backend: postgresql) instead of LMDB at `store`."""
    port, admin = free_port(), free_port()
    store_line = (
        "store: {backend: postgresql, postgresql: "
        f"{{dsn: {{value: {json.dumps(dsn)}}}, pool_size: 8, lease_seconds: 300}}}}\n"
        if dsn
        else f"store: {{path: {store}}}\n"
    )
    importer_line = (
        f"importer: {{url: {json.dumps(importer_url)}}}\n"
        if importer_url
        else 'importer: {command: ["/bin/true"]}\n'
    )
    cfg_path.write_text(
        "# written by bench/variants.py\n"
        "environment: alpha\n"
        f'listen: {{bind: ["127.0.0.1:{port}"]}}\n'
        f"webhook: {{path: {WEBHOOK_PATH}}}\n"
        f'auth: {{mode: hmac, hmac: {{secrets: [{{value: "{ctx.secret}"}}]}}}}\n'
        + store_line
        + importer_line
        + f'admin: {{bind: "127.0.0.1:{admin}"}}\n'
        "log: {level: info, format: json}\n"
    )
    cfg_path.chmod(0o600)
    return port, admin


def _cli(ctx: Ctx, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["taskset", "-c", LOAD_CPU, str(ctx.app_exe), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def check_app(ctx: Ctx) -> str | None:
    """Why ct-appliance cannot be benchmarked (a config it refuses shows as FAILED rows)."""
    return None if ctx.app_exe.exists() else f"{rel(ctx.app_exe, ctx.root)} not found"


def seed_cache_dir(root: Path, flows: int) -> Path:
    """Where the store seeded with `flows` ids is kept between runs: named by the flow count
    and by what decides its bytes (bench/seed.py, the record encoding, the index format that
    appliance/store.py names), so a change to any of them seeds anew. 100 M ids take ~25 min
    to seed and ~9 GB of disk."""
    digest = hashlib.sha256()
    digest.update((root / "bench" / "seed.py").read_bytes())
    digest.update((root / "appliance" / "record.py").read_bytes())
    store_py = (root / "appliance" / "store.py").read_text()
    digest.update(re.findall(r"^INDEX_FORMAT = .*$", store_py, re.M)[0].encode())
    return root / "var" / "bench" / "seed-cache" / f"{flows}-{digest.hexdigest()[:12]}"


def seed_template(ctx: Ctx, flows: int) -> None:
    """The store seeded with `flows` indexed ids (bench/seed.py), from the seed cache or built
    once now; rounds copy it."""
    if ctx.app_reason:
        ctx.template_reasons[flows] = ctx.app_reason
        return
    d = seed_cache_dir(ctx.root, flows)
    report = d / "seeded.json"
    if report.exists():
        ctx.seed_seconds[flows] = json.loads(report.read_text())["seconds"]
        ctx.templates[flows] = d / "store"
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cfg = d / "config.yaml"
    app_config(ctx, cfg, d / "store")
    argv = ["taskset", "-c", SERVER_CPU, sys.executable, str(HERE / "seed.py"),
            "--config", str(cfg), "--flows", str(flows)]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3 * 3600)
    if done.returncode != 0:
        ctx.template_reasons[flows] = (
            f"bulk loader exit {done.returncode}: {(done.stdout + done.stderr).strip()[-300:]}"
        )
        return
    seconds = time.perf_counter() - t0
    out = json.loads(done.stdout.strip().splitlines()[-1])
    report.write_text(json.dumps({**out, "seconds": round(seconds, 1)}) + "\n")
    ctx.seed_seconds[flows] = seconds
    ctx.templates[flows] = d / "store"


def start_app(
    ctx: Ctx,
    rdir: Path,
    store: Path,
    pause: bool,
    importer_url: str | None = None,
    group: memcg.Group | None = None,
    dsn: str | None = None,
    name: str = "config",
) -> tuple[Server, str, int]:
    """Start `ct-appliance serve` on store (or the PostgreSQL database `dsn`): (server, webhook
    url, admin port). `name` names its config and log in rdir (several appliances in one row)."""
    if ctx.app_reason:
        raise NotAvailable(ctx.app_reason)
    cfg = rdir / f"{name}.yaml"
    port, admin = app_config(ctx, cfg, store, importer_url, dsn)
    if pause:  # the pause state lives in the store: set before serving
        done = _cli(ctx, "importer", "pause", "--config", str(cfg))
        if done.returncode != 0:
            raise RuntimeError(f"importer pause: {(done.stdout + done.stderr).strip()[-300:]}")
    argv = [str(ctx.app_exe), "serve", "--config", str(cfg)]
    log = rdir / ("server.log" if name == "config" else f"{name}.log")
    server = servers.start(
        "ct-appliance", group.argv(argv) if group else argv, log, admin, "/readyz"
    )
    return server, f"http://127.0.0.1:{port}{WEBHOOK_PATH}", admin


def _app(ctx: Ctx, rdir: Path) -> Target:
    store = rdir / "store"
    server, url, _ = start_app(ctx, rdir, store, pause=True)
    f = ctx.files
    return Target(server, url, f["warm"], f["sat"], f["paced"], [], store)


def _dup(ctx: Ctx, rdir: Path) -> Target:
    store = rdir / "store"
    server, url, _ = start_app(ctx, rdir, store, pause=True)
    small = ctx.files["small"]
    try:
        primed = load.loadgen("once", url, str(small), "--concurrency", "16", timeout=300)
    except BaseException:
        server.stop()
        raise
    notes = []
    if primed["accepted"] != sum(1 for _ in open(small, "rb")):
        notes.append(f"priming: {primed['accepted']} accepted, statuses {primed['statuses']}")
    return Target(server, url, small, small, small, notes, store)


def _indexed(flows: int) -> Callable[[Ctx, Path], Target]:
    def start(ctx: Ctx, rdir: Path) -> Target:
        template = ctx.templates.get(flows)
        if template is None:
            raise NotAvailable(ctx.template_reasons.get(flows, "not seeded"))
        store = rdir / "store"
        group = memcg.Group(f"ct-bench-{rdir.name}", ctx.memory_max) if ctx.memory_max else None
        copy = ["cp", "-a", "--reflink=auto", str(template), str(store)]
        subprocess.run(group.argv(copy) if group else copy, check=True)
        os.sync()  # the copy's writeback (13 GB at 100 M) is the harness's, not the server's
        server, url, _ = start_app(ctx, rdir, store, pause=True, group=group)
        f = ctx.files
        return Target(server, url, f["warm"], f["sat"], f["paced"], [], store, group)

    return start


# --- the reference servers ----------------------------------------------------------------------


def start_bare(name: str, log: Path, cpu: str = SERVER_CPU) -> tuple[Server, int]:
    """bare_asgi.py on a free port: the ceiling, and the HTTP importer's trivial service."""
    port = free_port()
    argv = [sys.executable, str(HERE / "bare_asgi.py"), "--bind", f"127.0.0.1:{port}"]
    return servers.start(name, argv, log, port, "/", cpu=cpu), port


def _bare(ctx: Ctx, rdir: Path) -> Target:
    server, port = start_bare("bare", rdir / "server.log")
    small = ctx.files["small"]
    return Target(server, f"http://127.0.0.1:{port}{WEBHOOK_PATH}", small, small, small, [])


def webhook_hooks(ctx: Ctx) -> Path:
    hooks = [
        {
            "id": "cointracker",
            "execute-command": "/bin/true",
            "http-methods": ["POST"],
            "response-message": '{"status":"accepted"}',
            "trigger-rule-mismatch-http-response-code": 401,
            "trigger-rule": {
                "match": {
                    "type": "payload-hmac-sha256",
                    "secret": ctx.secret,
                    "parameter": {"source": "header", "name": "X-Cointracker-Signature"},
                }
            },
        }
    ]
    path = ctx.work / "hooks.json"
    path.write_text(json.dumps(hooks, indent=2))
    return path


def _webhook(ctx: Ctx, rdir: Path) -> Target:
    if ctx.webhook_exe is None:
        raise NotAvailable("webhook not installed (apt-get install webhook)")
    port = free_port()
    argv = [ctx.webhook_exe, "-hooks", str(webhook_hooks(ctx)), "-ip", "127.0.0.1",
            "-port", str(port), "-nopanic"]  # fmt: skip
    # Any answer means it listens (GET on a POST-only hook answers 405).
    server = servers.start(
        "webhook", argv, rdir / "server.log", port, "/hooks/cointracker", need_200=False
    )
    small = ctx.files["small"]
    return Target(server, f"http://127.0.0.1:{port}/hooks/cointracker", small, small, small, [])


@dataclass
class Variant:
    key: str
    label: str
    kind: str  # "http" or "import"
    start: Callable[[Ctx, Path], Target] | None = None
    seed_flows: int | None = None  # the seeded rows: ids in the store before the round
    prepare: Callable[[Ctx], None] | None = None  # once before the rounds (seed a database)
    default: bool = True  # False: runs only when BENCH_VARIANTS names it


def lmdb_variants() -> list[Variant]:
    """The rows of the embedded store and the baselines (bench/pgrows.py adds PostgreSQL's)."""
    return [
        Variant("bare", "bare Hypercorn-trio raw ASGI (ceiling)", "http", _bare),
        Variant("app", "ct-appliance durable, HMAC, 50 new ids/POST", "http", _app),
        Variant("dup", "ct-appliance duplicate path (known ids)", "http", _dup),
        Variant("idx1m", "ct-appliance, 1M ids indexed", "http", _indexed(10**6), 10**6),
        Variant("idx10m", "ct-appliance, 10M ids indexed", "http", _indexed(10**7), 10**7),
        Variant("idx100m", "ct-appliance, 100M ids indexed", "http", _indexed(10**8), 10**8),
        Variant("webhook", "Debian webhook 2.8, HMAC rule, /bin/true", "http", _webhook),
        Variant("import", "import throughput, /bin/true importer (deliveries/s)", "import"),
        Variant(
            "importhttp",
            "import throughput, HTTP importer answering 200 (deliveries/s)",
            "import",
        ),
    ]


def remove_store(path: Path | None) -> None:
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)
