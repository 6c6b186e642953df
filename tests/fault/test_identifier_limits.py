"""Identifier limits over real sockets (spec §1; issue 13, item 6).

A correctly signed delivery with a 300 KB `cost_basis_run_id` or a 100 KB flow id used to be
accepted, and its importer spawn then failed with E2BIG on every attempt. Now it is a 400
`invalid_payload` naming the field, and nothing is stored; ids right at 1,024 bytes of UTF-8
still go all the way through the importer.
"""

from __future__ import annotations

import json
from typing import Any

from ..conftest import delivery, sign
from .helpers import read_record, recording_importer, wait_drained


def test_oversized_ids_are_400_naming_the_field_and_nothing_is_stored(
    make_appliance: Any, tmp_path: Any
) -> None:
    overrides, record = recording_importer(tmp_path)
    app = make_appliance(overrides).start()
    oversized = {
        "cost_basis_run_id": (
            delivery(["ok-1"], run="r" * 300_000),
            "cost_basis_run_id is longer than 1024 bytes",
        ),
        "ghost_user_id": (
            delivery(["ok-2"], ghost_user_id="g" * 1025),
            "ghost_user_id is longer than 1024 bytes",
        ),
        "flow id": (
            delivery(["ok-3", "ok-4", "f" * 100_000]),
            "flow_ids[2] is longer than 1024 bytes",
        ),
        "flow id of 342 three-byte characters": (
            delivery(["€" * 342]),
            "flow_ids[0] is longer than 1024 bytes",
        ),
    }
    for name, (body, message) in oversized.items():
        r = app.post(body)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        assert r.json() == {"error": "invalid_payload", "message": message}, name
    assert app.cli_json("inbox", "list") == []

    # At the limit (1,024 bytes, multi-byte characters counted as bytes) a delivery is stored
    # and its importer runs with the ids in its environment and on stdin.
    run, user, flow = "€" * 341 + "r", "g" * 1024, "é" * 512
    body = json.dumps(
        {"flow_ids": [flow], "cost_basis_run_id": run, "ghost_user_id": user}, ensure_ascii=False
    ).encode()
    assert len(run.encode()) == len(user.encode()) == len(flow.encode()) == 1024
    r = app.post(body, headers={"X-Cointracker-Signature": sign(body)})
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text[:200]
    wait_drained(app)
    [doc] = read_record(record)
    assert (doc["cost_basis_run_id"], doc["ghost_user_id"], doc["flow_ids"]) == (run, user, [flow])
    assert [d["state"] for d in app.cli_json("inbox", "list")] == ["done"]
