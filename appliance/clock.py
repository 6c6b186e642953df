"""The one clock of the async code: wall-clock seconds read through trio's clock.

Records store wall-clock times (received, started, next attempt due), and the dispatcher waits
with trio (`move_on_at`, `sleep`). `TrioWallClock` makes the two one clock: the wall time when
it was made, plus trio's time since. Under `trio.testing.MockClock` the dispatcher's backoff,
retry and polling run in virtual time, so tests wait for nothing; in production trio's clock is
the monotonic clock, so a step of the system clock cannot make a backoff fire early or late.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""

    def deadline(self, at: float) -> float:
        """The trio deadline (for `trio.move_on_at`) of wall-clock time `at`."""


class TrioWallClock:
    """Make inside `trio.run`: it anchors trio's clock to the wall clock once."""

    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._offset

    def deadline(self, at: float) -> float:
        return at - self._offset
