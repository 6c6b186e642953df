"""The flow index is exact whatever its hash keys do (flowindex.py, invariants I1-I3).

A property test against a model: random deliveries over a small alphabet of flow ids (so they
overlap), each claimed in slices of 1-4 ids, their steps interleaved across commits the way the
group commit interleaves them, on a store whose index key function has two bits: nearly every
claim collides, so the record checks and `flows_exact` carry the answers. Every answer, every
record's flow ids and every owner must match the model, and so must a rebuilt index (with the
same colliding keys, and with the real seeded hash).
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import flowindex
from appliance.inbox import Inbox
from appliance.intake import Acceptance, accept_txn
from appliance.payload import Delivery
from appliance.record import Incoming
from appliance.store import Store

# Plain ASCII ids (found in the record's bytes) and ids with a quote, a backslash, a non-ASCII
# letter (checked against the decoded record), with JSON's delimiters among them.
FLOW_IDS = st.text(alphabet='ab:"\\é,]', min_size=1, max_size=3)
DELIVERIES = st.lists(st.lists(FLOW_IDS, max_size=10, unique=True), min_size=1, max_size=10)


def two_bit_key(flow_id: str) -> bytes:
    return (zlib.crc32(flow_id.encode()) % 4).to_bytes(8, "little")


class Model:
    """Which delivery claimed each flow id, computed the way spec §5 says."""

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}  # flow id -> delivery number
        self.claimed: dict[int, list[str]] = {}
        self.has_seq: set[int] = set()

    def step(self, n: int, ids: list[str]) -> None:
        """Delivery n's step over the slice `ids`: until it takes a seq it only looks."""
        for fid in ids:
            if n not in self.has_seq:
                if fid in self.owner:
                    continue
                self.has_seq.add(n)
            if fid not in self.owner:
                self.owner[fid] = n
                self.claimed.setdefault(n, []).append(fid)


def incoming(ids: list[str]) -> Incoming:
    return Incoming(Delivery(tuple(ids), "run", "ghost", 0), b"{}", 1e9, want_owners=True)


def owners(store: Store, inbox: Inbox, ids: list[str]) -> dict[str, int | None]:
    found = store.read(lambda txn: flowindex.owners_txn(inbox, txn, ids))
    return {o.flow_id: o.seq for o in found}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries=DELIVERIES, data=st.data())
def test_answers_stay_exact_when_every_key_collides(
    deliveries: list[list[str]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        store = Store(path, index_keyer=two_bit_key)
        inbox = Inbox(store)
        flowindex.recover(inbox)
        model = Model()
        ops: dict[int, Acceptance] = {}
        for n, ids in enumerate(deliveries):
            item = Incoming(Delivery(tuple(ids), "run", "ghost", 0), b"{}", 1e9, want_owners=True)
            ops[n] = Acceptance(inbox, item, slice_ids=data.draw(st.integers(1, 4)))
        active = list(ops)
        while active:
            n = data.draw(st.sampled_from(active))
            op = ops[n]
            pos, finishing = op.pos, bool(op.parts) and op.pos >= len(op.ids)
            if not finishing:
                model.step(n, list(op.ids[pos : pos + op.slice]))
            step = store.write_batch([op.step])[0]
            if op.committed(step):
                active.remove(n)

        seq_of = {n: op.result.seq for n, op in ops.items() if op.result and op.result.seq}
        for n, op in ops.items():
            assert op.result is not None
            want = model.claimed.get(n, [])
            assert op.result.new == len(want), (n, deliveries[n], want)
            assert op.result.status == ("accepted" if want else "duplicate")
            if want:
                assert op.result.seq is not None
                rec = store.read(lambda txn, s=op.result.seq: inbox.load_txn(txn, s))
                assert rec is not None and list(rec.flows) == want
            dups = {seq_of[model.owner[f]] for f in op.ids if f not in want}
            assert op.result.owners == frozenset(dups)

        every = sorted(model.owner)
        expected = {fid: seq_of[model.owner[fid]] for fid in every}
        assert owners(store, inbox, every) == expected
        assert owners(store, inbox, ["never-sent"]) == {"never-sent": None}

        flowindex.rebuild(inbox)  # the same colliding keys, replayed from the inbox
        assert owners(store, inbox, every) == expected
        store.close()

        store = Store(path)  # the real seeded hash: another index, the same answers
        inbox = Inbox(store)
        flowindex.rebuild(inbox)
        assert owners(store, inbox, every) == expected
        store.close()


def test_a_collision_with_an_earlier_slice_of_the_same_delivery_is_not_new(
    tmp_path: Path,
) -> None:
    """Delivery A takes key K for "a" in its first slice; B claims "b" (also key K) through
    flows_exact; A's second slice holds "b": K is A's own, and "b" is still B's."""
    store = Store(tmp_path, index_keyer=lambda fid: b"\x00" * 8)  # one key for every id
    inbox = Inbox(store)
    flowindex.recover(inbox)
    item_a = Incoming(Delivery(("a", "b"), "run", "g", 0), b"{}", 1e9)
    item_b = Incoming(Delivery(("b",), "run", "g", 0), b"{}", 1e9)
    a, b = Acceptance(inbox, item_a, slice_ids=1), Acceptance(inbox, item_b)
    assert not a.committed(store.write_batch([a.step])[0])  # "a" claimed, K -> A
    assert b.committed(store.write_batch([b.step])[0])  # "b": K held by A, which lacks it
    while not a.committed(store.write_batch([a.step])[0]):
        pass
    assert b.result is not None and b.result.new == 1
    assert a.result is not None and (a.result.new, a.result.duplicate) == (1, 1)
    assert owners(store, inbox, ["a", "b"]) == {"a": a.result.seq, "b": b.result.seq}


@pytest.mark.parametrize(
    "earlier,later",
    [
        ([",,", "]"], ","),  # '","' sits between the two elements of the earlier record
        (["x:", "y"], ":"),
        (["q", '"'], "q"),  # a real element next to an escaped quote: found
        (['a\\"', "b"], "a"),
        (["é", "e"], "é"),
        (["run-1"], "run"),
    ],
)
def test_an_id_is_never_found_inside_another_record_s_syntax(
    tmp_path: Path, earlier: list[str], later: str
) -> None:
    """With one hash key for every id, each answer rests on the record check alone."""
    store = Store(tmp_path, index_keyer=lambda fid: b"\x00" * 8)
    inbox = Inbox(store)
    flowindex.recover(inbox)
    first = store.write(lambda t: accept_txn(inbox, t, incoming(earlier)))
    again = store.write(lambda t: accept_txn(inbox, t, incoming([later])))
    held = later in earlier
    assert (again.status, again.new) == (("duplicate", 0) if held else ("accepted", 1))
    assert owners(store, inbox, [later]) == {later: first.seq if held else again.seq}
