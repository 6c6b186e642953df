"""Shared fixtures: a real `ct-appliance serve` process on free loopback ports, and a client
that signs like CoinTracker does."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

# Real PostgreSQL: a session cluster and a fresh database per test (see tests/pgcluster.py).
from .pgcluster import pg_cluster, pg_dsn  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + "ab" * 16
EXAMPLE_IMPORTER = ROOT / "examples" / "jsonl_importer.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery(flow_ids: list[str], run: str | None = None, **extra: Any) -> bytes:
    doc = {
        "flow_ids": flow_ids,
        "cost_basis_run_id": run or f"run-{uuid.uuid4().hex[:8]}",
        "ghost_user_id": "ghost-1",
        "user_config": {"currency": "USD"},
        "partner_config": {"tier": "gold"},
        **extra,
    }
    return json.dumps(doc).encode()


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Appliance:
    """One `ct-appliance serve` process; its config, store and importer record in `tmp`."""

    def __init__(self, tmp: Path, overrides: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = tmp / "config.yaml"
        self.imported = tmp / "imported.jsonl"
        self.log_path = tmp / "server.log"
        self.config: dict[str, Any] = {
            "listen": {"bind": [f"127.0.0.1:{self.port}"], "graceful_timeout_seconds": 5},
            "auth": {"mode": "hmac", "hmac": {"secrets": [{"value": SECRET}]}},
            "store": {"path": str(tmp / "store")},
            "importer": {
                "command": [sys.executable, str(EXAMPLE_IMPORTER)],
                "env": {"IMPORT_FILE": str(self.imported)},
                "backoff_initial_seconds": 0.2,
                "backoff_max_seconds": 2,
                "shutdown_grace_seconds": 2,
            },
            "admin": {"bind": f"127.0.0.1:{self.admin_port}"},
        }
        if overrides:
            self.config = merge(self.config, overrides)
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/cointracker"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(config or self.config))
        self.config_path.chmod(0o600)

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> Appliance:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.admin + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.logs()}")

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def post(
        self,
        body: bytes,
        *,
        secret: str = SECRET,
        headers: dict[str, str] | None = None,
        client: httpx.Client | None = None,
    ) -> httpx.Response:
        h = {"X-Cointracker-Signature": sign(body, secret), "content-type": "application/json"}
        h.update(headers or {})
        return (client or httpx).post(self.url, content=body, headers=h, timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "appliance", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def cli_json(self, *args: str, check: bool = True) -> Any:
        return json.loads(self.cli(*args, "--json", check=check).stdout)

    def imported_docs(self) -> list[dict[str, Any]]:
        if not self.imported.exists():
            return []
        return [json.loads(line) for line in self.imported.read_text().splitlines()]

    def wait_for(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()[-4000:]}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def make_appliance(tmp_path: Path) -> Iterator[Any]:
    made: list[Appliance] = []

    def make(overrides: dict[str, Any] | None = None, sub: str = "a") -> Appliance:
        d = tmp_path / sub
        d.mkdir(exist_ok=True)
        app = Appliance(d, overrides)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


@pytest.fixture
def appliance(make_appliance: Any) -> Appliance:
    app: Appliance = make_appliance()
    return app.start()
