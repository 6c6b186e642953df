"""The delivery record and its companions: typed, immutable, one codec each.

    Record         one stored delivery: what arrived, its new flow ids, its state, its attempts
    AttemptEntry   one importer attempt in a record's attempt log
    RunStats       per cost_basis_run_id counts (pages, new and duplicate flow ids)
    PauseState     the importer pause flag, who set it and when
    InboxSummary   the one inbox summary: counts per state, oldest pending, size, pause
    Incoming       a verified, parsed delivery on its way into the store
    Accepted       what the store answered for it

Every value is a frozen dataclass. A record changes only through `lifecycle.py`, which returns
a new one; a backend stores what it is given and never edits a record itself.

On disk (LMDB `deliveries`, `runs`, `state`) a record is the JSON object the first release
wrote, key for key (`encode_record` / `decode_record`). Keys that were written only once they
had a value (``retry_base``, ``done_at``, ...) are still omitted while they have none, so a
store written by either version reads the same in the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import jsoncodec
from .payload import Delivery


class State(StrEnum):
    RECEIVING = "receiving"  # a big delivery whose flow ids are still being claimed
    PENDING = "pending"
    IMPORTING = "importing"
    DONE = "done"
    DEAD = "dead"


class Outcome(StrEnum):
    """How an attempt ended (the importer protocol's results, plus `interrupted`)."""

    SUCCESS = "success"
    RETRY = "retry"
    DEAD = "dead"
    INTERRUPTED = "interrupted"  # a crash or a stop cut the attempt short


@dataclass(frozen=True, slots=True)
class AttemptEntry:
    n: int
    started_at: float
    ended_at: float | None = None
    outcome: Outcome | None = None  # None while the attempt runs
    summary: str | None = None
    duration: float | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"n": self.n, "started_at": self.started_at}
        if self.ended_at is not None:
            doc["ended_at"] = self.ended_at
        if self.outcome is not None:
            doc["outcome"] = self.outcome.value
        if self.summary is not None:
            doc["summary"] = self.summary
        if self.duration is not None:
            doc["duration"] = self.duration
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AttemptEntry:
        outcome = doc.get("outcome")
        return cls(
            n=int(doc["n"]),
            started_at=float(doc.get("started_at", 0.0)),
            ended_at=doc.get("ended_at"),
            outcome=Outcome(outcome) if outcome is not None else None,
            summary=doc.get("summary"),
            duration=doc.get("duration"),
        )


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    received_at: float
    run_id: str
    ghost_user_id: str
    state: State
    flows: tuple[str, ...]  # the flow ids this delivery claimed (new when it arrived)
    next_at: float  # when the next attempt is due (pending)
    duplicate_flows: int = 0
    in_body_duplicates: int = 0
    body_bytes: int = 0
    attempts: tuple[AttemptEntry, ...] = ()
    reruns: int = 0  # attempts cut short by a crash or a stop (import_reruns_total)
    retry_base: int | None = None  # attempts before the last operator retry (not counted)
    manual_retries: int | None = None
    done_at: float | None = None
    dead_at: float | None = None
    body_pruned_at: float | None = None
    purged_at: float | None = None
    flow_count: int | None = None  # receiving: flow ids in the body
    delivery_id: str = ""  # <instance>-<seq>: filled in when read, never stored

    @property
    def last_attempt(self) -> AttemptEntry | None:
        return self.attempts[-1] if self.attempts else None


def dead_letter(rec: Record) -> dict[str, Any]:
    """A dead delivery as GET /status and `ct-appliance status` list it."""
    last = rec.last_attempt
    return {
        "delivery_id": rec.delivery_id,
        "received_at": rec.received_at,
        "cost_basis_run_id": rec.run_id,
        "flows": len(rec.flows),
        "attempts": len(rec.attempts),
        "last_error": last.summary if last is not None else None,
    }


_OPTIONAL = (
    "retry_base",
    "manual_retries",
    "done_at",
    "dead_at",
    "body_pruned_at",
    "purged_at",
    "flow_count",
)


def encode_record(rec: Record) -> bytes:
    doc: dict[str, Any] = {
        "seq": rec.seq,
        "received_at": rec.received_at,
        "run": rec.run_id,
        "user": rec.ghost_user_id,
        "state": rec.state.value,
        "flows": rec.flows,
        "duplicate_flows": rec.duplicate_flows,
        "in_body_duplicates": rec.in_body_duplicates,
        "body_bytes": rec.body_bytes,
        "attempts": [a.to_json() for a in rec.attempts],
        "next_at": rec.next_at,
        "reruns": rec.reruns,
    }
    for name in _OPTIONAL:
        value = getattr(rec, name)
        if value is not None:
            doc[name] = value
    return jsoncodec.dumps(doc)


def decode_record(raw: bytes | memoryview, delivery_id: str = "") -> Record:
    doc = json.loads(bytes(raw))
    return Record(
        seq=int(doc["seq"]),
        received_at=float(doc["received_at"]),
        run_id=doc["run"],
        ghost_user_id=doc["user"],
        state=State(doc["state"]),
        flows=tuple(doc["flows"]),
        next_at=float(doc.get("next_at", doc["received_at"])),
        duplicate_flows=int(doc.get("duplicate_flows", 0)),
        in_body_duplicates=int(doc.get("in_body_duplicates", 0)),
        body_bytes=int(doc.get("body_bytes", 0)),
        attempts=tuple(AttemptEntry.from_json(a) for a in doc.get("attempts", ())),
        reruns=int(doc.get("reruns", 0)),
        delivery_id=delivery_id,
        **{name: doc[name] for name in _OPTIONAL if doc.get(name) is not None},
    )


def decode_flows(raw: bytes | memoryview) -> list[str]:
    """Only the flow ids of an encoded record (the index rebuild reads nothing else)."""
    flows: list[str] = jsoncodec.loads_stored(raw)["flows"]
    return flows


def decode_claimed(raw: bytes | memoryview) -> tuple[list[str], bool]:
    """The flow ids an encoded record holds, and whether they are all it claimed: False while
    it is `receiving` (the rest are in its parts, inbox.py)."""
    doc = jsoncodec.loads_stored(raw)
    return doc["flows"], doc["state"] != State.RECEIVING.value


@dataclass(frozen=True, slots=True)
class RunStats:
    run_id: str
    ghost_user_id: str
    first_seen: float
    last_seen: float
    pages: int = 0
    accepted_pages: int = 0
    duplicate_pages: int = 0
    flows_new: int = 0
    flows_duplicate: int = 0

    def counted(self, now: float, new: int, duplicate: int) -> RunStats:
        """These stats with one more page of `new` and `duplicate` flow ids."""
        return RunStats(
            run_id=self.run_id,
            ghost_user_id=self.ghost_user_id,
            first_seen=self.first_seen,
            last_seen=now,
            pages=self.pages + 1,
            accepted_pages=self.accepted_pages + (1 if new else 0),
            duplicate_pages=self.duplicate_pages + (0 if new else 1),
            flows_new=self.flows_new + new,
            flows_duplicate=self.flows_duplicate + duplicate,
        )


def encode_run(run: RunStats) -> bytes:
    return jsoncodec.dumps(
        {
            "run_id": run.run_id,
            "ghost_user_id": run.ghost_user_id,
            "pages": run.pages,
            "accepted_pages": run.accepted_pages,
            "duplicate_pages": run.duplicate_pages,
            "flows_new": run.flows_new,
            "flows_duplicate": run.flows_duplicate,
            "first_seen": run.first_seen,
            "last_seen": run.last_seen,
        }
    )


def decode_run(raw: bytes | memoryview) -> RunStats:
    doc = json.loads(bytes(raw))
    return RunStats(
        run_id=doc["run_id"],
        ghost_user_id=doc.get("ghost_user_id", ""),
        first_seen=float(doc.get("first_seen", 0.0)),
        last_seen=float(doc.get("last_seen", doc.get("first_seen", 0.0))),
        pages=int(doc.get("pages", 0)),
        accepted_pages=int(doc.get("accepted_pages", 0)),
        duplicate_pages=int(doc.get("duplicate_pages", 0)),
        flows_new=int(doc.get("flows_new", 0)),
        flows_duplicate=int(doc.get("flows_duplicate", 0)),
    )


@dataclass(frozen=True, slots=True)
class PauseState:
    paused: bool = False
    at: float | None = None
    by: str | None = None


def encode_pause(state: PauseState) -> bytes:
    return jsoncodec.dumps({"paused": state.paused, "at": state.at, "by": state.by})


def decode_pause(raw: bytes | memoryview | None) -> PauseState:
    if raw is None:
        return PauseState()
    doc = json.loads(bytes(raw))
    return PauseState(bool(doc.get("paused")), doc.get("at"), doc.get("by"))


@dataclass(frozen=True, slots=True)
class InboxSummary:
    """Counts per state and what the launch-window signals and the status page need."""

    pending: int
    importing: int
    done: int
    dead: int
    receiving: int
    total: int
    flows: int
    runs: int
    oldest_pending_at: float | None
    size_bytes: int
    paused: bool

    def as_dict(self, now: float) -> dict[str, Any]:
        """The `inbox` object of GET /status (and of `ct-appliance status --json`)."""
        oldest = self.oldest_pending_at
        return {
            "pending": self.pending,
            "importing": self.importing,
            "done": self.done,
            "dead": self.dead,
            "receiving": self.receiving,
            "total": self.total,
            "flows": self.flows,
            "runs": self.runs,
            "oldest_pending_at": oldest,
            "oldest_pending_seconds": round(now - oldest, 3) if oldest else None,
            "size_bytes": self.size_bytes,
            "paused": self.paused,
        }


@dataclass(frozen=True, slots=True)
class FlowOwner:
    """`flows show`: which delivery claimed a flow id, and where that delivery is."""

    flow_id: str
    seq: int | None  # None: the flow id is unknown
    record: Record | None


@dataclass(frozen=True, slots=True)
class RecordDetail:
    """`inbox show`: a record with its attempts' captured output and its body, if kept."""

    record: Record
    outputs: tuple[Mapping[str, str] | None, ...]  # per attempt, in order
    body: bytes | None


@dataclass(frozen=True, slots=True)
class Incoming:
    delivery: Delivery
    body: bytes
    received_at: float
    want_owners: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    status: str  # "accepted" | "duplicate"
    delivery_id: str | None
    seq: int | None
    new: int
    duplicate: int
    owners: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Started:
    """A delivery the dispatcher may run now: its record (state importing) and its body."""

    record: Record
    body: bytes
