"""The YAML-node walker: `yaml.compose` nodes in, the frozen dataclasses of `configtypes.py` out.

`Builder` walks the dataclass tree field by field, reading nodes that keep their lines, and
collects every problem as ``config.yaml:14: auth.hmac.secrets[0]: give exactly one of value,
file, env``. Unknown keys, wrong types and missing required keys are errors. Secrets are resolved
at load time (a reload is validated completely before it is applied) and never appear in a repr
or a message. Only plain YAML is config: a custom tag, a tag that does not fit its text, or a key
that is not a plain name is a problem, not a crash.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import types
import typing
from collections.abc import Collection
from typing import Any, Literal

import yaml

from .configtypes import Secret, SecretSource
from .errors import ConfigError


def compose(text: str, name: str) -> yaml.Node | None:
    """The YAML node tree. Aliases stay shared nodes (nothing is expanded), so a "billion
    laughs" file costs what its text costs; a loop is only ever walked as deep as the types."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)  # type: ignore[no-any-return]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        why = e.problem or e.context or "cannot be parsed"
        raise ConfigError([printable(f"{where}: not valid YAML: {why}")]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{name}: not valid YAML"]) from None
    except RecursionError:
        raise ConfigError([f"{name}: not valid YAML: nested too deeply"]) from None


def printable(text: str) -> str:
    """One printable line: a key or tag from the file cannot forge a log line or a terminal
    escape, and a lone surrogate cannot make printing fail."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


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


class Builder:
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
        self.problems.append(printable(f"{self.name}:{line}: {path or '(top)'}: {why}"))

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
