"""The admin listener's status page: one HTML document, no JavaScript framework.

It refreshes itself with a meta refresh and shows the launch-window table with healthy /
investigate marks, the inbox counts, the oldest pending delivery and recent dead deliveries.
"""

from __future__ import annotations

import html
from typing import Any

from .durations import format_age
from .metrics import format_signal

_LABELS = {
    "p95_latency_seconds": ("Webhook p95 latency", "< 1 s", "> 5 s"),
    "error_5xx_rate": ("5xx rate (drill answers apart)", "< 0.1 %", "> 1 %"),
    "signature_failure_rate": ("Signature-verification failures", "0 %", "any sustained"),
    "idempotency_skip_rate": ("Idempotency-skip rate", "a few %", "> 20 %"),
    "imports_per_webhook": ("Imports per webhook", "about 1", "dead deliveries"),
}

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#1d2228;max-width:70rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{padding:.3rem .8rem;text-align:left;
border-bottom:1px solid #dde}th{background:#f3f4f7}.healthy{color:#0a7d32;font-weight:600}
.watch{color:#a86500;font-weight:600}.investigate{color:#c0182a;font-weight:700}
.nodata{color:#777}.alert{background:#c0182a;color:#fff;padding:.6rem 1rem;font-weight:700}
.banner{background:#fff4d6;padding:.4rem 1rem}code{background:#f3f4f7;padding:0 .2rem}
"""


def render(doc: dict[str, Any]) -> str:
    e = html.escape
    lw = doc["launch_window"]
    rows = []
    for key, (label, healthy, investigate) in _LABELS.items():
        sig = lw["signals"][key]
        grade = sig["grade"]
        extra = ""
        if key == "imports_per_webhook":
            extra = f" (pending {sig.get('pending')}, dead {sig.get('dead')})"
        rows.append(
            f'<tr data-signal="{key}"><td>{e(label)}</td>'
            f'<td class="value">{e(format_signal(key, sig["value"]))}{e(extra)}</td>'
            f'<td class="{grade.replace(" ", "")} grade">{e(grade)}</td>'
            f"<td>{e(healthy)}</td><td>{e(investigate)}</td></tr>"
        )
    alerts = "".join(f'<p class="alert">{e(a)}</p>' for a in lw["alerts"])
    inbox = doc["inbox"]
    counts = "".join(
        f'<tr><td>{s}</td><td data-count="{s}">{inbox.get(s, 0)}</td></tr>'
        for s in ("pending", "importing", "done", "dead")
    )
    dead_rows = (
        "".join(
            f"<tr><td><code>{e(d['delivery_id'])}</code></td>"
            f"<td>{e(str(d['cost_basis_run_id']))}</td><td>{d['flows']}</td>"
            f"<td>{d['attempts']}</td><td>{e(str(d['last_error'] or ''))}</td></tr>"
            for d in doc["recent_dead"]
        )
        or '<tr><td colspan="5">none</td></tr>'
    )
    paused = (
        '<p class="banner">Importer runs are <b>paused</b>: deliveries are accepted and queued. '
        "Resume with <code>ct-appliance importer resume</code>.</p>"
        if doc["importer_paused"]
        else ""
    )
    window_min = lw["window_seconds"] / 60
    oldest = format_age(inbox.get("oldest_pending_seconds"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>ct-appliance {e(doc["environment"])}</title><style>{_STYLE}</style></head><body>
<h1>ct-appliance <small>{e(doc["version"])} &middot; {e(doc["environment"])}
 &middot; auth {e(doc["auth_mode"])} &middot; ack {e(doc["ack"])}</small></h1>
<p>{"ready" if doc["ready"] else "NOT READY: " + e(doc["ready_reason"])}
 &middot; up {e(format_age(doc["uptime_seconds"]))}</p>
{alerts}{paused}
<h2>Launch window (last {window_min:g} min, {lw["answers"]} answers,
 {lw["injected_failures"]} drill answers apart)</h2>
<table id="launch-window"><tr><th>signal</th><th>value</th><th>mark</th><th>healthy</th>
<th>investigate</th></tr>{"".join(rows)}</table>
<h2>Inbox</h2><table id="inbox">{counts}
<tr><td>oldest pending</td><td id="oldest-pending">{e(oldest)}</td></tr>
<tr><td>flow ids indexed</td><td>{inbox.get("flows", 0)}</td></tr>
<tr><td>runs</td><td>{inbox.get("runs", 0)}</td></tr></table>
<h2>Recent dead deliveries</h2><table id="dead"><tr><th>delivery</th><th>run</th><th>flows</th>
<th>attempts</th><th>last error</th></tr>{dead_rows}</table>
</body></html>"""
