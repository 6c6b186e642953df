"""http.py without a socket: the webhook's ASGI app called with a scope and scripted
receive/send, over a Runtime on a real LMDB store (its writer running).

What a socket hides, these tests see: whether an answer went out before the body was read
(`receive` was never called), which headers close the connection, and how much of an oversized
body was read. The same answers over real sockets are in tests/e2e/test_webhook.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing
import yaml

from appliance import config, http
from appliance.config import ImporterConfig
from appliance.lmdbbackend import LmdbBackend
from appliance.metrics import Metrics
from appliance.runtime import Live, Runtime
from appliance.server import make_verifier

SECRET = "http-test-secret-" + "ef" * 16  # >= 32 bytes
PATH = "/webhooks/cointracker"
MAX_BODY = 4096


def sign(body: bytes) -> str:
    return hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def delivery(flow_ids: list[str], run: str = "run-1") -> bytes:
    doc = {"flow_ids": flow_ids, "cost_basis_run_id": run, "ghost_user_id": "ghost-1"}
    return json.dumps(doc).encode()


def signed(body: bytes) -> dict[str, str]:
    return {"x-cointracker-signature": sign(body), "content-type": "application/json"}


# -- a scripted ASGI exchange -----------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    events: list[str]  # in order: "receive", "start", "body", "body(more)"
    received: int  # how many times the app called receive

    @property
    def doc(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        doc = self.doc
        assert set(doc) == {"error", "message"}, doc
        return str(doc["error"])


async def call(
    app: Any,
    *,
    method: str = "POST",
    path: str = PATH,
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
    length: bool | int | None = True,
    complete: bool = True,
    end: str = "hang",
) -> Answer:
    """One request through `app` (the Quart app's `asgi_app`, as Hypercorn calls it).

    `chunks` are the body's messages (the last one ends it, unless not `complete`); after them
    `receive` blocks like a quiet client ("hang") or reports a disconnect ("disconnect").
    `length`: True declares the size of `chunks` as Content-Length, an int declares that, None
    declares nothing (chunked)."""
    chunks = [b""] if chunks is None else chunks
    hdrs = dict(headers or {})
    if length is True:
        hdrs["content-length"] = str(sum(map(len, chunks)))
    elif isinstance(length, int):
        hdrs["content-length"] = str(length)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8443),
        "extensions": {},
    }
    events: list[str] = []
    sent: list[dict[str, Any]] = []
    script = list(chunks)

    async def receive() -> dict[str, Any]:
        events.append("receive")
        await trio.lowlevel.checkpoint()
        if script:
            chunk = script.pop(0)
            more = bool(script) or not complete
            return {"type": "http.request", "body": chunk, "more_body": more}
        if end == "disconnect":
            return {"type": "http.disconnect"}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            events.append("start")
        else:
            events.append("body(more)" if message.get("more_body") else "body")
        sent.append(message)

    await app.asgi_app(scope, receive, send)
    if not sent:
        return Answer(0, {}, b"", events, events.count("receive"))
    start = sent[0]
    assert start["type"] == "http.response.start"
    headers_out = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return Answer(start["status"], headers_out, body, events, events.count("receive"))


# -- the runtime ------------------------------------------------------------------------------------
class FakeImports:
    """The dispatcher as the request path sees it (`runtime.ImportRunner`), scripted."""

    def __init__(self, outcome: str = "done") -> None:
        self.paused = False
        self.notified = 0
        self.waits: list[tuple[set[int], float]] = []
        self.outcome = outcome

    def notify(self) -> None:
        self.notified += 1

    async def wait_imported(self, seqs: set[int], bound: float) -> str:
        self.waits.append((set(seqs), bound))
        return self.outcome

    def reconfigure(self, cfg: ImporterConfig) -> None:
        raise AssertionError("not expected")


@dataclass
class Web:
    app: Any
    rt: Runtime
    backend: LmdbBackend
    imports: FakeImports
    extra: dict[str, Any] = field(default_factory=dict)

    def stored(self) -> int:
        return self.backend.summary().total

    def requests(self, outcome: str, status: int) -> float:
        value = self.rt.metrics.registry.get_sample_value(
            "ct_appliance_requests_total", {"outcome": outcome, "status": str(status)}
        )
        return value or 0.0

    def signature_failures(self) -> float:
        value = self.rt.metrics.registry.get_sample_value(
            "ct_appliance_signature_failures_total", {"mode": "hmac"}
        )
        return value or 0.0


@asynccontextmanager
async def webhook(tmp_path: Path, **over: Any) -> AsyncIterator[Web]:
    doc: dict[str, Any] = {
        "auth": {"hmac": {"secrets": [{"value": SECRET}]}},
        "store": {"path": str(tmp_path / "store")},
        "importer": {"command": ["/bin/true"]},
        "webhook": {"max_body_bytes": MAX_BODY, "max_inflight_body_bytes": 4 * MAX_BODY},
    }
    for key, value in over.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    cfg = config.load(path).config
    backend = LmdbBackend(cfg.store.path, serving=True)
    try:
        rt = Runtime(Live(cfg, make_verifier(cfg)), backend, Metrics(), str(path))
        imports = FakeImports()
        rt.dispatcher = imports
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run_writer)
            yield Web(http.create_app(rt), rt, backend, imports)
            backend.stop_writes()
    finally:
        backend.close()


# -- spec §4: the checks, in their order ------------------------------------------------------------
async def test_a_signed_delivery_is_accepted_then_a_duplicate(tmp_path: Path) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1", "f2"])
        a = await call(web.app, headers=signed(body), chunks=[body])
        assert a.status == 200 and a.headers["content-type"] == "application/json"
        assert a.doc["status"] == "accepted" and set(a.doc) == {"status", "delivery_id"}
        (rec,) = web.backend.records()
        assert a.doc["delivery_id"] == rec.delivery_id and rec.flows == ("f1", "f2")
        assert web.imports.notified == 1  # the dispatcher looks at the queue now
        assert "connection" not in a.headers  # the connection is kept

        again = await call(web.app, headers=signed(body), chunks=[body[:10], body[10:]])
        assert (again.status, again.doc) == (200, {"status": "duplicate"})
        assert web.stored() == 1 and web.imports.notified == 1
        assert web.requests("accepted", 200) == 1 and web.requests("duplicate", 200) == 1


async def test_wrong_method_is_405_and_wrong_path_404_in_the_json_error_shape(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1"])
        a = await call(web.app, method="GET", headers=signed(body))
        assert (a.status, a.error) == (405, "method_not_allowed")
        assert a.headers["allow"] == "POST" and a.received == 0
        for path in ("/other", PATH + "/", "/webhooks/cointracker2"):
            a = await call(web.app, path=path, headers=signed(body), chunks=[body])
            assert (a.status, a.error) == (404, "not_found"), path
        assert web.stored() == 0


async def test_a_missing_or_malformed_signature_is_401_before_the_body_is_read(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1"])
        for headers in ({}, {"x-cointracker-signature": "not-hex"}):
            a = await call(web.app, headers=headers, chunks=[body[:5], body[5:]])
            assert (a.status, a.error) == (401, "unauthorized"), headers
            # The answer goes out first; the body is read and dropped behind it on the same
            # connection (the sender sees its 401, not a reset).
            assert a.events == ["start", "body(more)", "receive", "receive", "body"], a.events
            assert "connection" not in a.headers
            assert "www-authenticate" not in a.headers  # a bearer-only header
        assert web.stored() == 0 and web.signature_failures() == 2


async def test_a_signature_that_does_not_match_is_401_after_the_body_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1"])
        forged = {"x-cointracker-signature": sign(body + b" ")}
        a = await call(web.app, headers=forged, chunks=[body])
        assert (a.status, a.error) == (401, "unauthorized")
        assert a.events == ["receive", "start", "body"]
        assert a.doc["message"] == "authentication failed"  # never which check, nor the secret
        # An unauthenticated body is never parsed: invalid JSON with a bad signature is 401.
        junk = b"{not json"
        a = await call(web.app, headers={"x-cointracker-signature": "0" * 64}, chunks=[junk])
        assert (a.status, a.error) == (401, "unauthorized")
        assert web.stored() == 0 and web.signature_failures() == 2
        assert web.imports.notified == 0


async def test_a_declared_size_over_the_limit_is_413_before_credentials_and_body(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1"])
        for headers in ({}, signed(body)):  # unsigned too: size comes before credentials
            a = await call(web.app, headers=headers, chunks=[body], length=MAX_BODY + 1)
            assert (a.status, a.error) == (413, "too_large")
            assert a.received == 0 and a.headers["connection"] == "close"
        # Exactly the limit is allowed through to the next checks.
        at_limit = body + b" " * (MAX_BODY - len(body))
        a = await call(web.app, headers=signed(at_limit), chunks=[at_limit])
        assert a.status == 200 and a.doc["status"] == "accepted"
        assert web.signature_failures() == 0


async def test_a_chunked_body_past_the_limit_is_413_without_reading_the_rest(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        chunks = [b"x" * 1024] * 100  # 100 KiB announced by nobody
        unsigned = {"x-cointracker-signature": "0" * 64}
        a = await call(web.app, headers=unsigned, chunks=chunks, length=None)
        assert (a.status, a.error) == (413, "too_large")
        assert a.received == MAX_BODY // 1024 + 1  # stopped at the first byte past 4096
        assert a.headers["connection"] == "close"
        assert web.stored() == 0


async def test_invalid_json_and_invalid_payload_are_400_and_store_nothing(tmp_path: Path) -> None:
    async with webhook(tmp_path) as web:
        for bad in (b"not json", b"[1, 2]", b"\xff\xfe{"):
            a = await call(web.app, headers=signed(bad), chunks=[bad])
            assert (a.status, a.error) == (400, "invalid_json"), bad
        shapeless = json.dumps({"flow_ids": "f1", "cost_basis_run_id": "r", "ghost_user_id": "g"})
        a = await call(web.app, headers=signed(shapeless.encode()), chunks=[shapeless.encode()])
        assert (a.status, a.error) == (400, "invalid_payload") and "flow_ids" in a.doc["message"]
        assert web.stored() == 0 and web.signature_failures() == 0
        assert web.requests("invalid_json", 400) == 3


async def test_draining_or_an_unavailable_store_is_503_before_anything_else_but_the_method(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1"])
        web.rt.draining = True
        for headers, length in (({}, True), (signed(body), True), ({}, MAX_BODY + 1)):
            a = await call(web.app, headers=headers, chunks=[body], length=length)
            assert (a.status, a.error) == (503, "unavailable")
            assert a.headers["retry-after"] == "5" and a.headers["connection"] == "close"
            assert a.received == 0
        a = await call(web.app, method="GET")
        assert a.status == 405  # the method is checked first
        web.rt.draining = False

        web.backend.store.available = False  # as after a failed write (disk full)
        a = await call(web.app, headers=signed(body), chunks=[body])
        assert (a.status, a.error) == (503, "unavailable") and a.received == 0
        assert "store unavailable" in a.doc["message"]
        web.backend.store.available = True

        a = await call(web.app, headers=signed(body), chunks=[body])
        assert a.status == 200 and web.stored() == 1


async def test_a_body_not_complete_in_time_is_503_body_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with webhook(tmp_path, webhook={"body_timeout_seconds": 30}) as web:
        body = delivery(["f1"])
        t0 = trio.current_time()
        a = await call(web.app, headers=signed(body), chunks=[body[:10]], complete=False)
        assert trio.current_time() - t0 == 30  # virtual seconds
        assert (a.status, a.error) == (503, "body_timeout")
        assert a.headers["retry-after"] == "1" and a.headers["connection"] == "close"
        assert web.stored() == 0
        assert web.rt.budget.used == 0  # the reservation of its declared length is given back


async def test_a_sender_that_disconnects_mid_body_gets_nothing_and_stores_nothing(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path) as web:
        body = delivery(["f1"])
        a = await call(
            web.app, headers=signed(body), chunks=[body[:10]], complete=False, end="disconnect"
        )
        assert a.status == 0 and a.events == ["receive", "receive"]  # no answer at all
        assert web.stored() == 0 and web.rt.budget.used == 0


async def test_the_retry_drill_answers_500_to_the_first_deliveries_and_stores_nothing(
    tmp_path: Path,
) -> None:
    async with webhook(tmp_path, testing={"fail_first_deliveries": 1}) as web:
        body = delivery(["f1"])
        a = await call(web.app, headers=signed(body), chunks=[body])
        assert (a.status, a.error) == (500, "injected_failure")
        assert web.stored() == 0
        a = await call(web.app, headers=signed(body), chunks=[body])
        assert a.status == 200 and a.doc["status"] == "accepted"  # the sender's retry


async def test_ack_imported_answers_200_only_once_the_import_is_confirmed(tmp_path: Path) -> None:
    async with webhook(tmp_path, ack="imported", webhook={"imported_wait_seconds": 25}) as web:
        body = delivery(["f1", "f2"])
        a = await call(web.app, headers=signed(body), chunks=[body])
        assert a.status == 200 and a.doc["status"] == "accepted"
        (rec,) = web.backend.records()
        assert web.imports.waits == [({rec.seq}, 25.0)]

        # A duplicate waits for the deliveries that own its flow ids.
        web.imports.outcome = "not imported within 25 s"
        again = delivery(["f2", "f1"])
        a = await call(web.app, headers=signed(again), chunks=[again])
        assert (a.status, a.error) == (500, "import_failed")
        assert a.doc["message"] == (
            "import not confirmed: not imported within 25 s; stored and retried locally"
        )
        assert web.imports.waits[-1] == ({rec.seq}, 25.0)

        # Not confirmed, but stored: the sender's retry of it is a duplicate.
        new = delivery(["f3"])
        a = await call(web.app, headers=signed(new), chunks=[new])
        assert (a.status, a.error) == (500, "import_failed")
        assert web.stored() == 2
        web.imports.outcome = "done"
        a = await call(web.app, headers=signed(new), chunks=[new])
        assert (a.status, a.doc) == (200, {"status": "duplicate"})

        web.rt.dispatcher = None
        last = delivery(["f4"])
        a = await call(web.app, headers=signed(last), chunks=[last])
        assert (a.status, a.error) == (500, "import_failed")
        assert a.doc["message"] == "no importer is running"
