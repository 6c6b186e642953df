"""What a reload changes, described for operators without a single secret.

Used by the server on SIGHUP (logged), by `/status` and by `check-config` (printed against the
running server's summary), so all say the same thing. URLs pass through `mask_url`: an
``importer.url`` or ``jwks_url`` with ``user:password@`` shows as ``user:***@``.
"""

from __future__ import annotations

from typing import Any

from .config import BearerConfig, Config, mask_url, secret_count


def summary(cfg: Config) -> dict[str, Any]:
    """A secret-free view of the settings an operator reasons about."""
    out: dict[str, Any] = {
        "environment": cfg.environment,
        "auth_mode": cfg.auth.mode,
        "secret_count": secret_count(cfg),
        "listen": list(cfg.listen.bind),
        "tls": cfg.listen.tls is not None,
        "admin": cfg.admin.bind,
        "admin_token": cfg.admin.token is not None,
        "admin_allowed_hosts": list(cfg.admin.allowed_hosts),
        "store_backend": cfg.store.backend,
        "store_path": cfg.store.path,
        "store_postgresql": _postgresql(cfg),
        "webhook_path": cfg.webhook.path,
        "max_body_bytes": cfg.webhook.max_body_bytes,
        "max_inflight_body_bytes": cfg.webhook.max_inflight_body_bytes,
        "max_connections": cfg.listen.max_connections,
        "ack": cfg.ack,
        "importer": (
            list(cfg.importer.command) if cfg.importer.command else mask_url(cfg.importer.url or "")
        ),
        "importer_concurrency": cfg.importer.concurrency,
        "importer_timeout_seconds": cfg.importer.timeout_seconds,
        "fail_first_deliveries": cfg.testing.fail_first_deliveries,
    }
    if cfg.auth.mode == "hmac" and cfg.auth.hmac is not None:
        out["hmac_header"] = cfg.auth.hmac.header
    if cfg.auth.mode == "bearer" and cfg.auth.bearer is not None:
        b = cfg.auth.bearer
        out["issuer"] = b.issuer
        out["audience"] = b.audience
        out["algorithms"] = list(b.algorithms)
        out["key_source"] = key_source(b)
    return out


def key_source(b: BearerConfig) -> str:
    """Where bearer keys come from: the kind, and the URL or file (never the secret)."""
    kind = next(k for k in ("jwks_url", "jwks_file", "public_key_file", "secret") if getattr(b, k))
    return kind if kind == "secret" else f"{kind} {mask_url(str(getattr(b, kind)))}"


def _postgresql(cfg: Config) -> dict[str, Any] | None:
    """The PostgreSQL store's settings: where its DSN comes from, never the DSN itself."""
    pg = cfg.store.postgresql
    if pg is None:
        return None
    return {"dsn_from": pg.dsn.source, "pool_size": pg.pool_size, "lease_seconds": pg.lease_seconds}


RESTART_KEYS = ("listen", "tls", "admin", "store_backend", "store_path", "store_postgresql")


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def summarize_changes(old: Config, new: Config) -> list[str]:
    return diff(summary(old), summary(new)) or ["no change"]


def restart_needed(old: Config, new: Config) -> list[str]:
    a, b = summary(old), summary(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r} (needs a restart)" for k in RESTART_KEYS if a[k] != b[k]]
