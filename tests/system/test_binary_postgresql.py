"""System test (issue 15): the onefile binary built by `make binary` drives the PostgreSQL store.

psycopg picks its libpq binding by name at import time, which PyInstaller's analysis cannot
see (build/ct-appliance.spec lists it). This runs the real `dist/ct-appliance` against a real
PostgreSQL (tests/pgcluster.py): `db migrate`, then `serve` with `store.backend: postgresql`,
then a signed delivery accepted, its retry answered `duplicate`, and the import done.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

if os.environ.get("CT_SYSTEM_TEST") != "1":
    pytest.skip(
        "system test: needs the binary; run it with `make test-system`", allow_module_level=True
    )

import httpx  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "dist" / "ct-appliance"
SECRET = "s" * 40
sys.path.insert(0, str(REPO))
from tests.pgcluster import PgCluster, free_port  # noqa: E402


def test_the_binary_migrates_and_serves_on_postgresql(tmp_path: Path) -> None:
    assert BINARY.exists(), "make test-system builds dist/ct-appliance first"
    port, admin = free_port(), free_port()
    imported = tmp_path / "imported.jsonl"
    importer = tmp_path / "import.sh"
    importer.write_text(f"#!/bin/sh\ncat >> {imported}\necho >> {imported}\n")
    importer.chmod(0o755)
    with PgCluster() as pg:
        pg.init().start()
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"bind": [f"127.0.0.1:{port}"]},
                    "auth": {"hmac": {"secrets": [{"value": SECRET}]}},
                    "store": {"backend": "postgresql", "postgresql": {"dsn": {"value": pg.dsn()}}},
                    "importer": {"command": [str(importer)]},
                    "admin": {"bind": f"127.0.0.1:{admin}"},
                }
            )
        )
        config.chmod(0o600)
        migrate = subprocess.run(
            [BINARY, "db", "migrate", "--config", config, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migrate.returncode == 0, migrate.stderr
        assert json.loads(migrate.stdout)["schema_version"] >= 1
        with (tmp_path / "server.log").open("wb") as log:
            server = subprocess.Popen([BINARY, "serve", "--config", config], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
            flows = [str(uuid.uuid4()) for _ in range(3)]
            body = json.dumps(
                {
                    "flow_ids": flows,
                    "cost_basis_run_id": "run-1",
                    "ghost_user_id": "g",
                    "user_config": {},
                    "partner_config": {},
                }
            ).encode()
            sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            url = f"http://127.0.0.1:{port}/webhooks/cointracker"
            headers = {"X-Cointracker-Signature": sig}
            first = httpx.post(url, content=body, headers=headers, timeout=10)
            again = httpx.post(url, content=body, headers=headers, timeout=10)
            assert first.json()["status"] == "accepted", first.text
            assert again.json()["status"] == "duplicate", again.text
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not imported.exists():
                time.sleep(0.1)
            doc = json.loads(imported.read_text().splitlines()[0])
            assert doc["flow_ids"] == flows
            status = httpx.get(f"http://127.0.0.1:{admin}/status").json()
            assert status["store"] == {"backend": "postgresql", "error": None}
            assert [a["self"] for a in status["appliances"]] == [True]
        finally:
            server.terminate()
            assert server.wait(30) == 0, (tmp_path / "server.log").read_text()[-3000:]
