"""Writes tests/snapshots/store-f601ff2.json: a store in every state, written by the first
release (commit f601ff2), dumped database by database. Run it with that code on the path:

    git worktree add /tmp/old f601ff2
    cd /tmp/old && PYTHONPATH=. python /path/to/make_store_f601ff2.py /tmp/legacy-store OUT.json

tests/test_legacy_store.py loads the dump into a fresh LMDB file and opens it with the current code.
This script imports the first release's API (Transitions, accept_txn of dict records) on purpose.
"""

# ruff: noqa
import base64, json, sys, time
from pathlib import Path
from appliance.store import Store, DB_NAMES, INDEX_DB_NAMES
from appliance.inbox import Inbox, Incoming
from appliance.intake import accept_txn, Acceptance
from appliance.lifecycle import Transitions
from appliance.payload import Delivery
from appliance import flowindex

path = Path(sys.argv[1])
out = sys.argv[2]
store = Store(path)
ib = Inbox(store)
tr = Transitions(ib)
flowindex.recover(ib)
T = 1_790_000_000.0


def inc(ids, run="run-1", body=None, t=T):
    uniq = tuple(dict.fromkeys(ids))
    b = (
        body
        or json.dumps(
            {"flow_ids": ids, "cost_basis_run_id": run, "ghost_user_id": "ghost-1"}
        ).encode()
    )
    return Incoming(Delivery(uniq, run, "ghost-1", len(ids) - len(uniq)), b, t)


def acc(ids, **kw):
    return store.write(lambda t: accept_txn(ib, t, inc(ids, **kw)))


def fin(seq, outcome, now, summary, max_attempts=3, retry_in=30.0):
    return store.write(
        lambda t: tr.finish_txn(
            t,
            seq,
            outcome=outcome,
            summary=summary,
            duration=0.25,
            output={"stdout": "out " + summary, "stderr": "err"},
            now=now,
            max_attempts=max_attempts,
            retry_in=retry_in,
        )
    )


# 1 pending, never attempted
p = acc(["p1", "p2", "p2"], t=T)
# 2 done after a retry
d = acc(["d1", "d2"], t=T + 1).seq
store.write(lambda t: tr.start_txn(t, d, T + 2))
fin(d, "retry", T + 3, "exit 1")
store.write(lambda t: tr.start_txn(t, d, T + 40))
fin(d, "success", T + 41, "exit 0")
# 3 dead by max attempts, then operator retry, then dead again by exit 65
x = acc(["x1"], run="run-2", t=T + 5).seq
for n in range(2):
    store.write(lambda t, n=n: tr.start_txn(t, x, T + 6 + n))
    fin(x, "retry", T + 6.5 + n, "exit 3", max_attempts=2, retry_in=0)
store.write(lambda t: tr.retry_txn(t, x, T + 20))
store.write(lambda t: tr.start_txn(t, x, T + 21))
fin(x, "dead", T + 22, "exit 65 (EX_DATAERR: permanent)")
# 4 importing when the "crash" happened, with an earlier interruption
i = acc(["i1", "i2", "i3"], t=T + 8).seq
store.write(lambda t: tr.start_txn(t, i, T + 9))
store.write(lambda t: tr.interrupt_txn(t, i, T + 10, "interrupted: appliance stopping"))
store.write(lambda t: tr.start_txn(t, i, T + 11))
# 5 duplicate page (no record)
acc(["p1", "d1"], t=T + 12)
# 6 done and pruned; 7 done and purged
pr = acc(["r1"], t=T + 13).seq
store.write(lambda t: tr.start_txn(t, pr, T + 14))
fin(pr, "success", T + 15, "exit 0")
store.write(lambda t: tr.prune_txn(t, T + 16))
pu = acc(["u1"], t=T + 17).seq
store.write(lambda t: tr.start_txn(t, pu, T + 18))
fin(pu, "success", T + 19, "exit 0")
store.write(lambda t: tr.purge_txn(t, T + 17.5, False))
# 8 pending with a backoff in the future
b = acc(["b1"], t=T + 30).seq
store.write(lambda t: tr.start_txn(t, b, T + 31))
fin(b, "retry", T + 32, "HTTP 503", retry_in=9e9)
# 9 receiving: a big delivery cut short after one committed part
item = inc([f"g{n}" for n in range(10)] + ["p1"], t=T + 50)
op = Acceptance(ib, item, slice_ids=4)
step = store.write(op.step)
op.committed(step)
step = store.write(op.step)
op.committed(step)
store.write(lambda t: tr.set_paused_txn(t, True, "cli (uid 0)"))
dump = {}
for name in DB_NAMES + INDEX_DB_NAMES:
    db = getattr(store.dbs, name)
    dump[name] = store.read(
        lambda t, db=db: [
            [base64.b64encode(bytes(k)).decode(), base64.b64encode(bytes(v)).decode()]
            for k, v in t.cursor(db=db)
        ]
    )

Path(out).write_text(json.dumps({"written_by": "f601ff2", "databases": dump}, indent=0) + "\n")
print("seqs", p.seq, d, x, i, pr, pu, b, op.seq)
