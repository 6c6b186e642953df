"""The one interface between the appliance and where its deliveries are kept.

The request path, the dispatcher, the admin listener and the CLI use only this `Backend`; the
embedded LMDB store (lmdbbackend.py) implements it, and so does the PostgreSQL store shared by
several appliances (pgbackend.py). A backend keeps records and flow-id claims; it does not decide how a record moves:
every write below loads a record, applies one function of lifecycle.py, and stores the result
in one durable transaction, so the rules of spec §5 are written once, in lifecycle.py.

What every implementation guarantees:
* `accept` returns only after the delivery and its flow-id claims are durable, and its claims
  are exact: two deliveries never both claim a flow id (spec §5.1-§5.3).
* A write that returns has committed; one that raises `StoreError` has changed nothing, or (a
  multi-step accept) left only what recovery finishes at the next `open`.
* Reads block (call them from a worker thread in async code: `trio.to_thread.run_sync`); writes
  are async because the server batches them into group commits.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from .config import Config

from .record import (
    Accepted,
    FlowOwner,
    InboxSummary,
    Incoming,
    Outcome,
    PauseState,
    Record,
    RecordDetail,
    RunStats,
    Started,
    State,
)


class Backend(Protocol):
    @property
    def instance(self) -> str:
        """Drawn once per store: delivery ids are <instance>-<seq>."""

    # Imports leased to one of several appliances sharing the store (PostgreSQL): the
    # dispatcher renews its running attempts' leases; None: this process alone runs imports.
    lease_seconds: float | None

    # -- life -------------------------------------------------------------------------------
    def recover(self) -> dict[str, Any]:
        """Before serving (blocking): make the store consistent after a crash; what was done."""

    async def run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The server's writer task (group commit), until `stop_writes`."""

    def stop_writes(self) -> None:
        """Commit what is queued and the accepts in progress, then end `run_writer`."""

    def close(self, *, clean: bool = False) -> None:
        """Release the store; `clean` after the last write of a clean stop."""

    def size_bytes(self) -> int:
        """What the store takes on disk (blocks, not apparent size)."""

    # -- health ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while writes fail (disk full, database down): the webhook answers 503."""

    @property
    def last_error(self) -> str | None:
        """Why it is unavailable."""

    async def probe(self) -> None:
        """A tiny write: makes `available` true again once writes work (raises StoreError)."""

    # -- intake ------------------------------------------------------------------------------
    async def accept(self, item: Incoming) -> Accepted:
        """Claim the delivery's flow ids and store it pending, or answer `duplicate`."""

    # -- the dispatcher ----------------------------------------------------------------------
    async def recover_imports(self, now: float) -> list[int]:
        """At start: attempts a crash left running go back to pending (requeue; reruns)."""

    def due(self, now: float, limit: int, exclude: set[int]) -> tuple[list[int], float | None]:
        """Up to `limit` pending seqs due now, FIFO; and the earliest later due time."""

    async def start(self, seqs: Sequence[int], now: float) -> list[Started | None]:
        """Start an attempt of each (pending -> importing); None where it is no longer pending
        (or another appliance started it)."""

    async def reclaim(self, now: float) -> list[int]:
        """Attempts whose appliance stopped renewing their lease go back to pending (reruns);
        with one appliance, never any."""

    async def renew(self, seqs: Iterable[int]) -> set[int]:
        """Extend the leases of attempts running here; the seqs whose lease is still ours."""

    async def finish(
        self,
        seq: int,
        outcome: Outcome,
        *,
        summary: str,
        duration: float,
        output: Mapping[str, str],
        now: float,
        max_attempts: int,
        retry_in: float,
    ) -> State | None:
        """Record how an attempt ended, with its captured output; the new state (None: gone)."""

    async def requeue(self, seq: int, now: float, why: str) -> bool:
        """An attempt cut short by a stop: back to pending, counted as a rerun."""

    async def prune(self, cutoff: float, now: float) -> int:
        """Retention: drop bodies of deliveries imported before `cutoff`; how many."""

    def states(self, seqs: set[int]) -> dict[int, State | None]:
        """The state of each seq (None: no such delivery)."""

    def paused(self) -> PauseState:
        """The importer pause flag (the CLI may set it while the server runs)."""

    # -- operators ---------------------------------------------------------------------------
    async def set_paused(self, paused: bool, by: str, now: float) -> None: ...

    async def retry(self, seq: int, now: float) -> str:
        """An operator's retry: "queued", or why not (lifecycle.why_not_retry, "not found")."""

    async def purge(self, cutoff: float, include_dead: bool, now: float) -> int:
        """Drop bodies and attempt outputs of done (and dead) deliveries received before
        `cutoff`; flow ids stay claimed. How many."""

    def summary(self) -> InboxSummary: ...

    def records(
        self, *, state: State | None = None, limit: int = 50, newest_first: bool = True
    ) -> list[Record]: ...

    def find(self, delivery_id: str) -> int | None:
        """The seq of a delivery id of this store, if it exists."""

    def detail(self, seq: int) -> RecordDetail | None: ...

    def dead_seqs(self) -> list[int]: ...

    def flows(self, flow_ids: Sequence[str]) -> list[FlowOwner]: ...

    def runs(self, limit: int = 50) -> list[RunStats]:
        """Runs, most recently seen first."""

    def run(self, run_id: str) -> RunStats | None: ...

    def delivery_id(self, seq: int) -> str: ...

    def peers(self) -> list[dict[str, Any]]:
        """The appliances sharing this store, seen recently (empty for the embedded store)."""


def appliance_name(cfg: Config) -> str:
    """How this appliance is known to the others sharing a store: host and webhook port
    (two appliances on one host listen on different ports)."""
    port = cfg.listen.bind[0].rpartition(":")[2] if cfg.listen.bind else "0"
    return f"{socket.gethostname()}:{port}"


def open_backend(cfg: Config, *, serving: bool, create: bool = True) -> Backend:
    """The store `store.backend` names. `serving`: the server's (group commit, lock held);
    `create`: an LMDB store may be created where none is."""
    store = cfg.store
    if store.backend == "postgresql":
        from .pgbackend import PgBackend  # psycopg is imported only when it is used

        assert store.postgresql is not None
        pg = store.postgresql
        return PgBackend(
            pg.dsn.value.decode(),
            name=appliance_name(cfg),
            pool_size=pg.pool_size,
            lease_seconds=pg.lease_seconds,
            serving=serving,
        )
    from .lmdbbackend import LmdbBackend

    return LmdbBackend(store.path, initial_map_bytes=store.initial_map_bytes, serving=serving)
