#!/usr/bin/env python3
"""The checks behind `make test-ops`: Prometheus rules, their unit tests, the example Prometheus
config and the Grafana dashboard, held against the metric names of SPEC §8.

Standard library only, plus `promtool` (Debian's `prometheus` package) on PATH, so it runs with
any python3 and no venv. Prints one line per check and ends with `N passed, M failed`; exits 1
when a check failed.

What "held against the spec" means here:
- every metric an expression reads is one of SPEC §8's names (histograms with their _bucket,
  _sum and _count series), and every outcome/status/result/state/mode value it matches on is
  one the appliance emits;
- every alert is proven to be tested both ways: promtool's tests must fail when the alert is
  made to never fire, and again when it is made to always fire;
- the dashboard's launch-window panels compute the same numbers as the recording rules
  (promtool evaluates both on the same traffic), and carry the thresholds of CoinTracker's table.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

OPS = Path(__file__).resolve().parent
RULES = OPS / "prometheus" / "ct-appliance.rules.yml"
RULE_TESTS = OPS / "prometheus" / "ct-appliance.rules.test.yml"
PROM_CONFIG = OPS / "prometheus" / "prometheus.example.yml"
DASHBOARD = OPS / "grafana" / "ct-appliance.dashboard.json"

# SPEC §8: the metric names (all prefixed ct_appliance_) and their kinds.
METRICS = {
    "requests_total": "counter",
    "request_duration_seconds": "histogram",
    "signature_failures_total": "counter",
    "flow_ids_total": "counter",
    "imports_total": "counter",
    "import_duration_seconds": "histogram",
    "import_reruns_total": "counter",
    "inbox_deliveries": "gauge",
    "inbox_oldest_pending_seconds": "gauge",
    "importer_paused": "gauge",
    "store_size_bytes": "gauge",
    "info": "gauge",
}
SERIES = {
    f"ct_appliance_{name}{suffix}"
    for name, kind in METRICS.items()
    for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))
}
# The label values the appliance emits (status is the HTTP status code as a string).
LABEL_VALUES = {
    "outcome": set(
        "accepted duplicate injected_failure unauthorized invalid_json invalid_payload too_large"
        " body_timeout unavailable internal not_found method_not_allowed import_failed".split()
    ),
    "status": {"200", "400", "401", "404", "405", "413", "500", "503"},
    "result": {"new", "duplicate", "success", "retry", "dead"},
    "state": {"pending", "importing", "done", "dead"},
    "mode": {"hmac", "bearer"},
}
SEVERITIES = {"investigate", "alert_cointracker"}

# CoinTracker's launch-window table: dashboard panel title -> (recording rule, unit, threshold
# steps as (value, colour) with None for the base). Green healthy, yellow watch, red investigate.
SIGNALS = {
    "Webhook p95 latency": (
        "ct_appliance:webhook_p95_latency_seconds:rate15m",
        "s",
        [(None, "green"), (1, "yellow"), (5, "red")],
    ),
    "5xx rate (drill excluded)": (
        "ct_appliance:webhook_5xx_ratio:rate15m",
        "percentunit",
        [(None, "green"), (0.001, "yellow"), (0.01, "red")],
    ),
    "Signature-verification failure rate": (
        "ct_appliance:webhook_signature_failure_ratio:rate15m",
        "percentunit",
        [(None, "green"), (1e-9, "red")],
    ),
    "Idempotency-skip rate": (
        "ct_appliance:webhook_idempotency_skip_ratio:rate15m",
        "percentunit",
        [(None, "green"), (0.05, "yellow"), (0.2, "red")],
    ),
    "Imports per webhook": ("ct_appliance:imports_per_webhook:rate15m", "none", None),
}

PROMQL_FUNCTIONS = set(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min
    count_over_time day_of_month day_of_week delta deriv exp floor histogram_quantile holt_winters
    hour idelta increase irate label_join label_replace last_over_time ln log2 log10 max_over_time
    min_over_time minute month predict_linear quantile_over_time rate resets round scalar sgn sort
    sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time time timestamp vector year
    sum avg min max count group stddev stdvar topk bottomk quantile count_values""".split()
)
PROMQL_KEYWORDS = set(
    "by without on ignoring group_left group_right and or unless bool offset inf nan".split()
)

# Grafana variables, replaced by what Prometheus would receive.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$window": "15m",
    "$instance": ".*",
}


# ---------------------------------------------------------------------------------------------
# PromQL helpers (lexical: enough for the expressions in this directory)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (functions, keywords and grouping labels left out)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?:ms|s|m|h|d|w|y)?\b", "0", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        token = m.group(0)
        if e[m.end() :].lstrip().startswith("("):
            if token not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown function {token}() in {expr!r}")
        elif token.lower() not in PROMQL_KEYWORDS:
            names.add(token)
    return names


def label_matchers(expr: str) -> list[tuple[str, str, str]]:
    return re.findall(r'\b(outcome|status|result|state|mode)\s*(=~|!~|!=|=)\s*"([^"]*)"', expr)


def check_expr_vocabulary(expr: str, allowed: set[str], where: str) -> list[str]:
    problems = []
    if "__name__" in expr:
        problems.append(f"{where}: selects by __name__: {expr}")
    for name in sorted(metric_names(expr) - allowed):
        problems.append(f"{where}: {name} is not a SPEC §8 metric: {expr}")
    for label, op, value in label_matchers(expr):
        known = LABEL_VALUES[label]
        if op in ("=", "!="):
            values = [value]
        elif label == "status":
            values = [v for v in known if re.fullmatch(value, v)] or [value]
        else:
            values = value.split("|")
        for v in values:
            if v not in known:
                problems.append(
                    f"{where}: {label}{op}{value!r}: {v!r} is not a value the appliance emits"
                )
    return problems


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + var[1:] + "}", value).replace(var, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def require_ok(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        raise AssertionError((proc.stdout + proc.stderr).strip()[-4000:])


# ---------------------------------------------------------------------------------------------
# The rules file, read as text (no YAML library needed): rule blocks and their fields.


BLOCK_SCALAR = ("|", "|-", ">", ">-")


def scalar(lines: list[str], i: int, end: int) -> tuple[str, int]:
    """The value of the `key: value` on line i, folded to one line (a block scalar's lines
    joined), and the index of the line after it (blank lines after a block scalar left out)."""
    line = lines[i]
    indent = len(line) - len(line.lstrip())
    value, j = line.split(":", 1)[1].strip(), i + 1
    if value in BLOCK_SCALAR:
        while j < end and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1
        value = " ".join(x.strip() for x in lines[i + 1 : j] if x.strip())
    return value, j


def rule_blocks(text: str) -> list[dict[str, str]]:
    """Each `- record:` / `- alert:` block: its name, its expr, where the expr sits (first line,
    number of lines), and its severity, summary and description."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*- (record|alert):", line)]
    blocks = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        kind, name = re.match(r"\s*- (record|alert):\s*(\S+)", lines[start]).groups()
        block = {"kind": kind, "name": name}
        i = start + 1
        while i < end:
            m = re.match(r"\s*(expr|severity|summary|description):", lines[i])
            if not m:
                i += 1
                continue
            value, j = scalar(lines, i, end)
            block[m.group(1)] = value
            if m.group(1) == "expr":
                block.update(expr_line=str(i), expr_lines=str(j - i))
            i = j
        blocks.append(block)
    return blocks


def with_expr(text: str, block: dict[str, str], expr: str) -> str:
    """The rules text with one rule's expression replaced."""
    lines = text.splitlines()
    i, n = int(block["expr_line"]), int(block["expr_lines"])
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i : i + n] = [f"{indent}expr: {expr}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The checks

CHECKS: list[tuple[str, Callable[[], None]]] = []


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS.append((name, fn))
        return fn

    return register


@check("promtool check rules: ct-appliance.rules.yml is valid")
def _() -> None:
    require_ok(promtool("check", "rules", str(RULES)))


@check("promtool test rules: ct-appliance.rules.test.yml passes")
def _() -> None:
    require_ok(promtool("test", "rules", str(RULE_TESTS)))


@check("promtool check config: prometheus.example.yml (scrape config and rule files) is valid")
def _() -> None:
    require_ok(promtool("check", "config", str(PROM_CONFIG)))
    text = PROM_CONFIG.read_text()
    for needed in ("127.0.0.1:9811", "/metrics", "ct-appliance.rules.yml"):
        if needed not in text:
            raise AssertionError(f"{PROM_CONFIG.name} does not mention {needed}")


@check("rules: every expression reads only SPEC §8 metrics and label values")
def _() -> None:
    blocks = rule_blocks(RULES.read_text())
    recorded = {b["name"] for b in blocks if b["kind"] == "record"}
    problems = []
    for b in blocks:
        problems += check_expr_vocabulary(b["expr"], SERIES | recorded, b["name"])
        if b["kind"] == "record" and not re.fullmatch(
            r"ct_appliance:[a-z0-9_]+:[a-z0-9_]+", b["name"]
        ):
            problems.append(f"{b['name']}: recording rule not named level:metric:operations")
    if problems:
        raise AssertionError("\n".join(problems))


@check("rules: every alert has a known severity, a summary and a description")
def _() -> None:
    problems = []
    alerts = [b for b in rule_blocks(RULES.read_text()) if b["kind"] == "alert"]
    for b in alerts:
        if b.get("severity") not in SEVERITIES:
            problems.append(
                f"{b['name']}: severity {b.get('severity')!r} not in {sorted(SEVERITIES)}"
            )
        for key in ("summary", "description"):
            if not b.get(key):
                problems.append(f"{b['name']}: no {key}")
    if {b.get("severity") for b in alerts} != SEVERITIES:
        problems.append("both severities must be used")
    if problems:
        raise AssertionError("\n".join(problems))


def mutation_survivors(replacement: str) -> list[str]:
    """Alerts whose expression can be replaced by `replacement` without a rule test failing."""
    text = RULES.read_text()
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(RULE_TESTS, Path(tmp) / RULE_TESTS.name)
        (Path(tmp) / RULES.name).write_text(text)
        if promtool("test", "rules", RULE_TESTS.name, cwd=Path(tmp)).returncode != 0:
            raise AssertionError("the unit tests fail on the unchanged rules")
        for b in rule_blocks(text):
            if b["kind"] != "alert":
                continue
            (Path(tmp) / RULES.name).write_text(with_expr(text, b, replacement))
            if promtool("check", "rules", RULES.name, cwd=Path(tmp)).returncode != 0:
                raise AssertionError(f"could not mutate {b['name']}")
            if promtool("test", "rules", RULE_TESTS.name, cwd=Path(tmp)).returncode == 0:
                survivors.append(b["name"])
    return survivors


@check("rule tests: every alert is tested firing (tests fail when it never fires)")
def _() -> None:
    survivors = mutation_survivors("vector(0) > 1")
    if survivors:
        raise AssertionError("no test expects these alerts to fire: " + ", ".join(survivors))


@check("rule tests: every alert is tested not firing (tests fail when it always fires)")
def _() -> None:
    survivors = mutation_survivors("vector(1)")
    if survivors:
        raise AssertionError("no test expects these alerts to stay silent: " + ", ".join(survivors))


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def all_exprs(dash: dict) -> list[tuple[str, str]]:
    exprs = [
        (f"panel {p.get('id')} {p.get('title')!r}", t["expr"])
        for p in all_panels(dash)
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = (
                var["query"]["query"]
                if isinstance(var.get("query"), dict)
                else var.get("query", "")
            )
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            exprs.append((f"variable {var['name']}", m.group(1) if m else q))
    return exprs


@check(
    "dashboard: valid JSON, schemaVersion 39, unique panel ids, panels inside the 24-column grid"
)
def _() -> None:
    dash = load_dashboard()
    problems = []
    if dash.get("schemaVersion") != 39:
        problems.append(f"schemaVersion {dash.get('schemaVersion')}")
    if not dash.get("uid") or not dash.get("title"):
        problems.append("uid and title are required")
    panels = all_panels(dash)
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids not unique: {ids}")
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            problems.append(f"panel {p['id']} outside the grid: {g}")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"panel {p['id']} overlaps {cells[(x, y)]}")
                cells[(x, y)] = p["title"]
        if p["type"] != "row" and not p.get("targets"):
            problems.append(f"panel {p['id']} {p['title']!r} has no query")
    if problems:
        raise AssertionError("\n".join(dict.fromkeys(problems)))


@check("dashboard: datasource is the ${DS_PROMETHEUS} input and variable everywhere")
def _() -> None:
    dash = load_dashboard()
    problems = []
    inputs = [i for i in dash.get("__inputs", []) if i.get("name") == "DS_PROMETHEUS"]
    if not inputs or inputs[0].get("pluginId") != "prometheus":
        problems.append("no __inputs entry DS_PROMETHEUS of plugin prometheus")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("DS_PROMETHEUS", {})
    if ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("no datasource variable DS_PROMETHEUS")
    want = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for p in all_panels(dash):
        if p["type"] == "row":
            continue
        for where, ds in [(f"panel {p['id']}", p.get("datasource"))] + [
            (f"panel {p['id']} target {t.get('refId')}", t.get("datasource")) for t in p["targets"]
        ]:
            if ds != want:
                problems.append(f"{where}: datasource {ds}")
    for v in variables.values():
        if v.get("type") == "query" and v.get("datasource") != want:
            problems.append(f"variable {v['name']}: datasource {v.get('datasource')}")
    if problems:
        raise AssertionError("\n".join(problems))


@check("dashboard: every expression reads only SPEC §8 metrics and label values")
def _() -> None:
    problems = []
    for where, expr in all_exprs(load_dashboard()):
        problems += check_expr_vocabulary(expr, SERIES, where)
    if problems:
        raise AssertionError("\n".join(problems))


@check("dashboard: every SPEC §8 metric is shown by some panel")
def _() -> None:
    used = set()
    for _where, expr in all_exprs(load_dashboard()):
        used |= metric_names(expr)
    missing = [
        name for name in METRICS if not any(s.startswith(f"ct_appliance_{name}") for s in used)
    ]
    if missing:
        raise AssertionError("no panel shows: " + ", ".join(missing))


@check("dashboard: every expression is valid PromQL (promtool parses it)")
def _() -> None:
    exprs = all_exprs(load_dashboard())
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (_where, expr) in enumerate(exprs):
        lines += [
            f"      - record: dashboard:expr_{n}:check",
            f"        expr: {json.dumps(substitute(expr))}",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard.rules.yml"
        path.write_text("\n".join(lines) + "\n")
        require_ok(promtool("check", "rules", str(path)))


def signal_panels(dash: dict, title: str) -> list[dict]:
    return [p for p in all_panels(dash) if p.get("title") == title]


@check("dashboard: one stat and one graph per launch-window signal, with the table's thresholds")
def _() -> None:
    dash = load_dashboard()
    problems = []
    for title, (_rule, unit, steps) in SIGNALS.items():
        panels = signal_panels(dash, title)
        if sorted(p["type"] for p in panels) != ["stat", "timeseries"]:
            problems.append(
                f"{title!r}: want a stat and a timeseries panel, got {[p['type'] for p in panels]}"
            )
        for p in panels:
            defaults = p["fieldConfig"]["defaults"]
            if defaults.get("unit") != unit:
                problems.append(
                    f"{title!r} ({p['type']}): unit {defaults.get('unit')!r}, want {unit!r}"
                )
            got = [(s["value"], s["color"]) for s in defaults["thresholds"]["steps"]]
            if steps is not None and got != steps:
                problems.append(f"{title!r} ({p['type']}): thresholds {got}, want {steps}")
            if (
                steps is not None
                and p["type"] == "timeseries"
                and defaults["custom"]["thresholdsStyle"]["mode"] == "off"
            ):
                problems.append(f"{title!r}: thresholds not drawn on the graph")
        if panels and "$window" not in panels[0]["targets"][0]["expr"]:
            problems.append(f"{title!r}: not computed over the $window variable")
    window = {v["name"]: v for v in dash["templating"]["list"]}.get("window", {})
    if window.get("current", {}).get("value") != "15m":
        problems.append("the window variable must default to 15m (SPEC §8)")
    if problems:
        raise AssertionError("\n".join(problems))


# Traffic that moves, so that a different window or a different ratio gives a different number.
EQUIVALENCE_SERIES = [
    ("ct_appliance_requests_total", 'outcome="accepted", status="200"', "0+60x20 1200+20x20"),
    ("ct_appliance_requests_total", 'outcome="duplicate", status="200"', "0+5x25 125+40x15"),
    ("ct_appliance_requests_total", 'outcome="unauthorized", status="401"', "0x15 1+2x25"),
    ("ct_appliance_requests_total", 'outcome="unavailable", status="503"', "0x12 3+3x10 33x18"),
    ("ct_appliance_requests_total", 'outcome="injected_failure", status="500"', "0+1x5 5x35"),
    ("ct_appliance_requests_total", 'outcome="internal", status="500"', "0x22 1+1x18"),
    ("ct_appliance_imports_total", 'result="success"', "0+55x20 1100+25x20"),
    ("ct_appliance_imports_total", 'result="retry"', "0+2x40"),
    ("ct_appliance_request_duration_seconds_bucket", 'le="0.1"', "0+50x20 1000+5x20"),
    ("ct_appliance_request_duration_seconds_bucket", 'le="1"', "0+60x20 1200+30x20"),
    ("ct_appliance_request_duration_seconds_bucket", 'le="5"', "0+70x20 1400+60x20"),
    ("ct_appliance_request_duration_seconds_bucket", 'le="+Inf"', "0+72x20 1440+70x20"),
]


def scaled(values: str, k: int) -> str:
    """promtool series notation `a+bxn` with a and b multiplied by k."""
    out = []
    for token in values.split():
        a, b, n = re.fullmatch(r"(\d+)(?:\+(\d+))?(?:x(\d+))?", token).groups()
        out.append(f"{int(a) * k}" + (f"+{int(b) * k}" if b else "") + (f"x{n}" if n else ""))
    return " ".join(out)


@check("dashboard: launch-window panels compute the same numbers as the recording rules")
def _() -> None:
    dash = load_dashboard()
    lines = [
        "rule_files: [ct-appliance.rules.yml]",
        "evaluation_interval: 1m",
        "tests:",
        "  - interval: 1m",
        "    input_series:",
    ]
    # three appliances under one job (so the rules' `by (job, instance)` and the dashboard's
    # `by (instance)` name the same groups): the second with twice the traffic of the first, the
    # third with no error series at all (its ratios must read 0, not "no data", on both sides)
    for k, instance in [(1, "127.0.0.1:9811"), (2, "10.0.0.2:9811"), (1, "10.0.0.3:9811")]:
        for metric, labels, values in EQUIVALENCE_SERIES:
            if instance == "10.0.0.3:9811" and re.search(
                r'status="[45]|outcome="duplicate"', labels
            ):
                continue
            series = f'{metric}{{job="ct-appliance", instance="{instance}", {labels}}}'
            lines.append(
                f"      - {{series: {json.dumps(series)}, values: {json.dumps(scaled(values, k))}}}"
            )
    lines.append("    promql_expr_test:")
    for title, (rule, _unit, _steps) in SIGNALS.items():
        for p in signal_panels(dash, title):
            expr = substitute(p["targets"][0]["expr"])
            diff = f"({expr}) - on (instance) sum by (instance) ({rule})"
            for t in ("12m", "21m", "27m", "35m"):
                lines += [
                    f"      - expr: {json.dumps(f'abs({diff}) > 1e-9')}",
                    f"        eval_time: {t}",
                    "        exp_samples: []",
                    f"      - expr: {json.dumps(f'count({diff})')}",
                    f"        eval_time: {t}",
                    "        exp_samples: [{labels: '{}', value: 3}]",
                ]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(RULES, Path(tmp) / RULES.name)
        (Path(tmp) / "equivalence.test.yml").write_text("\n".join(lines) + "\n")
        require_ok(promtool("test", "rules", "equivalence.test.yml", cwd=Path(tmp)))


def main() -> int:
    if shutil.which("promtool") is None:
        print("promtool not found: install Debian's prometheus package (make test-ops does)")
        return 1
    passed = failed = 0
    for name, fn in CHECKS:
        try:
            fn()
        except Exception as exc:  # a check that crashes has failed; say why and go on
            failed += 1
            print(f"FAIL {name}")
            for line in str(exc).splitlines() or [type(exc).__name__]:
                print(f"     {line}")
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
