"""The flow-id index as derived state: trusted, caught up, or rebuilt from the inbox.

Theory of operation
-------------------
The index (`flows`: flow key -> seq of the delivery that claimed it) lives in its own LMDB
environment, written without fsync (store.py, "Two environments"). Everything in it can be
re-derived from the inbox: the records' new flow ids, plus the parts of deliveries still
`receiving` (intake.py). Its `index_meta` says how far it got:

    applied_seq   every record up to this seq is in the index
    instance      the inbox instance it was built from
    boot_id       the boot during which it was last open
    clean         "1" once a clean stop flushed it

At server start (`recover`), before anything is accepted:
* trusted when it is empty, was closed cleanly, or was open during this same boot (a kill -9
  loses no page of it: they are in the page cache), AND it is consistent with the inbox: its
  instance is this inbox's, its applied_seq is not past the inbox's last seq, and its tree can
  be read at both ends. Then it is caught up: records after applied_seq and every part are
  replayed (idempotent puts).
* otherwise (a reboot while it was open and unflushed, an index that cannot be opened or read,
  one from another store) its files are deleted and it is rebuilt from the inbox. It is never
  `drop()`ped: dropping walks every page of a tree that may be garbage.
Progress is logged every few seconds, and how long the rebuild took once it is done.
`rebuild` (the `rebuild-index` command, server stopped) is the same rebuild on demand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from .errors import StoreError, StoreFull
from .inbox import Inbox, flow_key, key_seq, seq_key
from .record import decode_flows
from .store import Txn

log = logging.getLogger("ct_appliance.index")

PROGRESS_EVERY_SECONDS = 5.0


def recover(inbox: Inbox) -> dict[str, Any]:
    """Trust, catch up or rebuild the index; then mark it open. Returns what was done."""
    store, boot = inbox.store, _boot_id()
    why = store.index_reset or _distrust(inbox, boot)
    if why is not None and store.index_reset is None:
        store.reset_index(why)
    started = time.monotonic()
    try:
        out = store.write(lambda txn: _recover_txn(inbox, txn, boot, rebuilding=why is not None))
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
        out = store.write(lambda txn: _recover_txn(inbox, txn, boot, rebuilding=True))
    if why is not None:
        out["reason"] = why
        out["seconds"] = round(time.monotonic() - started, 2)
        log.warning("flow index rebuilt from the inbox", extra={"fields": dict(out)})
    store.index_reset = None
    return out


def rebuild(inbox: Inbox) -> int:
    """`rebuild-index`: a new index from the inbox alone; returns the flow ids claimed."""
    inbox.store.reset_index("rebuild-index")
    claimed: int = inbox.store.write(lambda txn: _replay_txn(inbox, txn, _progress(inbox)))
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
                if ok and len(cur.value()) != 8:
                    return "the index holds a value that is not a seq"
        return None

    try:
        return inbox.store.read(check)
    except (lmdb.Error, UnicodeDecodeError) as e:
        return f"unreadable: {e}"


def _recover_txn(inbox: Inbox, txn: Txn, boot: str, *, rebuilding: bool) -> dict[str, Any]:
    meta = inbox.dbs.index_meta
    claimed = _replay_txn(inbox, txn, _progress(inbox) if rebuilding else None)
    finished = inbox.finish_receiving_txn(txn)
    txn.put(b"clean", b"0", db=meta)
    txn.put(b"boot_id", boot.encode(), db=meta)
    txn.put(b"instance", inbox.instance.encode(), db=meta)
    out: dict[str, Any] = {"rebuilt": rebuilding, "replayed_flow_ids": claimed}
    if finished:
        out["finished_receiving"] = finished
    return out


def _replay_txn(inbox: Inbox, txn: Txn, progress: Callable[[int], None] | None = None) -> int:
    """Apply every record newer than the index's applied_seq, and every part of a delivery
    still receiving; returns the flow ids claimed."""
    dbs = inbox.dbs
    raw = txn.get(b"applied_seq", db=dbs.index_meta)
    applied = key_seq(raw) if raw is not None else 0
    claimed = 0
    put, flows_db = txn.index.put, dbs.flows
    last = applied
    for key, value in inbox.iter_records_txn(txn, after=applied):
        for fid in decode_flows(value):
            claimed += put(flow_key(fid), key, overwrite=False, db=flows_db)
        last = key_seq(key)
        if progress is not None:
            progress(last)
    txn.put(b"applied_seq", seq_key(last), db=dbs.index_meta)
    # Parts of deliveries still receiving may sit below the watermark (intake.py): their
    # claims are re-applied every time (idempotent, and there are few of them).
    for seq, flows in inbox.receiving_txn(txn).items():
        for fid in flows:
            claimed += put(flow_key(fid), seq_key(seq), overwrite=False, db=flows_db)
    return claimed


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
