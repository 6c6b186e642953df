"""Time as operators read and type it: durations (``90s``, ``15m``, ``2h``, ``30d``; a bare
number is seconds), ages, and RFC 3339 timestamps."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    m = _RE.match(text)
    if m is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 30d)")
    return float(m.group(1)) * _UNITS.get(m.group(2) or "s", 1.0)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
