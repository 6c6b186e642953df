"""Anonymous floods (issue 13): what a sender without credentials can make the server spend.

Each test is an attack over real sockets against the real server: 48 connections streaming
30 MiB bodies with a wrong signature while real deliveries keep arriving; credentials refused
before a byte of the body is sent; the connection cap (busy connections refused, idle ones
evicted); cleartext HTTP/2; and the log lines a flood of bad signatures may cause.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Any

import httpx
import jwt

from ..conftest import Appliance, delivery, sign
from .helpers import Stopwatch, report, rss_kib

MIB = 1 << 20
WRONG_SIGNATURE = "0" * 64


def head(app: Appliance, length: int, extra: str = "") -> bytes:
    return (
        f"POST /webhooks/cointracker HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def answer_of(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Whatever the server sends before it closes or goes quiet for `timeout` seconds."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _complete(data: bytes) -> bool:
    top, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length: *(\d+)", top)
    return m is None or len(rest) >= int(m.group(1))


def metric_value(app: Appliance, pattern: str) -> float:
    text = httpx.get(app.admin + "/metrics", timeout=10).text
    m = re.search(r"(?m)^" + pattern + r" (\S+)$", text)
    assert m is not None, f"{pattern} not on /metrics"
    return float(m.group(1))


class Attacker(threading.Thread):
    """Streams 30 MiB bodies with a well-formed, wrong signature, over and over."""

    def __init__(self, app: Appliance, stop: threading.Event, body_bytes: int) -> None:
        super().__init__(daemon=True)
        self.app, self.stop, self.body_bytes = app, stop, body_bytes
        self.answers: dict[str, int] = {}

    def run(self) -> None:
        chunk = b"x" * (256 * 1024)
        request = head(self.app, self.body_bytes, f"X-Cointracker-Signature: {WRONG_SIGNATURE}\r\n")
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.app.port), timeout=10) as s:
                    s.sendall(request)
                    sent = 0
                    while sent < self.body_bytes and not self.stop.is_set():
                        s.sendall(chunk[: self.body_bytes - sent])
                        sent += len(chunk)
                    status = answer_of(s)[:12].decode(errors="replace")
            except OSError:
                # The server answered 503 and closed while we were still sending.
                status = "closed while sending"
            self.answers[status] = self.answers.get(status, 0) + 1


class RealSender(threading.Thread):
    """What CoinTracker sends meanwhile: signed 3 KB deliveries, and a 2 MiB one now and then."""

    def __init__(self, app: Appliance, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.app, self.stop = app, stop
        self.results: list[tuple[int, float, int]] = []  # status, seconds, body bytes

    def run(self) -> None:
        n = 0
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                n += 1
                count = 20_000 if n % 10 == 0 else 50  # ~2 MiB with long ids, else ~3 KB
                flows = [f"real-{n}-{i}-{'f' * 64}" for i in range(count)]
                body = delivery(flows)
                started = time.monotonic()
                r = self.app.post(body, client=client)
                self.results.append((r.status_code, time.monotonic() - started, len(body)))
                time.sleep(0.05)


def test_body_flood_without_credentials_stays_bounded_and_real_deliveries_pass(
    make_appliance: Any,
) -> None:
    """48 connections stream 30 MiB bodies with a wrong signature for 12 s (the attack that
    took the server from 47 to 1,408 MiB). With the default budget the server stays far under
    the unit's MemoryHigh=1G, answers the excess 503 + Retry-After, and every real delivery sent
    during the flood is answered 200."""
    app = make_appliance().start()
    assert app.proc is not None
    idle_kib = rss_kib(app.proc.pid)
    stop = threading.Event()
    attackers = [Attacker(app, stop, 30 * MIB) for _ in range(48)]
    sender = RealSender(app, stop)
    peak = idle_kib
    watch = Stopwatch()
    for t in [*attackers, sender]:
        t.start()
    while watch() < 12:
        peak = max(peak, rss_kib(app.proc.pid))
        time.sleep(0.02)
    stop.set()
    for t in [*attackers, sender]:
        t.join(60)
    answers: dict[str, int] = {}
    for a in attackers:
        for status, n in a.answers.items():
            answers[status] = answers.get(status, 0) + n
    statuses = [s for s, _, _ in sender.results]
    latencies = sorted(seconds for _, seconds, _ in sender.results)
    report(
        "body_flood",
        idle_rss_mib=round(idle_kib / 1024, 1),
        peak_rss_mib=round(peak / 1024, 1),
        attacker_answers=answers,
        real_deliveries=len(statuses),
        real_200=statuses.count(200),
        real_large=sum(1 for _, _, size in sender.results if size > MIB),
        real_p50_ms=round(latencies[len(latencies) // 2] * 1000, 1),
        real_max_ms=round(latencies[-1] * 1000, 1),
    )
    assert app.proc.poll() is None, app.logs()[-3000:]
    # Default budget 256 MiB: bodies of 30 MiB are admitted while less than ~136 MiB is held.
    assert peak < 512 * 1024, f"peak RSS {peak // 1024} MiB"
    assert len(statuses) >= 20 and set(statuses) == {200}, sender.results
    assert any(s.startswith("HTTP/1.1 503") or s == "closed while sending" for s in answers)
    assert metric_value(app, "ct_appliance_inflight_body_bytes") == 0


def test_credentials_are_refused_before_the_body_is_read(make_appliance: Any) -> None:
    """A missing or malformed signature header (HMAC) and a bad token (bearer) are answered 401
    while the announced 10 MiB body has not been sent at all."""
    app = make_appliance().start()
    for extra in ("", "X-Cointracker-Signature: not-hex\r\n"):
        with socket.create_connection(("127.0.0.1", app.port)) as s:
            s.sendall(head(app, 10 * MIB, extra))
            answer = answer_of(s, timeout=10)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    app.stop()

    secret = "bearer-secret-" + "cd" * 16
    bearer = make_appliance(
        {
            "auth": {
                "mode": "bearer",
                "bearer": {
                    "issuer": "https://issuer.test/",
                    "audience": "https://partner.test/ct",
                    "algorithms": ["HS256"],
                    "secret": {"value": secret},
                },
            }
        },
        sub="bearer",
    ).start()
    with socket.create_connection(("127.0.0.1", bearer.port)) as s:
        s.sendall(head(bearer, 10 * MIB, "Authorization: Bearer not.a.token\r\n"))
        answer = answer_of(s, timeout=10)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"www-authenticate: Bearer" in answer.lower().replace(b"bearer", b"Bearer")
    now = int(time.time())
    claims = {"iss": "https://issuer.test/", "aud": "https://partner.test/ct", "exp": now + 60}
    good = jwt.encode(claims, secret, algorithm="HS256")
    r = httpx.post(
        bearer.url, content=delivery(["b-1"]), headers={"authorization": f"Bearer {good}"}
    )
    assert r.status_code == 200 and r.json()["status"] == "accepted"


def idle_connection(app: Appliance) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    s.sendall(b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer_of(s).startswith(b"HTTP/1.1 404")
    return s


def busy_connection(app: Appliance) -> socket.socket:
    """A connection in the middle of a request: headers sent, body not complete."""
    s = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    s.sendall(head(app, 1000, f"X-Cointracker-Signature: {WRONG_SIGNATURE}\r\n") + b"{")
    return s


def test_connection_cap_refuses_busy_overflow_and_evicts_idle_connections(
    make_appliance: Any,
) -> None:
    app = make_appliance(
        {"listen": {"max_connections": 16}, "webhook": {"body_timeout_seconds": 60}}
    ).start()
    busy = [busy_connection(app) for _ in range(16)]
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        s.sendall(app_post_bytes(app, ["over-cap"]))
        answer = answer_of(s)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"retry-after: 5" in answer.lower()
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "overloaded"
    assert httpx.get(app.admin + "/readyz").status_code == 200  # the admin listener is its own
    refused = r'ct_appliance_connections_refused_total\{listener="webhook"\}'
    assert metric_value(app, refused) == 1
    for s in busy:
        s.close()

    time.sleep(0.3)
    idle = [idle_connection(app) for _ in range(16)]
    r = app.post(delivery(["past-idle-cap"]))  # a new connection: evicts the oldest idle one
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    idle[0].settimeout(5)
    assert idle[0].recv(100) == b""  # closed by the server
    evicted = r'ct_appliance_connections_evicted_total\{listener="webhook"\}'
    assert metric_value(app, evicted) >= 1
    for s in idle:
        s.close()


def test_idle_connections_close_after_the_keep_alive_timeout(make_appliance: Any) -> None:
    """Every idle connection is closed once `listen.keep_alive_timeout_seconds` passes, also
    after an answer Quart served (a 404): upstream Hypercorn lost that connection's idle timer
    about half the time, and the socket stayed open for good."""
    app = make_appliance({"listen": {"keep_alive_timeout_seconds": 1}}).start()
    idle = [idle_connection(app) for _ in range(20)]
    time.sleep(3)
    still_open = 0
    for s in idle:
        s.settimeout(0.5)
        try:
            still_open += s.recv(100) != b""
        except TimeoutError:
            still_open += 1
        s.close()
    assert still_open == 0


def app_post_bytes(app: Appliance, flows: list[str]) -> bytes:
    body = delivery(flows)
    return head(app, len(body), f"X-Cointracker-Signature: {sign(body)}\r\n") + body


def test_cleartext_http2_is_refused(appliance: Appliance) -> None:
    """Prior-knowledge HTTP/2 (one connection, many streams) and `Upgrade: h2c` on the plain
    listener: the preface gets 505, the upgrade is ignored and answered over HTTP/1.1."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=10) as s:
        s.sendall(preface)
        answer = answer_of(s)
    assert answer.startswith(b"HTTP/1.1 505"), answer[:100]
    upgrade = (
        b"GET /webhooks/cointracker HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, "
        b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=10) as s:
        s.sendall(upgrade)
        answer = answer_of(s)
    assert answer.startswith(b"HTTP/1.1 405"), answer[:100]
    r = appliance.post(delivery(["after-h2"]))
    assert r.status_code == 200


def test_log_lines_of_unauthenticated_requests_are_bounded(appliance: Appliance) -> None:
    """1,000 bad signatures write a burst of lines, then a few a second; the next line that is
    written says how many were left out, so lines + suppressed account for every request."""
    body = delivery(["log-flood"])
    sent = 1_000
    with httpx.Client(timeout=10) as client:
        for _ in range(sent):
            r = appliance.post(body, secret="wrong-" + "0" * 32, client=client)
            assert r.status_code == 401
        time.sleep(1.5)
        appliance.post(body, secret="wrong-" + "0" * 32, client=client)
    time.sleep(0.5)
    lines = [
        line
        for line in appliance.log_lines()
        if line.get("msg") == "delivery" and line.get("outcome") == "unauthorized"
    ]
    suppressed = sum(line.get("suppressed_since_last", 0) for line in lines)
    report("log_flood", requests=sent + 1, lines=len(lines), suppressed=suppressed)
    assert len(lines) < 150, len(lines)
    assert len(lines) + suppressed == sent + 1
    assert (
        metric_value(
            appliance, r'ct_appliance_requests_total\{outcome="unauthorized",status="401"\}'
        )
        == sent + 1
    )
