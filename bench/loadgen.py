"""Open-loop paced load, and exactly-once posting, for bench/run.py (trio + h11).

    python bench/loadgen.py paced URL FILE --rate 100 --seconds 8
    python bench/loadgen.py once  URL FILE --concurrency 16

paced: request i is due at t0 + i/rate whatever happened before it (open loop, unlike wrk's
closed loop). It goes out on an idle keep-alive connection, or on a new one when every connection
is busy, and its latency runs from its *due* time, not from when it was sent: a server that stalls
is charged for every request that queued behind the stall (no coordinated omission). `send_lag`
reports how late the generator itself was, so a starved generator is visible.

once: every line of FILE exactly once over C keep-alive connections, as fast as answered (priming
the duplicate path, feeding the importer).

Both print one line of JSON on stdout: counts, statuses, verdicts and latency percentiles (ms).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from payloads import read_file  # noqa: E402

TIMEOUT_SECONDS = 10.0


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    duplicate: int = 0
    errors: int = 0
    connections: int = 0

    def answer(self, status: int, body: bytes) -> None:
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if b'"accepted"' in body:
            self.accepted += 1
        elif b'"duplicate"' in body:
            self.duplicate += 1


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(our_role=h11.CLIENT)

    @classmethod
    async def open(cls, host: str, port: int, tally: Tally) -> Conn:
        tally.connections += 1
        return cls(await trio.open_tcp_stream(host, port))

    async def post(
        self, host: str, path: str, header: str, sig: str, body: bytes
    ) -> tuple[int, bytes]:
        req = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("Host", host),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                (header, sig),
            ],
        )
        out = (
            self.h11.send(req)
            + self.h11.send(h11.Data(data=body))
            + self.h11.send(h11.EndOfMessage())
        )
        await self.stream.send_all(out)
        status = 0
        chunks = []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def close(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


async def paced(
    url: str, lines: list[tuple[str, bytes]], header: str, rate: float, seconds: float
) -> Tally:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    tally = Tally()
    idle: list[Conn] = []
    total = int(rate * seconds)

    async def one(i: int, due: float) -> None:
        sig, body = lines[i % len(lines)]
        conn = idle.pop() if idle else None
        try:
            with trio.fail_after(TIMEOUT_SECONDS):
                if conn is None:
                    conn = await Conn.open(host, port, tally)
                tally.send_lags.append(trio.current_time() - due)
                status, answer = await conn.post(f"{host}:{port}", path, header, sig, body)
            tally.latencies.append(trio.current_time() - due)
            tally.answer(status, answer)
            if conn.reusable():
                idle.append(conn)
            else:
                await conn.close()
        except (
            OSError,
            trio.TooSlowError,
            h11.ProtocolError,
            trio.BrokenResourceError,
            ConnectionError,
        ):
            tally.errors += 1
            if conn is not None:
                await conn.close()

    async with trio.open_nursery() as nursery:
        # A few connections opened before the clock starts, as a sender keeps them alive.
        for _ in range(4):
            idle.append(await Conn.open(host, port, tally))
        t0 = trio.current_time() + 0.05
        for i in range(total):
            due = t0 + i / rate
            await trio.sleep_until(due)
            nursery.start_soon(one, i, due)
    for conn in idle:
        await conn.close()
    return tally


async def once(url: str, lines: list[tuple[str, bytes]], header: str, concurrency: int) -> Tally:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    tally = Tally()
    queue = iter(range(len(lines)))

    async def worker() -> None:
        conn: Conn | None = None
        for i in queue:
            sig, body = lines[i]
            start = trio.current_time()
            try:
                with trio.fail_after(TIMEOUT_SECONDS):
                    if conn is None:
                        conn = await Conn.open(host, port, tally)
                    status, answer = await conn.post(f"{host}:{port}", path, header, sig, body)
                tally.latencies.append(trio.current_time() - start)
                tally.answer(status, answer)
                if not conn.reusable():
                    await conn.close()
                    conn = None
            except (
                OSError,
                trio.TooSlowError,
                h11.ProtocolError,
                trio.BrokenResourceError,
                ConnectionError,
            ):
                tally.errors += 1
                if conn is not None:
                    await conn.close()
                conn = None
        if conn is not None:
            await conn.close()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return tally


def report(tally: Tally, elapsed: float) -> dict[str, Any]:
    lat = sorted(tally.latencies)
    lags = sorted(tally.send_lags)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "requests": len(lat),
        "elapsed_s": round(elapsed, 3),
        "errors": tally.errors,
        "statuses": tally.statuses,
        "accepted": tally.accepted,
        "duplicate": tally.duplicate,
        "connections": tally.connections,
        "p50_ms": ms(percentile(lat, 50)),
        "p90_ms": ms(percentile(lat, 90)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "send_lag_p99_ms": ms(percentile(lags, 99)),
        "send_lag_max_ms": ms(lags[-1] if lags else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="paced / once load for bench/run.py")
    parser.add_argument("mode", choices=["paced", "once"])
    parser.add_argument("url")
    parser.add_argument("file", type=Path)
    parser.add_argument("--header", default="X-Cointracker-Signature")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    lines = read_file(args.file)

    async def run() -> tuple[Tally, float]:
        t0 = trio.current_time()
        if args.mode == "paced":
            tally = await paced(args.url, lines, args.header, args.rate, args.seconds)
        else:
            tally = await once(args.url, lines, args.header, args.concurrency)
        return tally, trio.current_time() - t0

    tally, elapsed = trio.run(run)
    print(json.dumps(report(tally, elapsed)))


if __name__ == "__main__":
    main()
