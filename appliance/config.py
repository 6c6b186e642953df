"""The YAML config (spec §3) as one tree of frozen dataclasses.

Defaults live here, in code. `load()` reads the file with `yaml.compose` so that every node keeps
its line, walks the dataclass tree field by field, and collects every problem as
``config.yaml:14: auth.hmac.secrets[0]: give exactly one of value, file, env``. Unknown keys,
wrong types and missing required keys are errors. Secrets are resolved at load time (a reload
is validated completely before it is applied) and never appear in a repr or a message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

DEFAULT_PATH = "/etc/ct-appliance/config.yaml"


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
    max_connections: int = 4096


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
class StoreConfig:
    path: str = "/var/lib/ct-appliance"
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


@dataclass(frozen=True)
class Loaded:
    """A validated config, where it came from, and what the operator should be warned about."""

    config: Config
    path: str
    warnings: tuple[str, ...]


def default_path() -> str:
    return os.environ.get("CT_APPLIANCE_CONFIG") or DEFAULT_PATH


def load(path: str | os.PathLike[str], *, resolve_secrets: bool = True) -> Loaded:
    """Load and validate a config file. Operator commands that never use a secret pass
    resolve_secrets=False, so they work without systemd's ${CREDENTIALS_DIRECTORY}."""
    name = str(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{name}: cannot read: {e}"]) from None
    return loads(text, name, file_mode=_mode(name), resolve_secrets=resolve_secrets)


def loads(
    text: str,
    name: str = "config.yaml",
    *,
    file_mode: int | None = None,
    resolve_secrets: bool = True,
) -> Loaded:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise ConfigError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    b = _Builder(name, resolve_secrets)
    if node is None:
        raise ConfigError([f"{name}:1: importer: required key is missing"])
    cfg = b.build(Config, node, "")
    if b.problems:
        raise ConfigError(b.problems)
    assert isinstance(cfg, Config)
    warnings = _validate(cfg, b, file_mode)
    if b.problems:
        raise ConfigError(b.problems)
    return Loaded(cfg, name, tuple(warnings))


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Builder:
    """Walks YAML nodes against dataclass types, recording problems and the line of every key."""

    def __init__(self, name: str, resolve_secrets: bool = True) -> None:
        self.name = name
        self.resolve_secrets = resolve_secrets
        self.problems: list[str] = []
        self.lines: dict[str, int] = {}
        self.value_secrets: list[str] = []

    def fail(self, node: yaml.Node | int, path: str, why: str) -> None:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        self.problems.append(f"{self.name}:{line}: {path or '(top)'}: {why}")

    def line(self, path: str) -> int:
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        return self.lines.get(path, 1)

    def build(self, tp: Any, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if _is_null(node):
                return None
            return self.build(args[0], node, path)
        if tp is Secret:
            return self.secret(node, path)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, node, path)
        if origin is tuple:
            return self.sequence(typing.get_args(tp)[0], node, path)
        if origin is dict:
            return self.mapping_of_str(node, path)
        if origin is Literal:
            value = self.scalar(str, node, path)
            if value is not None and value not in typing.get_args(tp):
                choices = " | ".join(typing.get_args(tp))
                self.fail(node, path, f"must be one of {choices}, not {value!r}")
            return value
        return self.scalar(tp, node, path)

    def dataclass(self, tp: Any, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, "must be a mapping")
            return None
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if key not in fields:
                hint = ", ".join(sorted(fields))
                self.fail(key_node, sub, f"unknown key (known here: {hint})")
                continue
            if key in values:
                self.fail(key_node, sub, "given twice")
                continue
            values[key] = self.build(hints[key], value_node, sub)
        for f in fields.values():
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing and f.name not in values:
                sub = f"{path}.{f.name}" if path else f.name
                self.fail(node, sub, "required key is missing")
        if any(v is None and not _optional(hints[k]) for k, v in values.items()):
            return None
        try:
            return tp(**values)
        except TypeError:
            return None

    def sequence(self, item_tp: Any, node: yaml.Node, path: str) -> tuple[Any, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, "must be a list")
            return None
        return tuple(self.build(item_tp, n, f"{path}[{i}]") for i, n in enumerate(node.value))

    def mapping_of_str(self, node: yaml.Node, path: str) -> dict[str, str] | None:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, "must be a mapping of names to strings")
            return None
        out: dict[str, str] = {}
        for k, v in node.value:
            sub = f"{path}.{k.value}"
            value = self.scalar(str, v, sub)
            if value is not None:
                out[str(k.value)] = value
        return out

    def scalar(self, tp: Any, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"must be a {_type_name(tp)}")
            return None
        value = yaml.SafeLoader("").construct_object(node)  # type: ignore[no-untyped-call]
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
            value = node.value
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            self.fail(node, path, f"must be a {_type_name(tp)}, not {node.value!r}")
            return None
        if tp in (int, float) and value < 0:
            self.fail(node, path, "must not be negative")
            return None
        return value

    def secret(self, node: yaml.Node, path: str) -> Secret | None:
        src = self.dataclass(SecretSource, node, path)
        if src is None:
            return None
        given = [k for k in ("value", "file", "env") if getattr(src, k) is not None]
        if len(given) != 1:
            self.fail(node, path, "give exactly one of value, file, env")
            return None
        if src.value is not None:
            self.value_secrets.append(path)
        if not self.resolve_secrets:
            return Secret(b"", "not resolved (operator command)")
        if src.value is not None:
            raw, where = src.value, "value in the config file"
        elif src.env is not None:
            env_value = os.environ.get(src.env)
            if env_value is None:
                self.fail(node, path, f"environment variable {src.env} is not set")
                return None
            raw, where = env_value, f"env {src.env}"
        else:
            assert src.file is not None
            file_path = self.expand(src.file, node, path)
            if file_path is None:
                return None
            try:
                raw = Path(file_path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                self.fail(
                    node, path, f"cannot read secret file {file_path}: {e.__class__.__name__}"
                )
                return None
            where = f"file {file_path}"
        raw = raw.strip()
        if not raw:
            self.fail(node, path, f"the secret from {where} is empty")
            return None
        return Secret(raw.encode(), where)

    def expand(self, text: str, node: yaml.Node, path: str) -> str | None:
        for var in _VAR.findall(text):
            if var not in os.environ:
                hint = " (set by systemd LoadCredential=)" if var == "CREDENTIALS_DIRECTORY" else ""
                self.fail(node, path, f"${{{var}}} is not set{hint}")
                return None
        return _VAR.sub(lambda m: os.environ[m.group(1)], text)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    return {str: "string", int: "whole number", float: "number", bool: "boolean (true/false)"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _validate(cfg: Config, b: _Builder, file_mode: int | None) -> list[str]:
    """Rules that span keys; production refuses what alpha only warns about."""
    warnings: list[str] = []

    def at(path: str) -> str:
        return f"{b.name}:{b.line(path)}: {path}"

    auth = cfg.auth
    if auth.mode == "hmac" and (auth.hmac is None or not auth.hmac.secrets):
        b.fail(b.line("auth"), "auth.hmac.secrets", "mode hmac needs at least one secret")
    if auth.mode == "bearer":
        if auth.bearer is None:
            b.fail(b.line("auth"), "auth.bearer", "mode bearer needs this section")
        else:
            _validate_bearer(auth.bearer, b)
    imp = cfg.importer
    if (imp.command is None) == (imp.url is None):
        b.fail(b.line("importer"), "importer", "give exactly one of command, url")
    if imp.command is not None and not imp.command:
        b.fail(b.line("importer.command"), "importer.command", "must not be empty")
    if imp.url is not None and not imp.url.startswith(("http://", "https://")):
        b.fail(b.line("importer.url"), "importer.url", "must start with http:// or https://")
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
    if _split_bind(cfg.admin.bind) is None:
        b.fail(b.line("admin.bind"), "admin.bind", f"not HOST:PORT: {cfg.admin.bind!r}")
    if not cfg.listen.bind:
        b.fail(b.line("listen.bind"), "listen.bind", "give at least one address")

    risky: list[tuple[str, str]] = [(p, "a secret given as value:") for p in b.value_secrets]
    if cfg.testing.fail_first_deliveries > 0:
        risky.append(
            (
                "testing.fail_first_deliveries",
                "the retry drill answers 500 to the first deliveries",
            )
        )
    if cfg.listen.tls is None and not cfg.listen.behind_proxy:
        risky.append(("listen", "plain HTTP without TLS and without behind_proxy: true"))
    holds_secret = bool(b.value_secrets or imp.env or imp.headers)
    if holds_secret and file_mode is not None and file_mode & (stat.S_IROTH | stat.S_IWOTH):
        risky.append(("(file)", "the file holds secrets and is readable by others (chmod 600)"))
    for path, why in risky:
        if cfg.environment == "production":
            b.fail(b.line(path), path, f"refused in production: {why}")
        else:
            warnings.append(f"{at(path)}: {why} (allowed in alpha, refused in production)")
    return warnings


def _validate_bearer(br: BearerConfig, b: _Builder) -> None:
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


def secret_count(cfg: Config) -> int:
    if cfg.auth.mode == "hmac" and cfg.auth.hmac is not None:
        return len(cfg.auth.hmac.secrets)
    if cfg.auth.bearer is not None and cfg.auth.bearer.secret is not None:
        return 1
    return 0
