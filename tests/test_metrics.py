"""metrics.py: the launch-window signals computed like the alert rules compute them."""

from __future__ import annotations

from appliance.metrics import LATENCY_BUCKETS, Window, quantile, signals
from appliance.record import InboxSummary


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_quantile_interpolates_like_histogram_quantile() -> None:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[LATENCY_BUCKETS.index(0.1)] = 100  # all in (0.05, 0.1]
    assert abs((quantile(0.95, counts) or 0) - (0.05 + 0.05 * 0.95)) < 1e-9
    assert quantile(0.95, [0] * len(counts)) is None


def test_drill_answers_are_apart_and_alerts_fire() -> None:
    clock = Clock()
    w = Window(clock)
    for _ in range(97):
        w.request("accepted", 200, 0.01)
    w.request("duplicate", 200, 0.01)
    for _ in range(50):
        w.request("injected_failure", 500, 0.001)
    s = signals(w, 900, InboxSummary(0, 0, 0, 0, 0, 0, 0, 0, None, 0, False))
    assert s["signals"]["error_5xx_rate"]["value"] == 0 and s["injected_failures"] == 50
    assert s["healthy"]
    for _ in range(5):
        w.request("unavailable", 503, 0.001)
    s = signals(w, 900, None)
    assert s["signals"]["error_5xx_rate"]["grade"] == "investigate"
    assert any("5xx" in a for a in s["alerts"])


def test_every_delivery_failing_verification_says_alert_cointracker() -> None:
    w = Window(Clock())
    for _ in range(5):
        w.request("unauthorized", 401, 0.001)
    s = signals(w, 900, None)
    assert s["signals"]["signature_failure_rate"]["value"] == 1.0
    assert any("verification" in a for a in s["alerts"])


def test_window_slides() -> None:
    clock = Clock()
    w = Window(clock)
    w.request("unavailable", 503, 0.1)
    clock.t += 1000
    w.request("accepted", 200, 0.1)
    assert signals(w, 900, None)["signals"]["error_5xx_rate"]["value"] == 0
