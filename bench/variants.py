"""The servers under test and how each is set up for one round.

| key     | server                                                  | requests replayed       |
|---------|---------------------------------------------------------|-------------------------|
| bare    | bare_asgi.py: hypercorn.trio.serve, raw ASGI (ceiling)  | small file, cycled      |
| app     | ct-appliance serve, fresh store, HMAC, importer paused  | unique ids, never again |
| dup     | ct-appliance serve, the small file posted once first    | small file: duplicates  |
| idx1m   | ct-appliance serve on a copy of a store with 1 M ids    | unique ids              |
| idx10m  | the same with 10 M ids                                  | unique ids              |
| webhook | Debian's webhook (adnanh/webhook): HMAC rule, /bin/true | small file, cycled      |
| import  | ct-appliance serve, importer /bin/true: post N, drain   | unique ids              |

Imports are paused for the accept variants (`ct-appliance importer pause`), so that they measure
the accept path alone; the import variant measures the other half. Seeded stores are built once per
run by the app's bulk loader (`python bench/seed.py --config CFG --flows N`) and copied
for each round, so every round starts from the same index.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    seed_reason: str | None = None
    templates: dict[int, Path] = field(default_factory=dict)
    template_reasons: dict[int, str] = field(default_factory=dict)
    seed_seconds: dict[int, float] = field(default_factory=dict)
    py_spy: str | None = None


@dataclass
class Target:
    server: Server
    url: str
    warm: Path
    sat: Path
    paced: Path
    notes: list[str]
    store: Path | None = None


class NotAvailable(Exception):
    pass


def rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


# --- ct-appliance -------------------------------------------------------------------------------


def app_config(
    ctx: Ctx,
    cfg_path: Path,
    store: Path,
    importer: list[str] | None = None,
    importer_url: str | None = None,
) -> tuple[int, int]:
    """Write a SPEC §3 config for a loopback server; return (webhook port, admin port)."""
    port, admin = free_port(), free_port()
    command = json.dumps(importer or ["/bin/true"])
    importer_line = (
        f"importer: {{url: {json.dumps(importer_url)}}}\n"
        if importer_url
        else f"importer: {{command: {command}}}\n"
    )
    cfg_path.write_text(
        "# written by bench/variants.py\n"
        "environment: alpha\n"
        f'listen: {{bind: ["127.0.0.1:{port}"]}}\n'
        f"webhook: {{path: {WEBHOOK_PATH}}}\n"
        f'auth: {{mode: hmac, hmac: {{secrets: [{{value: "{ctx.secret}"}}]}}}}\n'
        f"store: {{path: {store}}}\n" + importer_line + f'admin: {{bind: "127.0.0.1:{admin}"}}\n'
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
    """Why ct-appliance cannot be benchmarked, or None when check-config accepts our config."""
    if not ctx.app_exe.exists():
        return f"{rel(ctx.app_exe, ctx.root)} not found (no console script yet)"
    d = ctx.work / "check"
    d.mkdir(exist_ok=True)
    cfg = d / "config.yaml"
    app_config(ctx, cfg, d / "store")
    try:
        done = _cli(ctx, "check-config", "--config", str(cfg))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"check-config: {e}"
    out = (done.stdout + done.stderr).strip()
    if done.returncode == 0:
        return None
    if "invalid choice" in out or "No such command" in out:
        return None  # no check-config yet: let serve decide
    return f"check-config exit {done.returncode}: {out[-300:]}"


def seed_command() -> list[str]:
    """The bulk loader's argv, to which `--config CFG --flows N` is appended."""
    custom = os.environ.get("BENCH_SEED_COMMAND")
    return shlex.split(custom) if custom else [sys.executable, "bench/seed.py"]


def seed_available(ctx: Ctx) -> str | None:
    if ctx.app_reason:
        return ctx.app_reason
    if os.environ.get("BENCH_SEED_COMMAND"):
        return None
    if not (ctx.root / "bench" / "seed.py").exists():
        return "no bulk loader: bench/seed.py does not exist"
    return None


def seed_template(ctx: Ctx, flows: int) -> None:
    """Build the store seeded with `flows` indexed ids once; rounds copy it."""
    if ctx.seed_reason:
        ctx.template_reasons[flows] = ctx.seed_reason
        return
    d = ctx.work / f"seed-{flows}"
    d.mkdir(exist_ok=True)
    cfg = d / "config.yaml"
    app_config(ctx, cfg, d / "store")
    argv = [
        "taskset",
        "-c",
        SERVER_CPU,
        *seed_command(),
        "--config",
        str(cfg),
        "--flows",
        str(flows),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ctx.root, timeout=1800)
    if done.returncode != 0:
        ctx.template_reasons[flows] = (
            f"bulk loader exit {done.returncode}: {(done.stdout + done.stderr).strip()[-300:]}"
        )
        return
    ctx.seed_seconds[flows] = time.perf_counter() - t0
    ctx.templates[flows] = d / "store"


def start_app(
    ctx: Ctx,
    rdir: Path,
    store: Path,
    pause: bool,
    importer: list[str] | None = None,
    importer_url: str | None = None,
) -> tuple[Server, str, int, Path, list[str]]:
    """Start `ct-appliance serve` on store: (server, webhook url, admin port, config, notes)."""
    if ctx.app_reason:
        raise NotAvailable(ctx.app_reason)
    cfg = rdir / "config.yaml"
    port, admin = app_config(ctx, cfg, store, importer, importer_url)
    notes: list[str] = []
    paused = False
    if pause:
        # Pause state lives in the store: set it before serving, or else right after start.
        paused = _cli(ctx, "importer", "pause", "--config", str(cfg)).returncode == 0
    server = servers.start(
        "ct-appliance", [str(ctx.app_exe), "serve", "--config", str(cfg)],
        rdir / "server.log", admin, "/readyz",
    )  # fmt: skip
    if pause and not paused:
        paused = _cli(ctx, "importer", "pause", "--config", str(cfg)).returncode == 0
        if not paused:
            notes.append("importer not paused (no `importer pause`): /bin/true runs during load")
    return server, f"http://127.0.0.1:{port}{WEBHOOK_PATH}", admin, cfg, notes


def _app(ctx: Ctx, rdir: Path) -> Target:
    store = rdir / "store"
    server, url, _, _, notes = start_app(ctx, rdir, store, pause=True)
    f = ctx.files
    return Target(server, url, f["warm"], f["sat"], f["paced"], notes, store)


def _dup(ctx: Ctx, rdir: Path) -> Target:
    import load

    store = rdir / "store"
    server, url, _, _, notes = start_app(ctx, rdir, store, pause=True)
    small = ctx.files["small"]
    try:
        primed = load.once(url, small, concurrency=16)
    except Exception:
        server.stop()
        raise
    if primed["accepted"] != sum(1 for _ in open(small, "rb")):
        notes.append(f"priming: {primed['accepted']} accepted, statuses {primed['statuses']}")
    return Target(server, url, small, small, small, notes, store)


def _indexed(flows: int) -> Callable[[Ctx, Path], Target]:
    def start(ctx: Ctx, rdir: Path) -> Target:
        template = ctx.templates.get(flows)
        if template is None:
            raise NotAvailable(ctx.template_reasons.get(flows, "not seeded"))
        store = rdir / "store"
        subprocess.run(["cp", "-a", "--reflink=auto", str(template), str(store)], check=True)
        server, url, _, _, notes = start_app(ctx, rdir, store, pause=True)
        f = ctx.files
        return Target(server, url, f["warm"], f["sat"], f["paced"], notes, store)

    return start


# --- the reference servers ----------------------------------------------------------------------


def _bare(ctx: Ctx, rdir: Path) -> Target:
    port = free_port()
    server = servers.start(
        "bare", [sys.executable, str(HERE / "bare_asgi.py"), "--bind", f"127.0.0.1:{port}"],
        rdir / "server.log", port, "/",
    )  # fmt: skip
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


def all_variants(seed_flows: list[int]) -> list[Variant]:
    out = [
        Variant("bare", "bare Hypercorn-trio raw ASGI (ceiling)", "http", _bare),
        Variant("app", "ct-appliance durable, HMAC, 50 new ids/POST", "http", _app),
        Variant("dup", "ct-appliance duplicate path (known ids)", "http", _dup),
    ]
    for n in seed_flows:
        out.append(
            Variant(
                f"idx{_short(n)}",
                f"ct-appliance, {_short(n).upper()} ids indexed",
                "http",
                _indexed(n),
            )
        )
    out.append(Variant("webhook", "Debian webhook 2.8, HMAC rule, /bin/true", "http", _webhook))
    out.append(Variant("import", "import throughput, /bin/true importer (deliveries/s)", "import"))
    out.append(
        Variant(
            "importhttp",
            "import throughput, HTTP importer answering 200 (deliveries/s)",
            "import",
        )
    )
    return out


def _short(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def seeded_flows(key: str, seed_flows: list[int]) -> int | None:
    for n in seed_flows:
        if key == f"idx{_short(n)}":
            return n
    return None


def remove_store(path: Path | None) -> None:
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)
