"""The product's interface, pinned: CLI commands and options, config keys, metric names.

A change here is a decision: update the snapshot in the same commit and say why.
Regenerate with: CT_UPDATE_SNAPSHOTS=1 make unit
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

from appliance import config
from appliance.cli import build_parser
from appliance.connections import ConnectionGate
from appliance.metrics import Metrics
from appliance.record import InboxSummary

SNAPSHOTS = Path(__file__).parent / "snapshots"


def check(name: str, lines: list[str]) -> None:
    path = SNAPSHOTS / name
    text = "\n".join(lines) + "\n"
    if os.environ.get("CT_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert path.read_text() == text, f"{name} changed; see tests/test_surface.py"


def _walk_parser(p: argparse.ArgumentParser, prefix: str) -> list[str]:
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in sorted(action.choices.items()):
                out += _walk_parser(sub, f"{prefix} {name}".strip())
        elif action.option_strings:
            out.append(f"{prefix} {'/'.join(action.option_strings)}".strip())
        elif action.dest != "help":
            out.append(f"{prefix} <{action.dest}>".strip())
    return out


def test_cli_surface() -> None:
    check("cli.txt", _walk_parser(build_parser(), "ct-appliance"))


def _walk_config(tp: typing.Any, prefix: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        path = f"{prefix}.{f.name}" if prefix else f.name
        t = hints[f.name]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(t):
            out += _walk_config(t, path)
        elif inner and typing.get_origin(t) is not tuple:
            out += _walk_config(inner[0], path)
        else:
            out.append(path)
    return out


def test_config_keys() -> None:
    check("config-keys.txt", _walk_config(config.Config, ""))


def test_metric_names() -> None:
    m = Metrics()
    m.watch_inbox(lambda: InboxSummary(0, 0, 0, 0, 0, 0, 0, 0, None, 0, False))
    gates = {"webhook": ConnectionGate(16), "admin": ConnectionGate(16)}
    m.watch_limits(lambda: {"gates": gates, "inflight_body_bytes": 0})
    names = sorted({s.name for fam in m.registry.collect() for s in fam.samples})
    check("metrics.txt", names)
