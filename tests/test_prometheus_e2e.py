"""A real Prometheus scrapes the real daemon, evaluates the shipped rules and answers the dashboard.

test_deploy.py proves the deploy files parse and that each alert fires on synthetic series. This
test proves they work against what the daemon really exports: a metric renamed, a label that does
not match (`on (job, instance)`), a recording rule a dashboard relies on, or a template that fails
to render would pass those checks and still break here.

What is real: `anomon watch` (conftest's Daemon: its own process, TOML config, free port) and
Prometheus (`prometheus` from Debian's package, its own process, a temporary TSDB), talking HTTP
on 127.0.0.1 only. What is generated:

- the scrape config, from deploy/prometheus/prometheus.yml: the same `anomon` job, but
  scrape_interval, scrape_timeout and evaluation_interval are 1s instead of 15s/10s/15s, the target
  is the test daemon's port, and rule_files points at the shipped rules.yml by absolute path;
- nothing else. rules.yml is loaded verbatim: no duration or window is shortened. The anomaly-rate
  alert keeps its `for: 5m`, so within the test it reaches *pending*, which is exactly "the shipped
  expression, with its [10m] windows, evaluated true on live data" (rate() extrapolates over the
  seconds of samples there are). Firing after 5 minutes is Prometheus's job, covered by
  `promtool test rules` in test_deploy.py.

Needs `prometheus` and `promtool` on PATH: skipped without them, a failure when CI is set (CI
installs Debian's prometheus package, see .ci/run).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import Daemon, TinyModel, free_port
from test_deploy import PROM_CONFIG, RULES, dashboard_targets, grafana_expand

JOB = "anomon"
N_NORMAL = 12
N_ANOMALOUS = 20
ANOMALY_ALERT = "AnomonAnomalyRateHigh"
# Alerts that may legitimately be pending at the end besides the anomaly-rate one:
# AnomonScoringLatencyHigh (p99 scoring time > 1 s) depends on how loaded the test machine is.
MAY_BE_PENDING = {ANOMALY_ALERT, "AnomonScoringLatencyHigh"}


@pytest.fixture(scope="module")
def prom_bins() -> tuple[str, str]:
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found  # type: ignore[return-value]
    missing = " and ".join(n for n, p in zip(("prometheus", "promtool"), found) if not p)
    if os.environ.get("CI"):
        pytest.fail(f"{missing} not on PATH; CI must install Debian's prometheus package")
    pytest.skip(f"{missing} not on PATH (apt-get install prometheus); set CI=1 to fail instead")


class LocalServer:
    """A Prometheus-family server (Prometheus, Alertmanager) as a subprocess on a free loopback
    port, its log in a file: started, waited for (/-/ready), stopped."""

    name = "server"

    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.log_path = workdir / f"{self.name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
                                     cwd=workdir)
        self.started = time.time()

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Prometheus(LocalServer):
    """One Prometheus server on a free loopback port, with its log in a file."""

    name = "prometheus"

    def __init__(self, binary: str, workdir: Path, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"], workdir)

    def api(self, path: str, **params: Any) -> Any:
        r = requests.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        assert data["resultType"] == "matrix", data
        return data["result"]

    def values(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            last = predicate()
            if last:
                return last
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{self.log_tail()}")

def scrape_config(target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with 1 s intervals, the test target and the shipped rules."""
    shipped = yaml.safe_load(PROM_CONFIG.read_text())
    assert shipped["rule_files"] == [RULES.name]  # so the absolute path below is the same file
    cfg = copy.deepcopy(shipped)
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(RULES)]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [target]}]
    return cfg


def _finite(sample_values: list[Any]) -> bool:
    return any(math.isfinite(float(v[1])) for v in sample_values)


@pytest.mark.e2e
def test_prometheus_scrapes_evaluates_rules_and_answers_the_dashboard(
        prom_bins: tuple[str, str], tiny_model: TinyModel, daemon_factory, tmp_path: Path) -> None:
    prometheus_bin, promtool = prom_bins
    t0 = time.monotonic()
    d: Daemon = daemon_factory(tiny_model.path, name="d").start()
    target = f"127.0.0.1:{d.port}"

    pdir = tmp_path / "prom"
    pdir.mkdir()
    config = pdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(target), sort_keys=False))
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    prom = Prometheus(prometheus_bin, pdir, config)
    try:
        prom.wait_ready()
        sel = f'{{job="{JOB}", instance="{target}"}}'
        # At least two scrapes of the untouched counters (0), so increase() counts every image.
        prom.wait_for(lambda: prom.values(f"count_over_time(anomon_ready{sel}[1m])", "instance")
                      .get(target, 0) >= 2, "two scrapes of the daemon")
        assert prom.values(f"up{sel}", "instance") == {target: 1.0}

        # ---- phase 1: normal traffic only. The anomaly-rate alert must stay quiet.
        for i in range(N_NORMAL):
            tiny_model.normal_png(d.watch / f"n{i:02d}.png", i)
        prom.wait_for(lambda: prom.values(f"anomon_images_scored_total{sel}", "verdict")
                      == {"normal": N_NORMAL, "anomalous": 0}, f"{N_NORMAL} normal verdicts in Prometheus")
        # The rules see it: enough images for the alert's volume condition, none anomalous.
        prom.wait_for(lambda: prom.values("anomon:anomaly_share:ratio_rate10m", "instance") == {target: 0.0}
                      and prom.values("anomon:images_scored:increase10m", "instance").get(target, 0) >= 10,
                      "the recording rules to see the normal images")
        after_phase1 = time.time()
        rule = prom.wait_for(lambda: next((r for r in prom.rules() if r.get("name") == ANOMALY_ALERT
                                           and _ts(r["lastEvaluation"]) > after_phase1), None),
                             f"{ANOMALY_ALERT} evaluated on normal traffic")
        assert rule["state"] == "inactive" and rule["health"] == "ok", rule
        assert not [a for a in prom.alerts() if a["labels"]["alertname"] == ANOMALY_ALERT]

        # ---- phase 2: anomalous images dominate, plus one file that is not an image.
        for i in range(N_ANOMALOUS):
            tiny_model.anomalous_png(d.watch / f"a{i:02d}.png", i)
        (d.watch / "junk.png").write_bytes(b"this is not an image\n")

        # (a) the daemon's counts arrive in Prometheus, exactly.
        prom.wait_for(lambda: prom.values(f"anomon_images_scored_total{sel}", "verdict")
                      == {"normal": N_NORMAL, "anomalous": N_ANOMALOUS}, "all verdicts in Prometheus")
        prom.wait_for(lambda: prom.values(f'anomon_image_errors_total{{job="{JOB}", reason="not_image"}}',
                                          "instance") == {target: 1.0}, "the not_image error in Prometheus")
        assert prom.values(f"anomon_alerts_total{sel}", "instance") == {target: float(N_ANOMALOUS)}
        # ...and agree with the daemon's own /metrics.
        m = d.metrics()
        assert m['anomon_images_scored_total{verdict="normal"}'] == N_NORMAL
        assert m['anomon_images_scored_total{verdict="anomalous"}'] == N_ANOMALOUS

        # (b) the anomaly-rate alert goes pending (or firing), with the right value and text.
        share = N_ANOMALOUS / (N_NORMAL + N_ANOMALOUS)
        # The alert may go pending on an evaluation that saw only part of the anomalous images (a
        # busy machine scores them over several scrapes); its value then follows the counters
        # until every image is in the window. Both verdict series share their scrape timestamps,
        # so rate()'s extrapolation cancels out and the value settles at the exact share.
        seen: list[float] = []

        def settled() -> dict | None:
            for a in prom.alerts():
                if a["labels"]["alertname"] == ANOMALY_ALERT and a["state"] in ("pending", "firing"):
                    seen.append(float(a["value"]))
                    if float(a["value"]) == pytest.approx(share, abs=0.01):
                        return a
            return None

        try:
            alert = prom.wait_for(settled, f"{ANOMALY_ALERT} pending at a {share:.3f} share", timeout=60)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast values seen: {seen[-5:]}") from None
        # Per line: a daemon configured with model + watch serves one line, named "default".
        assert alert["labels"] == {"alertname": ANOMALY_ALERT, "severity": "critical", "job": JOB,
                                   "instance": target, "line": "default"}, alert
        assert alert["annotations"]["summary"] == (
            f"{share:.1%} of images anomalous on line default ({target})")
        assert "(alert above 20%)" in alert["annotations"]["description"]

        # Every shipped rule evaluates cleanly on real data (no matching or template errors), and
        # nothing else is alarmed by a healthy daemon.
        rules = prom.rules()
        assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        active = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
        assert ANOMALY_ALERT in active and active <= MAY_BE_PENDING, active

        # (c) every Grafana expression parses and returns real numbers, as Grafana would ask for it
        # (instant panels: an instant query; graphs: a range query since Prometheus started). Every
        # series a panel shows exists by now (labelled children are created at start, and each kind
        # of event happened), so an empty or all-NaN answer is a failure, with no exception.
        now = time.time()
        problems = []
        for panel, tgt in dashboard_targets():
            expr = grafana_expand(tgt["expr"])
            where = f"panel {panel['id']} ({panel['title']}) {tgt['refId']}: {expr}"
            if tgt.get("instant"):
                result = prom.query(expr)
                if not result or not _finite([s["value"] for s in result]):
                    problems.append(f"{where} -> {result}")
            else:
                result = prom.query_range(expr, prom.started, now)
                if not result or not any(_finite(s["values"][-5:]) for s in result):
                    problems.append(f"{where} -> {result}")
        assert not problems, "\n".join(problems)

        # A few panels, checked for the right numbers rather than just some numbers.
        assert prom.values(grafana_expand(_expr("Score threshold")), "instance")[target] == pytest.approx(
            tiny_model.threshold, rel=1e-6)
        (info,) = prom.query(grafana_expand(_expr("Model")))
        from anomon.detector import Detector

        assert info["metric"]["model_id"] == Detector.load(tiny_model.path, device="cpu").model_id
        (ratio,) = prom.query(grafana_expand(_expr("Anomalous share (10 min window)")))
        assert float(ratio["value"][1]) == pytest.approx(share, abs=0.01)
        # The dashboard's instance picker (label_values(anomon_build_info{job="anomon"}, instance)).
        assert target in prom.api("label/instance/values", **{"match[]": f'anomon_build_info{{job="{JOB}"}}'})
    finally:
        code = prom.stop()
    assert code == 0, prom.log_tail()
    assert d.stop() == 0
    took = time.monotonic() - t0
    assert took < 90, f"took {took:.0f} s"


def _expr(title: str) -> str:
    (expr,) = [t["expr"] for p, t in dashboard_targets() if p["title"] == title]
    return expr


def _ts(rfc3339: str) -> float:
    """Prometheus's RFC 3339 timestamps (nanosecond precision, 'Z') as Unix time."""
    from datetime import datetime

    head, _, frac = rfc3339.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float("0." + frac.split("+")[0].split("-")[0]) if frac else 0.0)
