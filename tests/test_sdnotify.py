"""sd_notify client against a real AF_UNIX datagram socket, as systemd would listen."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from appliance import sdnotify


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a path, exported as $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with sock:
        yield sock


def test_notify_sends_one_datagram_with_newline_separated_lines(
    listener: socket.socket,
) -> None:
    assert sdnotify.notify("READY=1", "STATUS=serving") is True
    assert listener.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_to_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ct-appliance-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_notify_with_unsupported_address_returns_false(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_notify_when_nobody_listens_returns_false_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval_seconds() == 15.0


def test_watchdog_interval_ignores_watchdog_pid_of_the_onefile_bootloader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under the onefile bootloader systemd's main PID is our parent, not us.
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert sdnotify.watchdog_interval_seconds() == 2.0


@pytest.mark.parametrize("value", [None, "", "0", "-5", "soon"])
def test_no_watchdog_interval_without_a_positive_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", value)
    assert sdnotify.watchdog_interval_seconds() is None


async def test_watchdog_loop_returns_at_once_without_watchdog(
    listener: socket.socket,
) -> None:
    with trio.fail_after(1):
        await sdnotify.watchdog_loop()
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.recv(4096)


async def test_watchdog_loop_returns_at_once_without_notify_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    with trio.fail_after(1):
        await sdnotify.watchdog_loop()


async def test_watchdog_loop_pings_every_half_period(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    listener.setblocking(False)
    with trio.move_on_after(0.35):
        await sdnotify.watchdog_loop()
    pings = []
    while True:
        try:
            pings.append(listener.recv(4096))
        except BlockingIOError:
            break
    # Virtual time: pings at t = 0, 0.1, 0.2 and 0.3, then the deadline.
    assert pings == [b"WATCHDOG=1"] * 4


async def test_a_long_start_asks_systemd_to_wait(listener: socket.socket) -> None:
    """While the store is prepared before READY=1 (a flow-index rebuild outlasts
    TimeoutStartSec at 10 M ids), systemd is asked for more time, told why, and the watchdog
    is pinged; nothing is sent once the work is done."""
    listener.settimeout(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdnotify.extend_start_loop, "rebuilding", 0.05)
        await trio.sleep(0.18)
        nursery.cancel_scope.cancel()
    got = []
    while True:
        try:
            got.append(listener.recv(4096))
        except BlockingIOError:
            break
    assert len(got) >= 2  # one every 0.05 s for 0.18 s (fewer only on a stalled loop)
    assert set(got) == {b"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=rebuilding\nWATCHDOG=1"}
    await trio.sleep(0.1)
    with pytest.raises(BlockingIOError):
        listener.recv(4096)
