"""The admin listener (spec §8): health, readiness, metrics, status JSON and the status page.

Bound to loopback by default. Reads only: it never changes the store.

Two gates run before every route, both read from the live config so a reload applies them:
- Host: only loopback names, the host of `admin.bind` and `admin.allowed_hosts` are answered;
  any other Host gets 421. A DNS-rebinding page (evil.example resolving to 127.0.0.1) runs in
  an operator's browser with the page's own origin, so its requests carry ``Host: evil.example``.
- `admin.token`, when set: every path but /healthz and /readyz (which probes use and which
  tell nothing) needs ``Authorization: Bearer TOKEN`` or HTTP Basic with the token as password,
  so the status page opens in a browser. Compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, jsonify, request
from quart_trio import QuartTrio

from . import statuspage
from .config import AdminConfig, is_loopback, split_bind
from .durations import parse_duration
from .errors import StoreError
from .metrics import signals
from .record import InboxSummary, Record, State, dead_letter
from .reload import summary
from .runtime import Runtime
from .version import build_info

DEFAULT_WINDOW_SECONDS = 900.0
EMPTY_INBOX = InboxSummary(0, 0, 0, 0, 0, 0, 0, 0, None, 0, False)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
CHALLENGES = ('Basic realm="ct-appliance"', 'Bearer realm="ct-appliance"')


async def status_document(rt: Runtime, window_seconds: float) -> dict[str, Any]:
    version, commit, built = build_info()
    cfg = rt.live.config
    backend = rt.backend

    def read() -> tuple[InboxSummary, list[Record], list[dict[str, Any]]]:
        return backend.summary(), backend.records(state=State.DEAD, limit=10), backend.peers()

    store_error = None
    try:
        counts, recent_dead, appliances = await trio.to_thread.run_sync(read)
    except StoreError as e:  # the database is unreachable: say so, and everything else
        counts, recent_dead, appliances = EMPTY_INBOX, [], []
        store_error = str(e)
    inbox = counts.as_dict(time.time())
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
        "recent_dead": [dead_letter(r) for r in recent_dead],
        "store": {"backend": cfg.store.backend, "error": store_error},
        "appliances": appliances,
        "launch_window": signals(rt.metrics.window, window_seconds, counts),
        "last_reload": rt.last_reload,
        "config": summary(cfg),
    }


def host_of(value: str) -> str | None:
    """The host of a Host header (port dropped, lowercase, no trailing dot); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return host.rstrip(".") or None


def host_allowed(value: str | None, admin: AdminConfig) -> bool:
    if value is None or not value.strip():
        # Every browser sends a Host, so DNS rebinding cannot make a request without one;
        # health checkers do (HAProxy's default HTTP/1.0 check): answer them.
        return True
    host = host_of(value)
    if host is None:
        return False
    if is_loopback(host) or host == split_bind(admin.bind)[0].lower():
        return True
    return host in {host_of(h) for h in admin.allowed_hosts}


def token_matches(authorization: str | None, token: bytes) -> bool:
    """`Bearer TOKEN`, or `Basic base64(any-user:TOKEN)`; constant time in the token."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        given = credentials.encode("latin-1", "replace")  # header text is latin-1 decoded bytes
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(credentials, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return False
    else:
        return False
    return hmac.compare_digest(given, token)


def _refusal(status: int, error: str, message: str) -> Response:
    response = jsonify(error=error, message=message)
    response.status_code = status
    if status == 401:
        for challenge in CHALLENGES:
            response.headers.add("WWW-Authenticate", challenge)
    return response


def create_app(rt: Runtime) -> Quart:
    app = QuartTrio("ct_appliance_admin")

    @app.before_request
    async def gate() -> Response | None:
        admin = rt.live.config.admin
        if not host_allowed(request.headers.get("Host"), admin):
            why = "this listener does not answer for that Host (see admin.allowed_hosts)"
            return _refusal(421, "misdirected_request", why)
        token = admin.token
        if token is not None and request.path not in OPEN_PATHS:
            if not token_matches(request.headers.get("Authorization"), token.value):
                why = "this path needs the admin token (Authorization: Bearer TOKEN)"
                return _refusal(401, "unauthorized", why)
        return None

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
