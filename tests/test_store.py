"""The store backends applying lifecycle.py: a real LMDB file (store.py, inbox.py,
lmdbbackend.py) and a real PostgreSQL database (pgbackend.py). Tests taking `make_backend` run
against both; the others are about LMDB's own mechanics (its map, its index, its lock)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from appliance import flowindex
from appliance.backend import Backend
from appliance.committer import GroupCommitter
from appliance.errors import StoreLocked
from appliance.inbox import Inbox, flow_key, seq_key
from appliance.intake import accept_txn
from appliance.lmdbbackend import LmdbBackend, run_inline
from appliance.payload import Delivery
from appliance.record import Incoming, Outcome, State
from appliance.store import Store


def incoming(flows: list[str], run: str = "r", body: bytes = b"{}") -> Incoming:
    unique = tuple(dict.fromkeys(flows))
    return Incoming(Delivery(unique, run, "g", len(flows) - len(unique)), body, 1.0e9)


MakeBackend = Callable[..., Backend]


@pytest.fixture(params=["lmdb", "postgresql"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeBackend]:
    """`make_backend(serving=False, name=...)` opens the store under test: the same LMDB
    directory, or the same (migrated) PostgreSQL database, each time it is called. Every
    backend opened is closed at the end (closing twice is harmless)."""
    opened: list[Backend] = []
    dsn = ""
    if request.param == "postgresql":
        from appliance import pgschema

        dsn = request.getfixturevalue("pg_dsn")
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgschema.migrate(conn)

    def make(serving: bool = False, name: str = "test:1") -> Backend:
        backend: Backend
        if request.param == "lmdb":
            backend = LmdbBackend(tmp_path, serving=serving)
        else:
            from appliance.pgbackend import PgBackend

            backend = PgBackend(dsn, name=name, lease_seconds=30, serving=serving)
        opened.append(backend)
        if serving:
            backend.recover()
        return backend

    yield make
    for backend in opened:
        backend.close()


def test_claims_are_exact_and_duplicates_store_nothing(make_backend: MakeBackend) -> None:
    backend = make_backend()
    a = run_inline(lambda: backend.accept(incoming(["x", "y"])))
    b = run_inline(lambda: backend.accept(incoming(["y", "z"])))
    c = run_inline(lambda: backend.accept(incoming(["x", "z"])))
    assert (a.status, a.new, b.status, b.new, b.duplicate) == ("accepted", 2, "accepted", 1, 1)
    assert c.status == "duplicate" and c.delivery_id is None
    assert a.delivery_id == backend.delivery_id(a.seq or 0)
    assert [r.flows for r in backend.records(newest_first=False)] == [("x", "y"), ("z",)]
    run = backend.run("r")
    assert run is not None and (run.pages, run.flows_new, run.flows_duplicate) == (3, 3, 3)
    assert (run.accepted_pages, run.duplicate_pages) == (2, 1)
    assert [f.seq for f in backend.flows(["z", "x", "nope"])] == [b.seq, a.seq, None]
    summary = backend.summary()
    assert (summary.total, summary.pending, summary.flows, summary.runs) == (2, 2, 3, 1)


def test_flow_ids_longer_than_the_key_limit_are_stored_by_digest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    long_id = "L" * 100_000
    assert len(flow_key(long_id)) == 33
    first = store.write(lambda t: accept_txn(inbox, t, incoming([long_id, long_id + "2"])))
    again = store.write(lambda t: accept_txn(inbox, t, incoming([long_id])))
    assert first.new == 2 and again.status == "duplicate"
    assert store.read(lambda t: flowindex.owners_txn(inbox, t, [long_id]))[0].seq == first.seq


def test_map_grows_by_itself(tmp_path: Path) -> None:
    store = Store(tmp_path, initial_map_bytes=1 << 20)
    inbox = Inbox(store)
    body = b"x" * 20_000
    for i in range(200):  # ~4 MB of bodies into a 1 MiB map
        store.write(lambda t, i=i: accept_txn(inbox, t, incoming([f"g{i}"], body=body)))
    assert store.env.info()["map_size"] > 1 << 20
    assert store.read(lambda t: inbox.summary_txn(t, size_bytes=0)).total == 200


def test_flow_ids_of_any_text_are_exact_keys(make_backend: MakeBackend) -> None:
    # NUL cannot be PostgreSQL text and a backslash is its escape: neither may merge two ids.
    odd = ["a\x00", "a\\0", "a\\\\0", "a\\", "a\\\x00", "é\x00ü", '"quoted"', "a"]
    backend = make_backend()
    first = run_inline(lambda: backend.accept(incoming(odd[:4])))
    rest = run_inline(lambda: backend.accept(incoming(odd)))
    assert (first.new, rest.new, rest.duplicate) == (4, 4, 4)
    again = run_inline(lambda: backend.accept(incoming(list(reversed(odd)))))
    assert again.status == "duplicate"
    owners = [f.seq for f in backend.flows([*odd, "a\\\\", "\x00"])]
    assert owners == [first.seq] * 4 + [rest.seq] * 4 + [None, None]
    assert [r.flows for r in backend.records(newest_first=False)] == [
        tuple(odd[:4]),
        tuple(odd[4:]),
    ]


async def test_group_commit_shares_commits_and_claims_exactly(make_backend: MakeBackend) -> None:
    backend = make_backend(serving=True)
    rng = random.Random(3)
    pool = [f"f{i}" for i in range(300)]
    bodies = [rng.sample(pool, 20) for _ in range(400)]
    results = []
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run_writer)

        async def one(flows: list[str]) -> None:
            results.append(await backend.accept(incoming(flows)))

        async with trio.open_nursery() as senders:
            for flows in bodies:
                senders.start_soon(one, flows)
        backend.stop_writes()
    committer: Any = getattr(backend, "committer", None)
    assert committer is not None and committer.commits < 100, committer.commits  # batched
    claimed: dict[str, int] = {}
    for rec in await trio.to_thread.run_sync(lambda: backend.records(limit=1000)):
        for f in rec.flows:
            assert f not in claimed
            claimed[f] = rec.seq
    assert set(claimed) == {f for b in bodies for f in b}
    assert sum(r.new for r in results) == len(claimed)
    backend.close()


async def test_a_failing_operation_fails_alone(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    committer = GroupCommitter(store)

    def broken(_txn: object) -> None:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        out: dict[str, object] = {}

        async def good() -> None:
            out["good"] = await committer.submit(lambda t: accept_txn(inbox, t, incoming(["ok"])))

        async def bad() -> None:
            try:
                await committer.submit(broken)
            except RuntimeError as e:
                out["bad"] = e

        async with trio.open_nursery() as n:
            n.start_soon(good)
            n.start_soon(bad)
        committer.close()
    assert isinstance(out["bad"], RuntimeError)
    assert store.read(lambda t: flowindex.owners_txn(inbox, t, ["ok"]))[0].seq is not None


async def test_lifecycle_retry_budget_dead_retry_prune_and_rebuild(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend()
    acc = await backend.accept(incoming(["a", "b"], body=b'{"k":1}'))
    seq = acc.seq
    assert seq is not None

    async def attempt(outcome: Outcome, at: float) -> State | None:
        started = await backend.start([seq], at)
        assert started[0] is not None and started[0].body == b'{"k":1}'
        return await backend.finish(
            seq,
            outcome,
            summary=f"{outcome.value} at {at}",
            duration=0.1,
            output={"stderr": "e"},
            now=at + 1,
            max_attempts=3,
            retry_in=5.0,
        )

    states = [await attempt(Outcome.RETRY, 10.0 + n) for n in range(3)]
    assert states == [State.PENDING, State.PENDING, State.DEAD]
    assert backend.dead_seqs() == [seq]
    detail = backend.detail(seq)
    assert detail is not None and detail.outputs == ({"stderr": "e"},) * 3
    assert detail.record.last_attempt is not None
    assert detail.record.last_attempt.summary == "retry at 12.0; max_attempts (3) reached"
    assert await backend.retry(seq, 20.0) == "queued"
    assert backend.dead_seqs() == []
    assert backend.due(20.0, 10, set()) == ([seq], None)
    assert await attempt(Outcome.SUCCESS, 21.0) == State.DONE
    assert backend.due(30.0, 10, set()) == ([], None)
    assert (await backend.retry(seq, 23.0)).startswith("already imported")
    assert await backend.prune(cutoff=1e12, now=24.0) == 1
    detail = backend.detail(seq)
    assert detail is not None and detail.body is None and detail.record.body_pruned_at == 24.0
    before = backend.flows(["a", "b", "c"])
    assert [f.seq for f in before] == [seq, seq, None]
    if isinstance(backend, LmdbBackend):  # PostgreSQL's claims are a primary key: no rebuild
        assert backend.rebuild_index() == 2
        assert backend.flows(["a", "b", "c"]) == before


async def test_purge_drops_bodies_and_outputs_never_flow_ids(make_backend: MakeBackend) -> None:
    backend = make_backend()
    done = (await backend.accept(incoming(["a"], body=b"1"))).seq
    dead = (await backend.accept(incoming(["b"], body=b"2"))).seq
    assert done is not None and dead is not None
    for seq, outcome in ((done, Outcome.SUCCESS), (dead, Outcome.DEAD)):
        await backend.start([seq], 1.0e9 + 1)
        await backend.finish(
            seq, outcome, summary="x", duration=0, output={"o": "x"}, now=1e9 + 2,
            max_attempts=3, retry_in=0,
        )  # fmt: skip
    assert await backend.purge(cutoff=2e9, include_dead=False, now=5.0) == 1
    assert await backend.purge(cutoff=2e9, include_dead=False, now=6.0) == 0  # once
    kept, gone = backend.detail(dead), backend.detail(done)
    assert gone is not None and gone.body is None and gone.outputs == (None,)
    assert kept is not None and kept.body == b"2"
    assert await backend.purge(cutoff=2e9, include_dead=True, now=7.0) == 1
    assert await backend.retry(dead, 8.0) == "body purged; cannot be retried"
    assert [f.seq for f in backend.flows(["a", "b"])] == [done, dead]


def test_server_and_maintenance_exclude_each_other(tmp_path: Path) -> None:
    # One process may open an LMDB environment once, so the second holder is the same Store
    # through a second lock-file descriptor: flock treats it as another holder, as it does a
    # second process (tests/e2e/test_importer.py runs rebuild-index beside a real server).
    server = LmdbBackend(tmp_path, serving=True)
    try:
        with server.maintenance():
            raise AssertionError("rebuild-index ran beside a server")
    except StoreLocked as e:
        assert "the server is running on this store" in str(e)
    server.close()
    with server.maintenance():
        try:
            with server.store.locked(exclusive=False):
                raise AssertionError("a server started during rebuild-index")
        except StoreLocked as e:
            assert "maintenance command" in str(e)


async def test_crash_recovery_returns_importing_to_pending_as_rerun(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend()
    seq = (await backend.accept(incoming(["a"]))).seq
    assert seq is not None
    await backend.start([seq], 5.0)
    backend.close()
    backend = make_backend()  # the same appliance, started again
    assert await backend.recover_imports(6.0) == [seq]
    rec = backend.records()[0]
    assert (rec.state, rec.reruns, rec.next_at) == (State.PENDING, 1, 6.0)
    assert rec.attempts[0].outcome is Outcome.INTERRUPTED
    assert await backend.recover_imports(7.0) == []


def test_index_catches_up_after_a_crash_between_the_two_commits(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    flowindex.recover(inbox)
    store.write(lambda t: accept_txn(inbox, t, incoming(["a", "b"])))
    second = store.write(lambda t: accept_txn(inbox, t, incoming(["c"])))
    assert second.seq == 2

    # The inbox commit of delivery 2 landed; its index commit did not (process killed between).
    def lose_index_commit(t: object) -> None:
        t.delete(store.index_keyer("c"), db=store.dbs.flows)  # type: ignore[attr-defined]
        t.put(b"applied_seq", seq_key(1), db=store.dbs.index_meta)  # type: ignore[attr-defined]

    store.write(lose_index_commit)
    assert store.read(lambda t: flowindex.owners_txn(inbox, t, ["c"]))[0].seq is None
    store.close()
    store = Store(tmp_path)
    inbox = Inbox(store)
    assert flowindex.recover(inbox) == {"rebuilt": False, "replayed_flow_ids": 1}
    assert store.read(lambda t: flowindex.owners_txn(inbox, t, ["c"]))[0].seq == 2


def test_index_left_open_across_a_reboot_is_rebuilt(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    flowindex.recover(inbox)
    store.write(lambda t: accept_txn(inbox, t, incoming(["a", "b"])))
    store.write(lambda t: t.put(b"boot_id", b"another-boot", db=store.dbs.index_meta))
    out = flowindex.recover(inbox)
    assert (out["rebuilt"], out["replayed_flow_ids"]) == (True, 2)
    assert out["reason"] == "the machine restarted while the index was open and not flushed"
    flowindex.mark_clean(inbox)
    store.write(lambda t: t.put(b"boot_id", b"another-boot", db=store.dbs.index_meta))
    assert flowindex.recover(inbox) == {"rebuilt": False, "replayed_flow_ids": 0}  # clean: trusted


def _indexed(tmp_path: Path) -> tuple[Store, Inbox]:
    store = Store(tmp_path)
    inbox = Inbox(store)
    flowindex.recover(inbox)
    for i in range(300):
        store.write(lambda t, i=i: accept_txn(inbox, t, incoming([f"a{i}", f"b{i}"])))
    flowindex.mark_clean(inbox)
    return store, inbox


def test_an_index_that_cannot_be_opened_is_deleted_and_rebuilt(tmp_path: Path) -> None:
    store, _ = _indexed(tmp_path)
    store.close()
    data = tmp_path / "index" / "data.mdb"
    data.write_bytes(random.Random(1).randbytes(data.stat().st_size))  # meta pages included
    store = Store(tmp_path)
    inbox = Inbox(store)
    out = flowindex.recover(inbox)
    assert out["rebuilt"] and out["replayed_flow_ids"] == 600
    assert out["reason"].startswith("could not be opened")
    assert store.read(lambda t: flowindex.owners_txn(inbox, t, ["a7"]))[0].seq == 8


def test_an_index_of_another_store_or_ahead_of_the_inbox_is_rebuilt(tmp_path: Path) -> None:
    store, inbox = _indexed(tmp_path)
    store.write(lambda t: t.put(b"instance", b"0badcafe", db=store.dbs.index_meta))
    assert flowindex.recover(inbox)["reason"] == "the index belongs to another store"
    flowindex.mark_clean(inbox)
    store.write(lambda t: t.put(b"applied_seq", seq_key(10_000), db=store.dbs.index_meta))
    out = flowindex.recover(inbox)
    assert "past the inbox's last seq 300" in out["reason"]
    assert out["replayed_flow_ids"] == 600


def test_rebuild_index_never_reads_the_old_tree(tmp_path: Path) -> None:
    store, inbox = _indexed(tmp_path)
    store.close()
    data = tmp_path / "index" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[2 * 4096 :] = random.Random(2).randbytes(len(raw) - 2 * 4096)  # every page but the metas
    data.write_bytes(bytes(raw))
    store = Store(tmp_path)
    inbox = Inbox(store)
    assert flowindex.rebuild(inbox) == 600
    assert store.read(lambda t: flowindex.owners_txn(inbox, t, ["b299"]))[0].seq == 300
