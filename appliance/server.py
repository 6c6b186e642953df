"""`ct-appliance serve`: the one nursery that owns everything.

    outer nursery
    ├── GroupCommitter.run        the single LMDB writer
    ├── Dispatcher.run            importer runs (inbox -> importer -> store)
    ├── store probe               clears "store unavailable" once writes work again
    ├── watchdog                  sd_notify WATCHDOG=1 when systemd asks for it
    └── web nursery
        ├── hypercorn serve       webhook listener(s)
        ├── hypercorn serve       admin listener
        └── signals               SIGTERM/SIGINT: drain; SIGHUP: reload

Shutdown (SIGTERM): readiness drops, the listeners stop accepting and finish in-flight requests
within `listen.graceful_timeout_seconds`; then running imports get
`importer.shutdown_grace_seconds` before they are killed (they stay pending); the writer
commits what is queued, the store closes, and the process exits 0.
"""

from __future__ import annotations

import errno
import functools
import logging
import signal
import ssl
import time
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve

from . import admin, connections, http, logs, sdnotify
from .auth import HmacVerifier, Verifier
from .backend import Backend, open_backend
from .config import Config, Loaded, mask_url
from .config import load as load_config
from .dispatcher import Dispatcher
from .errors import (
    ApplianceError,
    ConfigError,
    KeyLoadError,
    ReloadRefused,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from .metrics import Metrics
from .reload import restart_needed, summarize_changes
from .runtime import Live, Runtime
from .version import VERSION

log = logging.getLogger("ct_appliance.server")
connections.install()


TLS12_CIPHERS = ":".join(
    f"ECDHE-{auth}-{cipher}"
    for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")
    for auth in ("ECDSA", "RSA")
)
# HTTP/2 (TLS only): streams one connection may have open at once. Their bodies draw on the
# same body budget as HTTP/1.1 requests; this only bounds the per-connection bookkeeping.
H2_MAX_STREAMS = 16
# Hypercorn queues this many body chunks (up to 64 KiB each) per request before it stops
# reading the socket: what a connection can buffer beyond the body budget.
APP_QUEUE_CHUNKS = 4
ADMIN_MAX_CONNECTIONS = 64


class TLSHolder:
    """Serves the current certificate: an SNI callback swaps in the latest loaded context, so a
    reload changes the certificate of new handshakes while open connections keep theirs."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.current = self._context(cert_file, key_file)
        self.outer = self._context(cert_file, key_file)
        self.outer.sni_callback = self._pick

    @staticmethod
    def _context(cert_file: str, key_file: str) -> ssl.SSLContext:
        # Mozilla's "intermediate" profile without DHE: TLS 1.3, and TLS 1.2 with ECDHE key
        # exchange and AEAD ciphers only (no CBC, no RSA key exchange); no renegotiation.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.load_cert_chain(cert_file, key_file)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx

    def _pick(self, sslobj: Any, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    def reload(self, cert_file: str, key_file: str) -> None:
        self.current = self._context(cert_file, key_file)


class _HyperConfig(HyperConfig):
    tls: TLSHolder | None = None
    connection_gate: connections.ConnectionGate | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.outer if self.tls is not None else None


def _hyper_config(
    binds: list[str], cfg: Config, tls: TLSHolder | None, gate: connections.ConnectionGate
) -> _HyperConfig:
    hc = _HyperConfig()
    hc.bind = binds
    hc.graceful_timeout = cfg.listen.graceful_timeout_seconds
    hc.keep_alive_timeout = cfg.listen.keep_alive_timeout_seconds
    hc.backlog = 2048
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.connection_gate = gate
    hc.h2_max_concurrent_streams = H2_MAX_STREAMS
    hc.max_app_queue_size = APP_QUEUE_CHUNKS
    if tls is not None and cfg.listen.tls is not None:
        hc.tls = tls
        hc.certfile = cfg.listen.tls.cert_file
        hc.keyfile = cfg.listen.tls.key_file
    return hc


def make_verifier(cfg: Config) -> Verifier:
    if cfg.auth.mode == "bearer":
        from .bearer import BearerVerifier  # PyJWT and its keys only when bearer is in use

        assert cfg.auth.bearer is not None
        return BearerVerifier(cfg.auth.bearer)
    assert cfg.auth.hmac is not None
    return HmacVerifier(cfg.auth.hmac)


async def run(loaded: Loaded) -> None:
    cfg = loaded.config
    for warning in loaded.warnings:
        log.warning("config warning", extra=logs.fields(detail=warning))
    backend = open_backend(cfg, serving=True)
    clean = False
    try:
        recovered = await _recover(backend)
        if any(recovered.values()):
            log.warning("flow index recovered from the inbox", extra=logs.fields(**recovered))
        await _run(loaded, backend)
        clean = True
    finally:
        try:
            backend.close(clean=clean)
        except StoreError as e:  # not fatal: the index is then checked again at the next start
            log.warning("could not mark the flow index clean", extra=logs.fields(error=str(e)))
        log.info("store closed")


async def _recover(backend: Backend) -> dict[str, Any]:
    """Make the store consistent (the flow index caught up with the inbox) before accepting
    anything: a stale index could answer `accepted` for a known flow id. A full disk here is
    waited out, not fatal. Meanwhile systemd is asked to wait (a rebuild outlasts
    `TimeoutStartSec`)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            sdnotify.extend_start_loop, "preparing the store: catching up the flow index"
        )
        tries = 0
        while True:
            try:
                out: dict[str, Any] = await trio.to_thread.run_sync(backend.recover)
                nursery.cancel_scope.cancel()
                return out
            except (StoreFull, StoreUnavailable) as e:
                if tries % 30 == 0:
                    log.error("cannot prepare the store; retrying", extra=logs.fields(error=str(e)))
                    sdnotify.notify(f"STATUS=store unavailable at start: {e}; retrying")
                tries += 1
                await trio.sleep(1.0)


async def _run(loaded: Loaded, backend: Backend) -> None:
    cfg = loaded.config
    metrics = Metrics()
    verifier = make_verifier(cfg)
    rt = Runtime(Live(cfg, verifier), backend, metrics, loaded.path)
    rt.started_at = time.time()
    metrics.set_info(VERSION, cfg.environment, verifier.mode)
    dispatcher = Dispatcher(rt)
    rt.dispatcher = dispatcher
    metrics.watch_inbox(backend.summary)
    tls = TLSHolder(cfg.listen.tls.cert_file, cfg.listen.tls.key_file) if cfg.listen.tls else None
    gates = {
        "webhook": connections.ConnectionGate(cfg.listen.max_connections),
        "admin": connections.ConnectionGate(ADMIN_MAX_CONNECTIONS),
    }
    rt.webhook_gate = gates["webhook"]
    metrics.watch_limits(lambda: {"gates": gates, "inflight_body_bytes": rt.budget.used})
    web_cfg = _hyper_config(list(cfg.listen.bind), cfg, tls, gates["webhook"])
    admin_cfg = _hyper_config([cfg.admin.bind], cfg, None, gates["admin"])

    shutdown = trio.Event()
    async with trio.open_nursery() as outer:
        await outer.start(backend.run_writer)
        # Signals are handled until the process ends: a second SIGTERM (systemd's default
        # KillMode signals the onefile bootloader and its child) must not cut the drain short.
        signals_scope = await outer.start(_signals, rt, shutdown, tls)
        async with trio.open_nursery() as aux:
            rt.nursery = aux
            try:
                await verifier.prepare()
            except KeyLoadError as e:
                if cfg.auth.bearer is None or not cfg.auth.bearer.jwks_url:
                    raise
                log.error("bearer keys not loaded yet; not ready", extra=logs.fields(error=str(e)))
            aux.start_soon(verifier.run)
            await aux.start(dispatcher.run)
            aux.start_soon(_probe_store, rt)
            aux.start_soon(sdnotify.watchdog_loop)
            await _serve_until_stopped(rt, web_cfg, admin_cfg, shutdown)
            # Listeners are closed and in-flight requests answered.
            log.info("listeners closed; stopping importer runs")
            await dispatcher.stop(rt.live.config.importer.shutdown_grace_seconds)
            rt.live.verifier.stop()
            aux.cancel_scope.cancel()
        backend.stop_writes()
        signals_scope.cancel()
    log.info("stopped cleanly")


async def _serve_until_stopped(
    rt: Runtime, web_cfg: _HyperConfig, admin_cfg: _HyperConfig, shutdown: trio.Event
) -> None:
    """Serve both listeners until `shutdown`; return once in-flight requests are done."""
    cfg = rt.live.config
    async with trio.open_nursery() as web:
        binds, admin_binds = [
            await web.start(
                functools.partial(hypercorn_serve, app, hc, shutdown_trigger=shutdown.wait)
            )
            for app, hc in ((http.create_app(rt), web_cfg), (admin.create_app(rt), admin_cfg))
        ]
        log.info(
            "ready",
            extra=logs.fields(
                webhook=[b + cfg.webhook.path for b in binds],
                admin=admin_binds,
                auth_mode=rt.live.verifier.mode,
                environment=cfg.environment,
                store=cfg.store.path if cfg.store.backend == "lmdb" else cfg.store.backend,
                version=VERSION,
            ),
        )
        sdnotify.notify("READY=1", f"STATUS=serving {cfg.webhook.path}")


async def _probe_store(rt: Runtime) -> None:
    """While the store refuses writes (disk full), try a tiny write every second."""
    while True:
        await trio.sleep(1.0)
        if not rt.backend.available and not rt.draining:
            try:
                await rt.backend.probe()
            except ApplianceError:
                continue


async def _signals(
    rt: Runtime,
    shutdown: trio.Event,
    tls: TLSHolder | None,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    with (
        trio.CancelScope() as scope,
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
    ):
        task_status.started(scope)
        async for signum in signals:
            name = signal.Signals(signum).name
            if shutdown.is_set():
                log.info("already stopping; signal ignored", extra=logs.fields(signal=name))
            elif signum == signal.SIGHUP:
                await reload(rt, tls)
            else:
                log.info("shutdown requested", extra=logs.fields(signal=name))
                sdnotify.notify("STOPPING=1")
                rt.draining = True
                shutdown.set()


async def reload(rt: Runtime, tls: TLSHolder | None) -> bool:
    """Validate the config file completely, then switch to it between requests."""
    sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    old = rt.live.config
    try:
        try:
            loaded = load_config(rt.config_path)
        except ConfigError as e:
            raise ReloadRefused(e.problems) from None
        new = loaded.config
        verifier: Verifier = make_verifier(new)
        try:
            await verifier.prepare()
        except ApplianceError as e:
            raise ReloadRefused([mask_url(f"auth: {e}")]) from None
        if tls is not None and new.listen.tls is not None:
            try:
                tls.reload(new.listen.tls.cert_file, new.listen.tls.key_file)
            except (OSError, ssl.SSLError) as e:
                raise ReloadRefused([f"listen.tls: cannot load certificate/key: {e}"]) from None
    except ReloadRefused as e:
        rt.last_reload = {"at": time.time(), "ok": False, "errors": e.problems}
        log.error(
            "reload refused; still serving with the previous config",
            extra=logs.fields(errors=e.problems),
        )
        sdnotify.notify("READY=1", "STATUS=reload refused; previous config in use")
        return False
    for warning in loaded.warnings:
        log.warning("config warning", extra=logs.fields(detail=warning))
    old_verifier = rt.live.verifier
    rt.live = Live(new, verifier)
    rt.budget.configure(new.webhook.max_inflight_body_bytes, new.webhook.max_body_bytes)
    if rt.webhook_gate is not None:
        rt.webhook_gate.limit = new.listen.max_connections
    old_verifier.stop()
    if rt.nursery is not None:
        rt.nursery.start_soon(verifier.run)
    if rt.dispatcher is not None:
        rt.dispatcher.reconfigure(new.importer)
    rt.metrics.set_info(VERSION, new.environment, verifier.mode)
    changes = summarize_changes(old, new)
    needs_restart = restart_needed(old, new)
    rt.last_reload = {"at": time.time(), "ok": True, "changes": changes, "restart": needs_restart}
    log.info("config reloaded", extra=logs.fields(changes=changes))
    for item in needs_restart:
        log.warning("change needs a restart to apply", extra=logs.fields(change=item))
    sdnotify.notify("READY=1", "STATUS=config reloaded")
    return True


def main(config_path: str) -> int:
    try:
        loaded = load_config(config_path)
    except ConfigError as e:
        for line in e.problems:
            print(line)
        return 2
    cfg = loaded.config
    logs.setup(cfg.log.level, cfg.log.format)
    try:
        trio.run(run, loaded)
    except BaseExceptionGroup as group:
        return _startup_failure(group, cfg)
    except (ApplianceError, OSError) as e:
        return _startup_failure(BaseExceptionGroup("start", [e]), cfg)
    return 0


def _startup_failure(group: BaseExceptionGroup[BaseException], cfg: Config) -> int:
    """Known failures become one clear log line and exit 1; anything else is a bug: re-raise."""
    known, rest = group.split((ApplianceError, OSError))
    if rest is not None:
        raise rest
    assert known is not None
    for e in _leaves(known):
        if isinstance(e, OSError) and e.errno in (
            errno.EADDRINUSE,
            errno.EACCES,
            errno.EADDRNOTAVAIL,
        ):
            binds = ", ".join([*cfg.listen.bind, cfg.admin.bind])
            why = f"cannot listen on {binds}: {e.strerror}"
            log.error("cannot start", extra=logs.fields(error=why))
        else:
            log.error("cannot start", extra=logs.fields(error=str(e)))
    return 1


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
