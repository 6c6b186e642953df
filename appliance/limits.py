"""Budgets for what an anonymous sender can make the server spend. Plain objects, no I/O.

`BodyBudget` bounds the bytes of all webhook bodies held at once (`webhook.max_inflight_body_bytes`).
A body with a Content-Length reserves it whole before a byte is read, so every body admitted
can finish (bodies reserving piecemeal would all stall half-read at the limit and be refused
together, over and over); a chunked body reserves as its bytes arrive. A reservation is
granted only while the bytes in use stay under a line that falls with the body's own size:

    line(size) = total * (1 - size / (2 * max_body_bytes))

A tiny body may use (almost) the whole budget, a body of the maximum size only half of it. A
flood of large bodies therefore stops well short of the total and leaves room for the small
ones real deliveries are (a few KB to a few MB); a flood of small bodies is bounded by the
connection cap long before it reaches the line. A body refused is answered 503 with
`Retry-After` (CoinTracker retries 5xx) before its bytes are read. A sender that announces a
large body and then trickles it holds its reservation for at most `webhook.body_timeout_seconds`.
`total >= 2 * max_body_bytes` (checked by configrules.py) lets a body of the maximum size through on
an otherwise idle server.

`RateLimit` is a token bucket for log lines that an unauthenticated request causes.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class BodyBudget:
    def __init__(self, total: int, max_body: int) -> None:
        self.used = 0
        self.total = total
        self.max_body = max_body

    def configure(self, total: int, max_body: int) -> None:
        """A reload changes the limits; bytes already held stay held."""
        self.total = total
        self.max_body = max_body

    def line(self, size: int) -> int:
        return self.total - self.total * size // (2 * self.max_body)

    def hold(self) -> Hold:
        return Hold(self)


class Hold:
    """One body's share of the budget, released in one go when the request ends."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow(self, more: int) -> bool:
        b = self.budget
        if b.used + more > b.line(self.size + more):
            return False
        b.used += more
        self.size += more
        return True

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class RateLimit:
    """Allows `per_second` events on average with bursts of `burst`; counts the rest."""

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_second
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()
        self.suppressed = 0

    def allow(self) -> int | None:
        """None when the event must be dropped (counted); otherwise how many were dropped
        since the last allowed one, so the caller can say so."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return None
        self.tokens -= 1.0
        dropped, self.suppressed = self.suppressed, 0
        return dropped
