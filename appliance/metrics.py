"""Prometheus metrics (spec §8) and the launch-window signals computed from the same events.

The status page, `status`, `watch`, the alert rules in ops/ and the dashboard all read the
same five signals. Here they come from a sliding window of per-second buckets that count the
same events the Prometheus series count, with the p95 taken from the same histogram buckets by
the same linear interpolation as PromQL's `histogram_quantile`, so both agree.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import errors
from .record import InboxSummary

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
IMPORT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
MAX_WINDOW_SECONDS = 3600
ANSWERS = [("accepted", 200), ("duplicate", 200)] + [
    (cls.code, cls.status) for cls in errors.HTTPError.__subclasses__()
]

# (healthy, investigate) per signal; spec §1. Between the two a signal is "watch".
THRESHOLDS: dict[str, tuple[float, float]] = {
    "p95_latency_seconds": (1.0, 5.0),
    "error_5xx_rate": (0.001, 0.01),
    "signature_failure_rate": (0.0, 0.0),
    "idempotency_skip_rate": (0.05, 0.20),
}


@dataclass
class _Bucket:
    by_outcome: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    imports: dict[str, int] = field(default_factory=dict)


class Window:
    """Per-second buckets of webhook answers and import results for the last hour."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self) -> _Bucket:
        now = int(self.clock())
        b = self._buckets.get(now)
        if b is None:
            b = self._buckets[now] = _Bucket()
            if len(self._buckets) > MAX_WINDOW_SECONDS + 60:
                for t in [t for t in self._buckets if t < now - MAX_WINDOW_SECONDS]:
                    del self._buckets[t]
        return b

    def request(self, outcome: str, status: int, seconds: float) -> None:
        b = self._bucket()
        key = (outcome, status)
        b.by_outcome[key] = b.by_outcome.get(key, 0) + 1
        b.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds

    def imported(self, result: str) -> None:
        b = self._bucket()
        b.imports[result] = b.imports.get(result, 0) + 1

    def totals(self, window_seconds: float) -> dict[str, Any]:
        since = self.clock() - window_seconds
        by_outcome: dict[tuple[str, int], int] = {}
        latency = [0] * (len(LATENCY_BUCKETS) + 1)
        imports: dict[str, int] = {}
        for t, b in list(self._buckets.items()):
            if t < since:
                continue
            for k, v in b.by_outcome.items():
                by_outcome[k] = by_outcome.get(k, 0) + v
            for i, v in enumerate(b.latency):
                latency[i] += v
            for name, v in b.imports.items():
                imports[name] = imports.get(name, 0) + v
        return {"by_outcome": by_outcome, "latency": latency, "imports": imports}


def quantile(q: float, counts: list[int]) -> float | None:
    """PromQL histogram_quantile over non-cumulative bucket counts (last one is +Inf)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for i, c in enumerate(counts):
        if cumulative + c >= rank and c > 0:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            upper = LATENCY_BUCKETS[i]
            return lower + (upper - lower) * (rank - cumulative) / c
        cumulative += c
    return LATENCY_BUCKETS[-1]


def format_signal(key: str, value: float | None) -> str:
    """How the status page, `status` and `watch` print a signal's value."""
    if value is None:
        return "-"
    if key == "p95_latency_seconds":
        return f"{value * 1000:.1f} ms"
    if key == "imports_per_webhook":
        return f"{value:.2f}"
    return f"{value * 100:.2f} %"


def grade(signal: str, value: float | None) -> str:
    if value is None:
        return "no data"
    healthy, investigate = THRESHOLDS[signal]
    if value > investigate:
        return "investigate"
    if value <= healthy:
        return "healthy"
    return "watch"


def signals(window: Window, window_seconds: float, inbox: InboxSummary | None) -> dict[str, Any]:
    """The launch-window table (spec §8), graded, plus the 'alert CoinTracker now' verdicts."""
    t = window.totals(window_seconds)
    by = t["by_outcome"]
    answers = sum(by.values())
    injected = sum(v for (o, _), v in by.items() if o == "injected_failure")
    counted = answers - injected
    e5xx = sum(v for (o, s), v in by.items() if s >= 500 and o != "injected_failure")
    e401 = sum(v for (_, s), v in by.items() if s == 401)
    accepted = sum(v for (o, _), v in by.items() if o == "accepted")
    duplicate = sum(v for (o, _), v in by.items() if o == "duplicate")
    imports = t["imports"].get("success", 0)

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    rows = {
        "p95_latency_seconds": quantile(0.95, t["latency"]),
        "error_5xx_rate": ratio(e5xx, counted),
        "signature_failure_rate": ratio(e401, answers),
        "idempotency_skip_rate": ratio(duplicate, accepted + duplicate),
    }
    table: dict[str, Any] = {k: {"value": v, "grade": grade(k, v)} for k, v in rows.items()}
    ipw = ratio(imports, accepted)
    ipw_grade = "no data" if ipw is None else "healthy" if ipw >= 0.9 else "watch"
    if inbox is not None and inbox.dead:
        ipw_grade = "investigate"
    table["imports_per_webhook"] = {
        "value": ipw,
        "grade": ipw_grade,
        "pending": inbox.pending if inbox is not None else None,
        "dead": inbox.dead if inbox is not None else None,
    }
    alerts = []
    short = window.totals(min(300.0, window_seconds))["by_outcome"]
    short_counted = sum(v for (o, _), v in short.items() if o != "injected_failure")
    short_5xx = sum(v for (o, s), v in short.items() if s >= 500 and o != "injected_failure")
    if rows["error_5xx_rate"] is not None and rows["error_5xx_rate"] > 0.01:
        if short_counted and short_5xx / short_counted > 0.01:
            alerts.append("5xx rate above 1% for several minutes: alert CoinTracker now")
    if answers >= 3 and e401 == answers:
        alerts.append("every delivery is failing verification: alert CoinTracker now")
    return {
        "window_seconds": window_seconds,
        "answers": answers,
        "injected_failures": injected,
        "accepted": accepted,
        "duplicate": duplicate,
        "imports_success": imports,
        "signals": table,
        "alerts": alerts,
        "healthy": not alerts and all(r["grade"] != "investigate" for r in table.values()),
    }


class _InboxCollector(Collector):
    def __init__(self, read: Callable[[], InboxSummary]) -> None:
        self.read = read

    def collect(self) -> Any:
        try:
            c = self.read()
        except Exception:  # a failing store must not break the scrape of everything else
            return
        g = GaugeMetricFamily(
            "ct_appliance_inbox_deliveries", "Deliveries in the inbox by state", labels=["state"]
        )
        for state in ("pending", "importing", "done", "dead"):
            g.add_metric([state], getattr(c, state))
        yield g
        oldest = c.oldest_pending_at
        age = max(0.0, time.time() - oldest) if oldest else 0.0
        yield GaugeMetricFamily(
            "ct_appliance_inbox_oldest_pending_seconds", "Age of the oldest pending delivery", age
        )
        yield GaugeMetricFamily(
            "ct_appliance_store_size_bytes", "Size of the LMDB data file", c.size_bytes
        )
        yield GaugeMetricFamily(
            "ct_appliance_importer_paused", "1 while importer runs are paused", int(c.paused)
        )


class _LimitsCollector(Collector):
    """What anonymous senders are costing: connections per listener, body bytes in flight."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Any:
        c = self.read()
        open_ = GaugeMetricFamily(
            "ct_appliance_open_connections", "Open connections", labels=["listener"]
        )
        refused = CounterMetricFamily(
            "ct_appliance_connections_refused",
            "Connections answered 503 and closed at listen.max_connections",
            labels=["listener"],
        )
        evicted = CounterMetricFamily(
            "ct_appliance_connections_evicted",
            "Idle connections closed to make room at listen.max_connections",
            labels=["listener"],
        )
        for listener, gate in c["gates"].items():
            open_.add_metric([listener], gate.open)
            refused.add_metric([listener], gate.refused)
            evicted.add_metric([listener], gate.evicted)
        yield from (open_, refused, evicted)
        yield GaugeMetricFamily(
            "ct_appliance_inflight_body_bytes",
            "Bytes of webhook bodies held right now (webhook.max_inflight_body_bytes bounds it)",
            c["inflight_body_bytes"],
        )


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ct_appliance_requests", "Webhook answers", ["outcome", "status"], registry=r
        )
        self.duration = Histogram(
            "ct_appliance_request_duration_seconds",
            "Webhook answer latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.signature_failures = Counter(
            "ct_appliance_signature_failures", "Failed authentications", ["mode"], registry=r
        )
        self.flow_ids = Counter(
            "ct_appliance_flow_ids", "Flow ids received", ["result"], registry=r
        )
        self.imports = Counter("ct_appliance_imports", "Importer attempts", ["result"], registry=r)
        self.import_duration = Histogram(
            "ct_appliance_import_duration_seconds",
            "Importer attempt duration",
            buckets=IMPORT_BUCKETS,
            registry=r,
        )
        self.import_reruns = Counter(
            "ct_appliance_import_reruns",
            "Imports re-run because an attempt was cut short (crash, stop, lost lease)",
            registry=r,
        )
        self.info = Info("ct_appliance", "Build and mode", registry=r)
        self.window = Window()
        # The children the request path counts into, looked up once (labels() per request is
        # a lock and a tuple of strings each time).
        self._new_flows = self.flow_ids.labels("new")
        self._duplicate_flows = self.flow_ids.labels("duplicate")
        # Every answer the webhook can give exists from the start at 0, so rate() in
        # Prometheus counts the first occurrence of each outcome too.
        self._answers = {(o, s): self.requests.labels(o, str(s)) for o, s in ANSWERS}
        for mode in ("hmac", "bearer"):
            self.signature_failures.labels(mode)
        for result in ("success", "retry", "dead"):
            self.imports.labels(result)

    def set_info(self, version: str, environment: str, auth_mode: str) -> None:
        self.info.info({"version": version, "environment": environment, "auth_mode": auth_mode})

    def watch_inbox(self, read: Callable[[], InboxSummary]) -> None:
        self.registry.register(_InboxCollector(read))

    def watch_limits(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_LimitsCollector(read))

    def request(self, outcome: str, status: int, seconds: float) -> None:
        child = self._answers.get((outcome, status))
        if child is None:
            child = self.requests.labels(outcome, str(status))
        child.inc()
        self.duration.observe(seconds)
        self.window.request(outcome, status, seconds)

    def flows(self, new: int, duplicate: int) -> None:
        self._new_flows.inc(new)
        self._duplicate_flows.inc(duplicate)

    def imported(self, result: str, seconds: float | None = None) -> None:
        self.imports.labels(result).inc()
        if seconds is not None:
            self.import_duration.observe(seconds)
        self.window.imported(result)
