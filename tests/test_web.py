"""The HTTP endpoints: query validation, and connections that cannot starve the daemon.

In-process tests run anomon.web's server on a free port against a real ledger; the idle-connection
test runs the real daemon with a lowered open-file limit, the way the fault was met in production.
"""

from __future__ import annotations

import http.client
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from anomon.daemon_process import parse_metrics
from anomon.ledger import Ledger, Verdict, open_readonly
from anomon.web import WebServer
from conftest import TinyModel


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebServer]:
    led = Ledger.open(tmp_path / "ledger.sqlite3")
    led.record([Verdict(path=f"/w/{i}.png", verdict="anomalous", arrived_at=1.0, scored_at=2.0, size=1,
                        mtime_ns=i, sha256=f"s{i}", score=9.0, threshold=1.0) for i in range(3)])
    led.close()
    srv = WebServer("127.0.0.1", 0, registry=CollectorRegistry(), ready=lambda: {"ok": True},
                    healthy=lambda: True, ledger_file=tmp_path / "ledger.sqlite3", max_connections=4,
                    idle_timeout_s=1.0)
    srv.start()
    yield srv
    srv.stop()


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# -- /alerts ---------------------------------------------------------------------------------------


def test_alerts_pages_by_id(web: WebServer) -> None:
    status, body = get(web.port, "/alerts?since=1&limit=1")
    page = json.loads(body)
    assert status == 200 and [a["id"] for a in page["alerts"]] == [2] and page["more"] is True
    page = json.loads(get(web.port, "/alerts?since=0&limit=5000")[1])  # capped, not refused
    assert [a["id"] for a in page["alerts"]] == [1, 2, 3] and page["last_id"] == 3
    assert json.loads(get(web.port, "/alerts")[1])["last_id"] == 3


@pytest.mark.parametrize("query", [
    "since=1e30", f"since={10**30}", f"since={2**63}", "since=-1", "since=abc", "since=", "since=1.5",
    "since=%EF%BC%91", "since=1_0", "since=+1", "since=%201", "limit=0", "limit=-5", f"limit={10**30}",
    "limit=x", "since=1&since=2",
])
def test_alerts_rejects_a_bad_query_with_a_one_line_400(web: WebServer, query: str) -> None:
    status, body = get(web.port, f"/alerts?{query}")
    assert status == 400, (query, status, body)
    error = json.loads(body)["error"]
    assert body.count(b"\n") == 1 and ("since" in error or "limit" in error), body
    assert get(web.port, "/healthz")[0] == 200  # and the server is fine


# -- connections -----------------------------------------------------------------------------------


def _idle_sockets(port: int, n: int) -> list[socket.socket]:
    """Up to n connections that never send a byte, each one connected before the next (so they
    really pile up, as a stuck client's would). Stops early once connecting stalls: a daemon that
    no longer accepts has lost already, and the caller's checks will say so."""
    out: list[socket.socket] = []
    stalled = 0
    while len(out) < n and stalled < 3:
        s = socket.socket()
        s.settimeout(3.0)  # a SYN dropped by a full accept queue is sent again after 1 s
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            stalled += 1
        out.append(s)
        time.sleep(0.002)  # a client, not a flood: the server may keep up
    return out


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(True)
    s.settimeout(0)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except (ConnectionResetError, socket.timeout):
        return True


def test_more_idle_connections_than_the_cap_do_not_block_requests(web: WebServer) -> None:
    idle = _idle_sockets(web.port, 20)  # the cap is 4
    try:
        time.sleep(0.3)
        for path in ("/healthz", "/readyz", "/metrics", "/alerts?since=0"):
            t0 = time.monotonic()
            assert get(web.port, path, timeout=2.0)[0] == 200, path
            assert time.monotonic() - t0 < 1.0, path
    finally:
        for s in idle:
            s.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(web: WebServer) -> None:
    (s,) = _idle_sockets(web.port, 1)
    try:
        time.sleep(0.3)
        assert not _closed_by_server(s)  # still open: the timeout is 1 s
        deadline = time.monotonic() + 5.0
        while not _closed_by_server(s):
            assert time.monotonic() < deadline, "idle connection never closed"
            time.sleep(0.1)
    finally:
        s.close()


def test_listen_backlog_is_not_five(web: WebServer) -> None:
    assert web.backlog >= 128


# -- the real daemon -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_idle_connections_do_not_starve_the_daemon(daemon_factory, tiny_model: TinyModel) -> None:
    """Hundreds of connections that never send a request, against a daemon whose open-file limit
    they exceed: /metrics and /readyz still answer promptly and a new image is still scored."""
    d = daemon_factory(tiny_model.path, "idle")
    d.start()
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (256, 256))  # the fault at 1024, in small
    idle = _idle_sockets(d.port, 400)
    try:
        time.sleep(2.0)  # let the daemon accept what it will
        for path in ("/metrics", "/readyz", "/healthz"):
            t0 = time.monotonic()
            status = d.get(path, timeout=3.0).status
            assert status == 200 and time.monotonic() - t0 < 2.0, (path, status)
        assert parse_metrics(d.get("/metrics", timeout=3.0).text)["anomon_ready"] == 1
        tiny_model.normal_png(d.watch / "during.png", 1)
        d.wait_for(lambda: _verdicts(d) == ["normal"], 15, "the image dropped in meanwhile")
    finally:
        for s in idle:
            s.close()
    assert d.stop() == 0


def _verdicts(d) -> list[str]:
    conn = open_readonly(d.state / "ledger.sqlite3")
    try:
        return [r[0] for r in conn.execute("SELECT verdict FROM images")]
    finally:
        conn.close()


def test_the_deployment_raises_the_open_file_limit() -> None:
    """1024 open files (the usual default) is what the connections used up; the cap keeps the
    daemon's own share small, the unit and the container leave room for the rest."""
    import re

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    unit = (deploy / "systemd" / "anomon.service").read_text()
    (limit,) = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.M)
    compose = (deploy / "docker" / "compose.yml").read_text()
    (nofile,) = re.findall(r"^\s+nofile: (\d+)", compose, re.M)
    assert int(limit) >= 65536 and int(nofile) >= 65536
