"""A minimal sd_notify client: readiness, reload, stop and watchdog messages to systemd.

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) to a
``Type=notify`` service and reads newline-separated ``KEY=value`` datagrams from it.

Under the PyInstaller onefile bootloader the main PID that systemd knows is the bootloader,
and the Python server is its child. So the unit needs ``NotifyAccess=all``, and the watchdog
is taken from ``$WATCHDOG_USEC`` alone: ``$WATCHDOG_PID`` names the bootloader, never us, and
checking it (as ``sd_watchdog_enabled()`` does) would switch the watchdog off. For the same
reason ``$NOTIFY_SOCKET`` is left in the environment: the importer's children never inherit it
from us because the importer builds its own environment.

Sending never raises: a lost notification must not take the server down. systemd's own
timeouts (start, watchdog) are what notice a server that cannot report.
"""

from __future__ import annotations

import os
import socket

import trio

__all__ = ["extend_start_loop", "notify", "watchdog_interval_seconds", "watchdog_loop"]

# While the store is prepared before READY=1 (a flow index rebuild takes ~55 s at 10 M flow
# ids, docs/INDEX.md), the start timeout is extended by this much, this often.
EXTEND_EVERY_SECONDS = 10.0
EXTEND_BY_SECONDS = 30.0


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of "@".
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when no socket is configured or sending
    failed. Blocking is not a concern: a datagram to a local socket is queued or refused at once.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(target)
    if address is None or not lines:
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def watchdog_interval_seconds() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds (systemd's advice), or None when it is not set.

    ``$WATCHDOG_PID`` is deliberately ignored: see the module docstring.
    """
    raw = os.environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


async def watchdog_loop() -> None:
    """Send ``WATCHDOG=1`` every half watchdog period, forever; return at once if none is set.

    Run it in the server's nursery: it stops pinging as soon as the event loop stalls, which is
    exactly what the watchdog is meant to catch.
    """
    interval = watchdog_interval_seconds()
    if interval is None or not os.environ.get("NOTIFY_SOCKET"):
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


async def extend_start_loop(status: str, every: float = EXTEND_EVERY_SECONDS) -> None:
    """Until cancelled, every `every` seconds: ask systemd for `EXTEND_BY_SECONDS` more
    before the start times out (`EXTEND_TIMEOUT_USEC`), say why (`STATUS`), and ping the
    watchdog. Run it beside the work that precedes READY=1; cancel it when that work is done.
    """
    usec = int(EXTEND_BY_SECONDS * 1_000_000)
    while True:
        await trio.sleep(every)
        notify(f"EXTEND_TIMEOUT_USEC={usec}", f"STATUS={status}", "WATCHDOG=1")
