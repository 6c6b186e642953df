"""Compact JSON out of the hot paths: stored records and run counters, and log lines.

Encoding a delivery record (50 flow ids) took ~18 µs with the standard library and ~2 µs with
orjson, once per accepted delivery on the writer thread (docs/BENCHMARKS.md, issue 16). For what
these paths store, orjson writes the same bytes `json.dumps(value, separators=(",", ":"))`
writes: keys in insertion order, tuples as arrays, floats as their shortest repr. Two
differences, both read back to the same values: text from DEL (0x7f) up is written as itself
(UTF-8) rather than as `\\uXXXX` escapes, and a float that needs an exponent is written `1e-7`
rather than `1e-07`. A non-finite float would be written `null` (the standard library writes
`Infinity`, which is not JSON); nothing stored here holds one: every time comes from the clock.

Whatever orjson refuses (a lone surrogate, an integer past 64 bits, a non-string key) falls back
to the standard library, so `dumps` encodes everything `json.dumps` does. Decoding a body stays
with the standard library: the request path's parse must keep its answers for hostile bodies
(payload.py). `loads_stored` reads back only what this process wrote (records, for the flow
index's rebuild and its exact checks, where 10 M flow ids are decoded): orjson, and the standard
library for what orjson refuses (an escaped lone surrogate, an integer past 64 bits).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    try:
        return orjson.dumps(value, default=default)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":"), default=default).encode()


def loads_stored(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(bytes(raw))
