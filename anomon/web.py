"""The daemon's HTTP endpoints: /metrics, /healthz, /readyz, /alerts, and the review page /review.

(Named web.py, not http.py, so it never shadows the standard library's `http` package.)

/metrics is rendered by prometheus_client (text or OpenMetrics, by the scraper's Accept header),
never by hand. /alerts reads the ledger through its own read-only SQLite connection per request, so
HTTP clients never contend with the scoring worker's writer connection (WAL lets both run); its
query is checked (`since`, `limit`: whole numbers in range) and a bad one gets a one-line 400.
/review and its images and judgements are anomon.review's; this module only carries them (the one
POST, /review/judge, with a body of at most anomon.review.MAX_BODY_BYTES).

No client can starve the daemon. Every connection costs a thread and a file descriptor, which the
scoring worker needs too (for the images it reads), so:
- at most `max_connections` are open at once. A new one beyond that closes the oldest that has
  not sent its request yet (an idle or slow client), or, if all are being answered, is closed
  itself; a scrape or a probe, which sends its request at once, therefore always gets through;
- a connection that sends nothing for `idle_timeout_s` (per read, monotonic socket timeouts) is
  closed;
- the listen backlog is large enough for a burst of probes.
Connections closed this way are logged, at most once a minute.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from anomon.ledger import LedgerError, alerts_after, open_readonly
from anomon.review import MAX_BODY_BYTES, Response, ReviewPage

log = logging.getLogger("anomon.web")

MAX_ALERTS_PER_PAGE = 1000
MAX_ALERT_ID = 2**63 - 1  # SQLite's INTEGER
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 128  # was socketserver's 5: a burst of probes met refused connections
_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")  # ASCII digits only (int() also takes "+1", "1_0", "１")
DROP_REPORT_S = 60.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up shutdown
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int) -> None:
        self.max_connections = max_connections
        self._lock = threading.Lock()
        # Open connections, oldest first -> True while still waiting for the client's request.
        self._open: dict[socket.socket, bool] = {}
        self._dropped = 0
        self._reported_at = float("-inf")
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self.max_connections:
                idle = next((c for c, waiting in self._open.items() if waiting), None)
                self._drop_one()
                if idle is None:  # every slot is answering a request: turn the newcomer away
                    self.shutdown_request(request)
                    return
                del self._open[idle]
                try:
                    idle.shutdown(socket.SHUT_RDWR)  # its thread reads EOF and ends
                except OSError:
                    pass
            self._open[request] = True
        try:
            super().process_request(request, client_address)  # its own thread
        except BaseException:
            with self._lock:
                self._open.pop(request, None)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)

    def answering(self, request: socket.socket) -> None:
        """The handler has read a whole request: this connection is no longer idle."""
        with self._lock:
            if request in self._open:
                self._open[request] = False

    def _drop_one(self) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._reported_at >= DROP_REPORT_S:
            log.warning("HTTP: %d connection(s) closed to stay within %d open connections (idle "
                        "clients, or more clients than that at once)", self._dropped,
                        self.max_connections, extra={"dropped": self._dropped})
            self._dropped = 0
            self._reported_at = now

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or was cut off: not worth a traceback on stderr.
        log.debug("http: connection from %s ended with an error", client_address, exc_info=True)


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
        ready: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
        ledger_file: Path,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        review: ReviewPage | None = None,
    ) -> None:
        handler = type("Handler", (_Handler,), {
            "registry": registry, "ready_checks": staticmethod(ready),
            "healthy": staticmethod(healthy), "ledger_file": ledger_file, "review": review,
            "timeout": idle_timeout_s,  # socketserver sets it on each connection's socket
        })
        cls = _Server6 if ":" in host else _Server
        self._httpd = cls((host, port), handler, max_connections)  # raises OSError (address in use, ...) now
        self.port = self._httpd.server_address[1]
        self.backlog = self._httpd.request_queue_size
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
    review: ReviewPage | None
    server: _Server
    server_version = "anomon"

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.answering(self.connection)
        return ok

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if self.review is not None and (url.path == "/review" or url.path.startswith("/review/")):
            self._guarded(url.path, lambda: self.review.get(url.path, parse_qs(url.query, keep_blank_values=True)))
            return
        route = {
            "/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz,
            "/alerts": self._alerts, "/": self._index,
        }.get(url.path.rstrip("/") or "/")
        if route is None:
            self._send(404, {"error": f"no such endpoint: {url.path}"})
            return
        try:
            route(parse_qs(url.query, keep_blank_values=True))
        except Exception:  # a bug must not kill the server thread; log it, answer 500
            log.exception("error serving %s", url.path)
            self._send(500, {"error": "internal error"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if self.review is None or not url.path.startswith("/review/"):
            self._send(404 if self.review is None else 405, {"error": f"no POST endpoint: {url.path}"})
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            self._send(411, {"error": "send the body with a Content-Length"})
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            self._send(413, {"error": f"the body may be at most {MAX_BODY_BYTES} bytes"})
            return
        body = self.rfile.read(int(length))
        self._guarded(url.path, lambda: self.review.post(url.path, self.headers, body,
                                                          remote=self.client_address[0]))

    def _guarded(self, path: str, answer: Callable[[], Response]) -> None:
        try:
            resp = answer()
        except Exception:  # as do_GET: log the bug, answer 500, keep serving
            log.exception("error serving %s", path)
            self._send(500, {"error": "internal error"})
            return
        self._send_response(resp)

    def _send_response(self, resp: Response) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(resp.length if resp.file is not None else len(resp.body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            if "Cache-Control" not in resp.headers:
                self.send_header("Cache-Control", "no-store")
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD":
                return
            if resp.file is not None:
                shutil.copyfileobj(resp.file, self.wfile, 1 << 16)
            else:
                self.wfile.write(resp.body)
        finally:
            if resp.file is not None:
                resp.file.close()

    def _metrics(self, query: dict[str, list[str]]) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._send_bytes(200, encoder(self.registry), content_type)

    def _healthz(self, query: dict[str, list[str]]) -> None:
        ok = self.healthy()
        self._send(200 if ok else 503, {"healthy": ok})

    def _readyz(self, query: dict[str, list[str]]) -> None:
        checks = self.ready_checks()
        # Booleans gate readiness; other entries inform (which line waits for a model, and why).
        ok = all(v for v in checks.values() if isinstance(v, bool))
        self._send(200 if ok else 503, {"ready": ok, "checks": checks})

    def _alerts(self, query: dict[str, list[str]]) -> None:
        try:
            since = _whole_number(query, "since", 0, lowest=0)
            limit = min(_whole_number(query, "limit", MAX_ALERTS_PER_PAGE, lowest=1), MAX_ALERTS_PER_PAGE)
        except ValueError as e:
            self._send(400, {"error": str(e)})
            return
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
        endpoints = ["/metrics", "/healthz", "/readyz", "/alerts?since=ID"]
        self._send(200, {"endpoints": endpoints + (["/review"] if self.review is not None else [])})

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


def _whole_number(query: dict[str, list[str]], name: str, default: int, *, lowest: int) -> int:
    """One query value as an integer from `lowest` to MAX_ALERT_ID; ValueError says what is wrong."""
    values = query.get(name)
    if values is None:
        return default
    if len(values) == 1 and _WHOLE_NUMBER.fullmatch(values[0]) and lowest <= int(values[0]) <= MAX_ALERT_ID:
        return int(values[0])
    raise ValueError(f"{name} must be given once, as a whole number from {lowest} to {MAX_ALERT_ID}"
                     + (" (an alert id)" if name == "since" else ""))
