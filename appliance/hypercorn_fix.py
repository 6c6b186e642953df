"""A fix for Hypercorn 0.18's trio TCP server, applied at import by server.py.

`TCPServer.protocol_send` serialises `send_all` calls with `send_lock`, but `_close` calls
`send_eof` without it. An HTTP/1.0 request (which must end the connection) followed by stray
bytes makes Hypercorn's reader answer 400 and close while the app's answer is being written:
two tasks use one trio stream at once, `trio.BusyResourceError` escapes `hypercorn.trio.serve`
and ends the whole server. One unauthenticated packet took the receiver down (found by
tests/fault/test_bad_input.py). Taking the same lock around `send_eof` makes the writes and the
EOF take turns; the upstream methods are otherwise unchanged.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.trio.tcp_server import TCPServer

_original_close = TCPServer._close


async def _close_under_send_lock(self: Any) -> None:
    lock: trio.Lock = self.send_lock
    if lock.locked() and lock.statistics().owner is trio.lowlevel.current_task():
        await _original_close(self)
        return
    async with lock:
        await _original_close(self)


def apply() -> None:
    if TCPServer._close is not _close_under_send_lock:
        TCPServer._close = _close_under_send_lock  # type: ignore[method-assign]
