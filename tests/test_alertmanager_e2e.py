"""From the daemon to the people: real anomon, real Prometheus, real Alertmanager, a real receiver.

test_deploy.py proves the shipped alertmanager.yml parses and routes label sets where it should
(`amtool`); test_prometheus_e2e.py that Prometheus evaluates the shipped rules on what the daemon
exports. This test follows alerts the whole way on a host with three lines: images dropped into
one line's folder make the anomaly-rate alert fire for that line, images dropped into another's
make the drift alert fire for it, and the third line's model file is broken (AnomonLineDown);
Prometheus hands them to Alertmanager, and Alertmanager's webhook notifications reach a receiver
in this test, each naming its line and routed by severity and line (the `weld-2` line's critical
alert to its own on-call receiver, the `press-1` line's warning to the shift's, `etch-3`'s
critical one to the on-call's), and nothing else arrives. Resetting the drift test (SIGUSR1, as
the alert says) resolves the drift alert, and the shift's receiver is told. Then AnomonLineDown
for `weld-2` holds back that line's alert only, and AnomonDown for the daemon all of them
(inhibit_rules).

What is real: `anomon watch` with three [[lines]] (its own process, a TOML file, a free port),
`prometheus` and Debian's `prometheus-alertmanager`, each its own process on 127.0.0.1, and the
receiver (an HTTP server in this process). What is generated from the shipped files, and nothing
else:

- prometheus.yml: scrape and evaluation every 1 s, the test daemon as target, this test's
  Alertmanager under `alerting`;
- rules.yml: the shipped rules, with one change: AnomonAnomalyRateHigh and AnomonLineDown wait
  `for: 2s` instead of 5 minutes and 1 minute (the test checks that this is the only difference).
  Expressions, windows, labels and texts are the shipped ones; that their `for:` holds back a
  short burst or a blip is promtool's business in rules.test.yml. AnomonDrift fires at once as
  shipped (`for: 0m`);
- alertmanager.yml: the shipped routes and inhibit rules, with group_wait / group_interval of 1 s
  and every receiver's webhook pointed at the test's receiver, at /<receiver name>.

Making the alerts fire within seconds: the first two lines' models are the tiny test bundle,
calibrated so that its threshold is 10 (see line_models). On `weld-2` a third of the images are
anomalous (a saturated square, scoring above 10); `press-1` is calibrated on scores below those of
the normal images the test drops, so they all score higher than every calibration image yet far
under the threshold: judged normal, and the drift test's martingale climbs to its alarm within a
few dozen images (29 when this was written). `etch-3`'s bundle is a truncated file, which the
daemon refuses: that line waits (anomon_line_up 0) while the others score.

Needs prometheus, promtool and prometheus-alertmanager (or alertmanager) on PATH: skipped without
them, a failure when CI is set (.ci/run installs both Debian packages).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from anomon.daemon_process import DaemonProcess, toml_value
from conftest import REPO, TinyModel, free_port
from test_deploy import AM_CONFIG, RULES, dashboard_targets, grafana_expand
from test_prometheus_e2e import LocalServer, Prometheus, scrape_config

JOB = "anomon"
# The lines of the test's daemon. `weld-2` is the line the shipped alertmanager.yml routes to its
# own receivers (its example route); the others go by severity alone. ETCH's model is broken.
WELD, PRESS, ETCH = "weld-2", "press-1", "etch-3"
RATE_ALERT = "AnomonAnomalyRateHigh"
DRIFT_ALERT = "AnomonDrift"
LINE_DOWN_ALERT = "AnomonLineDown"
# The only change to the shipped rules: these alerts wait 2 s, not `for:` minutes.
SHORTER_FOR = {RATE_ALERT: "2s", LINE_DOWN_ALERT: "2s"}
N_WELD_NORMAL = 20
N_ANOMALOUS = 10  # a third of WELD's verdicts, over the 20 % the rule alerts at
N_PRESS_NORMAL = 60


@pytest.fixture(scope="module")
def bins() -> dict[str, str]:
    found = {
        "prometheus": shutil.which("prometheus"),
        "promtool": shutil.which("promtool"),
        "alertmanager": shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"),
        "amtool": shutil.which("amtool"),
    }
    missing = [name for name, path in found.items() if not path]
    if not missing:
        return found  # type: ignore[return-value]
    why = f"{', '.join(missing)} not on PATH (apt-get install prometheus prometheus-alertmanager)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must install both Debian packages")
    pytest.skip(f"{why}; set CI=1 to fail instead")


# ------------------------------------------------------------------------------ the receiver


class Receiver:
    """Alertmanager's webhook receiver: records every notification as (path, JSON body)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with rec._lock:
                    rec.got.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """Every alert of every notification so far, as (receiver path, alert), with the
        notification's status and receiver name checked against the alert's."""
        with self._lock:
            got = list(self.got)
        out = []
        for path, body in got:
            assert body["version"] == "4" and path == f"/{body['receiver']}", (path, body)
            out.extend((path, a) for a in body["alerts"])
        return out

    def firing(self, alertname: str) -> list[tuple[str, dict[str, Any]]]:
        return [(p, a) for p, a in self.alerts()
                if a["labels"]["alertname"] == alertname and a["status"] == "firing"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------ Alertmanager


class Alertmanager(LocalServer):
    """One Alertmanager on a free loopback port, clustering off, its log in a file."""

    name = "alertmanager"

    def __init__(self, binary: str, workdir: Path, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([binary, f"--config.file={config}", f"--storage.path={workdir / 'data'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
                          "--log.level=info"], workdir)

    def alerts(self) -> list[dict[str, Any]]:
        r = requests.get(self.url + "/api/v2/alerts", timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, alerts: list[dict[str, Any]]) -> None:
        r = requests.post(self.url + "/api/v2/alerts", json=alerts, timeout=5)
        assert r.status_code == 200, r.text

# ------------------------------------------------------------------------------ the configs


def rules_copy(workdir: Path) -> Path:
    """rules.yml as shipped, but the alerts in SHORTER_FOR wait that long."""
    shipped = yaml.safe_load(RULES.read_text())
    rules = copy.deepcopy(shipped)
    for r in (r for g in rules["groups"] for r in g["rules"] if r.get("alert") in SHORTER_FOR):
        r["for"] = SHORTER_FOR[r["alert"]]
    path = workdir / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    # The only difference from the shipped file:
    again = yaml.safe_load(path.read_text())
    changed = [r for g in again["groups"] for r in g["rules"] if r.get("alert") in SHORTER_FOR]
    assert {r["alert"]: r["for"] for r in changed} == SHORTER_FOR
    for r in changed:
        r["for"] = {RATE_ALERT: "5m", LINE_DOWN_ALERT: "1m"}[r["alert"]]
    assert again == shipped
    return path


def alertmanager_config(receiver_url: str) -> dict[str, Any]:
    """The shipped alertmanager.yml: its routes and inhibit rules, 1 s waits, every webhook at
    receiver_url/<receiver name>."""
    cfg = copy.deepcopy(yaml.safe_load(AM_CONFIG.read_text()))

    def fast(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            fast(child)

    cfg["route"].update(group_wait="1s", group_interval="1s")
    fast(cfg["route"])
    for rc in cfg["receivers"]:
        assert set(rc) == {"name", "webhook_configs"}, rc  # nothing here would be reached otherwise
        for hook in rc["webhook_configs"]:
            hook["url"] = f"{receiver_url}/{rc['name']}"
    return cfg


# ------------------------------------------------------------------------------ the models


@pytest.fixture(scope="module")
def line_models(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny bundle calibrated twice, with one score of 10 that puts the threshold above every
    normal image and under every anomalous one (checked here), and a broken bundle for ETCH:

    - for WELD on the scores of the clearly normal images themselves: the test's normal
      images are exchangeable with the calibration images, no drift;
    - for PRESS on those scores shifted down below the lowest of them: the same images now all
      score higher than every calibration image, a drift ("higher", a dimming lamp, say) the
      drift test raises its alarm on within a few dozen images, while they stay normal."""
    from PIL import Image

    from anomon.detector import Detector

    det = Detector.load(tiny_model.path, device="cpu")
    prep = lambda arrays: np.stack([det.preprocess(Image.fromarray(a)) for a in arrays])  # noqa: E731
    normal = det.score_samples(prep(tiny_model.normals))
    anomalous = det.score_samples(prep([_anomalous_array(i) for i in range(N_ANOMALOUS)]))
    assert normal.max() < 10.0 < anomalous.min(), (normal, anomalous)
    out = tmp_path_factory.mktemp("am-models")
    models = {}
    shifted = normal - (normal.max() - normal.min()) - 0.1  # (scores can be negative: z-scored views)
    for line, calibration in ((WELD, normal), (PRESS, shifted)):
        det.calibrate(np.r_[calibration, 10.0])
        assert det.threshold_ == 10.0
        models[line] = out / f"{line}.anomon"
        det.save(models[line])
    models[ETCH] = out / f"{ETCH}.anomon"
    models[ETCH].write_bytes(models[PRESS].read_bytes()[:200])  # a truncated copy: refused
    return models


def _anomalous_array(i: int) -> np.ndarray:
    from conftest import anomalous_array

    return anomalous_array(np.random.default_rng(10_000 + i))  # as TinyModel.anomalous_png


class LinesDaemon(DaemonProcess):
    """`anomon watch` serving several lines, each with its own folder and model ([[lines]] tables
    after the daemon-wide keys, which write_toml writes)."""

    def __init__(self, workdir: Path, models: dict[str, Path]) -> None:
        self.watch = {line: workdir / line for line in models}
        for folder in self.watch.values():
            folder.mkdir(parents=True)
        self.lines = [{"name": line, "model": str(model), "watch": [str(self.watch[line])]}
                      for line, model in models.items()]
        super().__init__(workdir, {"state": str(workdir / "state"), "stable_s": 0.3, "log_format": "json",
                                   "device": "cpu"}, env={"OMP_NUM_THREADS": "1"}, cwd=REPO)

    def write_config(self) -> None:
        super().write_config()
        with open(self.config, "a", encoding="utf-8") as f:
            for line in self.lines:
                f.write("\n[[lines]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in line.items()))

    def scored(self, line: str, verdict: str) -> float:
        return self.metric(f'anomon_images_scored_total{{line="{line}",verdict="{verdict}"}}')


# ------------------------------------------------------------------------------ the test


@pytest.mark.e2e
def test_lines_anomaly_rate_drift_and_line_down_reach_their_receivers_and_anomon_down_holds_them_back(
        bins: dict[str, str], tiny_model: TinyModel, line_models: dict[str, Path], tmp_path: Path) -> None:
    t0 = time.monotonic()
    receiver = Receiver()

    amdir = tmp_path / "am"
    amdir.mkdir()
    am_config = amdir / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump(alertmanager_config(receiver.url), sort_keys=False))
    check = subprocess.run([bins["amtool"], "check-config", str(am_config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    am = Alertmanager(bins["alertmanager"], amdir, am_config)

    d = LinesDaemon(tmp_path / "d", line_models)
    prom: Prometheus | None = None
    try:
        d.start()
        target = f"127.0.0.1:{d.port}"
        pdir = tmp_path / "prom"
        pdir.mkdir()
        cfg = scrape_config(target)
        cfg["rule_files"] = [str(rules_copy(pdir))]
        (alerting,) = cfg["alerting"]["alertmanagers"]
        alerting["static_configs"] = [{"targets": [f"127.0.0.1:{am.port}"]}]
        prom_config = pdir / "prometheus.yml"
        prom_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        check = subprocess.run([bins["promtool"], "check", "config", str(prom_config)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        prom = Prometheus(bins["prometheus"], pdir, prom_config)
        am.wait_ready()
        prom.wait_ready()
        sel = f'{{job="{JOB}", instance="{target}"}}'
        # Two scrapes of the untouched counters (0), so increase() counts every image.
        prom.wait_for(lambda: prom.values(f"count_over_time(anomon_ready{sel}[1m])", "instance")
                      .get(target, 0) >= 2, "two scrapes of the daemon")
        assert d.metric(f'anomon_line_up{{line="{ETCH}"}}') == 0 and d.get("/readyz").status == 200

        # WELD: a third of its parts bad. PRESS: only normal parts, but every one scores higher
        # than its calibration images.
        for i in range(N_WELD_NORMAL):
            tiny_model.normal_png(d.watch[WELD] / f"n{i:03d}.png", i)
        for i in range(N_ANOMALOUS):
            tiny_model.anomalous_png(d.watch[WELD] / f"a{i:03d}.png", i)
        for i in range(N_PRESS_NORMAL):
            tiny_model.normal_png(d.watch[PRESS] / f"n{i:03d}.png", i)
        want = {(WELD, "normal"): N_WELD_NORMAL, (WELD, "anomalous"): N_ANOMALOUS,
                (PRESS, "normal"): N_PRESS_NORMAL, (PRESS, "anomalous"): 0}
        d.wait_for(lambda: {k: d.scored(*k) for k in want} == want, 60, f"the verdicts {want}")
        drift_alarms = {line: d.metric(f'anomon_drift_alarms_total{{line="{line}"}}')
                        for line in (WELD, PRESS)}
        assert drift_alarms == {WELD: 0, PRESS: 1}, drift_alarms  # the daemon's own drift alarm

        # Each alert reaches the receiver its severity and line route it to, naming the line.
        expected = {  # alertname -> (line, severity, receiver)
            RATE_ALERT: (WELD, "critical", "/weld-2-oncall"),
            DRIFT_ALERT: (PRESS, "warning", "/shift"),
            LINE_DOWN_ALERT: (ETCH, "critical", "/oncall"),
        }
        _wait(lambda: all(receiver.firing(name) for name in expected), 45,
              "the three notifications at the receiver", receiver, prom, am)
        for name, (line, severity, path) in expected.items():
            got = receiver.firing(name)
            assert {p for p, _ in got} == {path}, (name, got)
            for _, alert in got:
                assert alert["labels"] == {"alertname": name, "severity": severity, "job": JOB,
                                           "instance": target, "line": line}, alert["labels"]
                # Firing, with no end known yet (Go's zero time), and a link back to Prometheus.
                assert alert["endsAt"].startswith("0001-01-01") and alert["startsAt"] > "2000"
                assert "/graph?g0.expr=" in alert["generatorURL"], alert["generatorURL"]
        (_, rate), *_ = receiver.firing(RATE_ALERT)
        assert rate["annotations"]["summary"].endswith(f"of images anomalous on line {WELD} ({target})")
        assert "(alert above 20%)" in rate["annotations"]["description"]
        (_, drift), *_ = receiver.firing(DRIFT_ALERT)
        assert drift["annotations"]["summary"] == (
            f"images of line {PRESS} on {target} drift away from the calibration images")
        assert "-s USR1 anomon" in drift["annotations"]["description"]  # what to do after fixing it
        (_, down), *_ = receiver.firing(LINE_DOWN_ALERT)
        assert down["annotations"]["summary"] == (
            f"line {ETCH} on {target} judges no image: its model is not loaded")
        # Nothing else was sent: no anomaly-rate alert for PRESS, no drift alert for WELD, no
        # AnomonNotReady (the other lines score on), and no other alert.
        assert {(a["labels"]["alertname"], a["labels"].get("line")) for _, a in receiver.alerts()} == {
            (RATE_ALERT, WELD), (DRIFT_ALERT, PRESS), (LINE_DOWN_ALERT, ETCH)}

        # Grafana's view of the same: the line picker offers every line, and the drift panel with
        # PRESS picked shows its evidence at or above the alarm level.
        picker = prom.api("label/line/values", **{"match[]": f'anomon_line_up{{job="{JOB}"}}'})
        assert picker == sorted([WELD, PRESS, ETCH]), picker
        (drift_expr,) = [t["expr"] for _, t in dashboard_targets()
                         if "anomon_drift_martingale_log10" in t["expr"]]
        shown = prom.values(grafana_expand(drift_expr.replace("$line", PRESS)), "line")
        assert set(shown) == {PRESS} and shown[PRESS] >= 2.0, shown

        # The operator fixes PRESS's lamp and resets the drift test as the alert says (SIGUSR1):
        # the alert resolves, and the shift's receiver is told so.
        d.signal(signal.SIGUSR1)
        _wait(lambda: [a for p, a in receiver.alerts() if p == "/shift" and a["status"] == "resolved"
                       and a["labels"]["alertname"] == DRIFT_ALERT and a["labels"]["line"] == PRESS], 20,
              "the drift alert resolved at the receiver", receiver, prom, am)

        # WELD's model failed (as Prometheus would send AnomonLineDown): its alerts are held back,
        # ETCH's are not. Then the daemon is down (AnomonDown): every per-line alert is held back.
        rate, etch = (RATE_ALERT, WELD), (LINE_DOWN_ALERT, ETCH)
        now = time.time()
        am.post([_alert(LINE_DOWN_ALERT, target, now, line=WELD)])
        states = _wait(lambda: _states(am, {rate: "suppressed", etch: "active"}), 15,
                       "WELD's alert held back by AnomonLineDown", receiver, prom, am)
        assert states[rate]["status"]["inhibitedBy"] == [states[(LINE_DOWN_ALERT, WELD)]["fingerprint"]]
        am.post([_alert("AnomonDown", target, now)])
        states = _wait(lambda: _states(am, {rate: "suppressed", etch: "suppressed"}), 15,
                       "every line's alerts held back by AnomonDown", receiver, prom, am)
        down = states[("AnomonDown", None)]
        assert down["status"]["state"] == "active" and [r["name"] for r in down["receivers"]] == ["oncall"]
        assert states[etch]["status"]["inhibitedBy"] == [down["fingerprint"]]
        assert all(a["status"]["state"] == "suppressed" for (_, line), a in states.items() if line), \
            "a per-line alert got through while AnomonDown fires"
        _wait(lambda: receiver.firing("AnomonDown"), 15, "AnomonDown at the receiver", receiver, prom, am)
        assert {p for p, _ in receiver.firing("AnomonDown")} == {"/oncall"}
    finally:
        prom_code = prom.stop() if prom is not None else 0
        am_code = am.stop()
        receiver.close()
        d_code = d.stop()
    assert prom_code == 0, prom.log_tail() if prom is not None else ""
    assert am_code == 0, am.log_tail()
    assert d_code == 0, d.log_tail()
    took = time.monotonic() - t0
    assert took < 60, f"took {took:.0f} s"


def _alert(name: str, target: str, now: float, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, "severity": "critical", "job": JOB, "instance": target, **labels},
            "annotations": {"summary": f"{name} (posted by the test)"},
            "startsAt": _rfc3339(now), "endsAt": _rfc3339(now + 300)}


def _states(am: Alertmanager, want: dict[tuple[str, str], str]) -> dict[tuple[str, str | None], Any] | None:
    """Alertmanager's alerts by (alertname, line), once each wanted one is in the wanted state."""
    alerts = {(a["labels"]["alertname"], a["labels"].get("line")): a for a in am.alerts()}
    if all(alerts.get(k, {}).get("status", {}).get("state") == state for k, state in want.items()):
        return alerts
    return None


def _wait(predicate, timeout: float, what: str, receiver: Receiver, prom: Prometheus,
          am: Alertmanager) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(
        f"timed out after {timeout:g} s waiting for {what}\n"
        f"receiver got: {[(p, a['labels'], a['status']) for p, a in receiver.alerts()]}\n"
        f"prometheus alerts: {[(a['labels'], a['state']) for a in prom.alerts()]}\n"
        f"alertmanager alerts: {[(a['labels'], a['status']) for a in am.alerts()]}\n"
        f"alertmanager log:\n{am.log_tail(15)}\nprometheus log:\n{prom.log_tail(15)}")


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
