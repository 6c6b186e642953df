"""intake.py: a delivery claimed in slices, one per commit, on a real LMDB file.

Slices of a few flow ids make every case (interleaving, a failed commit, a crash between
steps, recovery, a rebuilt index) small enough to check id by id."""

from __future__ import annotations

from pathlib import Path

import trio

from appliance import flowindex
from appliance.committer import GroupCommitter
from appliance.errors import StoreFull
from appliance.inbox import Inbox
from appliance.intake import Acceptance, accept_txn
from appliance.payload import Delivery
from appliance.record import InboxSummary, Incoming, Record, State
from appliance.store import Store


def incoming(flows: list[str], run: str = "r") -> Incoming:
    return Incoming(Delivery(tuple(flows), run, "g", 0), b'{"body": 1}', 1.0e9, want_owners=True)


def run_steps(store: Store, op: Acceptance, limit: int = 10_000) -> int:
    """Step `op` one commit at a time until it is over; returns the number of commits."""
    for n in range(1, limit):
        if op.committed(store.write_batch([op.step])[0]):
            return n
    raise AssertionError("never finished")


def records(store: Store, inbox: Inbox, limit: int = 50) -> list[Record]:
    """Every record, newest first (at most `limit`)."""
    return store.read(lambda txn: inbox.records_txn(txn, None, limit, True))


def summary(store: Store, inbox: Inbox) -> InboxSummary:
    return store.read(lambda txn: inbox.summary_txn(txn, size_bytes=0))


def owners(store: Store, inbox: Inbox, ids: list[str]) -> dict[str, int | None]:
    found = store.read(lambda txn: flowindex.owners_txn(inbox, txn, ids))
    return {o.flow_id: o.seq for o in found}


def test_a_big_delivery_takes_one_commit_per_slice_and_then_one_to_finish(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    ids = [f"f{i}" for i in range(10)]
    op = Acceptance(inbox, incoming(ids), slice_ids=3)
    assert run_steps(store, op) == 5  # 4 slices of claims, 1 finish that claims nothing
    assert op.result is not None and (op.result.status, op.result.new) == ("accepted", 10)
    rec = records(store, inbox)[0]
    assert rec.state is State.PENDING and rec.flows == tuple(ids)
    counts = summary(store, inbox)
    assert counts.receiving == 0 and counts.pending == 1
    retry = Acceptance(inbox, incoming(ids), slice_ids=3)
    assert run_steps(store, retry) == 4  # probes only; duplicate when the last one is seen
    assert retry.result is not None and retry.result.status == "duplicate"
    assert retry.result.owners == {op.result.seq}
    assert summary(store, inbox).total == 1


def test_a_small_delivery_is_one_commit_as_before(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    op = Acceptance(inbox, incoming(["a", "b"]), slice_ids=3)
    assert run_steps(store, op) == 1
    assert records(store, inbox)[0].state is State.PENDING


def test_a_delivery_overlapping_two_earlier_ones_claims_exactly_the_rest(tmp_path: Path) -> None:
    """A slice claimed in one putmulti: when some ids are taken, each is read back, and only
    those that now hold the new seq are the delivery's; the others name their owners."""
    for slice_ids in (3, 1000):  # claimed in slices, and in one step
        store = Store(tmp_path / str(slice_ids))
        inbox = Inbox(store)
        first = accept_txn_once(store, inbox, ["a", "b", "c"])
        second = accept_txn_once(store, inbox, ["x", "y"])
        ids = ["n1", "a", "n2", "y", "n3", "c", "n4"]
        op = Acceptance(inbox, incoming(ids), slice_ids=slice_ids)
        run_steps(store, op)
        assert op.result is not None and op.result.status == "accepted"
        assert (op.result.new, op.result.duplicate) == (4, 3)
        assert op.result.owners == {first, second}
        assert records(store, inbox)[0].flows == ("n1", "n2", "n3", "n4")
        mine = op.result.seq
        assert owners(store, inbox, ids) == {
            "n1": mine, "a": first, "n2": mine, "y": second, "n3": mine, "c": first, "n4": mine
        }  # fmt: skip


def accept_txn_once(store: Store, inbox: Inbox, ids: list[str]) -> int:
    result = store.write_batch([lambda txn: accept_txn(inbox, txn, incoming(ids))])[0]
    assert result.status == "accepted" and result.seq is not None
    return int(result.seq)


def test_interleaved_deliveries_claim_each_flow_id_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    big = [f"f{i}" for i in range(20)]
    op = Acceptance(inbox, incoming(big), slice_ids=4)
    small_results = []
    done = False
    i = 0
    while not done:
        # Every commit: one step of the big delivery, then a small one sharing two of its ids
        # (one it has claimed, one it has not reached yet).
        small = incoming([big[i % 20], big[19 - i % 20], f"s{i}"])
        results = store.write_batch([op.step, lambda t, s=small: accept_txn(inbox, t, s)])
        done = op.committed(results[0])
        small_results.append(results[1])
        i += 1
    claimed: dict[str, int] = {}
    for rec in records(store, inbox, limit=1000):
        for fid in rec.flows:
            assert fid not in claimed, fid
            claimed[fid] = rec.seq
    assert set(claimed) >= set(big)
    assert owners(store, inbox, list(claimed)) == claimed  # the index agrees with the records
    assert op.result is not None
    assert op.result.new + sum(r.new for r in small_results) == len(claimed)


def test_a_failed_step_answers_at_once_and_finishes_with_what_was_claimed(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    ids = [f"f{i}" for i in range(10)]
    op = Acceptance(inbox, incoming(ids), slice_ids=3)
    for _ in range(2):
        assert not op.committed(store.write_batch([op.step])[0])
    # The third commit fails (a full disk, say): its claims never happened.
    assert op.failed(StoreFull("disk full")) is True
    assert op.committed(store.write_batch([op.step])[0])  # the finish step
    assert op.result is not None and op.result.new == 6
    assert records(store, inbox)[0].flows == tuple(ids[:6])
    # CoinTracker's retry claims the rest as a new delivery: every id once.
    again = store.write(lambda t: accept_txn(inbox, t, incoming(ids)))
    assert (again.status, again.new, again.duplicate) == ("accepted", 4, 6)


def test_nothing_committed_means_nothing_left_behind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    op = Acceptance(inbox, incoming(["a", "b", "c", "d"]), slice_ids=2)
    assert op.failed(StoreFull("disk full")) is False  # the first step never committed
    assert summary(store, inbox).total == 0


def test_recovery_finishes_a_delivery_cut_by_a_crash_and_rebuild_agrees(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    flowindex.recover(inbox)
    ids = [f"f{i}" for i in range(10)]
    op = Acceptance(inbox, incoming(ids), slice_ids=3)
    for _ in range(2):
        op.committed(store.write_batch([op.step])[0])
    later = store.write(lambda t: accept_txn(inbox, t, incoming(["f8", "x"])))  # beyond it
    assert summary(store, inbox).receiving == 1
    store.close()  # the server died here; its sender got no answer

    store = Store(tmp_path)
    inbox = Inbox(store)
    out = flowindex.recover(inbox)
    assert out["finished_receiving"] == 1
    recs = {r.seq: r for r in records(store, inbox)}
    assert op.seq is not None and later.seq is not None
    assert recs[op.seq].state is State.PENDING and recs[op.seq].flows == tuple(ids[:6])
    assert recs[later.seq].flows == ("f8", "x")
    before = owners(store, inbox, [*ids, "x"])
    flowindex.rebuild(inbox)
    assert owners(store, inbox, [*ids, "x"]) == before
    assert before["f9"] is None and before["f8"] == later.seq


async def test_group_commit_interleaves_small_deliveries_with_a_big_one(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    committer = GroupCommitter(store)
    ids = [f"f{i}" for i in range(40)]
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)

        async def big() -> None:
            result = await committer.submit_steps(Acceptance(inbox, incoming(ids), slice_ids=4))
            order.append(f"big:{result.new}")

        async def small(n: int) -> None:
            await trio.lowlevel.checkpoint()
            result = await committer.submit(lambda t: accept_txn(inbox, t, incoming([f"s{n}"])))
            order.append(f"small:{result.new}")

        async with trio.open_nursery() as n:
            n.start_soon(big)
            for i in range(3):
                n.start_soon(small, i)
        committer.close()
    assert order[-1] == "big:40" and order.count("small:1") == 3  # the small ones did not wait
    assert committer.commits >= 11
