"""Bulk loader for the seeded benchmark rows: N random UUID-4 flow ids, claimed by deliveries
that are already imported, written straight into a stopped appliance's store.

    python bench/seed.py --config CFG --flows N

The records are real inbox records (50 flow ids each, state done), appended in seq order. The
index is then made by the appliance's own rebuild (`flowindex.rebuild`, what `ct-appliance
rebuild-index` runs): the flow ids reach the index in arrival order, that is in random key
order, exactly as traffic would have inserted them, so its leaves are as full as a real store's
(~68 %), not the 100 % a sorted bulk append leaves (after which every new id splits a leaf).
It prints the seconds each half took (the second is the 10 M rebuild figure of docs/INDEX.md)
and the index's size on disk in blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, flowindex, lifecycle  # noqa: E402
from appliance.inbox import Inbox, seq_key  # noqa: E402
from appliance.record import AttemptEntry, Outcome, State, encode_record  # noqa: E402
from appliance.store import Store  # noqa: E402

PER_DELIVERY = 50
CHUNK = 20_000  # deliveries per write transaction


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--flows", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s %(fields)s")
    cfg = config.load(args.config).config
    started = time.perf_counter()
    rng = random.Random(args.seed)
    store = Store(cfg.store.path, initial_map_bytes=max(1 << 30, args.flows * 100))
    inbox = Inbox(store)
    flowindex.recover(inbox)
    deliveries = (args.flows + PER_DELIVERY - 1) // PER_DELIVERY
    now = time.time()
    attempts = (
        AttemptEntry(
            n=1, started_at=now, ended_at=now, outcome=Outcome.SUCCESS, summary="seeded",
            duration=0.0,
        ),
    )  # fmt: skip

    def record(d: int) -> tuple[bytes, bytes]:
        n = min(PER_DELIVERY, args.flows - d * PER_DELIVERY)
        flows = tuple(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n))
        rec = lifecycle.accept(
            d + 1, received_at=now, run_id=f"seed-run-{d // 20}", ghost_user_id="seed-user",
            flows=flows,
        )  # fmt: skip
        rec = dataclasses.replace(
            rec, state=State.DONE, done_at=now, body_pruned_at=now, attempts=attempts
        )
        return seq_key(d + 1), encode_record(rec)

    def load_records(first: int, last: int) -> Callable[[Any], None]:
        def load(txn: Any) -> None:
            with txn.inbox.cursor(db=store.dbs.deliveries) as cur:
                if first == 0 and cur.last():
                    raise SystemExit("bench/seed.py wants a fresh store")
                cur.putmulti((record(d) for d in range(first, last)), append=True)

        return load

    for first in range(0, deliveries, CHUNK):
        store.write(load_records(first, min(first + CHUNK, deliveries)))
    records_seconds = time.perf_counter() - started
    flowindex.rebuild(inbox)
    index_seconds = time.perf_counter() - started - records_seconds
    store.close()
    index_bytes = (Path(cfg.store.path) / "index" / "data.mdb").stat().st_blocks * 512
    print(
        json.dumps(
            {
                "flows": args.flows,
                "deliveries": deliveries,
                "records_seconds": round(records_seconds, 1),
                "index_seconds": round(index_seconds, 1),
                "index_bytes": index_bytes,
                "index_bytes_per_flow": round(index_bytes / max(1, args.flows), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
