"""anomon.daemon_process: the one way the demo, the e2e tests and the bench run the daemon.

Its pieces are checked here on their own (seconds): the /metrics parser whose key format the e2e
tests write by hand, the TOML writer against Python's own TOML reader, the free-port picker, the
HTTP helper on a non-2xx answer, the error a failed start raises, and that the module stays light
(no torch, no numpy) so `anomon demo` and the test helpers import it at no cost.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from anomon.daemon_process import DaemonProcess, DaemonProcessError, free_port, parse_metrics, toml_value, write_toml

EXPOSITION = """\
# HELP anomon_images_scored_total Images scored, by verdict.
# TYPE anomon_images_scored_total counter
anomon_images_scored_total{verdict="normal"} 7.0
anomon_images_scored_total{verdict="anomalous"} 2.0
# HELP anomon_score_threshold Decision threshold.
# TYPE anomon_score_threshold gauge
anomon_score_threshold 3.25
# HELP anomon_model_info The model.
# TYPE anomon_model_info gauge
anomon_model_info{model_id="abc",image_size="32"} 1.0
# HELP anomon_intake_latency_seconds Intake latency.
# TYPE anomon_intake_latency_seconds histogram
anomon_intake_latency_seconds_bucket{le="0.1"} 3.0
anomon_intake_latency_seconds_bucket{le="+Inf"} 9.0
anomon_intake_latency_seconds_count 9.0
anomon_intake_latency_seconds_sum 1.5
"""


def test_parse_metrics_keys_are_name_and_sorted_labels() -> None:
    m = parse_metrics(EXPOSITION)
    assert m['anomon_images_scored_total{verdict="normal"}'] == 7.0
    assert m['anomon_images_scored_total{verdict="anomalous"}'] == 2.0
    assert m["anomon_score_threshold"] == 3.25  # no labels: the bare name
    assert m['anomon_model_info{image_size="32",model_id="abc"}'] == 1.0  # sorted, whatever the order sent
    assert m['anomon_intake_latency_seconds_bucket{le="+Inf"}'] == 9.0
    assert m["anomon_intake_latency_seconds_count"] == 9.0
    assert len(m) == 8


def test_toml_round_trips_through_tomllib(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "model": tmp_path / "model.anomon",  # paths are written as strings
        "watch": [Path("/a b/in"), "/c"],
        "odd": 'quote " backslash \\ tab \t newline \n DEL \x7f é 漢 🙂',
        "polling": True,
        "off": False,
        "batch_size": 16,
        "stable_s": 0.3,
        "tiny": 1e-05,
        "big": 1e300,
        "nested": [[1, 2], [3.5]],
        "needs quotes": "x",
    }
    path = tmp_path / "c.toml"
    write_toml(path, values, comment="line one\nline two")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# line one\n# line two\n")
    expect = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    expect["watch"] = ["/a b/in", "/c"]
    assert tomllib.loads(text) == expect


def test_toml_refuses_what_a_config_cannot_hold() -> None:
    for bad in (None, {"a": None}, [object()], b"bytes"):
        with pytest.raises(TypeError):
            toml_value(bad)


def test_toml_lines_tables_round_trip(tmp_path: Path) -> None:
    lines = [{"name": "press-1", "model": "/m/p.anomon", "watch": ["/srv/p"], "batch_size": 4},
             {"name": "weld \"2\"", "model": "/m/w.anomon", "watch": ["/srv/w"], "target_fpr": 0.01}]
    write_toml(tmp_path / "a.toml", {"state": "/var/lib/anomon", "lines": lines})
    assert tomllib.loads((tmp_path / "a.toml").read_text()) == {"state": "/var/lib/anomon", "lines": lines}


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_importing_it_imports_neither_torch_nor_numpy() -> None:
    code = "import sys, anomon.daemon_process; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.fixture
def fake_daemon_http() -> Iterator[str]:
    """A stand-in HTTP server: /metrics answers EXPOSITION, anything else a JSON 404."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            ok = self.path == "/metrics"
            body = EXPOSITION.encode() if ok else json.dumps({"error": "not found"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_get_returns_non_2xx_answers_and_metrics_parses(fake_daemon_http: str, tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, {"listen": fake_daemon_http})  # never started: only its HTTP side
    assert d.url == f"http://{fake_daemon_http}"
    status, body = d.get("/nowhere")  # urllib raises HTTPError for a 404; get() answers it
    assert status == 404 and json.loads(body) == {"error": "not found"}
    assert d.get("/nowhere").json() == {"error": "not found"}
    assert d.metric("anomon_score_threshold") == 3.25
    assert d.metric("anomon_absent") != d.metric("anomon_absent")  # NaN when absent


def test_a_daemon_that_exits_at_start_raises_with_its_status_and_log(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, {"model": str(tmp_path / "missing.anomon"), "watch": [str(tmp_path)],
                                 "state": str(tmp_path / "state"), "log_format": "json"},
                      env={"OMP_NUM_THREADS": "1"})
    with pytest.raises(DaemonProcessError, match=r"exited with status 2(.|\n)*model file not found"):
        d.start(timeout=120)
    assert d.stop() == 2
    assert tomllib.loads(d.config.read_text())["model"] == str(tmp_path / "missing.anomon")
    assert any("model file not found" in line.get("msg", "") for line in d.log_lines())


def test_a_key_naming_fewer_labels_sums_the_samples_that_have_them() -> None:
    m = parse_metrics('# TYPE a_total counter\n'
                      'a_total{line="x",verdict="normal"} 2\n'
                      'a_total{line="y",verdict="normal"} 3\n'
                      'a_total{line="y",verdict="anomalous"} 7\n')
    assert m['a_total{line="y",verdict="normal"}'] == 3  # exact keys as before
    assert m['a_total{verdict="normal"}'] == 5 and m["a_total"] == 12  # like PromQL's sum without
    assert 'a_total{verdict="normal"}' in m and 'a_total{verdict="none"}' not in m
    assert m.get('a_total{line="z"}', -1.0) == -1.0
