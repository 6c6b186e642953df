"""The PostgreSQL store as a `Backend`: N appliances share one inbox and one flow-id index.

Theory of operation (spec §5, across appliances; the schema is in pgschema.py):

* **Accept** (pgintake.py, pgcommit.py). Each appliance group-commits its own accepts in one
  transaction per commit; flow ids are claimed by the ct_flows primary key in the same
  transaction as the record and body (`synchronous_commit` on), so claims are exact across
  appliances and a delivery posted to A and re-posted to B is a `duplicate` on B. Every accept
  is one transaction: a crash leaves nothing `receiving` to finish.
* **Imports.** Any appliance may run any pending delivery. `start` takes rows with
  `FOR UPDATE SKIP LOCKED` and sets a lease (owner = this appliance's name, until = database
  time + lease_seconds): two appliances never start the same delivery. The dispatcher renews
  the leases of its running attempts every lease_seconds / 3 and cancels an attempt whose lease
  it could not renew before it runs out, so a lease that expired is never still running.
  `reclaim` (every few seconds, from the dispatcher) returns expired leases to pending as reruns; at start an
  appliance also takes back the leases its own previous run held. `finish` and `requeue` only
  apply to an attempt this process started and still holds; one that lost its lease is left to
  whoever holds it now.
* **Time.** Leases use the database's clock, so appliances with skewed clocks agree.
* **Failures.** pgdb.py turns an unreachable, restarting or read-only database into
  `StoreUnavailable` (503 + Retry-After) and back once a write works; the writer's heartbeat
  (every HEARTBEAT_SECONDS, also what /status lists as the other appliances) notices within
  seconds even without traffic.

Reads block (call them from a worker thread); writes are async. Without a writer task (a CLI
command) a write is its own transaction, run inline (`lmdbbackend.run_inline`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from . import jsoncodec, lifecycle, pgreads, pgschema
from .errors import StoreError
from .inbox import Epochs, read_epochs
from .logs import fields
from .pgdb import Db
from .pgintake import BIG_DELIVERY, accept_txn
from .pgreads import NOW
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
    decode_record,
    encode_record,
)
from .version import VERSION

if TYPE_CHECKING:
    import trio

    from .pgcommit import PgCommitter

T = TypeVar("T")
Conn = psycopg.Connection[Any]

log = logging.getLogger("ct_appliance.store")

HEARTBEAT_SECONDS = 5.0
PEERS_SEEN_SECONDS = 60.0  # /status lists appliances with a heartbeat this recent


class PgBackend:
    """`backend.Backend` over PostgreSQL. `serving=True` (the server) group-commits accepts
    through `run_writer` and keeps a heartbeat; `name` identifies this appliance (its leases,
    its /status row)."""

    def __init__(
        self,
        dsn: str,
        *,
        name: str,
        pool_size: int = 8,
        lease_seconds: float = 300.0,
        serving: bool = False,
    ) -> None:
        self.name = name
        self.lease_seconds: float | None = lease_seconds
        self._lease = lease_seconds
        self.serving = serving
        self.db = Db(dsn, size=pool_size, application_name=f"ct-appliance {name}"[:63])
        self._names: Epochs | None = None
        self.committer: PgCommitter | None = None
        self._started_at = time.time()
        self._attempts: dict[int, int] = {}  # seq -> attempt number this process runs (leased)
        if not serving:
            self._load()

    # -- names ------------------------------------------------------------------------------
    def _load(self) -> None:
        """Check the schema and read the instance ids (raises SchemaError, StoreUnavailable)."""

        def read(conn: Conn) -> dict[str, str]:
            pgschema.check(conn)
            return {k: v for k, v in conn.execute("SELECT key, value FROM ct_meta")}

        meta = self.db.read(read)
        self._names = Epochs(read_epochs(lambda key: _encoded(meta.get(key.decode()))))

    @property
    def names(self) -> Epochs:
        if self._names is None:
            self._load()
        assert self._names is not None
        return self._names

    @property
    def instance(self) -> str:
        return self.names.instance

    def delivery_id(self, seq: int) -> str:
        return self.names.delivery_id_of(seq)

    # -- life -------------------------------------------------------------------------------
    def recover(self) -> dict[str, Any]:
        """Before serving: the schema must be this release's; register this appliance. Every
        accept is one transaction, so a crash leaves nothing to finish."""
        self._load()
        self.db.run(self._heartbeat_txn)
        return {}

    async def run_writer(self, *, task_status: trio.TaskStatus[None] | None = None) -> None:
        """Group commit of this appliance's accepts, and its heartbeat, until `stop_writes`."""
        import trio

        from .pgcommit import PgCommitter

        self.committer = PgCommitter(self._accept_batch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat_loop)
            if task_status is not None:
                task_status.started()
            await self.committer.run()
            nursery.cancel_scope.cancel()

    def _accept_batch(self, items: list[Incoming]) -> list[Accepted]:
        return self.db.run(
            functools.partial(accept_txn, items=items, names=self.names, by=self.name)
        )

    async def _heartbeat_loop(self) -> None:
        import trio

        while True:
            await trio.sleep(HEARTBEAT_SECONDS)
            try:
                await trio.to_thread.run_sync(self.db.run, self._heartbeat_txn)
            except StoreError as e:
                log.warning("store heartbeat failed", extra=fields(error=str(e)))

    def _heartbeat_txn(self, conn: Conn) -> None:
        conn.execute(
            "INSERT INTO ct_appliances (name, version, pid, started_at, seen_at) "
            f"VALUES (%s, %s, %s, %s, {NOW}) ON CONFLICT (name) DO UPDATE SET "
            "version = EXCLUDED.version, pid = EXCLUDED.pid, "
            "started_at = EXCLUDED.started_at, seen_at = EXCLUDED.seen_at",
            (self.name, VERSION, os.getpid(), self._started_at),
        )

    def stop_writes(self) -> None:
        if self.committer is not None:
            self.committer.close()

    def close(self, *, clean: bool = False) -> None:
        """Close the connections; after a clean stop, leave the other appliances' /status."""
        try:
            if clean and self.serving:
                self.db.run(self._leave_txn)
        except StoreError as e:  # the row ages out of /status within PEERS_SEEN_SECONDS
            log.warning("could not leave the appliance list", extra=fields(error=str(e)))
        finally:
            self.db.close()

    def _leave_txn(self, conn: Conn) -> None:
        conn.execute("DELETE FROM ct_appliances WHERE name = %s", (self.name,))

    def size_bytes(self) -> int:
        return self.db.read(pgreads.size_bytes)

    # -- health -----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.db.available

    @property
    def last_error(self) -> str | None:
        return self.db.last_error

    async def probe(self) -> None:
        await self._write(self._heartbeat_txn)

    async def _write(self, fn: Callable[[Conn], T]) -> T:
        """In the server, on a worker thread; in a CLI command, inline (it never suspends)."""
        if not self.serving:
            return self.db.run(fn)
        import trio

        return await trio.to_thread.run_sync(self.db.run, fn)

    # -- intake -----------------------------------------------------------------------------
    async def accept(self, item: Incoming) -> Accepted:
        if self.committer is None or len(item.delivery.flow_ids) > BIG_DELIVERY:
            return (await self._write(lambda conn: self._accept_one(conn, item)))[0]
        return await self.committer.submit(item)

    def _accept_one(self, conn: Conn, item: Incoming) -> list[Accepted]:
        return accept_txn(conn, [item], names=self.names, by=self.name)

    # -- records: load -> apply -> store ----------------------------------------------------
    def _load_for_update(self, conn: Conn, seq: int) -> tuple[Record, str | None] | None:
        row = conn.execute(
            "SELECT seq, record, lease_owner FROM ct_deliveries WHERE seq = %s FOR UPDATE",
            (seq,),
        ).fetchone()
        return (pgreads.record(row, self.names), row[2]) if row is not None else None

    def _save(self, conn: Conn, rec: Record, *, leased: bool = False) -> None:
        """Store `rec` with the columns its state implies; `leased`: this appliance holds it."""
        conn.execute(
            "UPDATE ct_deliveries SET state = %s, next_at = %s, done_at = %s, record = %s, "
            "lease_owner = %s, lease_until = "
            + (f"{NOW} + %s" if leased else "%s")
            + " WHERE seq = %s",
            (
                rec.state.value,
                rec.next_at,
                rec.done_at,
                encode_record(rec),
                self.name if leased else None,
                self._lease if leased else None,
                rec.seq,
            ),
        )

    # -- the dispatcher ---------------------------------------------------------------------
    async def recover_imports(self, now: float) -> list[int]:
        """At start: leases this appliance held before it stopped, and expired ones."""
        return await self._write(functools.partial(self._requeue_txn, now=now, mine=True))

    async def reclaim(self, now: float) -> list[int]:
        """Attempts whose appliance stopped renewing their lease: back to pending, as reruns."""
        return await self._write(functools.partial(self._requeue_txn, now=now, mine=False))

    def _requeue_txn(self, conn: Conn, *, now: float, mine: bool) -> list[int]:
        rows = conn.execute(
            "SELECT seq, record, lease_owner FROM ct_deliveries WHERE state = 'importing' "
            f"AND (lease_until < {NOW} OR lease_owner = %s) ORDER BY seq FOR UPDATE SKIP LOCKED",
            (self.name if mine else "",),
        ).fetchall()
        out = []
        for row in rows:
            rec = pgreads.record(row, self.names)
            if row[2] == self.name and int(row[0]) in self._attempts:
                continue  # running here now, lease merely late to renew
            why = f"interrupted: appliance {row[2] or 'unknown'} stopped"
            self._save(conn, lifecycle.requeue(rec, now, why))
            out.append(rec.seq)
        return out

    def due(self, now: float, limit: int, exclude: set[int]) -> tuple[list[int], float | None]:
        return self.db.read(lambda conn: pgreads.due(conn, now, limit, exclude))

    async def start(self, seqs: Sequence[int], now: float) -> list[Started | None]:
        def start_all(conn: Conn) -> list[Started | None]:
            rows = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE seq = ANY(%s) "
                "AND state = 'pending' FOR UPDATE SKIP LOCKED",
                (list(seqs),),
            ).fetchall()
            started: dict[int, Record] = {}
            for row in rows:
                after = lifecycle.start(pgreads.record(row, self.names), now)
                self._save(conn, after, leased=True)
                started[after.seq] = after
            bodies = dict(
                conn.execute(
                    "SELECT seq, body FROM ct_bodies WHERE seq = ANY(%s)", (list(started),)
                ).fetchall()
            )
            return [
                Started(started[s], bytes(bodies.get(s) or b"")) if s in started else None
                for s in seqs
            ]

        out = await self._write(start_all)
        for item in out:
            if item is not None:
                self._attempts[item.record.seq] = len(item.record.attempts)
        return out

    async def renew(self, seqs: Iterable[int]) -> set[int]:
        """Extend the leases of attempts running here; the seqs whose lease is still ours."""
        held = [s for s in seqs if s in self._attempts]
        if not held:
            return set()

        def renew(conn: Conn) -> set[int]:
            rows = conn.execute(
                f"UPDATE ct_deliveries SET lease_until = {NOW} + %s WHERE seq = ANY(%s) "
                "AND state = 'importing' AND lease_owner = %s RETURNING seq, record",
                (self._lease, held, self.name),
            ).fetchall()
            return {
                int(r[0])
                for r in rows
                if len(decode_record(r[1]).attempts) == self._attempts.get(int(r[0]))
            }

        return await self._write(renew)

    def _ours(self, seq: int, found: tuple[Record, str | None] | None) -> Record | None:
        """The record, if this process runs its current attempt (and so may end it)."""
        if found is None:
            return None
        rec, owner = found
        mine = (
            rec.state is State.IMPORTING
            and owner == self.name
            and len(rec.attempts) == self._attempts.get(seq)
        )
        if not mine:
            log.warning(
                "import attempt no longer holds its lease; its result is not recorded",
                extra=fields(delivery_id=rec.delivery_id, holder=owner),
            )
            return None
        return rec

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
        def finish(conn: Conn) -> State | None:
            rec = self._ours(seq, self._load_for_update(conn, seq))
            if rec is None:
                return None
            after = lifecycle.finish(
                rec,
                outcome,
                summary=summary,
                duration=duration,
                now=now,
                max_attempts=max_attempts,
                retry_in=retry_in,
            )
            self._save(conn, after)
            conn.execute(
                "INSERT INTO ct_outputs (seq, n, output) VALUES (%s, %s, %s) "
                "ON CONFLICT (seq, n) DO UPDATE SET output = EXCLUDED.output",
                (seq, len(rec.attempts), jsoncodec.dumps(dict(output))),
            )
            return after.state

        state = await self._write(finish)  # a failed write keeps the attempt: it is retried
        self._attempts.pop(seq, None)
        return state

    async def requeue(self, seq: int, now: float, why: str) -> bool:
        def requeue(conn: Conn) -> bool:
            rec = self._ours(seq, self._load_for_update(conn, seq))
            if rec is None:
                return False
            self._save(conn, lifecycle.requeue(rec, now, why))
            return True

        done = await self._write(requeue)
        self._attempts.pop(seq, None)
        return done

    async def prune(self, cutoff: float, now: float, limit: int = 5000) -> int:
        def prune(conn: Conn) -> int:
            rows = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE state = 'done' AND body_kept "
                "AND done_at < %s ORDER BY done_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (cutoff, limit),
            ).fetchall()
            for row in rows:
                self._save(conn, lifecycle.prune(pgreads.record(row, self.names), now))
            seqs = [int(r[0]) for r in rows]
            conn.execute("DELETE FROM ct_bodies WHERE seq = ANY(%s)", (seqs,))
            conn.execute("UPDATE ct_deliveries SET body_kept = false WHERE seq = ANY(%s)", (seqs,))
            return len(seqs)

        return await self._write(prune)

    def states(self, seqs: set[int]) -> dict[int, State | None]:
        return self.db.read(lambda conn: pgreads.states(conn, seqs))

    def paused(self) -> PauseState:
        return self.db.read(pgreads.paused)

    # -- operators --------------------------------------------------------------------------
    async def set_paused(self, paused: bool, by: str, now: float) -> None:
        def put(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO ct_pause (id, paused, at, by) VALUES (1, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET paused = EXCLUDED.paused, at = EXCLUDED.at, "
                "by = EXCLUDED.by",
                (paused, now, by),
            )

        await self._write(put)

    async def retry(self, seq: int, now: float) -> str:
        def retry(conn: Conn) -> str:
            found = self._load_for_update(conn, seq)
            if found is None:
                return "not found"
            rec = found[0]
            kept = pgreads.has_body(conn, seq)
            why = lifecycle.why_not_retry(rec, body_kept=kept)
            if why is not None:
                return why
            self._save(conn, lifecycle.retry(rec, now, body_kept=kept))
            return "queued"

        return await self._write(retry)

    async def purge(self, cutoff: float, include_dead: bool, now: float) -> int:
        states = ["done", "dead"] if include_dead else ["done"]

        def purge(conn: Conn) -> int:
            rows = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE state = ANY(%s) "
                "AND received_at < %s ORDER BY seq FOR UPDATE",
                (states, cutoff),
            ).fetchall()
            victims = [
                r for r in (pgreads.record(row, self.names) for row in rows) if not r.purged_at
            ]
            seqs = [r.seq for r in victims]
            for rec in victims:
                self._save(conn, lifecycle.purge(rec, now))
            conn.execute("DELETE FROM ct_bodies WHERE seq = ANY(%s)", (seqs,))
            conn.execute("DELETE FROM ct_outputs WHERE seq = ANY(%s)", (seqs,))
            conn.execute("UPDATE ct_deliveries SET body_kept = false WHERE seq = ANY(%s)", (seqs,))
            return len(victims)

        return await self._write(purge)

    def summary(self) -> InboxSummary:
        return self.db.read(pgreads.summary)

    def records(
        self, *, state: State | None = None, limit: int = 50, newest_first: bool = True
    ) -> list[Record]:
        names = self.names
        return self.db.read(lambda c: pgreads.records(c, names, state, limit, newest_first))

    def find(self, delivery_id: str) -> int | None:
        seq = self.names.seq_of(delivery_id)
        if seq is None:
            return None
        return seq if self.db.read(lambda conn: pgreads.exists(conn, seq)) else None

    def detail(self, seq: int) -> RecordDetail | None:
        names = self.names
        return self.db.read(lambda conn: pgreads.detail(conn, names, seq))

    def dead_seqs(self) -> list[int]:
        return self.db.read(pgreads.dead_seqs)

    def flows(self, flow_ids: Sequence[str]) -> list[FlowOwner]:
        names = self.names
        return self.db.read(lambda conn: pgreads.flows(conn, names, flow_ids))

    def runs(self, limit: int = 50) -> list[RunStats]:
        return self.db.read(lambda conn: pgreads.runs(conn, limit))

    def run(self, run_id: str) -> RunStats | None:
        return self.db.read(lambda conn: pgreads.run(conn, run_id))

    def peers(self) -> list[dict[str, Any]]:
        """The appliances with a recent heartbeat (this one included), for /status."""
        return self.db.read(lambda conn: pgreads.peers(conn, self.name, PEERS_SEEN_SECONDS))


def _encoded(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None
