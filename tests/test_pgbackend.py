"""The PostgreSQL store shared by several appliances (pgbackend.py, pgdb.py, pgschema.py), on a
real PostgreSQL: what holds across appliances that one LMDB store never had to show. The
invariants both backends share are in tests/test_store.py, run against each."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from appliance import pgschema
from appliance.errors import SchemaError, StoreUnavailable
from appliance.lmdbbackend import run_inline
from appliance.pgbackend import PgBackend
from appliance.pgdb import conninfo, has_password
from appliance.record import Outcome, State

from .pgcluster import PgCluster
from .test_store import incoming


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pgschema.migrate(conn)
    return pg_dsn


@pytest.fixture
def appliances(dsn: str) -> Iterator[list[PgBackend]]:
    """Two appliances' views of one database (CLI-style: writes run inline)."""
    opened = [PgBackend(dsn, name=n, lease_seconds=1.0) for n in ("a:1", "b:2")]
    yield opened
    for b in opened:
        b.close()


def finish(backend: PgBackend, seq: int, outcome: Outcome, now: float) -> State | None:
    return run_inline(
        lambda: backend.finish(
            seq,
            outcome,
            summary=outcome.value,
            duration=0.1,
            output={"stdout": "o"},
            now=now,
            max_attempts=3,
            retry_in=1.0,
        )  # fmt: skip
    )


def test_a_delivery_posted_to_a_then_b_is_a_duplicate_on_b(appliances: list[PgBackend]) -> None:
    a, b = appliances
    first = run_inline(lambda: a.accept(incoming(["f1", "f2"])))
    again = run_inline(lambda: b.accept(incoming(["f1", "f2"])))
    partly = run_inline(lambda: b.accept(incoming(["f2", "f3"])))
    assert (first.status, again.status, again.duplicate) == ("accepted", "duplicate", 2)
    assert (partly.status, partly.new, partly.duplicate) == ("accepted", 1, 1)
    assert [f.seq for f in a.flows(["f1", "f2", "f3"])] == [first.seq, first.seq, partly.seq]
    assert a.summary().flows == 3 == b.summary().flows  # counted per appliance, summed


async def test_concurrent_group_commits_of_two_appliances_claim_each_id_once(dsn: str) -> None:
    rng = random.Random(7)
    pool = [f"id-{i}" for i in range(400)]
    pages = [rng.sample(pool, 25) for _ in range(300)]
    a, b = (PgBackend(dsn, name=n, serving=True) for n in ("a:1", "b:2"))
    results = []
    async with trio.open_nursery() as nursery:
        for backend in (a, b):
            await trio.to_thread.run_sync(backend.recover)
            await nursery.start(backend.run_writer)

        async def post(backend: PgBackend, flows: list[str]) -> None:
            results.append(await backend.accept(incoming(flows)))

        async with trio.open_nursery() as senders:
            for i, flows in enumerate(pages):  # overlapping ids land on both appliances at once
                senders.start_soon(post, (a, b)[i % 2], flows)
        a.stop_writes()
        b.stop_writes()
    owners: dict[str, int] = {}
    for rec in a.records(limit=1000):
        for f in rec.flows:
            assert f not in owners, f"{f} claimed by {owners[f]} and {rec.seq}"
            owners[f] = rec.seq
    assert set(owners) == {f for p in pages for f in p}
    assert sum(r.new for r in results) == len(owners) == a.summary().flows
    assert a.committer is not None and b.committer is not None
    assert a.committer.commits + b.committer.commits < len(pages)  # batched, per appliance
    a.close()
    b.close()


def test_two_appliances_never_start_the_same_delivery(appliances: list[PgBackend]) -> None:
    a, b = appliances
    seq = run_inline(lambda: a.accept(incoming(["x"]))).seq
    assert seq is not None
    assert a.due(2e9, 10, set()) == ([seq], None) == b.due(2e9, 10, set())
    started_a = run_inline(lambda: a.start([seq], 10.0))
    started_b = run_inline(lambda: b.start([seq], 10.0))
    assert started_a[0] is not None and started_b == [None]
    assert finish(b, seq, Outcome.SUCCESS, 11.0) is None  # b never held it
    assert finish(a, seq, Outcome.SUCCESS, 11.0) is State.DONE


def test_an_expired_lease_is_reclaimed_as_a_rerun_and_the_loser_records_nothing(
    appliances: list[PgBackend],
) -> None:
    a, b = appliances  # lease_seconds=1
    seq = run_inline(lambda: a.accept(incoming(["x"]))).seq
    assert seq is not None
    assert run_inline(lambda: a.start([seq], 10.0))[0] is not None
    assert run_inline(lambda: a.renew([seq])) == {seq}
    assert run_inline(lambda: b.reclaim(10.5)) == []  # a's lease is live
    time.sleep(1.2)  # a stops renewing (it died, or cannot reach the database)
    assert run_inline(lambda: b.reclaim(12.0)) == [seq]
    rec = b.records()[0]
    assert (rec.state, rec.reruns, rec.attempts[0].outcome) == (
        State.PENDING,
        1,
        Outcome.INTERRUPTED,
    )
    assert "a:1" in (rec.attempts[0].summary or "")
    assert run_inline(lambda: b.start([seq], 12.5))[0] is not None
    assert run_inline(lambda: a.renew([seq])) == set()  # a learns it lost the lease
    assert finish(a, seq, Outcome.SUCCESS, 13.0) is None
    assert finish(b, seq, Outcome.SUCCESS, 13.0) is State.DONE
    done = b.records()[0]
    assert [x.outcome for x in done.attempts] == [Outcome.INTERRUPTED, Outcome.SUCCESS]


def test_a_restarted_appliance_takes_back_only_its_own_leases(dsn: str) -> None:
    a = PgBackend(dsn, name="a:1", lease_seconds=300)
    b = PgBackend(dsn, name="b:2", lease_seconds=300)
    mine, theirs = (run_inline(lambda f=f: a.accept(incoming([f]))).seq for f in ("m", "t"))
    assert mine is not None and theirs is not None
    run_inline(lambda: a.start([mine], 1.0))
    run_inline(lambda: b.start([theirs], 1.0))
    a.close()  # killed
    a = PgBackend(dsn, name="a:1", lease_seconds=300)  # the same appliance, started again
    assert run_inline(lambda: a.recover_imports(2.0)) == [mine]
    assert b.states({mine, theirs}) == {mine: State.PENDING, theirs: State.IMPORTING}
    a.close()
    b.close()


def test_pause_retry_and_dead_letters_are_shared(appliances: list[PgBackend]) -> None:
    a, b = appliances
    run_inline(lambda: a.set_paused(True, "cli", 5.0))
    assert b.paused().paused and b.paused().by == "cli"
    seq = run_inline(lambda: a.accept(incoming(["d"]))).seq
    assert seq is not None
    run_inline(lambda: b.start([seq], 6.0))
    assert finish(b, seq, Outcome.DEAD, 7.0) is State.DEAD
    assert a.dead_seqs() == [seq] and a.summary().dead == 1
    assert a.find(b.delivery_id(seq)) == seq and a.find("ffffffff-0000000001") is None
    assert run_inline(lambda: a.retry(seq, 8.0)) == "queued"
    detail = b.detail(seq)
    assert detail is not None and detail.outputs == ({"stdout": "o"},)
    assert detail.body == b"{}" and detail.record.state is State.PENDING


def test_schema_is_versioned_idempotent_and_checked(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(SchemaError, match="db migrate"):
            pgschema.check(conn)
        assert pgschema.migrate(conn) == (0, pgschema.SCHEMA_VERSION)
        assert pgschema.migrate(conn) == (pgschema.SCHEMA_VERSION,) * 2
        pgschema.check(conn)
        newer = str(pgschema.SCHEMA_VERSION + 1)
        conn.execute("UPDATE ct_meta SET value = %s WHERE key = 'schema_version'", (newer,))
        with pytest.raises(SchemaError, match="newer"):
            pgschema.check(conn)
    with pytest.raises(SchemaError, match="newer"):
        PgBackend(pg_dsn, name="x:1")


def test_dsn_defaults_never_override_the_operator() -> None:
    dsn = conninfo("host=a,b port=1,2 dbname=d connect_timeout=9", "ct-appliance x")
    params = conninfo_to_dict(dsn)
    assert params["target_session_attrs"] == "read-write"
    assert params["connect_timeout"] == "9" and params["host"] == "a,b"
    assert params["application_name"] == "ct-appliance x" and params["keepalives"] == "1"
    assert has_password("postgresql://u:pw@h/d") and not has_password("host=/run/postgresql")


def test_an_unreachable_or_read_only_database_is_unavailable_until_a_write_works() -> None:
    with PgCluster() as pg:
        pg.init().start()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            pgschema.migrate(conn)
        backend = PgBackend(pg.dsn(), name="a:1")
        assert run_inline(lambda: backend.accept(incoming(["1"]))).status == "accepted"
        pg.stop("immediate")
        with pytest.raises(StoreUnavailable, match="postgresql"):
            run_inline(lambda: backend.accept(incoming(["2"])))
        assert not backend.available and "postgresql" in (backend.last_error or "")
        with pytest.raises(StoreUnavailable):
            backend.summary()
        pg.start()
        run_inline(backend.probe)
        assert backend.available and backend.last_error is None
        assert run_inline(lambda: backend.accept(incoming(["2"]))).status == "accepted"

        pg.set_conf(default_transaction_read_only="on")  # a failover in progress
        with pytest.raises(StoreUnavailable, match="read-only|read-write"):
            run_inline(lambda: backend.accept(incoming(["3"])))
        assert not backend.available
        pg.set_conf(default_transaction_read_only="off")
        run_inline(backend.probe)
        assert run_inline(lambda: backend.accept(incoming(["3"]))).status == "accepted"
        assert [f.seq is not None for f in backend.flows(["1", "2", "3"])] == [True] * 3
        backend.close()


async def test_a_commit_held_by_a_missing_synchronous_standby_is_a_503_not_a_hang() -> None:
    with PgCluster() as pg:
        pg.init().start()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            pgschema.migrate(conn)
        backend = PgBackend(pg.dsn(), name="a:1", serving=True)
        await trio.to_thread.run_sync(backend.recover)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run_writer)
            pg.set_conf(synchronous_standby_names="gone")  # every commit now waits for it
            started = trio.current_time()
            with pytest.raises(StoreUnavailable, match="no commit within"):
                await backend.accept(incoming(["held"]))
            assert 10 < trio.current_time() - started < 30
            assert not backend.available  # /readyz 503: the balancer sends deliveries elsewhere
            assert "synchronous standby" in (backend.last_error or "")
            pg.set_conf(synchronous_standby_names="")  # the held commit completes
            for _ in range(100):  # the stalled write ends within a moment
                if backend.available:
                    break
                await trio.sleep(0.2)
            assert backend.available, backend.last_error
            again = await backend.accept(incoming(["held"]))
            assert again.status == "duplicate"  # the first one was stored after all: no loss
            backend.stop_writes()
            nursery.cancel_scope.cancel()
        backend.close()


def test_status_lists_the_appliances_seen_and_a_clean_stop_leaves_the_list(dsn: str) -> None:
    a, b = (PgBackend(dsn, name=n, serving=True) for n in ("a:1", "b:2"))
    a.recover()
    b.recover()  # registers, as every heartbeat does
    assert [(p["name"], p["self"]) for p in a.peers()] == [("a:1", True), ("b:2", False)]
    b.close(clean=True)
    assert [p["name"] for p in a.peers()] == ["a:1"]
    a.close()  # killed, in effect: its row stays until it ages out
    c = PgBackend(dsn, name="c:3")
    assert [p["name"] for p in c.peers()] == ["a:1"]
    c.close()
