"""The webhook listener: a Quart-trio app whose webhook route is a thin ASGI adapter.

The webhook path is served by `WebhookEndpoint`, installed as the Quart app's ASGI middleware
(`app.asgi_app`), because the request path is where throughput is won: it reads the body as a
stream (so the size limit holds for a lying Content-Length or a chunked body, and the body
timeout is one cancel scope), and runs the checks of spec §4 in their order, except that what
the headers alone can refuse is refused before a byte of the body is read:

    path/method -> draining/store -> declared size -> credentials in the headers (bearer: the
    whole token; HMAC: the signature header is present and well formed) -> body, within the
    body budget, the size limit and the body timeout -> HMAC over the raw body -> JSON -> shape
    -> retry drill -> durable group commit -> (ack: imported: wait for the import) -> answer

Everything else on this listener goes to Quart, which answers 404 in the same JSON error shape.
An unauthenticated body is never parsed, stored or logged; the log lines that unauthenticated
requests cause are rate-limited (every request is still counted in the metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from quart import Quart, jsonify
from quart_trio import QuartTrio

from . import errors, payload
from .errors import AuthFailure, HTTPError
from .limits import Hold
from .logs import fields
from .record import Accepted, Incoming
from .runtime import Runtime

log = logging.getLogger("ct_appliance.webhook")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_DUPLICATE = b'{"status":"duplicate"}'
_ACCEPTED = b'{"status": "accepted", "delivery_id": "%s"}'


class _Disconnected(Exception):
    pass


class _Exchange:
    """One request's bookkeeping: log fields, and how far the body and the sender got."""

    __slots__ = ("info", "body_read", "authenticated")

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.body_read = False
        self.authenticated = False


class WebhookEndpoint:
    def __init__(self, fallback: ASGIApp, rt: Runtime) -> None:
        self.fallback = fallback
        self.rt = rt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.rt.live.config.webhook.path:
            await self.fallback(scope, receive, send)
            return
        started = time.perf_counter()
        live = self.rt.live  # one config for the whole request, even across a reload
        ex = _Exchange()
        drain = False
        try:
            status, body, outcome = await self._handle(scope, receive, live, ex)
            headers = [_JSON]
        except HTTPError as e:
            status, body, outcome = e.status, e.body(), e.code
            headers = [_JSON]
            if e.retry_after is not None:
                headers.append((b"retry-after", str(e.retry_after).encode()))
            if isinstance(e, errors.Unauthorized) and live.verifier.mode == "bearer":
                headers.append((b"www-authenticate", b'Bearer error="invalid_token"'))
            if isinstance(e, errors.MethodNotAllowed):
                headers.append((b"allow", b"POST"))
            if not ex.body_read and scope["method"] == "POST":
                # Answered before the body was read. A refused credential keeps the connection:
                # the answer goes out at once and the body is read and dropped behind it (the
                # sender sees its 401, not a reset). Anything else closes the connection.
                drain = isinstance(e, errors.Unauthorized)
                if not drain:
                    headers.append((b"connection", b"close"))
            elif isinstance(e, errors.PayloadTooLarge | errors.BodyTimeout):
                headers.append((b"connection", b"close"))
        except _Disconnected:
            return
        except Exception:
            log.exception("unexpected error while handling a delivery")
            err = errors.Internal("unexpected error; see the appliance log")
            status, body, outcome, headers = err.status, err.body(), err.code, [_JSON]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": drain})
        seconds = time.perf_counter() - started
        self.rt.metrics.request(outcome, status, seconds)
        self._log(ex, outcome, status, seconds)
        if drain:
            cfg = live.config.webhook
            if await _discard_body(receive, cfg.max_body_bytes, cfg.body_timeout_seconds):
                await send({"type": "http.response.body", "body": b""})

    def _log(self, ex: _Exchange, outcome: str, status: int, seconds: float) -> None:
        info = ex.info
        if not ex.authenticated:
            # What an anonymous sender can make us write is bounded: a burst, then a few lines
            # a second, each saying how many were left out since the last one.
            dropped = self.rt.anonymous_log.allow()
            if dropped is None:
                return
            if dropped:
                info["suppressed_since_last"] = dropped
        log.info(
            "delivery",
            extra=fields(
                outcome=outcome,
                status=status,
                latency_ms=round(seconds * 1000, 2),
                **info,
            ),
        )

    async def _handle(
        self, scope: Scope, receive: Receive, live: Any, ex: _Exchange
    ) -> tuple[int, bytes, str]:
        rt, cfg = self.rt, live.config
        if scope["method"] != "POST":
            raise errors.MethodNotAllowed("only POST is accepted here")
        if rt.draining:
            raise errors.Unavailable("shutting down; retry later")
        if not rt.backend.available:
            raise errors.Unavailable("store unavailable; retry later")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        limit = cfg.webhook.max_body_bytes
        declared = headers.get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > limit:
            raise errors.PayloadTooLarge(f"body larger than {limit} bytes")
        verifier = live.verifier
        with rt.budget.hold() as hold:
            try:
                authenticated = await verifier.verify_headers(headers)
                # A declared length is reserved whole before reading, so a body admitted is a
                # body that can finish; a chunked body reserves as it arrives.
                if length is not None and not hold.grow(length):
                    raise errors.Overloaded("too many bodies in flight; retry later")
                seconds = cfg.webhook.body_timeout_seconds
                body = await _read_body(receive, limit, seconds, hold, reserved=length is not None)
                ex.body_read = True
                if not authenticated:
                    await verifier.verify(headers, body)
            except AuthFailure as e:
                rt.metrics.signature_failures.labels(verifier.mode).inc()
                ex.info["auth_failure"] = e.reason
                raise errors.Unauthorized("authentication failed") from None
            ex.authenticated = True
            return await self._accept(body, live, ex.info)

    async def _accept(self, body: bytes, live: Any, info: dict[str, Any]) -> tuple[int, bytes, str]:
        rt, cfg = self.rt, live.config
        if len(body) > payload.THREAD_PARSE_BYTES:
            delivery = await trio.to_thread.run_sync(payload.parse, body)
        else:
            delivery = payload.parse(body)
        info["cost_basis_run_id"] = delivery.cost_basis_run_id
        if rt.drill_remaining > 0:
            rt.drill_remaining -= 1
            raise errors.InjectedFailure(
                f"retry drill: testing.fail_first_deliveries ({rt.drill_remaining} left)"
            )
        imported_ack = cfg.ack == "imported"
        item = Incoming(delivery, body, time.time(), want_owners=imported_ack)
        try:
            result: Accepted = await rt.backend.accept(item)
        except errors.StoreError as e:
            raise errors.Unavailable(f"store unavailable: {e}") from None
        if result.status == "accepted" and rt.dispatcher is not None:
            rt.dispatcher.notify()
        rt.metrics.flows(result.new, result.duplicate)
        info.update(delivery_id=result.delivery_id, flows_new=result.new)
        info["flows_duplicate"] = result.duplicate
        if imported_ack:
            await self._wait_imported(result, cfg.webhook.imported_wait_seconds)
        if result.status == "duplicate":
            return 200, _DUPLICATE, "duplicate"
        # The delivery id is ours (hex and a dash): no escaping needed.
        assert result.delivery_id is not None  # an accepted delivery has one
        return 200, _ACCEPTED % result.delivery_id.encode(), "accepted"

    async def _wait_imported(self, result: Accepted, bound: float) -> None:
        dispatcher = self.rt.dispatcher
        if dispatcher is None:
            raise errors.ImportFailed("no importer is running")
        seqs = set(result.owners)
        if result.seq is not None:
            seqs.add(result.seq)
        if not seqs:
            return
        outcome = await dispatcher.wait_imported(seqs, bound)
        if outcome != "done":
            raise errors.ImportFailed(
                f"import not confirmed: {outcome}; stored and retried locally"
            )


async def _receive_body(
    receive: Receive, limit: int, seconds: float, take: Callable[[bytes], None]
) -> None:
    """Hand every chunk of the body to `take`, within the size limit and the body timeout."""
    size = 0
    with trio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.PayloadTooLarge(f"body larger than {limit} bytes")
            take(chunk)
            if not message.get("more_body", False):
                return
    raise errors.BodyTimeout(f"body not complete within {seconds:g} s; retry")


async def _read_body(
    receive: Receive, limit: int, seconds: float, hold: Hold, *, reserved: bool
) -> bytes:
    """The whole body. Hypercorn holds it to its Content-Length, so a reserved body never
    outgrows its reservation; a chunked one grows its hold chunk by chunk."""
    chunks: list[bytes] = []

    def take(chunk: bytes) -> None:
        if chunk and not reserved and not hold.grow(len(chunk)):
            raise errors.Overloaded("too many bodies in flight; retry later")
        chunks.append(chunk)

    await _receive_body(receive, limit, seconds, take)
    return b"".join(chunks)


async def _discard_body(receive: Receive, limit: int, seconds: float) -> bool:
    """Read what is left of a refused body and drop it; True when it ended in time."""
    try:
        await _receive_body(receive, limit, seconds, lambda _chunk: None)
    except (HTTPError, _Disconnected):
        return False
    return True


def create_app(rt: Runtime) -> Quart:
    app = QuartTrio("ct_appliance")

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Any:
        return jsonify(error="not_found", message="no such path"), 404

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Any:
        return jsonify(error="method_not_allowed", message="method not allowed"), 405

    app.asgi_app = WebhookEndpoint(app.asgi_app, rt)  # type: ignore[method-assign, assignment, arg-type]
    return app
