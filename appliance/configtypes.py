"""The config's shape: one tree of frozen dataclasses, with every default in code.

`config.py` re-exports all of it, so other modules import from there. These types live apart so
that the YAML walker (`configyaml.py`) and the cross-key rules (`configrules.py`) can use them
while `config.py` uses those two: data flows one way, types -> walker -> rules -> `load()`.
A `Secret`'s bytes never appear in a repr or a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class Secret:
    """Secret bytes with a description of where they came from; never printed."""

    __slots__ = ("value", "source")

    def __init__(self, value: bytes, source: str) -> None:
        self.value = value
        self.source = source

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.source)


@dataclass(frozen=True)
class SecretSource:
    """Exactly one of `value`, `file` (``${CREDENTIALS_DIRECTORY}`` is expanded) or `env`."""

    value: str | None = None
    file: str | None = None
    env: str | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class ListenConfig:
    bind: tuple[str, ...] = ("0.0.0.0:8443",)
    tls: TLSConfig | None = None
    behind_proxy: bool = False
    graceful_timeout_seconds: float = 10.0
    keep_alive_timeout_seconds: float = 75.0
    # Each connection may hold ~320 KiB in Hypercorn before the body budget sees it: 1,024 of
    # them beside the 256 MiB body budget stay under the unit's MemoryMax=1G (docs/SECURITY.md).
    max_connections: int = 1024


@dataclass(frozen=True)
class WebhookConfig:
    path: str = "/webhooks/cointracker"
    max_body_bytes: int = 33_554_432
    max_inflight_body_bytes: int = 268_435_456
    body_timeout_seconds: float = 30.0
    imported_wait_seconds: float = 25.0


@dataclass(frozen=True)
class HmacConfig:
    secrets: tuple[Secret, ...]
    header: str = "X-Cointracker-Signature"


@dataclass(frozen=True)
class BearerConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256",)
    jwks_url: str | None = None
    jwks_file: str | None = None
    public_key_file: str | None = None
    secret: Secret | None = None
    leeway_seconds: float = 30.0
    subject: str | None = None
    jwks_refresh_seconds: float = 300.0
    jwks_ca_file: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    mode: Literal["hmac", "bearer"] = "hmac"
    hmac: HmacConfig | None = None
    bearer: BearerConfig | None = None


@dataclass(frozen=True)
class PostgresConfig:
    """`store.backend: postgresql`: N appliances share one database (docs/SCALING.md)."""

    dsn: Secret  # a libpq connection string; several hosts fail over (target_session_attrs)
    pool_size: int = 8
    lease_seconds: float = 300.0  # a dead appliance's import is re-run by another after this


@dataclass(frozen=True)
class StoreConfig:
    backend: Literal["lmdb", "postgresql"] = "lmdb"
    path: str = "/var/lib/ct-appliance"
    postgresql: PostgresConfig | None = None
    retention_days: float = 30.0
    initial_map_bytes: int = 1 << 30


@dataclass(frozen=True)
class ImporterConfig:
    command: tuple[str, ...] | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    sign_secret: Secret | None = None
    ca_file: str | None = None
    timeout_seconds: float = 300.0
    concurrency: int = 1
    max_attempts: int = 10
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 3600.0
    shutdown_grace_seconds: float = 10.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AdminConfig:
    bind: str = "127.0.0.1:9811"
    token: Secret | None = None
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TestingConfig:
    fail_first_deliveries: int = 0


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class Config:
    importer: ImporterConfig
    environment: Literal["alpha", "production"] = "alpha"
    listen: ListenConfig = ListenConfig()
    webhook: WebhookConfig = WebhookConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    ack: Literal["durable", "imported"] = "durable"
    admin: AdminConfig = AdminConfig()
    testing: TestingConfig = TestingConfig()
    log: LogConfig = LogConfig()
