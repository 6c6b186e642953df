"""What a connection may cost: Hypercorn 0.18's trio server with a connection gate.

Hypercorn serves each accepted connection with a `TCPServer`; `install()` swaps in the subclass
below, once, before any listener starts. It adds, per listener config:

* A connection cap (`ConnectionGate`, `listen.max_connections` on the webhook listener). At the
  cap a new connection first evicts the connection that has been idle longest (between
  requests, or still before its first request's headers are complete: a slowloris holds no
  request), so idle sockets cannot lock senders out. With nothing idle to evict it is answered
  a fixed `503` with `Retry-After` and closed (over TLS it is closed before the handshake,
  which is the expensive part). Connections in the middle of a request are never evicted;
  their number is bounded by the cap and their time by `webhook.body_timeout_seconds`.
* HTTP/1.1 only on a cleartext listener. Hypercorn would switch to HTTP/2 on a prior-knowledge
  preface or an `Upgrade: h2c` request, where one connection opens many streams. Cleartext
  HTTP/2 is refused here (505 for the preface; the upgrade header is ignored as RFC 9110
  allows); HTTP/2 is offered over TLS only, through ALPN, with a bounded stream count.
* A keep-alive timeout that holds for every connection: upstream, the idle timer restarted
  after a response Quart served could be lost to a cancellation, and the connection then
  stayed open for good (see `protocol_send`).
* The send-lock fix: upstream `_close` calls `send_eof` outside `send_lock`, so an HTTP/1.0
  request followed by stray bytes made two tasks use one stream at once and
  `trio.BusyResourceError` ended the whole server (tests/fault/test_bad_input.py). Taking the
  lock around the close makes the writes and the EOF take turns.
"""

from __future__ import annotations

import json
from typing import Any

import h11
import hypercorn.protocol
import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

_REFUSAL_BODY = json.dumps(
    {"error": "overloaded", "message": "too many connections; retry later"}
).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 5\r\nconnection: close\r\ncontent-length: "
    + str(len(_REFUSAL_BODY)).encode()
    + b"\r\n\r\n"
    + _REFUSAL_BODY
)


class ConnectionGate:
    """Counts one listener's open connections and knows which are idle, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self.evicted = 0
        self._idle: dict[LimitedTCPServer, None] = {}  # insertion order: idle since

    def admit(self, conn: LimitedTCPServer) -> bool:
        if self.open >= self.limit:
            if not self._evict_one():
                self.refused += 1
                return False
        self.open += 1
        self._idle[conn] = None  # a new connection holds no request yet
        return True

    def leave(self, conn: LimitedTCPServer) -> None:
        self.open -= 1
        self._idle.pop(conn, None)

    def set_idle(self, conn: LimitedTCPServer, idle: bool) -> None:
        self._idle.pop(conn, None)
        if idle:
            self._idle[conn] = None

    def _evict_one(self) -> bool:
        # The evicted connection closes within a scheduling round; until then the count may
        # pass the cap by the connections being evicted, never by more.
        for conn in self._idle:
            del self._idle[conn]
            conn.evict()
            self.evicted += 1
            return True
        return False


class LimitedTCPServer(TCPServer):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._gate: ConnectionGate | None = getattr(self.config, "connection_gate", None)
        self._idle_scope: trio.CancelScope | None = None
        self._evicted = False

    async def run(self) -> None:
        gate = self._gate
        if gate is None:
            await super().run()
            return
        if not gate.admit(self):
            await self._refuse()
            return
        try:
            await super().run()
        finally:
            gate.leave(self)

    async def _refuse(self) -> None:
        transport = getattr(self.stream, "transport_stream", None)
        try:
            if transport is None:  # cleartext: a fixed answer, sent within a second
                with trio.move_on_after(1.0):
                    await self.stream.send_all(REFUSAL)
            else:  # TLS: close before spending a handshake on it
                await transport.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def evict(self) -> None:
        self._evicted = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def protocol_send(self, event: Any) -> None:
        if not isinstance(event, Updated):
            await super().protocol_send(event)
            return
        if self._gate is not None:
            self._gate.set_idle(self, event.idle)
        if not event.idle:  # a request began: sent by the connection's own reading task
            await super().protocol_send(event)
            return
        # The idle timer is restarted from the task that finished the response; for a route
        # Quart serves, that task is being cancelled (Quart ends its request nursery on the
        # http.disconnect Hypercorn queues as the stream closes), and upstream the restart was
        # lost: the connection then had no keep-alive timeout at all. Shielded, it always runs.
        with trio.CancelScope(shield=True):
            await super().protocol_send(event)

    async def _idle_timeout(self) -> None:
        # Upstream waits keep_alive_timeout (or server shutdown) and then closes; an eviction
        # ends the wait early.
        if not self._evicted:
            with trio.move_on_after(self.config.keep_alive_timeout) as self._idle_scope:
                await self.context.terminated.wait()
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def _close(self) -> None:
        lock: trio.Lock = self.send_lock
        if lock.locked() and lock.statistics().owner is trio.lowlevel.current_task():
            await super()._close()
            return
        async with lock:
            await super()._close()


class CleartextH11Protocol(H11Protocol):
    """HTTP/1.1 without the two ways into HTTP/2 on a connection that is not TLS."""

    async def _check_protocol(self, event: h11.Request) -> None:
        if self.ssl:
            await super()._check_protocol(event)
        elif event.method == b"PRI" and event.target == b"*":
            raise _NoCleartextH2()
        # An `Upgrade: h2c` header is ignored: the request is answered over HTTP/1.1.

    async def _handle_events(self) -> None:
        try:
            await super()._handle_events()
        except _NoCleartextH2:
            await self._send_error_response(505)
            await self.send(Closed())


class _NoCleartextH2(Exception):
    pass


def install() -> None:
    """Make Hypercorn's trio worker use the classes above (idempotent)."""
    # Both names are looked up in these modules' globals each time a connection starts.
    setattr(hypercorn.trio.run, "TCPServer", LimitedTCPServer)  # noqa: B010
    setattr(hypercorn.protocol, "H11Protocol", CleartextH11Protocol)  # noqa: B010
