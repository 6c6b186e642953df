"""The rules that span keys, checked once the walker has built a `Config`.

Each problem is recorded on the `Builder` with the line of the key it names, like the walker's.
Production refuses what alpha only warns about (`_risky`): the warnings go back to the operator
with `Loaded.warnings`. What execve(2) cannot pass is refused in every environment.
`split_bind` and `is_loopback` live here because the rules use them; `config.py` re-exports them.
"""

from __future__ import annotations

import ipaddress
import re
import stat
import urllib.parse

from .configtypes import AdminConfig, BearerConfig, Config, ImporterConfig
from .configyaml import Builder

MIN_SECRET_BYTES = 32
# Linux limits what execve(2) can pass: one "NAME=value" string is at most MAX_ARG_STRLEN
# (128 KiB) and all of argv + envp share ARG_MAX (2 MiB with the default 8 MiB stack). The
# importer also gets the delivery's CT_* variables, so importer.env keeps to half of that.
MAX_ENV_ENTRY_BYTES = 128 << 10
MAX_ENV_TOTAL_BYTES = 1 << 20


def validate(cfg: Config, b: Builder, file_mode: int | None) -> list[str]:
    """Rules that span keys; production refuses what alpha only warns about."""
    auth = cfg.auth
    if auth.mode == "hmac" and (auth.hmac is None or not auth.hmac.secrets):
        b.fail(b.line("auth"), "auth.hmac.secrets", "mode hmac needs at least one secret")
    if auth.mode == "bearer":
        if auth.bearer is None:
            b.fail(b.line("auth"), "auth.bearer", "mode bearer needs this section")
        else:
            _validate_bearer(auth.bearer, b)
    _validate_importer(cfg.importer, b)
    _validate_limits(cfg, b)
    _validate_admin(cfg.admin, b)
    _validate_store(cfg, b)
    return _risky(cfg, b, file_mode)


def _validate_importer(imp: ImporterConfig, b: Builder) -> None:
    if (imp.command is None) == (imp.url is None):
        b.fail(b.line("importer"), "importer", "give exactly one of command, url")
    if imp.command is not None and not imp.command:
        b.fail(b.line("importer.command"), "importer.command", "must not be empty")
    if imp.url is not None:
        _check_url(imp.url, "importer.url", b)
    for key in ("concurrency", "max_attempts"):
        if getattr(imp, key) < 1:
            b.fail(b.line(f"importer.{key}"), f"importer.{key}", "must be at least 1")
    if imp.timeout_seconds <= 0:
        b.fail(b.line("importer.timeout_seconds"), "importer.timeout_seconds", "must be > 0")
    if imp.backoff_max_seconds < imp.backoff_initial_seconds:
        b.fail(
            b.line("importer.backoff_max_seconds"),
            "importer.backoff_max_seconds",
            "must be at least backoff_initial_seconds",
        )
    for name, value in imp.headers.items():
        path = f"importer.headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            b.fail(b.line(path), path, "not a valid HTTP header name")
        elif "\r" in value or "\n" in value:
            b.fail(b.line(path), path, "a header value must be one line")
    _validate_env(imp.env, b)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _validate_env(env: dict[str, str], b: Builder) -> None:
    """Refused in every environment: what execve(2) cannot pass fails every import (E2BIG)."""
    total = 0
    for name, value in env.items():
        path = f"importer.env.{name}"
        size = len(name.encode()) + len(value.encode()) + 2  # NAME=value and its NUL
        total += size
        if not name or "=" in name:
            b.fail(b.line(path), path, "an environment variable name must not be empty or hold =")
        elif size > MAX_ENV_ENTRY_BYTES:
            b.fail(
                b.line(path),
                path,
                f"{name}=... is {size} bytes; one environment entry can hold at most "
                f"{MAX_ENV_ENTRY_BYTES} (128 KiB, Linux MAX_ARG_STRLEN): the importer could "
                "never be started (E2BIG)",
            )
    if total > MAX_ENV_TOTAL_BYTES:
        b.fail(
            b.line("importer.env"),
            "importer.env",
            f"the entries total {total} bytes, over {MAX_ENV_TOTAL_BYTES} (1 MiB): with the "
            "delivery's own variables they could not be passed to the importer (E2BIG)",
        )


def _validate_limits(cfg: Config, b: Builder) -> None:
    if not cfg.webhook.path.startswith("/"):
        b.fail(b.line("webhook.path"), "webhook.path", "must start with /")
    if cfg.webhook.max_body_bytes < 1024:
        b.fail(b.line("webhook.max_body_bytes"), "webhook.max_body_bytes", "must be >= 1024")
    if cfg.webhook.max_inflight_body_bytes < 2 * cfg.webhook.max_body_bytes:
        b.fail(
            b.line("webhook.max_inflight_body_bytes"),
            "webhook.max_inflight_body_bytes",
            f"must be at least 2 x webhook.max_body_bytes ({2 * cfg.webhook.max_body_bytes}): "
            "a body of the maximum size must fit beside the headroom kept for smaller ones",
        )
    if cfg.listen.max_connections < 16:
        b.fail(b.line("listen.max_connections"), "listen.max_connections", "must be >= 16")
    for i, bind in enumerate(cfg.listen.bind):
        if _split_bind(bind) is None:
            b.fail(b.line(f"listen.bind[{i}]"), f"listen.bind[{i}]", f"not HOST:PORT: {bind!r}")
    if not cfg.listen.bind:
        b.fail(b.line("listen.bind"), "listen.bind", "give at least one address")


def _validate_store(cfg: Config, b: Builder) -> None:
    pg = cfg.store.postgresql
    if cfg.store.backend == "postgresql" and pg is None:
        b.fail(b.line("store.backend"), "store.postgresql", "backend postgresql needs this section")
    if pg is None:
        return
    if not 2 <= pg.pool_size <= 100:
        why = "must be between 2 and 100 (one connection commits, the others read)"
        b.fail(b.line("store.postgresql.pool_size"), "store.postgresql.pool_size", why)
    if pg.lease_seconds < 10:
        why = "must be at least 10 (leases are renewed every lease_seconds / 3)"
        b.fail(b.line("store.postgresql.lease_seconds"), "store.postgresql.lease_seconds", why)
    from .pgdb import parses  # psycopg is imported only when the config names PostgreSQL

    if pg.dsn.value and not parses(pg.dsn.value.decode("utf-8", "replace")):
        why = "not a libpq connection string (keywords or a postgresql:// URI)"
        b.fail(b.line("store.postgresql.dsn"), "store.postgresql.dsn", why)


DSN_PATH = "store.postgresql.dsn"


def _validate_admin(admin: AdminConfig, b: Builder) -> None:
    if _split_bind(admin.bind) is None:
        b.fail(b.line("admin.bind"), "admin.bind", f"not HOST:PORT: {admin.bind!r}")
    for i, host in enumerate(admin.allowed_hosts):
        path = f"admin.allowed_hosts[{i}]"
        if not _HOST.fullmatch(host):
            b.fail(b.line(path), path, f"not a host name or address: {host!r}")
    token = admin.token.value if admin.token is not None else b""
    if not all(33 <= c < 127 for c in token):
        why = "must be printable ASCII without spaces (it travels in an HTTP header)"
        b.fail(b.line("admin.token"), "admin.token", why)


_HOST = re.compile(r"[A-Za-z0-9._-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


def _check_url(url: str, path: str, b: Builder) -> None:
    """An http(s) URL that an HTTP client can parse (never echoed: it may hold a password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        b.fail(b.line(path), path, "not a valid URL")
        return
    if parts.scheme not in ("http", "https"):
        b.fail(b.line(path), path, "must start with http:// or https://")
    elif not parts.hostname:
        b.fail(b.line(path), path, "has no host")
    elif any(c.isspace() or not c.isprintable() for c in url):
        b.fail(b.line(path), path, "must not contain spaces or control characters")


def _risky(cfg: Config, b: Builder, file_mode: int | None) -> list[str]:
    """Settings production refuses and alpha warns about; the warnings."""
    pg = cfg.store.postgresql
    # A DSN is a secret only when it holds a password (a socket path or a .pgpass does not).
    dsn_secret = False
    if pg is not None:
        from .pgdb import has_password

        dsn_secret = has_password(pg.dsn.value.decode("utf-8", "replace"))
    value_secrets = [p for p in b.value_secrets if p != DSN_PATH or dsn_secret]
    risky: list[tuple[str, str]] = [(p, "a secret given as value:") for p in value_secrets]
    if cfg.testing.fail_first_deliveries > 0:
        risky.append(
            ("testing.fail_first_deliveries", "the retry drill answers 500 to the first deliveries")
        )
    if cfg.listen.tls is None and not cfg.listen.behind_proxy:
        risky.append(("listen", "plain HTTP without TLS and without behind_proxy: true"))
    imp = cfg.importer
    holds_secret = bool(value_secrets or imp.env or imp.headers)
    if holds_secret and file_mode is not None and file_mode & (stat.S_IROTH | stat.S_IWOTH):
        risky.append(("(file)", "the file holds secrets and is readable by others (chmod 600)"))
    bearer = cfg.auth.bearer if cfg.auth.mode == "bearer" else None
    if bearer is not None and _plain_http(bearer.jwks_url):
        why = "keys fetched over plain http:// (anyone on the path can substitute them)"
        risky.append(("auth.bearer.jwks_url", why))
    if _plain_http(imp.url) and (imp.headers or imp.sign_secret is not None):
        why = "plain http:// while importer.headers or sign_secret go with every request"
        risky.append(("importer.url", why))
    admin_host = _split_bind(cfg.admin.bind)
    if admin_host is not None and not is_loopback(admin_host[0]) and cfg.admin.token is None:
        risky.append(("admin.bind", "not loopback and no admin.token: anyone can read /status"))
    for path, secret in b.resolved:
        if path != DSN_PATH and len(secret.value) < MIN_SECRET_BYTES:
            why = f"shorter than {MIN_SECRET_BYTES} bytes (make one with ct-appliance gen-secret)"
            risky.append((path, why))
    warnings: list[str] = []
    for path, why in risky:
        if cfg.environment == "production":
            b.fail(b.line(path), path, f"refused in production: {why}")
        else:
            where = f"{b.name}:{b.line(path)}: {path}"
            warnings.append(f"{where}: {why} (allowed in alpha, refused in production)")
    return warnings


def _plain_http(url: str | None) -> bool:
    return url is not None and url[:7].lower() == "http://"


def _validate_bearer(br: BearerConfig, b: Builder) -> None:
    sources = [k for k in ("jwks_url", "jwks_file", "public_key_file", "secret") if getattr(br, k)]
    if len(sources) != 1:
        b.fail(
            b.line("auth.bearer"),
            "auth.bearer",
            "give exactly one of jwks_url, jwks_file, public_key_file, secret",
        )
    allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
    allowed |= {"EdDSA", "HS256", "HS384", "HS512"}
    for i, alg in enumerate(br.algorithms):
        path = f"auth.bearer.algorithms[{i}]"
        if alg not in allowed:
            b.fail(b.line(path), path, f"{alg!r} is not accepted (one of {sorted(allowed)})")
        elif alg.startswith("HS") and br.secret is None:
            b.fail(b.line(path), path, f"{alg} needs auth.bearer.secret (never a public key)")
        elif not alg.startswith("HS") and br.secret is not None:
            b.fail(b.line(path), path, f"{alg} needs a public key, not a shared secret")
    if not br.algorithms:
        b.fail(b.line("auth.bearer.algorithms"), "auth.bearer.algorithms", "give at least one")
    if br.jwks_url is not None:
        _check_url(br.jwks_url, "auth.bearer.jwks_url", b)


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1 (brackets and a trailing dot allowed)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_bind(bind: str) -> tuple[str, int] | None:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or not host:
        return None
    return host.strip("[]"), int(port)


def split_bind(bind: str) -> tuple[str, int]:
    parsed = _split_bind(bind)
    if parsed is None:
        raise ValueError(f"not HOST:PORT: {bind!r}")
    return parsed
