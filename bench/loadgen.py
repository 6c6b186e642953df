"""The one Python load generator (trio + h11): everything the bench does over HTTP except
closed-loop saturation, which is wrk's (a Python client on this two-core machine saturates its
own core before the server does).

    python bench/loadgen.py paced URL FILE --rate 100 --seconds 8
    python bench/loadgen.py once  URL FILE --concurrency 16 [--until-done STATUS_URL]

paced: request i is due at t0 + i/rate whatever happened before it (open loop, unlike wrk's
closed loop). It goes out on an idle keep-alive connection, or on a new one when every connection
is busy, and its latency runs from its *due* time, not from when it was sent: a server that stalls
is charged for every request that queued behind the stall (no coordinated omission). `send_lag`
reports how late the generator itself was, so a starved generator is visible.

once: every line of FILE exactly once over C keep-alive connections, as fast as answered (priming
the duplicate path, feeding the importer). With --until-done it then polls GET STATUS_URL (the
admin /status) every 0.1 s until `inbox.done` reaches the number accepted: `done_s` is the time
from the first post until then (the import row).

Both print one line of JSON on stdout: counts, statuses, verdicts and latency percentiles (ms).
The harness also imports `get()`, a blocking GET through the same client, to poll readiness.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from payloads import read_file  # noqa: E402

SIG_HEADER = "X-Cointracker-Signature"
TIMEOUT_SECONDS = 10.0
Headers = Sequence[tuple[str, str]]
FAILURES = (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError)


class Exchange:
    """One keep-alive connection's HTTP/1.1 state, without I/O (h11): the bytes of a request to
    send, and the bytes received fed in until the answer is complete."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.h11 = h11.Connection(our_role=h11.CLIENT)
        self.status = 0
        self.chunks: list[bytes] = []

    def request(self, method: str, target: str, headers: Headers, body: bytes) -> bytes:
        if body:
            headers = [*headers, ("Content-Length", str(len(body)))]
        out = self.h11.send(
            h11.Request(method=method, target=target, headers=[("Host", self.host), *headers])
        )
        if body:
            out += self.h11.send(h11.Data(data=body))
        return out + self.h11.send(h11.EndOfMessage())

    def receive(self, data: bytes) -> tuple[int, bytes] | None:
        """Feed what was read (b"" at EOF); (status, body) once the answer is complete."""
        self.h11.receive_data(data)
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                answer, self.chunks = (self.status, b"".join(self.chunks)), []
                return answer
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


def get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """GET path on 127.0.0.1:port, blocking; None if nothing answers."""
    x = Exchange(f"127.0.0.1:{port}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(x.request("GET", path, [], b""))
            while (answer := x.receive(s.recv(65536))) is None:
                pass
            return answer
    except (OSError, h11.ProtocolError):
        return None


class Conn:
    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.x = Exchange(host)

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        return cls(await trio.open_tcp_stream(host, port), f"{host}:{port}")

    async def request(
        self, method: str, target: str, headers: Headers = (), body: bytes = b""
    ) -> tuple[int, bytes]:
        await self.stream.send_all(self.x.request(method, target, headers, body))
        while (answer := self.x.receive(await self.stream.receive_some(65536))) is None:
            pass
        return answer

    async def post(self, target: str, sig: str, body: bytes) -> tuple[int, bytes]:
        headers = [("Content-Type", "application/json"), (SIG_HEADER, sig)]
        return await self.request("POST", target, headers, body)

    async def close(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    duplicate: int = 0
    errors: int = 0

    def answer(self, status: int, body: bytes) -> None:
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if b'"accepted"' in body:
            self.accepted += 1
        elif b'"duplicate"' in body:
            self.duplicate += 1


def _where(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


async def post(
    url: str, lines: list[tuple[str, bytes]], count: int, rate: float | None, concurrency: int
) -> Tally:
    """POST `count` lines of FILE (cycled): with a rate, request i at t0 + i/rate whatever
    happened before it (open loop); without, each as soon as fewer than `concurrency` are in
    flight. A request takes an idle keep-alive connection, or opens one when none is idle."""
    host, port, path = _where(url)
    tally = Tally()
    idle: list[Conn] = []
    slots = trio.Semaphore(concurrency)

    async def one(i: int, due: float) -> None:
        sig, body = lines[i % len(lines)]
        conn = idle.pop() if idle else None
        try:
            with trio.fail_after(TIMEOUT_SECONDS):
                if conn is None:
                    conn = await Conn.open(host, port)
                tally.send_lags.append(trio.current_time() - due)
                status, answer = await conn.post(path, sig, body)
            tally.latencies.append(trio.current_time() - due)
            tally.answer(status, answer)
            if conn.x.reusable():
                idle.append(conn)
            else:
                await conn.close()
        except FAILURES:
            tally.errors += 1
            if conn is not None:
                await conn.close()
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        # A few connections opened before the clock starts, as a sender keeps them alive.
        for _ in range(min(4, concurrency)):
            idle.append(await Conn.open(host, port))
        t0 = trio.current_time() + 0.05
        for i in range(count):
            if rate:
                await trio.sleep_until(t0 + i / rate)
            await slots.acquire()
            nursery.start_soon(one, i, t0 + i / rate if rate else trio.current_time())
    for conn in idle:
        await conn.close()
    return tally


async def until_done(status_url: str, want: int, deadline: float) -> int:
    """Poll the admin /status until inbox.done >= want (or the deadline); the last count seen."""
    host, port, path = _where(status_url)
    done = 0
    with trio.move_on_at(deadline):
        conn = await Conn.open(host, port)
        while True:
            status, answer = await conn.request("GET", path)
            if status == 200:
                done = int(json.loads(answer)["inbox"]["done"])
                if done >= want:
                    break
            if not conn.x.reusable():
                await conn.close()
                conn = await Conn.open(host, port)
            await trio.sleep(0.1)
    return done


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(p / 100 * len(sorted_values))) - 1]


def report(tally: Tally, elapsed: float) -> dict[str, Any]:
    lat, lags = sorted(tally.latencies), sorted(tally.send_lags)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "requests": len(lat),
        "elapsed_s": round(elapsed, 3),
        "errors": tally.errors,
        "statuses": tally.statuses,
        "accepted": tally.accepted,
        "duplicate": tally.duplicate,
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "send_lag_max_ms": ms(lags[-1] if lags else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="paced / once load for bench/run.py")
    parser.add_argument("mode", choices=["paced", "once"])
    parser.add_argument("url")
    parser.add_argument("file", type=Path)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--until-done", metavar="STATUS_URL")
    parser.add_argument("--timeout-seconds", type=float, default=120.0)
    args = parser.parse_args()
    lines = read_file(args.file)

    async def run() -> dict[str, Any]:
        t0 = trio.current_time()
        if args.mode == "paced":  # never waits for a slot: open loop
            count = int(args.rate * args.seconds)
            tally = await post(args.url, lines, count, args.rate, max(count, 1))
        else:
            tally = await post(args.url, lines, len(lines), None, args.concurrency)
        out = report(tally, trio.current_time() - t0)
        if args.until_done:
            deadline = trio.current_time() + args.timeout_seconds
            out["done"] = await until_done(args.until_done, tally.accepted, deadline)
            out["done_s"] = round(trio.current_time() - t0, 3)
        return out

    print(json.dumps(trio.run(run)))


if __name__ == "__main__":
    main()
