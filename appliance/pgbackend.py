"""The PostgreSQL store as a `Backend`: N appliances share one inbox and one flow-id index.

Theory of operation (spec §5, across appliances; the schema is in pgschema.py):

* **Accept.** Each appliance group-commits its own accepts: its writer task takes everything
  queued and runs it in ONE transaction (one pipeline of statements, then COMMIT, with
  `synchronous_commit` on), then answers every waiter. A delivery's flow ids are claimed by
  `INSERT INTO ct_flows ... ON CONFLICT DO NOTHING RETURNING` in the same transaction as its
  record and body: the primary key makes the claim exact between appliances (a second
  transaction inserting the same id waits for the first and then does nothing), so a delivery
  posted to A and re-posted to B is a `duplicate` on B. A delivery of more than BIG_DELIVERY
  flow ids is claimed in a transaction of its own, beside the group commits, so it never holds
  up small ones. Nothing is `receiving`: every accept is one transaction, so a crash leaves
  nothing to finish.
* **Imports.** Any appliance may run any pending delivery. `start` takes rows with
  `FOR UPDATE SKIP LOCKED` and sets a lease (owner = this appliance's name, until = database
  time + lease_seconds): two appliances never start the same delivery. The dispatcher renews
  the leases of its running attempts every lease_seconds / 3 and cancels an attempt whose lease
  it could not renew before it runs out, so a lease that expired is never still running.
  `reclaim` (every dispatcher tick) returns expired leases to pending as reruns; at start an
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
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from . import jsoncodec, lifecycle, pgschema
from .errors import StoreError
from .inbox import Epochs, read_epochs
from .logs import fields
from .pgdb import Db
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

T = TypeVar("T")
Conn = psycopg.Connection[Any]

log = logging.getLogger("ct_appliance.store")

BIG_DELIVERY = 2048  # more flow ids than this: claimed in a transaction of its own
MAX_BATCH = 64  # deliveries per group commit
MAX_BATCH_FLOWS = 16384
HEARTBEAT_SECONDS = 5.0
PEERS_SEEN_SECONDS = 60.0  # /status lists appliances with a heartbeat this recent
_NOW = "extract(epoch from clock_timestamp())"


class _Pending:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: Incoming) -> None:
        import trio

        self.item = item
        self.done = trio.Event()
        self.result: Accepted | None = None
        self.error: BaseException | None = None


def _record(row: Sequence[Any], names: Epochs) -> Record:
    seq = int(row[0])
    return decode_record(row[1], names.delivery_id_of(seq))


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
        self._queue: list[_Pending] = []
        self._wakeup: trio.Event | None = None
        self._stopping = False
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

        self._wakeup = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat_loop)
            if task_status is not None:
                task_status.started()
            while True:
                if not self._queue:
                    if self._stopping:
                        break
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                batch = self._take()
                await self._commit(batch)
            nursery.cancel_scope.cancel()

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        flows = 0
        while self._queue and len(batch) < MAX_BATCH:
            size = len(self._queue[0].item.delivery.flow_ids)
            if batch and flows + size > MAX_BATCH_FLOWS:
                break
            batch.append(self._queue.pop(0))
            flows += size
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        import trio

        items = [p.item for p in batch]
        try:
            results = await trio.to_thread.run_sync(
                self.db.run, functools.partial(self._accept_txn, items=items)
            )
        except Exception as e:  # StoreError: 503 for each; anything else: 500 for each
            for p in batch:
                p.error = e
        else:
            for p, result in zip(batch, results, strict=True):
                p.result = result
        for p in batch:
            p.done.set()

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
            f"VALUES (%s, %s, %s, %s, {_NOW}) ON CONFLICT (name) DO UPDATE SET "
            "version = EXCLUDED.version, pid = EXCLUDED.pid, "
            "started_at = EXCLUDED.started_at, seen_at = EXCLUDED.seen_at",
            (self.name, VERSION, os.getpid(), self._started_at),
        )

    def stop_writes(self) -> None:
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()

    def close(self, *, clean: bool = False) -> None:
        self.db.close()

    def size_bytes(self) -> int:
        row = self.db.read(
            lambda c: c.execute("SELECT pg_database_size(current_database())").fetchone()
        )
        return int(row[0]) if row else 0

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
        if self._wakeup is None or len(item.delivery.flow_ids) > BIG_DELIVERY:
            results = await self._write(functools.partial(self._accept_txn, items=[item]))
            return results[0]
        pending = _Pending(item)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _accept_txn(self, conn: Conn, *, items: list[Incoming]) -> list[Accepted]:
        """Claim and store every item, in order, in the transaction `conn` is in."""
        seqs = [
            int(r[0])
            for r in conn.execute(
                "SELECT nextval('ct_seq') FROM generate_series(1, %s)", (len(items),)
            )
        ]
        with conn.pipeline() as pipe:
            claims = [
                conn.execute(
                    "INSERT INTO ct_flows (flow_id, seq) SELECT unnest(%s::text[]), %s "
                    "ON CONFLICT DO NOTHING RETURNING flow_id",
                    (list(item.delivery.flow_ids), seq),
                )
                for item, seq in zip(items, seqs, strict=True)
            ]
            pipe.sync()
            claimed = [{r[0] for r in cur.fetchall()} for cur in claims]
        out: list[Accepted] = []
        rows: list[tuple[Any, ...]] = []
        bodies: list[tuple[int, bytes]] = []
        runs: dict[str, list[Any]] = {}
        new_total = 0
        for item, seq, got in zip(items, seqs, claimed, strict=True):
            d, ids = item.delivery, item.delivery.flow_ids
            new = tuple(f for f in ids if f in got)
            owners: frozenset[int] = frozenset()
            if item.want_owners and len(new) < len(ids):
                owners = self._owners(conn, [f for f in ids if f not in got])
            _count_run(runs, item, len(new), len(ids) - len(new))
            if not new:
                out.append(Accepted("duplicate", None, None, 0, len(ids), owners))
                continue
            rec = lifecycle.accept(
                seq,
                received_at=item.received_at,
                run_id=d.cost_basis_run_id,
                ghost_user_id=d.ghost_user_id,
                flows=new,
                duplicate_flows=len(ids) - len(new),
                in_body_duplicates=d.in_body_duplicates,
                body_bytes=len(item.body),
            )
            rows.append((seq, rec.state.value, rec.received_at, rec.next_at, encode_record(rec)))
            bodies.append((seq, item.body))
            new_total += len(new)
            delivery_id = self.names.delivery_id_of(seq)
            out.append(
                Accepted("accepted", delivery_id, seq, len(new), len(ids) - len(new), owners)
            )
        with conn.pipeline(), conn.cursor() as cur:
            if rows:
                cur.executemany(
                    "INSERT INTO ct_deliveries (seq, state, received_at, next_at, record) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    rows,
                )
                cur.executemany("INSERT INTO ct_bodies (seq, body) VALUES (%s, %s)", bodies)
            cur.executemany(_UPSERT_RUN, [runs[k] for k in sorted(runs)])  # one lock order
            if rows:
                cur.execute(
                    "INSERT INTO ct_counters (name, flows, deliveries) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET flows = ct_counters.flows + "
                    "EXCLUDED.flows, deliveries = ct_counters.deliveries + EXCLUDED.deliveries",
                    (self.name, new_total, len(rows)),
                )
        return out

    def _owners(self, conn: Conn, flow_ids: list[str]) -> frozenset[int]:
        found = conn.execute(
            "SELECT DISTINCT seq FROM ct_flows WHERE flow_id = ANY(%s)", (flow_ids,)
        ).fetchall()
        return frozenset(int(r[0]) for r in found)

    # -- records: load -> apply -> store ----------------------------------------------------
    def _load_for_update(self, conn: Conn, seq: int) -> tuple[Record, str | None] | None:
        row = conn.execute(
            "SELECT seq, record, lease_owner FROM ct_deliveries WHERE seq = %s FOR UPDATE",
            (seq,),
        ).fetchone()
        return (_record(row, self.names), row[2]) if row is not None else None

    def _save(self, conn: Conn, rec: Record, *, leased: bool = False) -> None:
        """Store `rec` with the columns its state implies; `leased`: this appliance holds it."""
        conn.execute(
            "UPDATE ct_deliveries SET state = %s, next_at = %s, done_at = %s, record = %s, "
            "lease_owner = %s, lease_until = "
            + (f"{_NOW} + %s" if leased else "%s")
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

    def _update(self, conn: Conn, seq: int, fn: Callable[[Record], Record]) -> Record | None:
        found = self._load_for_update(conn, seq)
        if found is None:
            return None
        after = fn(found[0])
        self._save(conn, after)
        return after

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
            f"AND (lease_until < {_NOW} OR lease_owner = %s) ORDER BY seq FOR UPDATE SKIP LOCKED",
            (self.name if mine else "",),
        ).fetchall()
        out = []
        for row in rows:
            rec = _record(row, self.names)
            if row[2] == self.name and int(row[0]) in self._attempts:
                continue  # running here now, lease merely late to renew
            why = f"interrupted: appliance {row[2] or 'unknown'} stopped"
            self._save(conn, lifecycle.requeue(rec, now, why))
            out.append(rec.seq)
        return out

    def due(self, now: float, limit: int, exclude: set[int]) -> tuple[list[int], float | None]:
        def look(conn: Conn) -> tuple[list[int], float | None]:
            ready = conn.execute(
                "SELECT seq FROM ct_deliveries WHERE state = 'pending' AND next_at <= %s "
                "AND NOT (seq = ANY(%s)) ORDER BY seq LIMIT %s",
                (now, list(exclude), limit),
            ).fetchall()
            wake = conn.execute(
                "SELECT min(next_at) FROM ct_deliveries WHERE state = 'pending' AND next_at > %s",
                (now,),
            ).fetchone()
            return [int(r[0]) for r in ready], (float(wake[0]) if wake and wake[0] else None)

        return self.db.read(look)

    async def start(self, seqs: Sequence[int], now: float) -> list[Started | None]:
        def start_all(conn: Conn) -> list[Started | None]:
            rows = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE seq = ANY(%s) "
                "AND state = 'pending' FOR UPDATE SKIP LOCKED",
                (list(seqs),),
            ).fetchall()
            started: dict[int, Record] = {}
            for row in rows:
                after = lifecycle.start(_record(row, self.names), now)
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
                f"UPDATE ct_deliveries SET lease_until = {_NOW} + %s WHERE seq = ANY(%s) "
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

        try:
            return await self._write(finish)
        finally:
            self._attempts.pop(seq, None)

    async def requeue(self, seq: int, now: float, why: str) -> bool:
        def requeue(conn: Conn) -> bool:
            rec = self._ours(seq, self._load_for_update(conn, seq))
            if rec is None:
                return False
            self._save(conn, lifecycle.requeue(rec, now, why))
            return True

        try:
            return await self._write(requeue)
        finally:
            self._attempts.pop(seq, None)

    async def prune(self, cutoff: float, now: float, limit: int = 5000) -> int:
        def prune(conn: Conn) -> int:
            rows = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE state = 'done' AND body_kept "
                "AND done_at < %s ORDER BY done_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (cutoff, limit),
            ).fetchall()
            for row in rows:
                self._save(conn, lifecycle.prune(_record(row, self.names), now))
            seqs = [int(r[0]) for r in rows]
            conn.execute("DELETE FROM ct_bodies WHERE seq = ANY(%s)", (seqs,))
            conn.execute("UPDATE ct_deliveries SET body_kept = false WHERE seq = ANY(%s)", (seqs,))
            return len(seqs)

        return await self._write(prune)

    def states(self, seqs: set[int]) -> dict[int, State | None]:
        def look(conn: Conn) -> dict[int, State | None]:
            rows = conn.execute(
                "SELECT seq, state FROM ct_deliveries WHERE seq = ANY(%s)", (list(seqs),)
            ).fetchall()
            found = {int(r[0]): State(r[1]) for r in rows}
            return {s: found.get(s) for s in seqs}

        return self.db.read(look)

    def paused(self) -> PauseState:
        return self.db.read(_paused)

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
            kept = _has_body(conn, seq)
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
            victims = [r for r in (_record(row, self.names) for row in rows) if not r.purged_at]
            seqs = [r.seq for r in victims]
            for rec in victims:
                self._save(conn, lifecycle.purge(rec, now))
            conn.execute("DELETE FROM ct_bodies WHERE seq = ANY(%s)", (seqs,))
            conn.execute("DELETE FROM ct_outputs WHERE seq = ANY(%s)", (seqs,))
            conn.execute("UPDATE ct_deliveries SET body_kept = false WHERE seq = ANY(%s)", (seqs,))
            return len(victims)

        return await self._write(purge)

    def summary(self) -> InboxSummary:
        def read(conn: Conn) -> InboxSummary:
            counts = dict(
                conn.execute(
                    "SELECT 'pending', count(*) FROM ct_deliveries WHERE state = 'pending' "
                    "UNION ALL SELECT 'importing', count(*) FROM ct_deliveries "
                    "WHERE state = 'importing' UNION ALL SELECT 'dead', count(*) "
                    "FROM ct_deliveries WHERE state = 'dead'"
                ).fetchall()
            )
            totals = conn.execute(
                "SELECT coalesce(sum(flows), 0), coalesce(sum(deliveries), 0) FROM ct_counters"
            ).fetchone()
            oldest = conn.execute(
                "SELECT received_at FROM ct_deliveries WHERE state IN ('pending', 'importing') "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
            runs = conn.execute("SELECT count(*) FROM ct_runs").fetchone()
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            assert totals is not None and runs is not None and size is not None
            pending, importing, dead = (int(counts[k]) for k in ("pending", "importing", "dead"))
            total = int(totals[1])
            return InboxSummary(
                pending=pending,
                importing=importing,
                done=max(0, total - pending - importing - dead),
                dead=dead,
                receiving=0,
                total=total,
                flows=int(totals[0]),
                runs=int(runs[0]),
                oldest_pending_at=float(oldest[0]) if oldest else None,
                size_bytes=int(size[0]),
                paused=_paused(conn).paused,
            )

        return self.db.read(read)

    def records(
        self, *, state: State | None = None, limit: int = 50, newest_first: bool = True
    ) -> list[Record]:
        where = "WHERE state = %s" if state is not None else ""
        order = "DESC" if newest_first else "ASC"
        query = f"SELECT seq, record FROM ct_deliveries {where} ORDER BY seq {order} LIMIT %s"
        params = (state.value, limit) if state is not None else (limit,)
        rows = self.db.read(lambda c: c.execute(query, params).fetchall())
        return [_record(r, self.names) for r in rows]

    def find(self, delivery_id: str) -> int | None:
        seq = self.names.seq_of(delivery_id)
        if seq is None:
            return None
        row = self.db.read(
            lambda c: c.execute("SELECT 1 FROM ct_deliveries WHERE seq = %s", (seq,)).fetchone()
        )
        return seq if row is not None else None

    def detail(self, seq: int) -> RecordDetail | None:
        def read(conn: Conn) -> RecordDetail | None:
            row = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE seq = %s", (seq,)
            ).fetchone()
            if row is None:
                return None
            rec = _record(row, self.names)
            outs = dict(
                conn.execute("SELECT n, output FROM ct_outputs WHERE seq = %s", (seq,)).fetchall()
            )
            body = conn.execute("SELECT body FROM ct_bodies WHERE seq = %s", (seq,)).fetchone()
            outputs = tuple(
                json.loads(bytes(outs[a.n])) if a.n in outs else None for a in rec.attempts
            )
            return RecordDetail(rec, outputs, bytes(body[0]) if body else None)

        return self.db.read(read)

    def dead_seqs(self) -> list[int]:
        rows = self.db.read(
            lambda c: c.execute(
                "SELECT seq FROM ct_deliveries WHERE state = 'dead' ORDER BY seq"
            ).fetchall()
        )
        return [int(r[0]) for r in rows]

    def flows(self, flow_ids: Sequence[str]) -> list[FlowOwner]:
        def read(conn: Conn) -> list[FlowOwner]:
            owners = dict(
                conn.execute(
                    "SELECT flow_id, seq FROM ct_flows WHERE flow_id = ANY(%s)", (list(flow_ids),)
                ).fetchall()
            )
            rows = conn.execute(
                "SELECT seq, record FROM ct_deliveries WHERE seq = ANY(%s)",
                (list(set(owners.values())),),
            ).fetchall()
            recs = {int(r[0]): _record(r, self.names) for r in rows}
            return [
                FlowOwner(f, owners.get(f), recs.get(owners[f]) if f in owners else None)
                for f in flow_ids
            ]

        return self.db.read(read)

    def runs(self, limit: int = 50) -> list[RunStats]:
        rows = self.db.read(
            lambda c: c.execute(
                f"SELECT {_RUN_COLUMNS} FROM ct_runs ORDER BY last_seen DESC LIMIT %s", (limit,)
            ).fetchall()
        )
        return [_run(r) for r in rows]

    def run(self, run_id: str) -> RunStats | None:
        row = self.db.read(
            lambda c: c.execute(
                f"SELECT {_RUN_COLUMNS} FROM ct_runs WHERE run_id = %s", (run_id,)
            ).fetchone()
        )
        return _run(row) if row is not None else None

    def peers(self) -> list[dict[str, Any]]:
        """The appliances with a recent heartbeat (this one included), for /status."""
        rows = self.db.read(
            lambda c: c.execute(
                f"SELECT name, version, pid, started_at, seen_at, {_NOW} - seen_at "
                f"FROM ct_appliances WHERE seen_at > {_NOW} - %s ORDER BY name",
                (PEERS_SEEN_SECONDS,),
            ).fetchall()
        )
        return [
            {
                "name": r[0],
                "version": r[1],
                "pid": r[2],
                "started_at": r[3],
                "seen_seconds_ago": round(float(r[5]), 1),
                "self": r[0] == self.name,
            }
            for r in rows
        ]


_RUN_COLUMNS = (
    "run_id, ghost_user_id, first_seen, last_seen, pages, accepted_pages, duplicate_pages, "
    "flows_new, flows_duplicate"
)
_UPSERT_RUN = (
    f"INSERT INTO ct_runs ({_RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (run_id) DO UPDATE SET last_seen = greatest(ct_runs.last_seen, "
    "EXCLUDED.last_seen), first_seen = least(ct_runs.first_seen, EXCLUDED.first_seen), "
    "pages = ct_runs.pages + EXCLUDED.pages, "
    "accepted_pages = ct_runs.accepted_pages + EXCLUDED.accepted_pages, "
    "duplicate_pages = ct_runs.duplicate_pages + EXCLUDED.duplicate_pages, "
    "flows_new = ct_runs.flows_new + EXCLUDED.flows_new, "
    "flows_duplicate = ct_runs.flows_duplicate + EXCLUDED.flows_duplicate"
)


def _count_run(runs: dict[str, list[Any]], item: Incoming, new: int, dup: int) -> None:
    """One more page of a run in this batch (the row `_UPSERT_RUN` adds to ct_runs)."""
    d, at = item.delivery, item.received_at
    row = runs.get(d.cost_basis_run_id)
    if row is None:
        runs[d.cost_basis_run_id] = [d.cost_basis_run_id, d.ghost_user_id, at, at, 1,
                                     int(new > 0), int(new == 0), new, dup]  # fmt: skip
        return
    row[2], row[3] = min(row[2], at), max(row[3], at)
    row[4] += 1
    row[5] += int(new > 0)
    row[6] += int(new == 0)
    row[7] += new
    row[8] += dup


def _run(row: Sequence[Any]) -> RunStats:
    return RunStats(
        run_id=row[0],
        ghost_user_id=row[1],
        first_seen=float(row[2]),
        last_seen=float(row[3]),
        pages=int(row[4]),
        accepted_pages=int(row[5]),
        duplicate_pages=int(row[6]),
        flows_new=int(row[7]),
        flows_duplicate=int(row[8]),
    )


def _paused(conn: Conn) -> PauseState:
    row = conn.execute("SELECT paused, at, by FROM ct_pause WHERE id = 1").fetchone()
    return PauseState(bool(row[0]), row[1], row[2]) if row is not None else PauseState()


def _has_body(conn: Conn, seq: int) -> bool:
    return conn.execute("SELECT 1 FROM ct_bodies WHERE seq = %s", (seq,)).fetchone() is not None


def _encoded(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None
