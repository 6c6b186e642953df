"""The admin listener (spec §8): health, readiness, metrics, status JSON and the status page.

Bound to loopback by default. Reads only: it never changes the store.
"""

from __future__ import annotations

import time
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, jsonify, request
from quart_trio import QuartTrio

from . import statuspage
from .durations import parse_duration
from .metrics import signals
from .reload import summary
from .runtime import Runtime
from .version import build_info

DEFAULT_WINDOW_SECONDS = 900.0


async def inbox_summary(rt: Runtime) -> dict[str, Any]:
    counts = await trio.to_thread.run_sync(rt.inbox.counts)
    oldest = counts.get("oldest_pending_at")
    counts["oldest_pending_seconds"] = round(time.time() - oldest, 3) if oldest else None
    counts["size_bytes"] = rt.store.size_bytes()
    counts["paused"] = rt.dispatcher.paused if rt.dispatcher is not None else False
    return counts


async def status_document(rt: Runtime, window_seconds: float) -> dict[str, Any]:
    version, commit, built = build_info()
    cfg = rt.live.config
    inbox = await inbox_summary(rt)
    recent_dead = await trio.to_thread.run_sync(lambda: rt.inbox.records(state="dead", limit=10))
    ready, why = rt.ready()
    return {
        "version": version,
        "commit": commit,
        "built": built,
        "environment": cfg.environment,
        "auth_mode": rt.live.verifier.mode,
        "ack": cfg.ack,
        "ready": ready,
        "ready_reason": why,
        "uptime_seconds": round(time.time() - rt.started_at, 1),
        "importer_paused": inbox["paused"],
        "inbox": inbox,
        "recent_dead": [
            {
                "delivery_id": r["delivery_id"],
                "received_at": r["received_at"],
                "cost_basis_run_id": r["run"],
                "flows": len(r["flows"]),
                "attempts": len(r["attempts"]),
                "last_error": (r["attempts"][-1].get("summary") if r["attempts"] else None),
            }
            for r in recent_dead
        ],
        "launch_window": signals(rt.metrics.window, window_seconds, inbox),
        "last_reload": rt.last_reload,
        "config": summary(cfg),
    }


def create_app(rt: Runtime) -> Quart:
    app = QuartTrio("ct_appliance_admin")

    @app.get("/healthz")
    async def healthz() -> Any:
        return jsonify(status="alive")

    @app.get("/readyz")
    async def readyz() -> Any:
        ready, why = rt.ready()
        return jsonify(ready=ready, reason=why), (200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        data = await trio.to_thread.run_sync(generate_latest, rt.metrics.registry)
        return Response(data, content_type=CONTENT_TYPE_LATEST)

    @app.get("/status")
    async def status() -> Any:
        window = _window_arg(request.args.get("window"))
        return jsonify(await status_document(rt, window))

    @app.get("/")
    async def page() -> Response:
        window = _window_arg(request.args.get("window"))
        doc = await status_document(rt, window)
        return Response(statuspage.render(doc), content_type="text/html; charset=utf-8")

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Any:
        return jsonify(error="not_found", message="no such path"), 404

    return app


def _window_arg(value: str | None) -> float:
    if not value:
        return DEFAULT_WINDOW_SECONDS
    try:
        return max(1.0, min(parse_duration(value), 3600.0))
    except ValueError:
        return DEFAULT_WINDOW_SECONDS
