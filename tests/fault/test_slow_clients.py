"""Slow and many clients (spec §1's latency table, §4's body timeout): 1,000 idle keep-alive
connections and slowloris senders (headers and bodies trickled a byte at a time) while good
signed deliveries are measured. Every good one must be answered 200, p99 under a generous 1 s
(the launch-window "healthy" line; the real figure is reported), and a trickled body is answered
503 body_timeout once `webhook.body_timeout_seconds` passes."""

from __future__ import annotations

import resource
import socket
import statistics
import time
from typing import Any

import httpx
import trio

from ..conftest import Appliance, delivery, sign
from .helpers import Stopwatch, report, rss_kib

IDLE = 1_000
HEADER_LORIS = 20
BODY_LORIS = 10
GOOD = 300
BODY_TIMEOUT = 2.0


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (headers and Content-Length body) from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def open_idle(app: Appliance, n: int) -> list[socket.socket]:
    """n keep-alive connections, each having made one request, now idle."""
    request = b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", app.port), timeout=10)
        s.sendall(request)
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 404"), answer[:100]
        socks.append(s)
    return socks


async def header_loris(app: Appliance, stop: trio.Event, sent: list[int]) -> None:
    body = delivery(["loris"])
    head = (
        b"POST /webhooks/cointracker HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"X-Cointracker-Signature: "
        + sign(body).encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", app.port)
    async with stream:
        for i in range(len(head) - 4):  # never finish the headers
            if stop.is_set():
                return
            await stream.send_all(head[i : i + 1])
            sent[0] += 1
            await trio.sleep(0.1)


async def body_loris(app: Appliance, stop: trio.Event, answers: list[tuple[bytes, float]]) -> None:
    body = delivery([f"loris-body-{time.monotonic_ns()}"], pad="x" * 5_000)
    head = (
        b"POST /webhooks/cointracker HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"X-Cointracker-Signature: "
        + sign(body).encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    while not stop.is_set():
        stream = await trio.open_tcp_stream("127.0.0.1", app.port)
        async with stream:
            await stream.send_all(head)
            started = time.monotonic()
            answer = b""

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, stream, body)
                with trio.move_on_after(BODY_TIMEOUT * 3):
                    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        answer += chunk
                nursery.cancel_scope.cancel()
            answers.append((answer, time.monotonic() - started))


async def trickle(stream: trio.SocketStream, body: bytes) -> None:
    for i in range(len(body)):
        await stream.send_all(body[i : i + 1])
        await trio.sleep(0.05)


def good_traffic(app: Appliance, latencies: list[float], codes: list[int]) -> None:
    with httpx.Client(timeout=10) as client:
        for i in range(GOOD):
            body = delivery([f"good-{i}-a", f"good-{i}-b"])
            started = time.perf_counter()
            r = app.post(body, client=client)
            latencies.append(time.perf_counter() - started)
            codes.append(r.status_code)
            time.sleep(0.01)


async def test_good_deliveries_are_served_through_idle_and_slowloris_clients(
    make_appliance: Any,
) -> None:
    clock = Stopwatch()
    raise_nofile(IDLE * 2 + 500)
    app: Appliance = make_appliance(
        {
            "webhook": {"body_timeout_seconds": BODY_TIMEOUT},
            "importer": {"command": ["/bin/true"]},
            # Room for all 1,030 attackers: the cap and its evictions are test_flood.py's.
            "listen": {"max_connections": 2048},
        }
    )
    await trio.to_thread.run_sync(app.start)
    assert app.proc is not None
    rss_before = rss_kib(app.proc.pid)

    # Baseline latency with no attack, for comparison.
    base_lat: list[float] = []
    base_codes: list[int] = []
    await trio.to_thread.run_sync(good_traffic, app, base_lat, base_codes)

    idle = await trio.to_thread.run_sync(open_idle, app, IDLE)
    stop = trio.Event()
    sent = [0]
    body_answers: list[tuple[bytes, float]] = []
    latencies: list[float] = []
    codes: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(HEADER_LORIS):
                nursery.start_soon(header_loris, app, stop, sent)
            for _ in range(BODY_LORIS):
                nursery.start_soon(body_loris, app, stop, body_answers)
            await trio.sleep(BODY_TIMEOUT + 0.5)  # the attack is in full swing
            await trio.to_thread.run_sync(good_traffic, app, latencies, codes)
            healthz = await trio.to_thread.run_sync(
                lambda: httpx.get(app.admin + "/healthz").status_code
            )
            # Still all there: the idle connections were kept (they answer another request).
            stop.set()

        def reuse(socks: list[socket.socket]) -> int:
            ok = 0
            for s in socks:
                s.sendall(b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                ok += read_response(s).startswith(b"HTTP/1.1 404")
            return ok

        still_open = await trio.to_thread.run_sync(reuse, idle)
        rss_after = rss_kib(app.proc.pid)
    finally:
        for s in idle:
            s.close()

    lat = sorted(latencies)
    p50 = statistics.median(lat)
    p99 = lat[int(len(lat) * 0.99) - 1]
    base = sorted(base_lat)
    timeouts = [
        (a, t) for a, t in body_answers if a.startswith(b"HTTP/1.1 503") and b"body_timeout" in a
    ]
    report(
        "slow_clients",
        idle_connections=IDLE,
        header_loris=HEADER_LORIS,
        body_loris=BODY_LORIS,
        good=len(codes),
        baseline_p50_ms=round(statistics.median(base) * 1000, 1),
        baseline_p99_ms=round(base[int(len(base) * 0.99) - 1] * 1000, 1),
        attack_p50_ms=round(p50 * 1000, 1),
        attack_p99_ms=round(p99 * 1000, 1),
        attack_max_ms=round(lat[-1] * 1000, 1),
        header_bytes_trickled=sent[0],
        body_timeouts=len(timeouts),
        body_timeout_answer_seconds=round(min((t for _, t in timeouts), default=0), 2),
        rss_before_mib=round(rss_before / 1024, 1),
        rss_during_mib=round(rss_after / 1024, 1),
        seconds=clock(),
    )
    assert codes == [200] * GOOD and base_codes == [200] * GOOD
    assert p99 < 1.0, p99
    assert healthz == 200
    assert still_open == IDLE
    # Every trickled body that was answered was answered 503 body_timeout after the bound.
    assert timeouts, body_answers[:3]
    for answer, seconds in body_answers:
        if answer:
            assert answer.startswith(b"HTTP/1.1 503") and b"body_timeout" in answer, answer
            assert BODY_TIMEOUT - 0.2 <= seconds < BODY_TIMEOUT + 2, seconds
    assert app.proc.poll() is None
    assert await trio.to_thread.run_sync(app.stop) == 0
