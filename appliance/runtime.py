"""What the running server shares between its parts.

`Runtime.live` is the reloadable view (config and the verifier built from it). It is replaced
as one object on SIGHUP, and every request reads it once at its start, so a request runs
entirely under the old or entirely under the new config: the switch is atomic between requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .auth import Verifier
from .backend import Backend
from .config import Config, ImporterConfig
from .connections import ConnectionGate
from .limits import BodyBudget, RateLimit
from .metrics import Metrics

# Log lines of unauthenticated requests: a burst of 50, then 5 a second.
ANONYMOUS_LOG_PER_SECOND = 5.0
ANONYMOUS_LOG_BURST = 50


class ImportRunner(Protocol):
    """What the request path, the admin listener and a reload need of the dispatcher
    (dispatcher.py implements it and builds on this module, not the other way round)."""

    paused: bool

    def notify(self) -> None:
        """A delivery was accepted: look at the queue now."""

    async def wait_imported(self, seqs: set[int], bound: float) -> str:
        """`ack: imported`: "done" once every seq is imported, else why not, within `bound` s."""

    def reconfigure(self, cfg: ImporterConfig) -> None:
        """A reload changed the importer section."""


@dataclass(frozen=True)
class Live:
    config: Config
    verifier: Verifier


class Runtime:
    def __init__(
        self,
        live: Live,
        backend: Backend,
        metrics: Metrics,
        config_path: str,
    ) -> None:
        self.live = live
        self.backend = backend
        self.metrics = metrics
        self.config_path = config_path
        self.draining = False
        self.drill_remaining = live.config.testing.fail_first_deliveries
        self.dispatcher: ImportRunner | None = None
        self.started_at = 0.0
        self.last_reload: dict[str, Any] = {}
        self.nursery: trio.Nursery | None = None
        cfg = live.config
        self.budget = BodyBudget(cfg.webhook.max_inflight_body_bytes, cfg.webhook.max_body_bytes)
        self.anonymous_log = RateLimit(ANONYMOUS_LOG_PER_SECOND, ANONYMOUS_LOG_BURST)
        self.webhook_gate: ConnectionGate | None = None

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.backend.available:
            return False, f"store unavailable: {self.backend.last_error}"
        if not self.live.verifier.ready():
            return False, f"{self.live.verifier.mode} keys not loaded"
        return True, "ready"
