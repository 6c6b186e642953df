"""Importer over HTTP end to end: a real HTTP server on loopback, started by the test, plays
the partner's internal import service (spec §6, "over HTTP")."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Appliance, delivery, free_port

SIGN_SECRET = "internal-signing-secret"


class ImportService:
    """Answers each POST with the next scripted action; records every request it saw."""

    def __init__(self, port: int = 0) -> None:
        self.script: list[Any] = []
        self.default: Any = (200, {}, b'{"ok": true}')
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.requests.append(
                    {"at": time.monotonic(), "headers": dict(self.headers.items()), "body": body}
                )
                action = outer.script.pop(0) if outer.script else outer.default
                if action == "hang":
                    outer.release.wait(30)
                    return
                status, headers, data = action
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/import"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Iterator[ImportService]:
    s = ImportService()
    yield s
    s.stop()


def http_config(url: str, **importer: Any) -> dict[str, Any]:
    return {
        "importer": {
            "command": None,
            "url": url,
            "headers": {"X-Partner-Token": "t0k"},
            "sign_secret": {"value": SIGN_SECRET},
            "timeout_seconds": 2,
            **importer,
        }
    }


def make(make_appliance: Any, config: dict[str, Any]) -> Appliance:
    app: Appliance = make_appliance()
    cfg = dict(app.config)
    cfg["importer"] = {
        k: v for k, v in {**cfg["importer"], **config["importer"]}.items() if k != "env"
    }
    cfg["importer"].pop("command")
    app.config = {**cfg, **{k: v for k, v in config.items() if k != "importer"}}
    app.write_config()
    return app.start()


def test_success_headers_and_signature_verified_independently(
    make_appliance: Any, service: ImportService, tmp_path: Path
) -> None:
    app = make(make_appliance, http_config(service.url))
    did = app.post(delivery(["h-1", "h-2"])).json()["delivery_id"]
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="import")
    assert len(service.requests) == 1
    req = service.requests[0]
    assert req["headers"]["CT-Delivery-Id"] == did and req["headers"]["CT-Attempt"] == "1"
    assert req["headers"]["X-Partner-Token"] == "t0k"
    body_file = tmp_path / "body"
    body_file.write_bytes(req["body"])
    openssl = (
        subprocess.run(
            ["openssl", "dgst", "-sha256", "-hmac", SIGN_SECRET, "-hex", str(body_file)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .rsplit(" ", 1)[-1]
    )
    assert req["headers"]["CT-Signature"] == openssl
    assert service.docs()[0]["flow_ids"] == ["h-1", "h-2"]
    shown = app.cli_json("inbox", "show", did)
    assert shown["attempt_log"][0]["output"]["response"] == '{"ok": true}'
    # A retry of the same delivery brings nothing new to the service.
    assert app.post(delivery(["h-1", "h-2"])).json() == {"status": "duplicate"}
    time.sleep(1)
    assert len(service.requests) == 1


def test_500_twice_then_200_is_attempt_3_and_400_is_dead_until_retried(
    make_appliance: Any, service: ImportService
) -> None:
    app = make(make_appliance, http_config(service.url, backoff_initial_seconds=0.3))
    service.script = [(500, {}, b"boom"), (503, {}, b"busy")]
    did = app.post(delivery(["r-1"])).json()["delivery_id"]
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="import")
    shown = app.cli_json("inbox", "show", did)
    assert [a["result"] for a in shown["attempt_log"]] == ["HTTP 500", "HTTP 503", "HTTP 200"]
    assert [r["headers"]["CT-Attempt"] for r in service.requests] == ["1", "2", "3"]

    service.script = [(400, {}, b'{"error": "unknown user"}')]
    did = app.post(delivery(["r-2"])).json()["delivery_id"]
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "dead", what="dead")
    shown = app.cli_json("inbox", "show", did)
    assert shown["attempt_log"][0]["output"]["response"] == '{"error": "unknown user"}'
    app.cli("inbox", "retry", did)
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="retry")


def test_429_retry_after_is_honoured(make_appliance: Any, service: ImportService) -> None:
    app = make(make_appliance, http_config(service.url, backoff_initial_seconds=0.1))
    service.script = [(429, {"Retry-After": "2"}, b"slow down")]
    did = app.post(delivery(["ra-1"])).json()["delivery_id"]
    app.wait_for(lambda: len(service.requests) == 2, timeout=10, what="second attempt")
    gap = service.requests[1]["at"] - service.requests[0]["at"]
    assert gap >= 2.0, gap
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="done")


def test_silent_server_is_cut_at_the_timeout_and_retried(
    make_appliance: Any, service: ImportService
) -> None:
    app = make(
        make_appliance, http_config(service.url, timeout_seconds=1, backoff_initial_seconds=0.2)
    )
    service.script = ["hang"]
    did = app.post(delivery(["t-1"])).json()["delivery_id"]
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="import")
    shown = app.cli_json("inbox", "show", did)
    assert shown["attempt_log"][0]["result"] == "no answer within 1 s"
    assert shown["attempt_log"][0]["duration_seconds"] < 3


def test_connection_refused_is_retried_until_the_service_is_up(make_appliance: Any) -> None:
    port = free_port()
    app = make(
        make_appliance,
        http_config(
            f"http://127.0.0.1:{port}/import", backoff_initial_seconds=0.3, backoff_max_seconds=1
        ),
    )
    did = app.post(delivery(["cr-1"])).json()["delivery_id"]
    app.wait_for(
        lambda: len(app.cli_json("inbox", "show", did)["attempt_log"]) >= 2, what="retries"
    )
    shown = app.cli_json("inbox", "show", did)
    assert "ConnectError" in shown["attempt_log"][0]["result"]
    assert shown["state"] in ("pending", "importing")  # retrying: another attempt may be running
    service = ImportService(port)
    try:
        app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="done")
    finally:
        service.stop()


def test_ack_imported_over_http(make_appliance: Any, service: ImportService) -> None:
    app = make(
        make_appliance,
        {
            "ack": "imported",
            **http_config(service.url, backoff_initial_seconds=0.3, backoff_max_seconds=1),
        },
    )
    service.script = [(503, {}, b"down")]
    body = delivery(["ai-1"])
    r = app.post(body)
    assert r.status_code == 500 and r.json()["error"] == "import_failed"
    r = app.post(body)
    assert r.status_code == 200
    assert [d["flow_ids"] for d in service.docs()][-1] == ["ai-1"]


def test_kill_9_during_in_flight_post_resends_same_delivery_id(
    make_appliance: Any, service: ImportService
) -> None:
    app = make(make_appliance, http_config(service.url, timeout_seconds=20))
    service.script = ["hang"]
    did = app.post(delivery(["k-1"])).json()["delivery_id"]
    app.wait_for(lambda: service.requests, what="in-flight POST")
    app.kill9()
    app.start()
    app.wait_for(lambda: app.cli_json("inbox", "show", did)["state"] == "done", what="re-send")
    assert [r["headers"]["CT-Delivery-Id"] for r in service.requests] == [did, did]
    assert [r["headers"]["CT-Attempt"] for r in service.requests] == ["1", "2"]
    assert app.cli_json("inbox", "show", did)["reruns"] == 1
