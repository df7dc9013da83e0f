"""The daemon's HTTP endpoints: /metrics, /healthz, /readyz, /alerts.

(Named web.py, not http.py, so it never shadows the standard library's `http` package.)

/metrics is rendered by prometheus_client (text or OpenMetrics, by the scraper's Accept header),
never by hand. /alerts reads the ledger through its own read-only SQLite connection per request, so
HTTP clients never contend with the scoring worker's writer connection (WAL lets both run).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from anomon.ledger import LedgerError, alerts_after, open_readonly

log = logging.getLogger("anomon.web")

MAX_ALERTS_PER_PAGE = 1000


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up shutdown
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class WebServer:
    """Serves the endpoints on a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        ready: Callable[[], dict[str, bool]],
        healthy: Callable[[], bool],
        ledger_file: Path,
    ) -> None:
        handler = type("Handler", (_Handler,), {
            "registry": registry, "ready_checks": staticmethod(ready),
            "healthy": staticmethod(healthy), "ledger_file": ledger_file,
        })
        cls = _Server6 if ":" in host else _Server
        self._httpd = cls((host, port), handler)  # raises OSError (address in use, ...) now
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="anomon-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever that never began otherwise
            self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    ready_checks: Callable[[], dict[str, bool]]
    healthy: Callable[[], bool]
    ledger_file: Path
    server_version = "anomon"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        route = {
            "/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz,
            "/alerts": self._alerts, "/": self._index,
        }.get(url.path.rstrip("/") or "/")
        if route is None:
            self._send(404, {"error": f"no such endpoint: {url.path}"})
            return
        try:
            route(parse_qs(url.query))
        except Exception:  # a bug must not kill the server thread; log it, answer 500
            log.exception("error serving %s", url.path)
            self._send(500, {"error": "internal error"})

    def _metrics(self, query: dict[str, list[str]]) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._send_bytes(200, encoder(self.registry), content_type)

    def _healthz(self, query: dict[str, list[str]]) -> None:
        ok = self.healthy()
        self._send(200 if ok else 503, {"healthy": ok})

    def _readyz(self, query: dict[str, list[str]]) -> None:
        checks = self.ready_checks()
        ok = all(checks.values())
        self._send(200 if ok else 503, {"ready": ok, "checks": checks})

    def _alerts(self, query: dict[str, list[str]]) -> None:
        try:
            since = int(query.get("since", ["0"])[0])
            limit = int(query.get("limit", [str(MAX_ALERTS_PER_PAGE)])[0])
        except ValueError:
            self._send(400, {"error": "since and limit must be integers (alert ids)"})
            return
        limit = max(1, min(limit, MAX_ALERTS_PER_PAGE))
        try:
            conn = open_readonly(self.ledger_file)
        except LedgerError as e:
            self._send(503, {"error": str(e)})
            return
        try:
            alerts = alerts_after(conn, since, limit)
        finally:
            conn.close()
        last = alerts[-1]["id"] if alerts else since
        self._send(200, {"alerts": alerts, "last_id": last, "more": len(alerts) == limit})

    def _index(self, query: dict[str, list[str]]) -> None:
        self._send(200, {"endpoints": ["/metrics", "/healthz", "/readyz", "/alerts?since=ID"]})

    def _send(self, status: int, body: Any) -> None:
        self._send_bytes(status, (json.dumps(body) + "\n").encode(), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("http %s", format % args)
