"""What every `ct-appliance` command shares: exit codes, the config loader, table and JSON output.

A command that cannot do what was asked raises `errors.CommandFailed` (an ApplianceError);
`main` prints it as `ct-appliance <command>: <message>` and exits 1. This module stays light
(no store, no HTTP client): the package imports it for every command, `--help` included.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from .. import config as config_mod
from ..durations import rfc3339

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def load(
    args: argparse.Namespace, *, resolve_secrets: bool = False, resolve_only: Sequence[str] = ()
) -> config_mod.Loaded:
    """The config for an operator command; secrets are only read where they are used."""
    path = args.config or config_mod.default_path()
    return config_mod.load(path, resolve_secrets=resolve_secrets, resolve_only=resolve_only)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, doc: Any, text: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(text())


def when(ts: float | None) -> str | None:
    """A timestamp as RFC 3339, or None when there is none."""
    return rfc3339(ts) if ts else None
