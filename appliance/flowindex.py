"""The flow-id index: a compact hash-keyed B-tree, exact through the inbox, derived from it.

Layout (index environment, store.py; the choice and its measurements: docs/INDEX.md)
------------------------------------------------------------------------------------
    flows        8-byte key (XXH3-64 of the flow id, seeded per index; LMDB `integerkey`)
                 -> 6-byte seq of the delivery that claimed the first flow id with that key
    flows_exact  flow key (inbox.flow_key: the whole id) -> 8-byte seq; only for a flow id
                 whose hash key was already held by a delivery that does not hold that id
                 (a true 64-bit collision: about one in 4,000 stores at 100 M flow ids)
    index_meta   applied_seq, boot_id, clean, instance (recovery, below), hash_seed, format

A node of `flows` is 24 bytes; leaves filled in random order stay ~68 % full, so the index
costs ~35 bytes per flow id on disk (the old layout, `'=' + id` -> 8-byte seq: ~116).

Invariants
----------
I1. A delivery's claimed flow ids are exactly its record's `flows`, plus its parts while it is
    `receiving` (`Lookup.holds`). Records are never deleted, and their flows never change
    once the record is not `receiving`.
I2. A flow id F is claimed by delivery S iff either `flows[key(F)]` = S and F is among S's
    claimed ids, or `flows_exact[F]` = S. `flows_exact[F]` exists only when `flows[key(F)]`
    is held by a delivery that did not claim F.
I3. Entries are only ever added (`overwrite=False`), by the one writer, in the transaction that
    stores the claiming delivery (or its part): a hash key's holder never changes.
From I1-I3, `Lookup.owner` is exact: a key that is absent means a new id; a key held by S is
checked against S's claimed ids (read from the inbox, in the same transaction); a mismatch
falls back to `flows_exact`. A collision costs one record read, never a wrong answer.

The claim (`Lookup.claim`, one `putmulti(overwrite=False)` per slice): when every key was
added, every id was new (the usual delivery). Otherwise each id is looked at again: its key
held by another delivery -> checked as above (duplicate, or new through `flows_exact`); held
by this delivery -> new, unless `flows_exact` already gives it to another delivery (its key was
taken by an earlier slice of this same delivery after that other claim).

Recovery (derived state)
------------------------
The index lives in its own LMDB environment, written without fsync (store.py, "Two
environments"). Everything in it can be re-derived by replaying the records in seq order and
the parts of deliveries still `receiving`; the replay applies the same claim rule, so a rebuilt
index answers exactly as the old one did (its hash seed, and so its collisions, may differ).
`index_meta` says how far it got:

    applied_seq   every record up to this seq is in the index
    instance      the inbox instance it was built from
    boot_id       the boot during which it was last open
    clean         "1" once a clean stop flushed it

At server start (`recover`), before anything is accepted:
* trusted when it is empty, was closed cleanly, or was open during this same boot (a kill -9
  loses no page of it: they are in the page cache), AND it is consistent with the inbox: its
  format is this release's, its instance is this inbox's, its applied_seq is not past the
  inbox's last seq, and its tree can be read at both ends. Then it is caught up: records after
  applied_seq and every part are replayed (idempotent).
* otherwise (a reboot while it was open and unflushed, an index that cannot be opened or read,
  one from another store or an older release) its files are deleted and it is rebuilt from the
  inbox. It is never `drop()`ped: dropping walks every page of a tree that may be garbage.
The replay commits every `REPLAY_FLOWS` flow ids (a rebuild that grows the map loses one chunk,
not all of it) and logs its progress every few seconds, and how long it took once done.
`rebuild` (the `rebuild-index` command, server stopped) is the same rebuild on demand.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lmdb

from .errors import StoreError, StoreFull
from .inbox import Inbox, flow_key, key_seq, seq_key
from .record import FlowOwner, decode_claimed, decode_flows
from .store import INDEX_FORMAT, Txn

log = logging.getLogger("ct_appliance.index")

PROGRESS_EVERY_SECONDS = 5.0
REPLAY_FLOWS = 2_000  # per replay transaction: its copied-on-write pages need room in the map
VALUE_BYTES = 6


def owner_value(seq: int) -> bytes:
    return seq.to_bytes(VALUE_BYTES, "big")


def value_owner(raw: bytes | memoryview) -> int:
    return int.from_bytes(raw, "big")


class Lookup:
    """Exact lookups and claims inside one write (or read) transaction.

    `holds(seq, flow_id)` answers from:
    * for a delivery still `receiving` in this process: `inbox.receiving`, the ids its
      committed steps claimed (intake.py keeps it before the writer's next transaction), plus
      `txn.claims`, those claimed in this transaction;
    * otherwise its record, read once per Lookup. A flow id of printable ASCII that is never
      JSON syntax (a UUID, say) has one JSON form in every encoder this store has used, and
      its quoted form can only sit between `[` or `,` and `,` or `]` as a string element of an
      array: inside a string a quote is escaped, the text between two quotes that are not one
      string's is JSON syntax, and `flows` is the record's only array of strings. So it is found in the
      record's bytes at memchr speed, each search starting where the last one in that record
      ended: a retry of a 400,000-id delivery (its ids in its record's order) costs one pass
      over the record per transaction, not a decode per lookup. Any other id is checked
      against the decoded record, once per Lookup;
    * for a record still `receiving` that this process is not accepting (recovery after a
      crash): its parts, read and decoded once per Lookup."""

    __slots__ = ("inbox", "txn", "itxn", "flows", "exact", "key", "records", "decoded", "hints")

    def __init__(self, inbox: Inbox, txn: Txn):
        self.inbox, self.txn = inbox, txn
        self.itxn = txn.index
        self.flows, self.exact = inbox.dbs.flows, inbox.dbs.flows_exact
        self.key = inbox.store.index_keyer
        self.records: dict[int, bytes | None] = {}
        self.decoded: dict[int, set[str]] = {}
        self.hints: dict[int, int] = {}  # seq -> where the last id found in its record ended

    def holds(self, seq: int, flow_id: str) -> bool:
        """Whether delivery `seq` claimed `flow_id` (I1), as this transaction sees it."""
        live = self.inbox.receiving.get(seq)
        if live is not None:
            return flow_id in live or flow_id in self.txn.claims.get(seq, ())
        decoded = self.decoded.get(seq)
        if decoded is not None:
            return flow_id in decoded
        if seq in self.records:
            raw = self.records[seq]
        else:
            raw = self.records[seq] = self.txn.get(seq_key(seq), db=self.inbox.dbs.deliveries)
        if raw is None:
            return False
        if not _receiving(raw):
            if _PLAIN.fullmatch(flow_id):
                end = _listed(raw, flow_id.encode(), self.hints.get(seq, 0))
                if end < 0:
                    return False
                self.hints[seq] = end
                return True
            decoded = self.decoded[seq] = set(decode_claimed(raw)[0])
            return flow_id in decoded
        flows = set(decode_claimed(raw)[0]).union(self.inbox.parts_of_txn(self.txn, seq))
        decoded = self.decoded[seq] = flows | self.txn.claims.get(seq, set())
        return flow_id in decoded

    def owner(self, flow_id: str) -> int | None:
        """The seq of the delivery that claimed `flow_id`, or None when it is new."""
        raw = self.itxn.get(self.key(flow_id), db=self.flows)
        if raw is None:
            return None
        holder = value_owner(raw)
        if self.holds(holder, flow_id):
            return holder
        raw = self.itxn.get(flow_key(flow_id), db=self.exact)
        return key_seq(raw) if raw is not None else None

    def claim(
        self, seq: int, ids: Sequence[str], want_owners: bool = False
    ) -> tuple[list[str], set[int]]:
        """Claim `ids` (distinct) for delivery `seq`: the ids that were new, and when asked,
        the seqs that already owned the others."""
        keys, value, added = self._add(seq, ids)
        if added == len(keys):
            return list(ids), set()
        new: list[str] = []
        owners: set[int] = set()
        get, flows, exact = self.itxn.get, self.flows, self.exact
        for flow_id, k in zip(ids, keys, strict=True):
            holder = get(k, db=flows)
            if holder == value:
                other = get(flow_key(flow_id), db=exact)
                if other is None:
                    new.append(flow_id)
                elif want_owners:
                    owners.add(key_seq(other))
                continue
            held_by = value_owner(holder)
            if self.holds(held_by, flow_id):
                if want_owners:
                    owners.add(held_by)
                continue
            if self.itxn.put(flow_key(flow_id), seq_key(seq), overwrite=False, db=exact):
                new.append(flow_id)
            elif want_owners:
                owners.add(key_seq(get(flow_key(flow_id), db=exact)))
        return new, owners

    def _add(self, seq: int, ids: Sequence[str]) -> tuple[list[bytes], bytes, int]:
        """One `putmulti(overwrite=False)` of `ids`' keys for `seq`: (keys, value, added)."""
        value = owner_value(seq)
        keys = [self.key(flow_id) for flow_id in ids]
        with self.itxn.cursor(db=self.flows) as cur:
            added: int = cur.putmulti([(k, value) for k in keys], overwrite=False)[1]
        return keys, value, added

    def apply(self, seq: int, ids: Iterable[str]) -> int:
        """Replay: re-apply the claims of delivery `seq` (ids it claimed, per I1). Idempotent;
        returns how many entries were added."""
        ids = list(ids)
        keys, value, added = self._add(seq, ids)
        if added == len(keys):
            return added
        get, flows = self.itxn.get, self.flows
        for flow_id, k in zip(ids, keys, strict=True):
            holder = get(k, db=flows)
            if holder != value and not self.holds(value_owner(holder), flow_id):
                added += self.itxn.put(
                    flow_key(flow_id), seq_key(seq), overwrite=False, db=self.exact
                )
        return added


# Printable ASCII that is never JSON syntax (no quote, backslash, comma, colon, bracket, brace).
_PLAIN = re.compile(r"[A-Za-z0-9 !#$%&'()*+\-./;<=>?@^_`|~]*")
_RECEIVING = b'"state":"receiving"'
_WHITESPACE, _OPENS, _CLOSES = frozenset(b" \t\r\n"), frozenset(b"[,"), frozenset(b",]")


def _receiving(raw: bytes) -> bool:
    """The record's state is `receiving` (its first `"state":"`, unescaped, is the field's)."""
    at = raw.find(b'"state":"')
    return raw.startswith(_RECEIVING, at)


def _listed(raw: bytes, flow_id: bytes, start: int = 0) -> int:
    """Where `flow_id` (plain ASCII) ends as an element of the record's `flows` array, or -1:
    its quoted form between `[` or `,` and `,` or `]`, JSON whitespace allowed around it.
    The search begins at `start` (where the last id found in this record ended: a retry lists
    a big record's ids in its order, so each search is short) and then wraps around."""
    quoted = b'"' + flow_id + b'"'
    for low, high in ((start, len(raw)), (0, min(len(raw), start + len(quoted)))):
        at = raw.find(quoted, low, high)
        while at != -1:
            before, after = at - 1, at + len(quoted)
            while before >= 0 and raw[before] in _WHITESPACE:
                before -= 1
            while after < len(raw) and raw[after] in _WHITESPACE:
                after += 1
            if before >= 0 and after < len(raw):
                if raw[before] in _OPENS and raw[after] in _CLOSES:
                    return at + len(quoted)
            at = raw.find(quoted, at + 1, high)
    return -1


def owners_txn(inbox: Inbox, txn: Txn, flow_ids: Sequence[str]) -> list[FlowOwner]:
    """`flows show`: which delivery claimed each flow id, and that delivery's record."""
    lookup = Lookup(inbox, txn)
    out = []
    for flow_id in flow_ids:
        seq = lookup.owner(flow_id)
        out.append(FlowOwner(flow_id, seq, inbox.load_txn(txn, seq) if seq is not None else None))
    return out


# -- recovery --------------------------------------------------------------------------------
def recover(inbox: Inbox) -> dict[str, Any]:
    """Trust, catch up or rebuild the index; then mark it open. Returns what was done."""
    store, boot = inbox.store, _boot_id()
    why = store.index_reset or _distrust(inbox, boot)
    if why is not None and store.index_reset is None:
        store.reset_index(why)
    started = time.monotonic()
    try:
        out = _recover(inbox, boot, rebuilding=why is not None)
    except StoreFull:
        raise  # the disk, not the index: the caller waits for space
    except StoreError as e:
        if why is not None:
            raise  # a fresh index failed: the inbox itself is in trouble
        # A trusted index that breaks while being caught up (a page of garbage deep in it):
        # rebuild it like any other.
        why = f"unreadable while catching up: {e}"
        store.reset_index(why)
        store.available, store.last_error = True, None
        started = time.monotonic()
        out = _recover(inbox, boot, rebuilding=True)
    if why is not None:
        out["reason"] = why
        out["seconds"] = round(time.monotonic() - started, 2)
        log.warning("flow index rebuilt from the inbox", extra={"fields": dict(out)})
    store.index_reset = None
    store.catch_up_index = lambda: catch_up(inbox)
    return out


def catch_up(inbox: Inbox) -> int:
    """Replay what the index has not applied yet: records past its applied seq, and the parts
    of deliveries still receiving. Idempotent; entries added."""
    added = _replay(inbox, None)
    added += inbox.store.write(lambda txn: _replay_parts_txn(inbox, txn))
    return added


def rebuild(inbox: Inbox) -> int:
    """`rebuild-index`: a new index from the inbox alone; returns the flow ids claimed."""
    inbox.store.reset_index("rebuild-index")
    claimed = _replay(inbox, _progress(inbox))

    def last_txn(txn: Txn) -> int:
        parts = _replay_parts_txn(inbox, txn)
        txn.put(b"instance", inbox.instance.encode(), db=inbox.dbs.index_meta)
        txn.put(b"clean", b"1", db=inbox.dbs.index_meta)  # the store's close flushes it
        return parts

    claimed += inbox.store.write(last_txn)
    inbox.store.index_reset = None
    return claimed


def mark_clean(inbox: Inbox) -> None:
    """At a clean stop, after the last write: the index may be trusted after a reboot."""
    inbox.store.write(lambda txn: txn.put(b"clean", b"1", db=inbox.dbs.index_meta))


def _distrust(inbox: Inbox, boot: str) -> str | None:
    """Why the index cannot be trusted, or None."""
    dbs = inbox.dbs

    def check(txn: Txn) -> str | None:
        meta = dbs.index_meta
        applied_raw = txn.get(b"applied_seq", db=meta)
        if txn.get(b"format", db=meta) != INDEX_FORMAT:
            return "it has the layout of an older release"
        entries = txn.stat(dbs.flows)["entries"]
        if entries == 0 and applied_raw is None:
            return None  # empty: replaying everything is the rebuild
        clean = txn.get(b"clean", db=meta) == b"1"
        last_boot = txn.get(b"boot_id", db=meta)
        if not clean and (last_boot is None or last_boot.decode() != boot):
            return "the machine restarted while the index was open and not flushed"
        instance = txn.get(b"instance", db=meta)
        if instance is not None and instance.decode() != inbox.instance:
            return "the index belongs to another store"
        applied = key_seq(applied_raw) if applied_raw is not None else 0
        with txn.cursor(db=dbs.deliveries) as cur:
            last = key_seq(cur.key()) if cur.last() else 0
        if applied > last:
            return f"the index has applied seq {applied}, past the inbox's last seq {last}"
        with txn.cursor(db=dbs.flows) as cur:  # both ends of the tree must be readable
            for ok in (cur.first(), cur.last()):
                if ok and len(cur.value()) != VALUE_BYTES:
                    return "the index holds a value that is not a seq"
        return None

    try:
        return inbox.store.read(check)
    except (lmdb.Error, UnicodeDecodeError) as e:
        return f"unreadable: {e}"


def _recover(inbox: Inbox, boot: str, *, rebuilding: bool) -> dict[str, Any]:
    claimed = _replay(inbox, _progress(inbox) if rebuilding else None)

    def last_txn(txn: Txn) -> dict[str, Any]:
        meta = inbox.dbs.index_meta
        parts = _replay_parts_txn(inbox, txn)
        finished = inbox.finish_receiving_txn(txn)
        txn.put(b"clean", b"0", db=meta)
        txn.put(b"boot_id", boot.encode(), db=meta)
        txn.put(b"instance", inbox.instance.encode(), db=meta)
        out: dict[str, Any] = {"rebuilt": rebuilding, "replayed_flow_ids": claimed + parts}
        if finished:
            out["finished_receiving"] = finished
        return out

    result: dict[str, Any] = inbox.store.write(last_txn)
    return result


def _replay(inbox: Inbox, progress: Callable[[int], None] | None) -> int:
    """Apply every record newer than the index's applied_seq, `REPLAY_FLOWS` flow ids per
    transaction; returns the index entries added."""
    total = 0
    while True:
        added, more = inbox.store.write(lambda txn: _replay_txn(inbox, txn, progress))
        total += added
        if not more:
            return total


def _replay_txn(inbox: Inbox, txn: Txn, progress: Callable[[int], None] | None) -> tuple[int, bool]:
    """One chunk of the replay: (entries added, whether records are left)."""
    meta = inbox.dbs.index_meta
    raw = txn.get(b"applied_seq", db=meta)
    applied = key_seq(raw) if raw is not None else 0
    lookup, added, flows, last = Lookup(inbox, txn), 0, 0, applied
    for key, value in inbox.iter_records_txn(txn, after=applied):
        ids = decode_flows(value)
        last = key_seq(key)
        added += lookup.apply(last, ids)
        flows += len(ids)
        if progress is not None:
            progress(last)
        if flows >= REPLAY_FLOWS:
            break
    else:
        if last != applied or raw is None:
            txn.put(b"applied_seq", seq_key(last), db=meta)
        return added, False
    txn.put(b"applied_seq", seq_key(last), db=meta)
    return added, True


def _replay_parts_txn(inbox: Inbox, txn: Txn) -> int:
    """Parts of deliveries still receiving may sit below the watermark (intake.py): their
    claims are re-applied every time (idempotent, and there are few of them)."""
    lookup = Lookup(inbox, txn)
    return sum(lookup.apply(seq, ids) for seq, ids in inbox.receiving_txn(txn).items())


def _progress(inbox: Inbox) -> Callable[[int], None]:
    started = last_report = time.monotonic()
    total = inbox.store.read(lambda txn: txn.stat(inbox.dbs.deliveries)["entries"])

    def report(seq: int) -> None:
        nonlocal last_report
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY_SECONDS:
            last_report = now
            log.info(
                "rebuilding the flow index",
                extra={
                    "fields": {
                        "at_seq": seq,
                        "deliveries": total,
                        "seconds": round(now - started, 1),
                    }
                },
            )

    return report


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
