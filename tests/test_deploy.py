"""Checks on the operator-facing files in deploy/ (Prometheus, Alertmanager, Grafana, systemd, Docker).

Why these tests exist: dashboards and alert rules fail silently. A renamed metric, a typo in PromQL
or an alert without a unit test shows up as an empty panel or an alert that never fires, months later,
on a production line. So every expression is parsed by promtool, every alert is exercised by
`promtool test rules`, and every metric name is checked against what the daemon exports.

promtool comes from Debian's `prometheus` package, amtool from `prometheus-alertmanager`. Without them
their tests are skipped, unless the environment variable CI is set: CI installs both packages, so a
missing tool there is a failure.
YAML is parsed with PyYAML (test extra, pinned in constraints.txt).
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from anomon.config import WatchConfig, load_watch_config, read_toml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules.test.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomon.json"
DS_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "anomon.yml"
UNIT = DEPLOY / "systemd" / "anomon.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yml"
EXAMPLE_CONFIG = DEPLOY / "anomon.toml"

# The daemon's metric contract: name -> Prometheus type. TODO(lead): read it from anomon.metrics.
DAEMON_METRICS: dict[str, str] = {
    "anomon_images_scored_total": "counter",
    "anomon_image_errors_total": "counter",
    "anomon_anomaly_score": "histogram",
    "anomon_score_threshold": "gauge",
    "anomon_scoring_duration_seconds": "histogram",
    "anomon_intake_latency_seconds": "histogram",
    "anomon_queue_depth": "gauge",
    "anomon_last_scored_timestamp_seconds": "gauge",
    "anomon_model_info": "gauge",
    "anomon_model_reloads_total": "counter",
    "anomon_build_info": "gauge",
    "anomon_alerts_total": "counter",
    "anomon_webhook_deliveries_total": "counter",
    "anomon_ready": "gauge",
    "anomon_p_value": "histogram",
    "anomon_drift_martingale_log10": "gauge",
    "anomon_drift_alarm_level_log10": "gauge",
    "anomon_target_false_alarm_ratio": "gauge",
    "anomon_alert_judgements": "gauge",
    "anomon_drift_alarm_judgements": "gauge",
    "anomon_reviews_total": "counter",
    "anomon_drift_images": "gauge",
    "anomon_drift_alarms_total": "counter",
    "anomon_drift_resets_total": "counter",
    "anomon_line_up": "gauge",
}
# prometheus-client's default process and platform collectors (Linux).
CLIENT_DEFAULT_SERIES = frozenset({
    "process_cpu_seconds_total", "process_max_fds", "process_open_fds",
    "process_resident_memory_bytes", "process_start_time_seconds", "process_virtual_memory_bytes",
    "python_gc_collections_total", "python_gc_objects_collected_total",
    "python_gc_objects_uncollectable_total", "python_info",
})
# The series that describe the daemon process, not a line; every other series of the daemon's
# carries a `line` label (one daemon, several lines; a config without lines is the line "default").
PROCESS_WIDE = frozenset({"anomon_ready", "anomon_build_info"} | CLIENT_DEFAULT_SERIES)
JOB = "anomon"
DEFAULT_TARGET = "127.0.0.1:9108"


def series_names(metrics: dict[str, str]) -> set[str]:
    """The series names a scrape shows for each metric (histograms expand to three)."""
    out: set[str] = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            out.add(name)
    return out


EXPORTED_SERIES = frozenset(series_names(DAEMON_METRICS) | CLIENT_DEFAULT_SERIES)

# ------------------------------------------------------------------------------- helpers

_PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
})


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referred to by a PromQL expression (simple lexing, no full parser).

    Good enough for the expressions in this repository: strings, label matchers, range selectors
    and label lists are removed first, then every remaining identifier that is neither a function
    call nor a keyword is a metric name.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group()
        rest = s[m.end():].lstrip()
        if word.lower() in _PROMQL_KEYWORDS or re.match(r"\(|(by|without)\b", rest):
            continue  # keyword, function call, or aggregation (`sum by (x) (...)`)
        names.add(word)
    return names


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def rule_groups() -> list[dict[str, Any]]:
    return load_yaml(RULES)["groups"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "record" in r]


def dashboard() -> dict[str, Any]:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # collapsed rows hold their panels


def dashboard_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def dashboard_annotations() -> list[dict[str, Any]]:
    """The dashboard's Prometheus annotation queries (Grafana's built-in one has no expression)."""
    return [a for a in dashboard()["annotations"]["list"] if "expr" in a]


# Grafana variables, replaced as Grafana would before Prometheus sees the query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*",
                "$line": ".*"}


def grafana_expand(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


def _debian_tool(name: str, package: str) -> str:
    """The tool's path; without it a skip, or under CI (which must install it) a failure."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not on PATH; CI must install Debian's {package} package")
    pytest.skip(f"{name} is not on PATH (apt-get install {package}); set CI=1 to fail instead")


@pytest.fixture(scope="session")
def promtool() -> str:
    return _debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def amtool() -> str:
    return _debian_tool("amtool", "prometheus-alertmanager")


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def unit_config() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                   comment_prefixes=("#", ";"), empty_lines_in_values=False)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read(UNIT, encoding="utf-8")
    return cp


# ------------------------------------------------------------------------------- the helpers themselves

def test_promql_metric_names_lexer() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(anomon_x_bucket{job="a", le=~"1e-3"}'
            '[5m]))) > on () group_left () anomon:thr and on (job) time() - foo_seconds offset 1h > 1e-9'
            ' unless bar{reason="x y"} * 60')
    assert promql_metric_names(expr) == {"anomon_x_bucket", "anomon:thr", "foo_seconds", "bar"}
    assert promql_metric_names('up{job="anomon"} == 0 or absent(up{job="anomon"})') == {"up"}


# ------------------------------------------------------------------------------- Prometheus

def test_promtool_check_config(promtool: str) -> None:
    out = run_promtool(promtool, "check", "config", PROM_CONFIG.name, cwd=PROM_DIR)
    assert "1 rule files found" in out.stdout + out.stderr


def test_promtool_check_rules(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", RULES.name, cwd=PROM_DIR)
    n = len(alert_rules()) + len(recording_rules())
    assert f"{n} rules found" in out.stdout + out.stderr


def test_promtool_test_rules(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=PROM_DIR)
    assert "SUCCESS" in out.stdout + out.stderr


def test_scrape_config_matches_the_daemon_defaults() -> None:
    cfg = load_yaml(PROM_CONFIG)
    assert cfg["global"]["scrape_interval"] == "15s"
    assert cfg["global"]["evaluation_interval"] == "15s"
    assert cfg["rule_files"] == ["rules.yml"]  # relative to prometheus.yml
    (am,) = cfg["alerting"]["alertmanagers"]
    assert [t for sc in am["static_configs"] for t in sc["targets"]] == ["127.0.0.1:9093"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert JOB in jobs
    targets = [t for sc in jobs[JOB]["static_configs"] for t in sc["targets"]]
    assert targets == [DEFAULT_TARGET]
    assert WatchConfig.model_fields["listen"].default == DEFAULT_TARGET


EXPECTED_ALERTS = {
    "AnomonDown", "AnomonLineDown", "AnomonAnomalyRateHigh", "AnomonNoImagesScored", "AnomonImageErrors",
    "AnomonQueueBacklogGrowing", "AnomonModelReloadFailed", "AnomonScoringLatencyHigh",
    "AnomonDrift",
}


def test_alert_rules_are_complete() -> None:
    alerts = alert_rules()
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert EXPECTED_ALERTS <= set(names)
    for a in alerts:
        assert "for" in a, f"{a['alert']}: no `for:`"
        assert a["labels"]["severity"] in {"critical", "warning"}, a["alert"]
        ann = a["annotations"]
        assert ann.get("summary") and ann.get("description"), a["alert"]
        assert "\n" not in ann["summary"], f"{a['alert']}: summary must be one line"


def test_every_alert_fires_and_holds_in_unit_tests() -> None:
    """Each alert has a promtool case where it fires and one where it must stay silent."""
    fires: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
            for exp in t.get("exp_alerts") or []:
                # A firing case must pin the labels and the rendered text, not just "something fired".
                assert exp.get("exp_labels", {}).get("severity"), t["alertname"]
                assert {"summary", "description"} <= set(exp.get("exp_annotations", {})), t["alertname"]
    names = {a["alert"] for a in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"
    assert load_yaml(RULES_TEST)["rule_files"] == ["rules.yml"]


# Alerts about the daemon process; every other alert is about one line and must name it.
PROCESS_ALERTS = {"AnomonDown", "AnomonNotReady"}


def test_every_alert_about_images_names_its_line() -> None:
    """One daemon serves several lines: an alert about images or a model fires per line, with the
    line in its labels (promtool cases, where the line comes through the expression) and in its
    text; the alerts about the process carry no line, and read no per-line series."""
    per_line = {a["alert"] for a in alert_rules()} - PROCESS_ALERTS
    for a in alert_rules():
        names = promql_metric_names(a["expr"]) & EXPORTED_SERIES
        if a["alert"] in PROCESS_ALERTS:
            assert names <= PROCESS_WIDE, a["alert"]
            assert "$labels.line" not in a["annotations"]["summary"] + a["annotations"]["description"]
            continue
        assert "{{ $labels.line }}" in a["annotations"]["summary"], a["alert"]
        assert "{{ $labels.line }}" in a["annotations"]["description"], a["alert"]
        # Matching across series keeps the line: `on (...)` lists it, or is empty (a global
        # setting on the right), or joins a process-wide series: `on (job, instance) <series>`.
        for m in re.finditer(r"\bon\s*\(([^)]*)\)\s*\(?\s*(?:time\(\)\s*-\s*)?([a-z_:]+)", a["expr"]):
            on = {x.strip() for x in m.group(1).split(",") if x.strip()}
            assert not on or "line" in on or m.group(2) in PROCESS_WIDE, (a["alert"], m.group())
    fired: dict[str, list[dict[str, Any]]] = {}
    for case in load_yaml(RULES_TEST)["tests"]:
        for t in case.get("alert_rule_test", []):
            fired.setdefault(t["alertname"], []).extend(t.get("exp_alerts") or [])
    for name in per_line:
        assert fired.get(name), name
        for exp in fired[name]:
            assert exp["exp_labels"].get("line"), (name, exp["exp_labels"])
    for name in PROCESS_ALERTS:
        assert all("line" not in exp["exp_labels"] for exp in fired[name]), name
    # Some promtool case has two lines on one daemon and only one of them firing, for the alerts
    # that compare two series of a line (a wrong `on (...)` makes the quiet line fire too).
    two_lines = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        lines = {m for s in case["input_series"] for m in re.findall(r'line="([^"]+)"', s["series"])}
        if len(lines) >= 2:
            for t in case.get("alert_rule_test", []):
                got = {e["exp_labels"]["line"] for e in t.get("exp_alerts") or []}
                if got and got < lines:
                    two_lines.add(t["alertname"])
    assert {"AnomonAnomalyRateHigh", "AnomonScoringStalled", "AnomonDrift", "AnomonLineDown"} <= two_lines


def test_drift_alert_level_is_the_daemons_own_per_line() -> None:
    """AnomonDrift fires where the daemon raises its own alarm: the martingale (log10) at each
    line's exported level, log10(1 / drift_alpha), never at a level written into the rule."""
    (rule,) = [a for a in alert_rules() if a["alert"] == "AnomonDrift"]
    expr = " ".join(rule["expr"].split())
    assert expr == ('anomon_drift_martingale_log10{job="anomon"} >= on (job, instance, line) '
                    'anomon_drift_alarm_level_log10{job="anomon"}'), expr
    from anomon.metrics import Metrics

    m = Metrics({"default": 1.0})
    m.line("default").set_drift_alpha(0.001)
    from prometheus_client import generate_latest

    assert 'anomon_drift_alarm_level_log10{line="default"} 3.0' in generate_latest(m.registry).decode()
    assert rule["for"] == "0m"  # the martingale is already a sequential test: no waiting on top


def test_rules_use_only_exported_metrics() -> None:
    recorded = {r["record"] for r in recording_rules()}
    allowed = EXPORTED_SERIES | recorded | {"up"}  # `up` is made by Prometheus for every target
    for r in recording_rules() + alert_rules():
        unknown = promql_metric_names(r["expr"]) - allowed
        assert not unknown, f"{r.get('alert') or r.get('record')}: unknown metrics {unknown}"
    for name in recorded:
        assert name.startswith("anomon:"), name
        assert re.fullmatch(r"[a-z_:][a-z0-9_:]*", name), name


def test_rules_select_the_anomon_job() -> None:
    """Every raw daemon metric in a rule is selected with job="anomon" (another exporter could
    reuse a process_* name)."""
    for r in recording_rules() + alert_rules():
        for name in promql_metric_names(r["expr"]) & EXPORTED_SERIES:
            for m in re.finditer(rf"\b{re.escape(name)}\b(\{{[^}}]*\}})?", r["expr"]):
                assert m.group(1) and f'job="{JOB}"' in m.group(1), (r.get("alert") or r["record"], name)


# ------------------------------------------------------------------------------- Alertmanager

def alertmanager_config() -> dict[str, Any]:
    return load_yaml(AM_CONFIG)


def run_amtool(amtool: str, *args: str) -> str:
    proc = subprocess.run([amtool, *args], cwd=AM_CONFIG.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"amtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_amtool_check_config(amtool: str) -> None:
    out = run_amtool(amtool, "check-config", AM_CONFIG.name)
    assert "SUCCESS" in out and "2 inhibit rules" in out, out


# (labels of an alert) -> the receiver Alertmanager must send it to.
ROUTES = [
    ({"alertname": "AnomonDown", "severity": "critical", "job": JOB, "instance": DEFAULT_TARGET}, "oncall"),
    ({"alertname": "AnomonAnomalyRateHigh", "severity": "critical", "line": "default"}, "oncall"),
    ({"alertname": "AnomonDrift", "severity": "warning", "line": "default"}, "shift"),
    ({"alertname": "AnomonImageErrors", "severity": "warning", "line": "press", "reason": "empty"}, "shift"),
    ({"alertname": "AnomonAnomalyRateHigh", "severity": "critical", "line": "weld-2"}, "weld-2-oncall"),
    ({"alertname": "AnomonDrift", "severity": "warning", "line": "weld-2"}, "weld-2-shift"),
]


@pytest.mark.parametrize("labels, receiver", ROUTES, ids=[f"{lb.get('line', '-')}-{lb['severity']}-{r}"
                                                          for lb, r in ROUTES])
def test_alertmanager_routes_by_severity_and_line(amtool: str, labels: dict[str, str], receiver: str) -> None:
    """Alertmanager's own router (`amtool config routes test`) on the shipped file."""
    out = run_amtool(amtool, "config", "routes", "test", f"--config.file={AM_CONFIG.name}",
                     *(f"{k}={v}" for k, v in labels.items()))
    assert out.split() == [receiver], out


def test_alertmanager_config_fits_the_rules() -> None:
    """The names the Alertmanager file relies on exist in rules.yml, every alert's severity has a
    route, notifications are grouped per line, and every receiver is reachable from a route."""
    cfg = alertmanager_config()
    alerts = {a["alert"]: a for a in alert_rules()}
    route = cfg["route"]
    assert {"alertname", "instance", "line"} <= set(route["group_by"])

    def walk(r: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield r
        for child in r.get("routes", []):
            yield from walk(child)

    used = {r["receiver"] for r in walk(route)}
    declared = [r["name"] for r in cfg["receivers"]]
    assert len(declared) == len(set(declared)) and used == set(declared)
    for r in cfg["receivers"]:
        hooks = r.get("webhook_configs", [])
        assert hooks and all(h.get("send_resolved") is True for h in hooks), r["name"]
    matchers = [m for r in walk(route) for m in r.get("matchers", [])]
    assert 'severity="critical"' in matchers
    assert {a["labels"]["severity"] for a in alerts.values()} == {"critical", "warning"}

    inhibit = cfg["inhibit_rules"]
    sources = {m for rule in inhibit for m in rule["source_matchers"]}
    assert sources == {'alertname="AnomonDown"', 'alertname="AnomonLineDown"'}
    assert {"AnomonDown", "AnomonLineDown"} <= set(alerts)
    down, line_down = inhibit
    # AnomonDown holds back the per-line alerts of the same daemon (and only those: not itself,
    # not AnomonNotReady); AnomonLineDown the other alerts of its line.
    assert down["target_matchers"] == ['line=~".+"'] and set(down["equal"]) == {"job", "instance"}
    assert set(line_down["equal"]) == {"job", "instance", "line"}
    assert 'alertname!="AnomonLineDown"' in line_down["target_matchers"]


# ------------------------------------------------------------------------------- Grafana

def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] == "anomon" and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    panels = list(all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    # No two panels overlap on the 24-column grid.
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_dashboard_datasource_is_the_provisioned_one() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    provisioned = load_yaml(DS_PROVISIONING)["datasources"]
    assert ds_var["current"]["value"] in {ds["uid"] for ds in provisioned}
    for p, t in dashboard_targets():
        for ds in (p["datasource"], t["datasource"]):
            assert ds == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    assert "anomon_build_info" in variables["instance"]["definition"]


def test_dashboard_uses_only_exported_metrics() -> None:
    targets = dashboard_targets()
    assert len(targets) >= 15
    used: set[str] = set()
    for p, t in targets:
        names = promql_metric_names(t["expr"])
        assert names, f"panel {p['id']}: no metric in {t['expr']!r}"
        unknown = names - EXPORTED_SERIES
        assert not unknown, f"panel {p['id']} ({p['title']}): not exported by the daemon: {unknown}"
        used |= names
    # The panels the operator needs are all there.
    for needed in ("anomon_images_scored_total", "anomon_anomaly_score_bucket", "anomon_score_threshold",
                   "anomon_intake_latency_seconds_bucket", "anomon_image_errors_total",
                   "anomon_queue_depth", "anomon_model_info", "anomon_last_scored_timestamp_seconds",
                   "anomon_model_reloads_total", "anomon_drift_martingale_log10", "anomon_p_value_bucket",
                   "anomon_line_up"):
        assert needed in used, needed


def test_dashboard_exprs_parse(promtool: str, tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule), after Grafana's variable expansion."""
    rules = []
    for p, t in dashboard_targets():
        expr = grafana_expand(t["expr"])
        assert "$" not in expr, f"unexpanded variable in panel {p['id']}: {expr}"
        rules.append({"record": f"dashboard_panel{p['id']}_{t['refId']}", "expr": expr})
    for i, a in enumerate(dashboard_annotations()):
        expr = grafana_expand(a["expr"])
        assert "$" not in expr, f"unexpanded variable in annotation {a['name']}: {expr}"
        rules.append({"record": f"dashboard_annotation{i}", "expr": expr})
    (tmp_path / "dash.rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", "dash.rules.yml", cwd=tmp_path)
    assert f"{len(rules)} rules found" in out.stdout + out.stderr


def test_dashboard_line_selector() -> None:
    """A `line` variable lists the lines of the chosen instances, several or all at once."""
    variables = [v["name"] for v in dashboard()["templating"]["list"]]
    assert variables == ["datasource", "instance", "line"]  # line's query reads $instance
    (line,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "line"]
    assert line["type"] == "query" and line["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    want = 'label_values(anomon_line_up{job="anomon", instance=~"$instance"}, line)'
    assert line["definition"] == line["query"]["query"] == want
    assert line["multi"] and line["includeAll"] and line["allValue"] == ".*"
    assert line["refresh"] == 2  # on time range change: a line added to the config shows up


def _by_clauses(expr: str) -> list[set[str]]:
    return [{x.strip() for x in m.group(1).split(",")} for m in re.finditer(r"\bby\s*\(([^)]*)\)", expr)]


def test_every_panel_is_filtered_by_line() -> None:
    """Every query selects the chosen lines: each per-line series with line=~"$line", and the
    daemon-wide ones (ready, version, CPU, memory) joined on the daemons that serve those lines.
    Wherever a query keeps the line (no aggregation, or `by (..., line, ...)`), the legend names
    it, so two lines never draw two indistinguishable series."""
    per_line = EXPORTED_SERIES - PROCESS_WIDE
    queries = [(f"panel {p['id']} ({p['title']})", t["expr"], t) for p, t in dashboard_targets()]
    queries += [(f"annotation {a['name']}", a["expr"], a) for a in dashboard_annotations()]
    for where, expr, q in queries:
        selectors = list(re.finditer(r"\b([a-z_:][a-z0-9_:]*)\{([^}]*)\}", expr))
        assert selectors, where
        for m in selectors:
            if m.group(1) in per_line:
                assert 'line=~"$line"' in m.group(2), (where, m.group())
        assert 'line=~"$line"' in expr, where
        names = promql_metric_names(expr)
        if names <= PROCESS_WIDE | {"anomon_line_up"} and not names <= {"anomon_line_up"}:
            # daemon-wide: the join is what filters it
            assert expr.endswith(' and on (job, instance) anomon_line_up{job="anomon", '
                                 'instance=~"$instance", line=~"$line"}'), where
            continue
        keeps_line = all("line" in by for by in _by_clauses(expr))
        legend = q.get("legendFormat", q.get("textFormat", ""))
        if keeps_line and q.get("format") != "table":
            assert "{{line}}" in legend, (where, legend)
    assert {p["title"] for p in all_panels(dashboard()["panels"]) if p["type"] != "text"} == {
        p["title"] for p, _ in dashboard_targets()}  # no panel without a query escapes the check


def test_drift_panel_shows_each_lines_martingale_and_the_alarm_level() -> None:
    (panel,) = [p for p, t in dashboard_targets() if "anomon_drift_martingale_log10" in t["expr"]]
    target, level_target = panel["targets"]
    assert target["expr"] == ('anomon_drift_martingale_log10'
                              '{job="anomon", instance=~"$instance", line=~"$line"}')
    assert "{{line}}" in target["legendFormat"]
    # Each line's alarm level is drawn (dashed, red) from the daemon's own gauge, the series
    # AnomonDrift compares the evidence with: a line with its own drift_alpha shows its own level.
    assert level_target["expr"] == ('anomon_drift_alarm_level_log10'
                                    '{job="anomon", instance=~"$instance", line=~"$line"}')
    assert "{{line}}" in level_target["legendFormat"]
    (override,) = [o for o in panel["fieldConfig"]["overrides"]
                   if o["matcher"] == {"id": "byFrameRefID", "options": level_target["refId"]}]
    props = {p["id"]: p["value"] for p in override["properties"]}
    assert props["custom.lineStyle"]["fill"] == "dash" and props["color"]["fixedColor"] == "red"
    level = -math.log10(WatchConfig.model_fields["drift_alpha"].default)
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["axisSoftMax"] > level  # the level is on screen before the curve gets there
    assert "alarm level" in panel["title"] and "log10(1/drift_alpha)" in panel["description"]
    # When alarms were raised and tests reset, as markers on the time axis.
    exprs = {a["name"]: a["expr"] for a in dashboard_annotations()}
    assert exprs["Drift alarms"].startswith("increase(anomon_drift_alarms_total{")
    assert exprs["Drift test resets"].startswith("increase(anomon_drift_resets_total{")


def test_dashboard_points_to_the_alert_feed() -> None:
    texts = [p["options"]["content"] for p in all_panels(dashboard()["panels"]) if p["type"] == "text"]
    assert any("/alerts" in t and "anomon verdicts" in t for t in texts)


def test_grafana_provisioning() -> None:
    ds = load_yaml(DS_PROVISIONING)
    assert ds["apiVersion"] == 1
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus" and prom["uid"] == "prometheus"
    assert prom["url"].startswith("http://")
    dash = load_yaml(DASH_PROVISIONING)
    assert dash["apiVersion"] == 1
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()


# ------------------------------------------------------------------------------- systemd

def test_systemd_unit_is_hardened() -> None:
    cp = unit_config()
    svc = cp["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
        "ExecStart": "/opt/anomon/.venv/bin/anomon watch --config /etc/anomon/anomon.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure", "TimeoutStopSec": "20",
        "DynamicUser": "yes", "StateDirectory": "anomon", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "read-only", "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert svc.get(key) == value, f"{key}={svc.get(key)!r}, want {value!r}"
    assert svc.get("RestartSec") and svc.get("ReadOnlyPaths")
    assert "MemoryDenyWriteExecute" not in svc  # breaks PyTorch's JIT-generated CPU kernels
    assert cp["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_agrees_with_the_example_config() -> None:
    svc = unit_config()["Service"]
    cfg = load_watch_config(EXAMPLE_CONFIG, {})
    assert str(cfg.state) == f"/var/lib/{svc['StateDirectory']}"
    read_only = {p.lstrip("-") for p in shlex.split(svc["ReadOnlyPaths"])}
    assert {str(w) for w in cfg.watch} <= read_only
    assert cfg.listen == DEFAULT_TARGET
    assert cfg.stop_timeout_s < float(svc["TimeoutStopSec"])
    assert str(cfg.model).startswith(f"/etc/{svc['ConfigurationDirectory']}/")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys and bad values are reported on stderr."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at a stand-in, nothing else changes.
    stand_in = tmp_path / "anomon"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text().replace("/opt/anomon/.venv/bin/anomon", str(stand_in))
    unit = tmp_path / "anomon.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0 and "bus" in proc.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


# ------------------------------------------------------------------------------- Docker

def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    # One entry per instruction: comments dropped, `\` continuation lines joined.
    joined = re.sub(r"\\\n\s*", " ", "\n".join(
        ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip()]
    assert lines[0] == "FROM python:3.11-slim"
    assert "EXPOSE 9108" in lines
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert "https://download.pytorch.org/whl/cpu" in text and "-c /src/constraints.txt" in text
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD "))[4:])
    assert cmd[-2:] == ["--listen", "0.0.0.0:9108"] and "/etc/anomon/anomon.toml" in cmd
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:] and "!anomon/" in ignore


def test_compose_wires_the_deploy_files() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"anomon", "prometheus", "alertmanager", "grafana"}
    base = COMPOSE.parent

    mounts: dict[str, str] = {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2] if not vol.startswith("${") else (vol, vol)
            if src.startswith("."):
                assert (base / src).exists(), f"{name}: {src} does not exist"
                mounts[str((base / src).resolve().relative_to(ROOT))] = dst
    assert mounts["deploy/prometheus"] == "/etc/prometheus"
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["deploy/grafana/dashboards"] == load_yaml(DASH_PROVISIONING)["providers"][0]["options"]["path"]
    assert mounts["deploy/anomon.toml"] == "/etc/anomon/anomon.toml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounts["deploy/alertmanager"] == "/etc/alertmanager"
    assert f"--config.file=/etc/alertmanager/{AM_CONFIG.name}" in services["alertmanager"]["command"]
    # prometheus.yml's Alertmanager (127.0.0.1:9093) is this one, in the shared namespace.
    assert load_yaml(PROM_CONFIG)["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "127.0.0.1:9093"]

    anomon = services["anomon"]
    assert (base / anomon["build"]["context"] / anomon["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert anomon["command"][-2:] == ["--listen", "0.0.0.0:9108"]
    # The shared network namespace is what makes 127.0.0.1:9108 and localhost:9090 right here.
    for name in ("anomon", "alertmanager", "grafana"):
        assert services[name]["network_mode"] == "service:prometheus"
    ports = services["prometheus"]["ports"]
    assert all(p.startswith("127.0.0.1:") for p in ports)
    assert {p.split(":")[1] for p in ports} == {"9090", "3000", "9093", "9108"}


# ------------------------------------------------------------------------------- example config

def test_example_config_documents_every_field() -> None:
    """deploy/anomon.toml loads, and names every WatchConfig field (set or commented out)."""
    cfg = load_watch_config(EXAMPLE_CONFIG, {})
    text = EXAMPLE_CONFIG.read_text()
    for field in WatchConfig.model_fields:
        assert re.search(rf"^#?\s*{field}\s*=", text, re.M), f"{field} not in {EXAMPLE_CONFIG.name}"
    set_values = read_toml(EXAMPLE_CONFIG)
    for key in set_values:  # the values shown are the defaults, except the paths
        if key not in {"model", "watch", "state"}:
            default = WatchConfig.model_fields[key].get_default(call_default_factory=True)
            assert getattr(cfg, key) == default, key
