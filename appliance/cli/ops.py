"""CLI commands for operators: check-config, status, watch.

`status` and `watch` read the running server's admin listener (`GET /status`), which computes
the launch-window table from the same events as /metrics. When the server is down, `status`
falls back to the store alone (counts, oldest pending, dead letters) and says so.

With `admin.token` set, these commands read that one secret (and no other) and send it; when
it cannot be read (say ``${CREDENTIALS_DIRECTORY}`` outside systemd), they say so and `status`
falls back to the store alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .. import config as config_mod
from ..durations import format_age, parse_duration
from ..errors import AdminRefused, CommandFailed, ConfigError
from ..metrics import format_signal
from ..reload import diff, summary
from .common import EXIT_FAILED, EXIT_OK, emit, load, table

_SIGNAL_NAMES = {
    "p95_latency_seconds": "webhook p95 latency",
    "error_5xx_rate": "5xx rate",
    "signature_failure_rate": "signature failures",
    "idempotency_skip_rate": "idempotency-skip rate",
    "imports_per_webhook": "imports per webhook",
}


def admin_get(cfg: config_mod.Config, path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET a JSON document from the admin listener; None when nothing answers there."""
    import httpx

    host, port = config_mod.split_bind(cfg.admin.bind)
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}{path}"
    headers = {}
    if cfg.admin.token is not None:  # printable ASCII: configrules.py checks it
        headers["Authorization"] = "Bearer " + cfg.admin.token.value.decode("ascii", "replace")
    try:
        response = httpx.get(url, timeout=timeout, headers=headers)
    except httpx.HTTPError:
        return None
    if response.status_code == 401:
        why = "admin.token is wrong" if cfg.admin.token else "it needs admin.token, none is set"
        raise AdminRefused(f"the admin listener on {cfg.admin.bind} answered 401: {why}")
    if response.status_code == 421:
        raise AdminRefused(
            f"the admin listener on {cfg.admin.bind} answered 421: it does not answer for "
            f"Host {host} (add it to admin.allowed_hosts)"
        )
    if response.status_code != 200:
        return None
    doc: dict[str, Any] = response.json()
    return doc


def load_for_admin(args: argparse.Namespace) -> tuple[config_mod.Loaded, str | None]:
    """The config with admin.token read (only that secret), and why it could not be, if so."""
    try:
        return load(args, resolve_only=("admin.token",)), None
    except ConfigError as first:
        loaded = load(args)  # a file that is wrong anyway raises here, as a config error
        return loaded, "cannot read admin.token: " + "; ".join(first.problems)


def check_config(args: argparse.Namespace) -> int:
    loaded = load(args, resolve_secrets=True)
    cfg = loaded.config
    new = summary(cfg)
    refused = None
    try:
        running = admin_get(cfg, "/status", timeout=1.0)
    except AdminRefused as e:
        running, refused = None, str(e)
    doc: dict[str, Any] = {
        "file": loaded.path,
        "valid": True,
        "config": new,
        "warnings": list(loaded.warnings),
    }
    if running is not None and "config" in running:
        doc["running_server"] = True
        doc["reload_would_change"] = diff(running["config"], new)
    else:
        doc["running_server"] = False
        if refused:
            doc["admin_refused"] = refused

    def text() -> str:
        lines = [f"{loaded.path}: valid"]
        lines += [f"  {k:24} {v}" for k, v in new.items()]
        lines += [f"warning: {w}" for w in loaded.warnings]
        if doc["running_server"]:
            changes = doc["reload_would_change"]
            lines.append("a reload (systemctl reload ct-appliance) would change:")
            lines += [f"  {c}" for c in changes] or ["  nothing"]
        elif refused:
            lines.append(f"{refused}; nothing to compare")
        else:
            lines.append("no running server answered on admin.bind; nothing to compare")
        return "\n".join(lines)

    emit(args, doc, text)
    return EXIT_OK


def _signal_rows(lw: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, name in _SIGNAL_NAMES.items():
        sig = lw["signals"][key]
        value = format_signal(key, sig["value"])
        if key == "imports_per_webhook":
            value += f" (pending {sig.get('pending')}, dead {sig.get('dead')})"
        rows.append({"signal": name, "value": value, "mark": sig["grade"]})
    return rows


def _store_only(args: argparse.Namespace, why: str | None = None) -> dict[str, Any]:
    from ..record import State, dead_letter
    from .store import open_backend

    backend = open_backend(args)
    counts = backend.summary()
    dead = backend.records(state=State.DEAD, limit=10)
    return {
        "server": f"{why or 'not running'} (figures from the store alone)",
        "importer_paused": counts.paused,
        "inbox": counts.as_dict(time.time()),
        "recent_dead": [dead_letter(r) for r in dead],
    }


def status(args: argparse.Namespace) -> int:
    loaded, why = load_for_admin(args)
    window = parse_duration(args.window)
    live = None
    if why is None:
        try:
            live = admin_get(loaded.config, f"/status?window={int(window)}s")
        except AdminRefused as e:
            why = str(e)
    if why is not None:
        print(f"ct-appliance status: {why}", file=sys.stderr)
    doc = live if live is not None else _store_only(args, why)

    def text() -> str:
        inbox = doc["inbox"]
        lines = []
        if live is not None:
            lines.append(
                f"ct-appliance {doc['version']} ({doc['environment']}, auth "
                f"{doc['auth_mode']}, ack {doc['ack']}): "
                f"{'ready' if doc['ready'] else 'NOT READY: ' + doc['ready_reason']}"
            )
        else:
            lines.append(f"server: {doc['server']}")
        if doc.get("importer_paused"):
            lines.append(
                "IMPORTS PAUSED: deliveries are accepted and queued (ct-appliance importer resume)"
            )
        lines.append(
            f"inbox: pending {inbox['pending']}, importing {inbox['importing']}, "
            f"done {inbox['done']}, dead {inbox['dead']}; oldest pending "
            f"{format_age(inbox.get('oldest_pending_seconds'))}; flow ids indexed "
            f"{inbox['flows']}; runs {inbox['runs']}"
        )
        if live is not None:
            lw = doc["launch_window"]
            lines.append(
                f"\nlaunch window, last {format_age(lw['window_seconds'])} "
                f"({lw['answers']} answers, {lw['injected_failures']} drill answers apart):"
            )
            lines.append(table(_signal_rows(lw), ["signal", "value", "mark"]))
            lines += [f"\n!! {a}" for a in lw["alerts"]]
        if doc.get("recent_dead"):
            lines.append("\ndead deliveries (ct-appliance inbox show ID; inbox retry ID):")
            lines += [
                f"  {d['delivery_id']}  run {d['cost_basis_run_id']}" for d in doc["recent_dead"]
            ]
        return "\n".join(lines)

    emit(args, doc, text)
    return EXIT_OK


def watch(args: argparse.Namespace) -> int:
    loaded, why = load_for_admin(args)
    if why is not None:
        raise CommandFailed(why)
    cfg = loaded.config
    window = parse_duration(args.window)
    interval = parse_duration(args.interval)
    while True:
        doc = admin_get(cfg, f"/status?window={int(window)}s")
        if doc is None:
            raise CommandFailed(f"no appliance answers on admin.bind {cfg.admin.bind}")
        lw = doc["launch_window"]
        bad = [r for r in _signal_rows(lw) if r["mark"] == "investigate"]
        verdict = "ALERT" if lw["alerts"] else "INVESTIGATE" if bad else "healthy"
        stamp = time.strftime("%H:%M:%S")
        if args.json:
            print(json.dumps({"at": stamp, "verdict": verdict, "launch_window": lw}))
        else:
            print(f"[{stamp}] {verdict}: last {format_age(window)}, {lw['answers']} answers")
            print(table(_signal_rows(lw), ["signal", "value", "mark"]))
            for alert in lw["alerts"]:
                print(f"!! {alert}")
        if args.once:
            return EXIT_FAILED if (bad or lw["alerts"]) else EXIT_OK
        time.sleep(interval)
