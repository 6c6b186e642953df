"""Bulk loader for the seeded benchmark rows: N random UUID-4 flow ids, claimed by deliveries
that are already imported, written straight into a stopped appliance's store.

    python bench/seed.py --config CFG --flows N

The records are real inbox records (50 flow ids each, state done), so `ct-appliance
rebuild-index` derives exactly the index written here (spec §5.4). Fast because the keys are
sorted first and appended (STACK.md: sorted appends are ~4x faster and ~4x smaller).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, flowindex, lifecycle  # noqa: E402
from appliance.inbox import Inbox, flow_key, seq_key  # noqa: E402
from appliance.record import AttemptEntry, Outcome, State, encode_record  # noqa: E402
from appliance.store import Store  # noqa: E402

PER_DELIVERY = 50


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--flows", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    cfg = config.load(args.config).config
    started = time.perf_counter()
    rng = random.Random(args.seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(args.flows)]
    store = Store(cfg.store.path, initial_map_bytes=max(1 << 30, args.flows * 400))
    inbox = Inbox(store)
    flowindex.recover(inbox)
    deliveries = (len(ids) + PER_DELIVERY - 1) // PER_DELIVERY
    now = time.time()

    def load_records(txn: object) -> None:
        with txn.inbox.cursor(db=store.dbs.deliveries) as cur:  # type: ignore[attr-defined]
            if cur.last():
                raise SystemExit("bench/seed.py wants a fresh store")

        attempts = (
            AttemptEntry(
                n=1,
                started_at=now,
                ended_at=now,
                outcome=Outcome.SUCCESS,
                summary="seeded",
                duration=0.0,
            ),
        )

        def records() -> Iterator[tuple[bytes, bytes]]:
            for d in range(deliveries):
                flows = tuple(ids[d * PER_DELIVERY : (d + 1) * PER_DELIVERY])
                rec = lifecycle.accept(
                    d + 1,
                    received_at=now,
                    run_id=f"seed-run-{d // 20}",
                    ghost_user_id="seed-user",
                    flows=flows,
                )
                rec = dataclasses.replace(
                    rec,
                    state=State.DONE,
                    done_at=now,
                    body_pruned_at=now,
                    attempts=attempts,
                )
                yield seq_key(d + 1), encode_record(rec)

        with txn.inbox.cursor(db=store.dbs.deliveries) as cur:  # type: ignore[attr-defined]
            cur.putmulti(records(), append=True)

    store.write(load_records)
    pairs = sorted((flow_key(f), seq_key(i // PER_DELIVERY + 1)) for i, f in enumerate(ids))
    ids.clear()  # the sorted pairs hold what is still needed

    def load_index(txn: object) -> None:
        with txn.index.cursor(db=store.dbs.flows) as cur:  # type: ignore[attr-defined]
            cur.putmulti(pairs, append=True)
        txn.index.put(b"applied_seq", seq_key(deliveries), db=store.dbs.index_meta)  # type: ignore[attr-defined]

    store.write(load_index)
    flowindex.mark_clean(inbox)
    store.close()
    print(
        json.dumps(
            {
                "flows": args.flows,
                "deliveries": deliveries,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
