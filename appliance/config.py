"""The YAML config (spec §3) as one tree of frozen dataclasses.

Built by hand from YAML nodes, not by a validation library: every problem must name file, line
and key path (``config.yaml:14: auth.hmac.secrets[0]: give exactly one of value, file, env``),
and only the nodes of `yaml.compose` know their lines (their marks); a validation library is
handed the plain dicts and lists of `yaml.safe_load`, which have none.

`load()` reads the file; `configyaml.py` walks its nodes against the dataclasses of
`configtypes.py` (re-exported here: the rest of the package imports from this module), and
`configrules.py` checks the rules that span keys and what production refuses.

The file is hostile input as far as this module is concerned: the server re-reads it on SIGHUP
while serving, so `load()` and `loads()` raise `ConfigError` and nothing else, whatever the
bytes (unknown tags, bad `!!int`, aliases that loop, nesting past the recursion limit). A value
is never echoed where it may be a secret, and every problem is printable on one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass

from .configrules import (
    MAX_ENV_ENTRY_BYTES,
    MAX_ENV_TOTAL_BYTES,
    MIN_SECRET_BYTES,
    is_loopback,
    split_bind,
    validate,
)
from .configtypes import (
    AdminConfig,
    AuthConfig,
    BearerConfig,
    Config,
    HmacConfig,
    ImporterConfig,
    ListenConfig,
    LogConfig,
    PostgresConfig,
    Secret,
    SecretSource,
    StoreConfig,
    TestingConfig,
    TLSConfig,
    WebhookConfig,
)
from .configyaml import Builder, compose, printable
from .errors import ConfigError

__all__ = [
    "DEFAULT_PATH",
    "MAX_ENV_ENTRY_BYTES",
    "MAX_ENV_TOTAL_BYTES",
    "MAX_FILE_BYTES",
    "MAX_PROBLEMS",
    "MIN_SECRET_BYTES",
    "AdminConfig",
    "AuthConfig",
    "BearerConfig",
    "Config",
    "HmacConfig",
    "ImporterConfig",
    "ListenConfig",
    "Loaded",
    "LogConfig",
    "PostgresConfig",
    "Secret",
    "SecretSource",
    "StoreConfig",
    "TLSConfig",
    "TestingConfig",
    "WebhookConfig",
    "default_path",
    "is_loopback",
    "load",
    "loads",
    "mask_url",
    "secret_count",
    "split_bind",
]

DEFAULT_PATH = "/etc/ct-appliance/config.yaml"
MAX_FILE_BYTES = 16 << 20  # a config is a few KiB; past this it is not one
MAX_PROBLEMS = 50  # enough to fix a file; a hostile one cannot flood the log with more


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
        raise ConfigError([printable(f"{name}: cannot read: {e}")]) from None
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
    node = compose(text, name)
    if node is None:
        raise ConfigError([f"{name}:1: importer: required key is missing"])
    b = Builder(name, resolve_secrets, resolve_only)
    cfg = b.build(Config, node, "")
    if b.problems:
        raise ConfigError(b.problems)
    assert isinstance(cfg, Config)
    warnings = validate(cfg, b, file_mode)
    if b.problems:
        raise ConfigError(b.problems)
    return Loaded(cfg, name, tuple(warnings))


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


def mask_url(text: str) -> str:
    """`text` (a URL, or a message that holds URLs) with every URL's password shown as ***:
    ``https://user:***@host/path``. A userinfo without a colon is all token: ``https://***@host``.
    The userinfo runs to the last ``@`` before the path, as URL parsers read it."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user}:***@" if colon else f"{m.group('scheme')}***@"

    return _USERINFO.sub(hide, text)


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def secret_count(cfg: Config) -> int:
    if cfg.auth.mode == "hmac" and cfg.auth.hmac is not None:
        return len(cfg.auth.hmac.secrets)
    if cfg.auth.bearer is not None and cfg.auth.bearer.secret is not None:
        return 1
    return 0
