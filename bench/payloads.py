"""Pre-signed deliveries for the load generators.

A request file holds one delivery per line: the lowercase hex HMAC-SHA256 of the body, a tab, then
the raw JSON body (one line, no tab in it). wrk's replay.lua and loadgen.py replay the lines as
they are, so the signature is always over the exact bytes sent and signing costs nothing during a
measurement.

Bodies follow SPEC §1: 50 flow ids (random UUID-4 strings, the realistic worst case for an index
keyed by id), a cost_basis_run_id shared by consecutive pages, a ghost_user_id per run, and
user_config padded so that a body weighs about `body_bytes` (3 KB by default).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

PAGES_PER_RUN = 20


def _uuid4_strings(count: int) -> list[str]:
    raw = bytearray(os.urandom(16 * count))
    out = []
    for i in range(count):
        b = raw[16 * i : 16 * i + 16]
        b[6] = (b[6] & 0x0F) | 0x40
        b[8] = (b[8] & 0x3F) | 0x80
        h = b.hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def _body(flow_ids: list[str], run_id: str, ghost: str, pad: int) -> bytes:
    doc = {
        "flow_ids": flow_ids,
        "cost_basis_run_id": run_id,
        "ghost_user_id": ghost,
        "user_config": {"base_currency": "USD", "cost_basis_method": "FIFO", "note": "x" * pad},
        "partner_config": {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def write_file(
    path: Path, count: int, secret: bytes, flows_per_body: int = 50, body_bytes: int = 3072
) -> int:
    """Write `count` signed deliveries, every flow id new; return the body size in bytes."""
    ids = _uuid4_strings(count * flows_per_body)
    runs = _uuid4_strings(count // PAGES_PER_RUN + 1)
    ghosts = _uuid4_strings(count // PAGES_PER_RUN + 1)
    # All ids have the same length, so one padding fits every body.
    bare = len(_body(ids[:flows_per_body], runs[0], ghosts[0], 0))
    pad = max(0, body_bytes - bare)
    size = 0
    with open(path, "wb") as f:
        for i in range(count):
            r = i // PAGES_PER_RUN
            body = _body(
                ids[i * flows_per_body : (i + 1) * flows_per_body], runs[r], ghosts[r], pad
            )
            sig = hmac.new(secret, body, hashlib.sha256).hexdigest()
            f.write(sig.encode() + b"\t" + body + b"\n")
            size = len(body)
    return size


def read_file(path: Path) -> list[tuple[str, bytes]]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            sig, _, body = line.rstrip(b"\n").partition(b"\t")
            out.append((sig.decode(), body))
    return out
