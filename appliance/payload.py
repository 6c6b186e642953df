"""The shape of a CoinTracker delivery (spec §1), checked after authentication.

Plain functions, no I/O. A `Delivery` keeps what the store and the importer need: the flow ids
in arrival order with in-body duplicates collapsed, the run and user ids, and nothing else: the
raw body is stored as it came and re-read at import time for the configs and unknown fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidJSON, InvalidPayload

KNOWN_FIELDS = frozenset(
    {"flow_ids", "cost_basis_run_id", "ghost_user_id", "user_config", "partner_config"}
)
# Spec §1: every id is at most this many bytes of UTF-8. Ids travel to the importer in its
# environment and on its stdin, where a 300 KB value cannot go (E2BIG at spawn).
MAX_ID_BYTES = 1024
# Up to this many characters an id is within MAX_ID_BYTES whatever it holds (4 bytes a code
# point at most), so only longer ids are ever encoded to be measured.
FAST_ID_CHARS = MAX_ID_BYTES // 4
# Bodies above this are parsed on a worker thread (server and dispatcher): a 6 MB body with
# 400,000 flow ids takes ~200 ms to parse and check, and the event loop then only waits for
# the longest single C call of it (json.loads holds the GIL throughout).
THREAD_PARSE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Delivery:
    flow_ids: tuple[str, ...]
    cost_basis_run_id: str
    ghost_user_id: str
    in_body_duplicates: int


def parse(body: bytes) -> Delivery:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8/16/32 and integers past Python's digit limit.
        raise InvalidJSON("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidJSON("body must be a JSON object")
    return validate(doc)


def validate(doc: dict[str, Any]) -> Delivery:
    flow_ids = doc.get("flow_ids")
    if not isinstance(flow_ids, list):
        raise InvalidPayload("flow_ids must be a list of strings")
    if not _plain_flow_ids(flow_ids):
        for i, flow_id in enumerate(flow_ids):
            _check_id(flow_id, f"flow_ids[{i}]")
    run_id = _required_string(doc, "cost_basis_run_id")
    user_id = _required_string(doc, "ghost_user_id")
    for key in ("user_config", "partner_config"):
        value = doc.get(key)
        if value is not None and not isinstance(value, dict):
            raise InvalidPayload(f"{key} must be an object")
    unique = tuple(dict.fromkeys(flow_ids))
    return Delivery(unique, run_id, user_id, len(flow_ids) - len(unique))


def _plain_flow_ids(flow_ids: list[Any]) -> bool:
    """True when every flow id is certainly fine, decided by a few C-level passes over the list
    (a 400,000-id body is on the request path). False means "look at each id", which finds the
    first bad one and names it."""
    if not flow_ids:
        return True
    try:
        joined = "".join(flow_ids)
    except TypeError:  # an element that is not a string
        return False
    if "" in flow_ids or max(map(len, flow_ids)) > FAST_ID_CHARS:
        return False
    # One check of the joined ids finds a lone surrogate anywhere: the UTF-8 codec refuses
    # every surrogate code point, so halves from neighbouring ids never pair up.
    return _is_text(joined)


def _check_id(value: object, name: str) -> None:
    if not isinstance(value, str) or not value or not _is_text(value):
        raise InvalidPayload(f"{name} must be a non-empty string of valid Unicode")
    if _too_long(value):
        raise InvalidPayload(f"{name} is longer than {MAX_ID_BYTES} bytes")


def _too_long(value: str) -> bool:
    """More than MAX_ID_BYTES of UTF-8 (the value is known to encode). A code point is 1 to 4
    bytes, so the length in characters settles it without encoding except in between."""
    if len(value) <= FAST_ID_CHARS:
        return False
    if len(value) > MAX_ID_BYTES:
        return True
    return len(value.encode()) > MAX_ID_BYTES


def _required_string(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidPayload(f"{key} must be a non-empty string")
    # Ids travel to the importer as environment variables, which cannot hold a NUL.
    if "\x00" in value or not _is_text(value):
        raise InvalidPayload(f"{key} must be valid Unicode without NUL characters")
    if _too_long(value):
        raise InvalidPayload(f"{key} is longer than {MAX_ID_BYTES} bytes")
    return value


def _is_text(value: str) -> bool:
    """False for strings JSON can carry but UTF-8 cannot (lone surrogates such as "\\udfff")."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def importer_document(
    body: bytes,
    *,
    delivery_id: str,
    attempt: int,
    received_at: str,
    new_flow_ids: list[str],
) -> dict[str, Any]:
    """The JSON document an importer receives (spec §6), built from the stored raw body."""
    doc = json.loads(body)
    extra = {k: v for k, v in doc.items() if k not in KNOWN_FIELDS}
    return {
        "delivery_id": delivery_id,
        "attempt": attempt,
        "received_at": received_at,
        "cost_basis_run_id": doc["cost_basis_run_id"],
        "ghost_user_id": doc["ghost_user_id"],
        "flow_ids": new_flow_ids,
        "user_config": doc.get("user_config") or {},
        "partner_config": doc.get("partner_config") or {},
        "extra": extra,
    }
