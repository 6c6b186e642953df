"""store.py + inbox.py + lifecycle.py on a real LMDB file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import trio

from appliance import flowindex
from appliance.committer import GroupCommitter
from appliance.inbox import Inbox, Incoming, flow_key, seq_key
from appliance.intake import accept_txn
from appliance.lifecycle import Transitions
from appliance.payload import Delivery
from appliance.store import Store


def incoming(flows: list[str], run: str = "r", body: bytes = b"{}") -> Incoming:
    unique = tuple(dict.fromkeys(flows))
    return Incoming(Delivery(unique, run, "g", len(flows) - len(unique)), body, 1.0e9)


def test_claims_are_exact_and_duplicates_store_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    a = store.write(lambda t: accept_txn(inbox, t, incoming(["x", "y"])))
    b = store.write(lambda t: accept_txn(inbox, t, incoming(["y", "z"])))
    c = store.write(lambda t: accept_txn(inbox, t, incoming(["x", "z"])))
    assert (a.status, a.new, b.status, b.new, b.duplicate) == ("accepted", 2, "accepted", 1, 1)
    assert c.status == "duplicate" and c.delivery_id is None
    assert [r["flows"] for r in inbox.records(newest_first=False)] == [["x", "y"], ["z"]]
    run = inbox.run("r")
    assert run is not None and (run["pages"], run["flows_new"], run["flows_duplicate"]) == (3, 3, 3)


def test_flow_ids_longer_than_the_key_limit_are_stored_by_digest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    long_id = "L" * 100_000
    assert len(flow_key(long_id)) == 33
    first = store.write(lambda t: accept_txn(inbox, t, incoming([long_id, long_id + "2"])))
    again = store.write(lambda t: accept_txn(inbox, t, incoming([long_id])))
    assert first.new == 2 and again.status == "duplicate"
    assert inbox.flows([long_id])[0]["known"] is True


def test_map_grows_by_itself(tmp_path: Path) -> None:
    store = Store(tmp_path, initial_map_bytes=1 << 20)
    inbox = Inbox(store)
    body = b"x" * 20_000
    for i in range(200):  # ~4 MB of bodies into a 1 MiB map
        store.write(lambda t, i=i: accept_txn(inbox, t, incoming([f"g{i}"], body=body)))
    assert store.env.info()["map_size"] > 1 << 20
    assert inbox.counts()["total"] == 200


async def test_group_commit_shares_commits_and_claims_exactly(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    committer = GroupCommitter(store)
    rng = random.Random(3)
    pool = [f"f{i}" for i in range(300)]
    bodies = [rng.sample(pool, 20) for _ in range(400)]
    results = []
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)

        async def one(flows: list[str]) -> None:
            item = incoming(flows)
            results.append(await committer.submit(lambda t: accept_txn(inbox, t, item)))

        async with trio.open_nursery() as senders:
            for flows in bodies:
                senders.start_soon(one, flows)
        committer.close()
    assert committer.operations == 400
    assert committer.commits < 100, committer.commits  # batched, not one commit per request
    claimed: dict[str, int] = {}
    for rec in inbox.records(limit=1000):
        for f in rec["flows"]:
            assert f not in claimed
            claimed[f] = rec["seq"]
    assert set(claimed) == {f for b in bodies for f in b}
    assert sum(r.new for r in results) == len(claimed)


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
    assert inbox.flows(["ok"])[0]["known"]


def test_lifecycle_retry_budget_dead_retry_prune_and_rebuild(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    tr = Transitions(inbox)
    acc = store.write(lambda t: accept_txn(inbox, t, incoming(["a", "b"], body=b'{"k":1}')))
    seq = acc.seq
    assert seq is not None
    for n in range(3):
        started = store.write(lambda t, n=n: tr.start_txn(t, seq, 10.0 + n))
        assert started is not None and started[1] == b'{"k":1}'
        state = store.write(
            lambda t, n=n: tr.finish_txn(
                t,
                seq,
                outcome="retry",
                summary="exit 1",
                duration=0.1,
                output={"stderr": "e"},
                now=11.0 + n,
                max_attempts=3,
                retry_in=5.0,
            )
        )
    assert state == "dead"
    assert store.write(lambda t: tr.retry_txn(t, seq, 20.0)) == "queued"
    assert store.read(lambda t: tr.ready_txn(t, 20.0, 10, set()))[0] == [seq]
    store.write(lambda t: tr.start_txn(t, seq, 21.0))
    state = store.write(
        lambda t: tr.finish_txn(
            t,
            seq,
            outcome="success",
            summary="exit 0",
            duration=0.1,
            output={},
            now=22.0,
            max_attempts=3,
            retry_in=0,
        )
    )
    assert state == "done"
    assert store.write(lambda t: tr.retry_txn(t, seq, 23.0)).startswith("already imported")
    assert store.write(lambda t: tr.prune_txn(t, cutoff=1e12)) == 1
    assert store.read(lambda t: inbox.body_txn(t, seq)) is None
    before = inbox.flows(["a", "b", "c"])
    assert flowindex.rebuild(inbox) == 2
    assert inbox.flows(["a", "b", "c"]) == before


def test_crash_recovery_returns_importing_to_pending_as_rerun(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    tr = Transitions(inbox)
    seq = store.write(lambda t: accept_txn(inbox, t, incoming(["a"]))).seq
    assert seq is not None
    store.write(lambda t: tr.start_txn(t, seq, 5.0))
    store.close()
    store = Store(tmp_path)
    inbox = Inbox(store)
    tr = Transitions(inbox)
    assert store.write(lambda t: tr.recover_txn(t, 6.0)) == [seq]
    rec = store.read(lambda t: inbox.record_txn(t, seq))
    assert rec is not None and rec["state"] == "pending" and rec["reruns"] == 1
    assert json.loads(json.dumps(rec))["attempts"][0]["outcome"] == "interrupted"


def test_index_catches_up_after_a_crash_between_the_two_commits(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    flowindex.recover(inbox)
    store.write(lambda t: accept_txn(inbox, t, incoming(["a", "b"])))
    second = store.write(lambda t: accept_txn(inbox, t, incoming(["c"])))
    assert second.seq == 2

    # The inbox commit of delivery 2 landed; its index commit did not (process killed between).
    def lose_index_commit(t: object) -> None:
        from appliance.inbox import flow_key, seq_key

        t.delete(flow_key("c"), db=store.dbs.flows)  # type: ignore[attr-defined]
        t.put(b"applied_seq", seq_key(1), db=store.dbs.index_meta)  # type: ignore[attr-defined]

    store.write(lose_index_commit)
    assert inbox.flows(["c"])[0]["known"] is False
    store.close()
    store = Store(tmp_path)
    inbox = Inbox(store)
    assert flowindex.recover(inbox) == {"rebuilt": False, "replayed_flow_ids": 1}
    assert inbox.flows(["c"])[0]["delivery_id"] == inbox.delivery_id_of(2)


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
    assert inbox.flows(["a7"])[0]["delivery_id"] == inbox.delivery_id_of(8)


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
    assert inbox.flows(["b299"])[0]["delivery_id"] == inbox.delivery_id_of(300)
