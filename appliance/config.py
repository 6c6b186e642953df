"""The YAML config (spec §3) as one tree of frozen dataclasses.

Defaults live here, in code. `load()` reads the file with `yaml.compose` so that every node keeps
its line, walks the dataclass tree field by field, and collects every problem as
``config.yaml:14: auth.hmac.secrets[0]: give exactly one of value, file, env``. Unknown keys,
wrong types and missing required keys are errors. Secrets are resolved at load time (a reload
is validated completely before it is applied) and never appear in a repr or a message.

The file is hostile input as far as this module is concerned: the server re-reads it on SIGHUP
while serving, so `load()` and `loads()` raise `ConfigError` and nothing else, whatever the
bytes (unknown tags, bad `!!int`, aliases that loop, nesting past the recursion limit). A value
is never echoed where it may be a secret, and every problem is printable on one line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import stat
import types
import typing
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import ConfigError

DEFAULT_PATH = "/etc/ct-appliance/config.yaml"
MAX_FILE_BYTES = 16 << 20  # a config is a few KiB; past this it is not one
MAX_PROBLEMS = 50  # enough to fix a file; a hostile one cannot flood the log with more
MIN_SECRET_BYTES = 32
# Linux limits what execve(2) can pass: one "NAME=value" string is at most MAX_ARG_STRLEN
# (128 KiB) and all of argv + envp share ARG_MAX (2 MiB with the default 8 MiB stack). The
# importer also gets the delivery's CT_* variables, so importer.env keeps to half of that.
MAX_ENV_ENTRY_BYTES = 128 << 10
MAX_ENV_TOTAL_BYTES = 1 << 20


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


@dataclass(frozen=True)
class Loaded:
    """A validated config, where it came from, and what the operator should be warned about."""

    config: Config
    path: str
    warnings: tuple[str, ...]


def default_path() -> str:
    return os.environ.get("CT_APPLIANCE_CONFIG") or DEFAULT_PATH


def load(
    path: str | os.PathLike[str],
    *,
    resolve_secrets: bool = True,
    resolve_only: Collection[str] = (),
) -> Loaded:
    """Load and validate a config file. Operator commands that never use a secret pass
    resolve_secrets=False, so they work without systemd's ${CREDENTIALS_DIRECTORY};
    `resolve_only` names the secrets they do need (``admin.token`` to read the admin listener)."""
    name = str(path)
    try:
        with open(name, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError([f"{name}: larger than {MAX_FILE_BYTES >> 20} MiB; not a config"])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError([_printable(f"{name}: cannot read: {e}")]) from None
    return loads(
        text,
        name,
        file_mode=_mode(name),
        resolve_secrets=resolve_secrets,
        resolve_only=resolve_only,
    )


def loads(
    text: str,
    name: str = "config.yaml",
    *,
    file_mode: int | None = None,
    resolve_secrets: bool = True,
    resolve_only: Collection[str] = (),
) -> Loaded:
    """Validate config text. Raises ConfigError and nothing else, for any text at all."""
    try:
        return _loads(text, name, file_mode, resolve_secrets, resolve_only)
    except ConfigError as e:
        raise _capped(e.problems, name) from None
    except Exception as e:
        # Last resort: a gap in the checks must refuse the file, never crash a reload. The
        # exception's text is left out: it may quote a value, and values may be secrets.
        why = f"cannot be loaded: {e.__class__.__name__} (a bug in ct-appliance; please report it)"
        raise ConfigError([f"{name}: {why}"]) from None


def _loads(
    text: str,
    name: str,
    file_mode: int | None,
    resolve_secrets: bool,
    resolve_only: Collection[str],
) -> Loaded:
    node = _compose(text, name)
    if node is None:
        raise ConfigError([f"{name}:1: importer: required key is missing"])
    b = _Builder(name, resolve_secrets, resolve_only)
    cfg = b.build(Config, node, "")
    if b.problems:
        raise ConfigError(b.problems)
    assert isinstance(cfg, Config)
    warnings = _validate(cfg, b, file_mode)
    if b.problems:
        raise ConfigError(b.problems)
    return Loaded(cfg, name, tuple(warnings))


def _compose(text: str, name: str) -> yaml.Node | None:
    """The YAML node tree. Aliases stay shared nodes (nothing is expanded), so a "billion
    laughs" file costs what its text costs; a loop is only ever walked as deep as the types."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)  # type: ignore[no-any-return]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        why = e.problem or e.context or "cannot be parsed"
        raise ConfigError([_printable(f"{where}: not valid YAML: {why}")]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{name}: not valid YAML"]) from None
    except RecursionError:
        raise ConfigError([f"{name}: not valid YAML: nested too deeply"]) from None


def _capped(problems: list[str], name: str) -> ConfigError:
    if len(problems) <= MAX_PROBLEMS:
        return ConfigError(problems)
    more = len(problems) - MAX_PROBLEMS
    return ConfigError([*problems[:MAX_PROBLEMS], f"{name}: ... and {more} more problems"])


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _printable(text: str) -> str:
    """One printable line: a key or tag from the file cannot forge a log line or a terminal
    escape, and a lone surrogate cannot make printing fail."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def mask_url(text: str) -> str:
    """`text` (a URL, or a message that holds URLs) with every URL's password shown as ***:
    ``https://user:***@host/path``. A userinfo without a colon is all token: ``https://***@host``.
    The userinfo runs to the last ``@`` before the path, as URL parsers read it."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user}:***@" if colon else f"{m.group('scheme')}***@"

    return _USERINFO.sub(hide, text)


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1 (brackets and a trailing dot allowed)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_STD + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_SENSITIVE = ("importer.env.", "importer.headers.")  # values may be credentials
_UNRESOLVED = "not resolved (operator command)"


def _tag_problem(node: yaml.Node) -> str | None:
    """Why a node's tag is refused, or None. Only plain YAML is config: a custom tag (`!foo`),
    `!!binary`, `!!set`, `!!omap` or a tag on the wrong kind of node is a problem, not a crash."""
    tag = str(node.tag)
    if isinstance(node, yaml.MappingNode):
        fits, kind = tag == _STD + "map", "mapping"
    elif isinstance(node, yaml.SequenceNode):
        fits, kind = tag == _STD + "seq", "list"
    else:
        fits, kind = tag in _SCALAR_TAGS, "scalar"
    if fits:
        return None
    shown = "!!" + tag[len(_STD) :] if tag.startswith(_STD) else tag
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    if tag in _SCALAR_TAGS or tag in (_STD + "map", _STD + "seq"):
        return f"YAML tag {shown} cannot mark a {kind}"
    return f"{'unsupported' if tag.startswith(_STD) else 'unknown'} YAML tag {shown}"


def _text_problem(value: str) -> str | None:
    """Text that no file name, argv, environment or header can carry."""
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be UTF-8 text (it holds a lone surrogate escape)"
    return None


class _Builder:
    """Walks YAML nodes against dataclass types, recording problems and the line of every key.

    The walk follows the types, never the node graph: a recursive alias is walked only as deep
    as the dataclass tree, and each node is looked at once per place it appears."""

    def __init__(
        self, name: str, resolve_secrets: bool = True, resolve_only: Collection[str] = ()
    ) -> None:
        self.name = name
        self.resolve_secrets = resolve_secrets
        self.resolve_only = frozenset(resolve_only)
        self.problems: list[str] = []
        self.lines: dict[str, int] = {}
        self.value_secrets: list[str] = []
        self.resolved: list[tuple[str, Secret]] = []  # (key path, secret) actually read
        self.hiding = 0  # > 0 while inside a secret: its values are never echoed

    def fail(self, node: yaml.Node | int, path: str, why: str) -> None:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        self.problems.append(_printable(f"{self.name}:{line}: {path or '(top)'}: {why}"))

    def line(self, path: str) -> int:
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        return self.lines.get(path, 1)

    def shown(self, node: yaml.Node, path: str) -> str:
        """A scalar's text for a message; hidden where it may be a secret, cut when long."""
        if self.hiding or path.startswith(_SENSITIVE):
            return "(value hidden)"
        text = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
        return repr(text if len(text) <= 60 else text[:60] + "...")

    def build(self, tp: Any, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        why = _tag_problem(node)
        if why is not None:
            self.fail(node, path, why)
            return None
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
                self.fail(node, path, f"must be one of {choices}, not {self.shown(node, path)}")
            return value
        return self.scalar(tp, node, path)

    def key(self, node: yaml.Node, path: str) -> str | None:
        """A mapping key as text; a key must be a plain scalar."""
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, "a key must be a plain name, not a list or a mapping")
            return None
        why = _tag_problem(node) or _text_problem(str(node.value))
        if why is not None:
            self.fail(node, path, f"key {why}")
            return None
        return str(node.value)

    def dataclass(self, tp: Any, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, "must be a mapping")
            return None
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            if key is None:
                continue
            sub = f"{path}.{key}" if path else key
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
            name = self.key(k, path)
            if name is None:
                continue
            sub = f"{path}.{name}"
            if name in out:
                self.fail(k, sub, "given twice")
                continue
            value = self.build(str, v, sub)
            if value is not None:
                out[name] = value
        return out

    def scalar(self, tp: Any, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, path, f"must be a {_type_name(tp)}")
            return None
        try:
            value = yaml.SafeLoader("").construct_object(node)  # type: ignore[no-untyped-call]
        except Exception:
            # `!!int abc`, `!!timestamp junk`, an int of 5,000 digits: the tag does not fit the
            # text. The constructor's message quotes the value, so it is not passed on.
            self.fail(node, path, f"not a valid value for its YAML tag {_short_tag(node)}")
            return None
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
            value = node.value
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            self.fail(node, path, f"must be a {_type_name(tp)}, not {self.shown(node, path)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(node, path, "must be a finite number")
            return None
        if tp in (int, float) and value < 0:
            self.fail(node, path, "must not be negative")
            return None
        why = _text_problem(value) if isinstance(value, str) else None
        if why is not None:
            self.fail(node, path, why)
            return None
        return value

    def secret(self, node: yaml.Node, path: str) -> Secret | None:
        self.hiding += 1
        try:
            src = self.dataclass(SecretSource, node, path)
        finally:
            self.hiding -= 1
        if src is None:
            return None
        given = [k for k in ("value", "file", "env") if getattr(src, k) is not None]
        if len(given) != 1:
            self.fail(node, path, "give exactly one of value, file, env")
            return None
        if src.value is not None:
            self.value_secrets.append(path)
        if not self.resolve_secrets and path not in self.resolve_only:
            return Secret(b"", _UNRESOLVED)
        resolved = self.resolve(src, node, path)
        if resolved is not None:
            self.resolved.append((path, resolved))
        return resolved

    def resolve(self, src: SecretSource, node: yaml.Node, path: str) -> Secret | None:
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
                raw = _read_secret_file(file_path)
            except (OSError, UnicodeError, ValueError) as e:
                why = f"cannot read secret file {file_path}: {e.__class__.__name__}"
                self.fail(node, path, why)
                return None
            where = f"file {file_path}"
        raw = raw.strip()
        if not raw:
            self.fail(node, path, f"the secret from {where} is empty")
            return None
        return Secret(raw.encode("utf-8", "surrogateescape"), where)

    def expand(self, text: str, node: yaml.Node, path: str) -> str | None:
        for var in _VAR.findall(text):
            if var not in os.environ:
                hint = " (set by systemd LoadCredential=)" if var == "CREDENTIALS_DIRECTORY" else ""
                self.fail(node, path, f"${{{var}}} is not set{hint}")
                return None
        return _VAR.sub(lambda m: os.environ[m.group(1)], text)


def _read_secret_file(path: str) -> str:
    """A secret is a short regular file: /dev/zero or a FIFO must not hang a reload."""
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = f.read(65537)
    if len(data) > 65536:
        raise ValueError("larger than 64 KiB")
    return data.decode("utf-8")


def _short_tag(node: yaml.Node) -> str:
    tag = str(node.tag)
    return "!!" + tag[len(_STD) :] if tag.startswith(_STD) else tag[:60]


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
    return _risky(cfg, b, file_mode)


def _validate_importer(imp: ImporterConfig, b: _Builder) -> None:
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


def _validate_env(env: dict[str, str], b: _Builder) -> None:
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


def _validate_limits(cfg: Config, b: _Builder) -> None:
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


def _validate_admin(admin: AdminConfig, b: _Builder) -> None:
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


def _check_url(url: str, path: str, b: _Builder) -> None:
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


def _risky(cfg: Config, b: _Builder, file_mode: int | None) -> list[str]:
    """Settings production refuses and alpha warns about; the warnings."""
    risky: list[tuple[str, str]] = [(p, "a secret given as value:") for p in b.value_secrets]
    if cfg.testing.fail_first_deliveries > 0:
        risky.append(
            ("testing.fail_first_deliveries", "the retry drill answers 500 to the first deliveries")
        )
    if cfg.listen.tls is None and not cfg.listen.behind_proxy:
        risky.append(("listen", "plain HTTP without TLS and without behind_proxy: true"))
    imp = cfg.importer
    holds_secret = bool(b.value_secrets or imp.env or imp.headers)
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
        if len(secret.value) < MIN_SECRET_BYTES:
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
    if br.jwks_url is not None:
        _check_url(br.jwks_url, "auth.bearer.jwks_url", b)


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
