#!/usr/bin/env python3
"""The checks of `make test-ops` that promtool cannot do.

promtool (Debian's `prometheus` package) does most of the work, and ops.mk runs it first:
`promtool check rules` parses the rules; `promtool test rules` runs ct-appliance.rules.test.yml,
which fires and silences every alert, pins what the recording rules give and (its test 10)
evaluates the dashboard's launch-window queries beside the recording rules on the same traffic;
`promtool check config` checks the example Prometheus config and the rule file it loads.

But promtool accepts any metric name (a misspelt one reads as empty and its alert never fires),
runs the tests it is given without knowing whether an alert has any, and never reads a Grafana
dashboard. So this script adds, with the standard library and promtool only:
- the spec: every metric an expression reads, in the rules and the dashboard, is a SPEC §8 name,
  every label value it matches on is one the appliance emits, and the dashboard shows them all;
- tests that can fail: each alert is made never to fire, then always to fire, and each time the
  unit tests must fail;
- what an alert carries: a known severity (both used), a summary and a description;
- the dashboard: every query parses (promtool, through a throwaway rule file), the launch-window
  panels hold CoinTracker's thresholds and the very queries test 10 evaluates, the data source is
  `${DS_PROMETHEUS}` everywhere, panel ids are unique and the panels fit the grid;
- the example Prometheus config scrapes the admin listener and loads the rules.

Prints one line per check and ends with `N passed, M failed`; exits 1 when a check failed.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPS = Path(__file__).resolve().parent
RULES = OPS / "prometheus" / "ct-appliance.rules.yml"
RULE_TESTS = OPS / "prometheus" / "ct-appliance.rules.test.yml"
PROM_CONFIG = OPS / "prometheus" / "prometheus.example.yml"
DASHBOARD = OPS / "grafana" / "ct-appliance.dashboard.json"

# SPEC §8: the metric names (all ct_appliance_...); the histograms add _bucket, _sum and _count.
METRICS = (
    "requests_total request_duration_seconds signature_failures_total flow_ids_total"
    " imports_total import_duration_seconds import_reruns_total inbox_deliveries"
    " inbox_oldest_pending_seconds importer_paused store_size_bytes info"
).split()
SERIES = {f"ct_appliance_{m}" for m in METRICS} | {
    f"ct_appliance_{m}_{suffix}"
    for m in ("request_duration_seconds", "import_duration_seconds")
    for suffix in ("bucket", "sum", "count")
}
# The label values the appliance emits (status is the HTTP status code as a string).
LABEL_VALUES = {
    "outcome": set(
        "accepted duplicate injected_failure unauthorized invalid_json invalid_payload too_large"
        " body_timeout overloaded unavailable internal not_found method_not_allowed import_failed".split()
    ),
    "status": {"200", "400", "401", "404", "405", "413", "500", "503"},
    "result": {"new", "duplicate", "success", "retry", "dead"},
    "state": {"pending", "importing", "done", "dead"},
    "mode": {"hmac", "bearer"},
}
SEVERITIES = {"investigate", "alert_cointracker"}

# CoinTracker's launch-window table as the dashboard draws it: panel title | recording rule
# (ct_appliance:NAME:rate15m) | unit | threshold steps over the green base (yellow from healthy,
# red from investigate).
SIGNALS = [
    [cell.strip() for cell in row.split("|")]
    for row in """
Webhook p95 latency                 | webhook_p95_latency_seconds     | s           | 1 yellow, 5 red
5xx rate (drill excluded)           | webhook_5xx_ratio               | percentunit | 0.001 yellow, 0.01 red
Signature-verification failure rate | webhook_signature_failure_ratio | percentunit | 1e-9 red
Idempotency-skip rate               | webhook_idempotency_skip_ratio  | percentunit | 0.05 yellow, 0.2 red
Imports per webhook                 | imports_per_webhook             | none        |
""".strip().splitlines()
]

# The dashboard's variables at their defaults, as Prometheus receives them.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "window": "15m",
    "instance": ".*",
}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


# ---------------------------------------------------------------------------------------------
# Reading PromQL, the rules (as text, in the shape the file is written: no YAML library) and the
# dashboard.


def metric_names(expr: str) -> set[str]:
    """The names an expression reads: what is left once strings, matchers, ranges, grouping
    clauses, numbers, calls and keywords are gone (promtool has parsed it, so a name followed by
    `(` is a function)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?(ms|s|m|h|d|w|y)?\b", "0", e)
    e = re.sub(r"[A-Za-z_:][A-Za-z0-9_:]*\s*\(", "(", e)
    keywords = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    return {n for n in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e) if n.lower() not in keywords}


def vocabulary_problems(expr: str, allowed: set[str], where: str) -> list[str]:
    problems = [f"{where}: selects by __name__: {expr}"] if "__name__" in expr else []
    problems += [
        f"{where}: {n} is not a SPEC §8 metric" for n in sorted(metric_names(expr) - allowed)
    ]
    for label, op, value in re.findall(
        r'\b(outcome|status|result|state|mode)\s*(=~|!~|!=|=)\s*"([^"]*)"', expr
    ):
        known = LABEL_VALUES[label]
        if op in ("=", "!="):
            values = [value]
        elif label == "status":  # a pattern such as "5..": it must match some status
            values = [v for v in known if re.fullmatch(value, v)] or [value]
        else:
            values = value.split("|")
        problems += [
            f"{where}: {label}{op}{value!r}: {v!r} is never emitted"
            for v in values
            if v not in known
        ]
    return problems


# A rule as the rules file writes it: `- record: NAME` or `- alert: NAME`, then `expr:` on the
# next line with its value on that line or in a block scalar of more deeply indented lines.
RULE = re.compile(
    r"^ *- (?P<kind>record|alert): (?P<name>\S+)\n"
    r"(?P<indent> +)expr:(?: [|>]-?\n(?P<block>(?:(?P=indent) .*\n)+)| (?P<line>.*)\n)",
    re.M,
)


def rules(text: str) -> list[re.Match[str]]:
    found = list(RULE.finditer(text))
    if len(found) != len(re.findall(r"^ *- (?:record|alert):", text, re.M)):
        raise AssertionError("every rule must have its expr: on the line after its name")
    return found


def expr_of(rule: re.Match[str]) -> str:
    return " ".join((rule["block"] or rule["line"]).split())


def dashboard() -> tuple[dict, list[dict], list[tuple[str, str]]]:
    """The dashboard, its panels (a collapsed row holds its own) and every query in it, each
    with where it is (the variables' `label_values(EXPR, label)` reduced to EXPR)."""
    dash = json.loads(DASHBOARD.read_text())
    panels = [q for p in dash.get("panels", []) for q in [p, *p.get("panels", [])]]
    exprs = [
        (f"panel {p.get('id')} {p.get('title')!r}", t["expr"])
        for p in panels
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            exprs.append((f"variable {var['name']}", m.group(1) if m else q))
    return dash, panels, exprs


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + var + "}", value).replace("$" + var, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


def promtool(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# The checks: each returns its problems, and its docstring is what it prints.


def spec_vocabulary() -> list[str]:
    """rules and dashboard read only SPEC §8 metrics and label values; the dashboard shows all"""
    found = rules(RULES.read_text())
    recorded = {r["name"] for r in found if r["kind"] == "record"}
    problems = [
        f"{name}: recording rule not named level:metric:operations"
        for name in sorted(recorded)
        if not re.fullmatch(r"ct_appliance:[a-z0-9_]+:[a-z0-9_]+", name)
    ]
    for r in found:
        problems += vocabulary_problems(expr_of(r), SERIES | recorded, r["name"])
    shown = set()
    for where, expr in dashboard()[2]:
        problems += vocabulary_problems(expr, SERIES, where)
        shown |= metric_names(expr)
    for m in METRICS:
        if not any(s.startswith(f"ct_appliance_{m}") for s in shown):
            problems.append(f"no dashboard panel shows ct_appliance_{m}")
    return problems


def alert_labels() -> list[str]:
    """alerts: each has a known severity, a summary and a description; both severities used"""
    text = RULES.read_text()
    found = rules(text)
    problems, used = [], set()
    for r, end in zip(found, [r.start() for r in found[1:]] + [len(text)], strict=True):
        if r["kind"] == "record":
            continue
        block = text[r.start() : end]
        severity = re.search(r"^\s+severity: *[\"']?(\w*)", block, re.M)
        used.add(severity[1] if severity else "")
        if not severity or severity[1] not in SEVERITIES:
            problems.append(f"{r['name']}: severity not one of {sorted(SEVERITIES)}")
        for key in ("summary", "description"):
            if not re.search(rf"^( +){key}: *([|>][-+]? *\n( *\n)*\1 +)?[\"']?\w", block, re.M):
                problems.append(f"{r['name']}: no {key}")
    return problems + ([] if SEVERITIES <= used else [f"use both severities {sorted(SEVERITIES)}"])


def alert_mutants() -> list[str]:
    """rule tests fail when any one alert never fires, and when it always fires"""
    text = RULES.read_text()
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(RULE_TESTS, tmp)
        (Path(tmp) / RULES.name).write_text(text)
        if promtool("test", "rules", RULE_TESTS.name, cwd=tmp).returncode != 0:
            return ["the unit tests fail on the unchanged rules"]
        for r in (r for r in rules(text) if r["kind"] == "alert"):
            for mutant, untested in (("vector(0) > 1", "firing"), ("vector(1)", "silent")):
                head = text[: r.start("indent")] + r["indent"]
                (Path(tmp) / RULES.name).write_text(f"{head}expr: {mutant}\n{text[r.end() :]}")
                if promtool("check", "rules", RULES.name, cwd=tmp).returncode != 0:
                    return [f"could not mutate {r['name']}"]
                if promtool("test", "rules", RULE_TESTS.name, cwd=tmp).returncode == 0:
                    problems.append(f"{r['name']}: no test expects it {untested}")
    return problems


def dashboard_queries_parse() -> list[str]:
    """dashboard: every query is valid PromQL (promtool parses it as a recording rule)"""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (_where, expr) in enumerate(dashboard()[2]):
        lines += [
            f"      - record: dashboard:q{n}",
            f"        expr: {json.dumps(substitute(expr))}",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dashboard.rules.yml").write_text("\n".join(lines) + "\n")
        proc = promtool("check", "rules", "dashboard.rules.yml", cwd=tmp)
    return [(proc.stdout + proc.stderr).strip()[-4000:]] if proc.returncode else []


def dashboard_signals() -> list[str]:
    """dashboard: a stat and a graph per signal, the table's thresholds, test 10's queries"""
    dash, panels, _exprs = dashboard()
    tests = RULE_TESTS.read_text()
    problems = []
    for title, name, unit, thresholds in SIGNALS:
        rule = f"ct_appliance:{name}:rate15m"
        steps = [(None, "green")]
        steps += [(float(v), c) for v, c in (t.split() for t in thresholds.split(",") if t)]
        mine = [p for p in panels if p.get("title") == title]
        if sorted(p["type"] for p in mine) != ["stat", "timeseries"]:
            problems.append(f"{title!r}: want a stat and a timeseries panel")
        for p in mine:
            where = f"{title!r} ({p['type']})"
            defaults = p["fieldConfig"]["defaults"]
            got = [(s["value"], s["color"]) for s in defaults["thresholds"]["steps"]]
            drawn = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
            if defaults.get("unit") != unit:
                problems.append(f"{where}: unit {defaults.get('unit')!r}, want {unit!r}")
            if thresholds and got != steps:
                problems.append(f"{where}: thresholds {got}, want {steps}")
            if thresholds and p["type"] == "timeseries" and drawn == "off":
                problems.append(f"{where}: thresholds not drawn on the graph")
            expr = p["targets"][0]["expr"]
            if "$window" not in expr:
                problems.append(f"{where}: not computed over $window")
            # test 10 holds `(QUERY) - on (instance) sum by (instance) (RULE)` for each signal
            compared = (
                re.escape(f"({substitute(expr)})")
                + r"\s+"
                + re.escape(f"- on (instance) sum by (instance) ({rule})")
            )
            if not re.search(compared, tests):
                problems.append(f"{where}: query not compared with {rule} in {RULE_TESTS.name}")
    window = {v["name"]: v for v in dash["templating"]["list"]}.get("window", {})
    if window.get("current", {}).get("value") != "15m":
        problems.append("the window variable must default to 15m (SPEC §8)")
    return problems


def dashboard_shape() -> list[str]:
    """dashboard: schema 39, unique panel ids inside the grid, ${DS_PROMETHEUS} everywhere"""
    dash, panels, _exprs = dashboard()
    problems = []
    if dash.get("schemaVersion") != 39 or not dash.get("uid") or not dash.get("title"):
        problems.append("want schemaVersion 39, a uid and a title")
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids not unique: {ids}")
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        x, y, w, h = (p["gridPos"][k] for k in "xywh")
        if x < 0 or x + w > 24:
            problems.append(f"panel {p['id']} outside the 24-column grid")
        for cell in itertools.product(range(x, x + w), range(y, y + h)):
            if cells.setdefault(cell, p["id"]) != p["id"]:
                problems.append(f"panel {p['id']} overlaps panel {cells[cell]}")
        if p["type"] != "row" and not p.get("targets"):
            problems.append(f"panel {p['id']} {p['title']!r} has no query")
        for t in [p, *p.get("targets", [])] if p["type"] != "row" else []:
            if t.get("datasource") != DATASOURCE:
                problems.append(f"panel {p['id']}: datasource {t.get('datasource')}")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    for v in variables.values():
        if v.get("type") == "query" and v.get("datasource") != DATASOURCE:
            problems.append(f"variable {v['name']}: datasource {v.get('datasource')}")
    inputs = {i.get("name"): i.get("pluginId") for i in dash.get("__inputs", [])}
    if inputs.get("DS_PROMETHEUS") != "prometheus":
        problems.append("no __inputs entry DS_PROMETHEUS for a prometheus data source")
    ds_var = variables.get("DS_PROMETHEUS", {})
    if ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("no data-source variable DS_PROMETHEUS")
    return problems


def example_config() -> list[str]:
    """prometheus.example.yml scrapes the admin listener and loads the rules"""
    text = re.sub(r"#.*", "", PROM_CONFIG.read_text())  # the settings, not the comments
    return [f"no {s}" for s in ('"127.0.0.1:9811"', "/metrics", RULES.name) if s not in text]


CHECKS = [
    spec_vocabulary,
    alert_labels,
    alert_mutants,
    dashboard_queries_parse,
    dashboard_signals,
    dashboard_shape,
    example_config,
]


def main() -> int:
    if shutil.which("promtool") is None:
        print("promtool not found: install Debian's prometheus package (make test-ops does)")
        return 1
    failed = 0
    for check in CHECKS:
        try:
            problems = check()
        except Exception as exc:  # a check that crashes has failed; say why and go on
            problems = [f"{type(exc).__name__}: {exc}"]
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {check.__doc__}")
        for line in "\n".join(dict.fromkeys(problems)).splitlines():
            print(f"     {line}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
