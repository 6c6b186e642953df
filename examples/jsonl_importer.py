#!/usr/bin/env python3
"""Example importer for ct-appliance: appends each delivery to a JSON-lines file.

Contract (see README, "Writing an importer"): one JSON document on stdin; exit 0 when the
flow ids are safely imported, 65 when the delivery can never be imported, anything else to be
retried later. A delivery can be re-run after a crash with the same delivery_id, so this
importer skips a delivery_id it has already recorded (idempotent on delivery_id).

Output file: $IMPORT_FILE, else ./var/imported.jsonl.
"""

import fcntl
import json
import os
import sys


def main() -> int:
    doc = json.load(sys.stdin)
    path = os.environ.get("IMPORT_FILE", "var/imported.jsonl")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several importers may run at once (concurrency > 1)
        f.seek(0)
        for line in f:
            if json.loads(line)["delivery_id"] == doc["delivery_id"]:
                print(f"{doc['delivery_id']}: already imported, skipping")
                return 0
        f.write(json.dumps(doc) + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(
        f"{doc['delivery_id']}: imported {len(doc['flow_ids'])} flow ids "
        f"(run {doc['cost_basis_run_id']}, attempt {doc['attempt']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
