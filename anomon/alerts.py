"""Exports of the ledger's alerts: alerts.jsonl and the webhook.

The alerts table in the ledger is the source of truth: an alert is written in the same transaction
as its verdict, so a verdict without its alert (or the reverse) cannot exist. Everything here is an
at-least-once export of that table, caught up at start from a cursor:

- alerts.jsonl: append, flush, fsync. Its own last complete line says where it stopped (a torn last
  line from a crash is cut off), and the ledger keeps a cursor too, so a rotated file is not refilled.
  Rotation (alerts_jsonl_max_bytes): before an append would go to a full file, the cursor is
  written to the ledger, then alerts.jsonl.N-1 becomes .N ... alerts.jsonl becomes .1 (the oldest
  beyond alerts_jsonl_keep_files is replaced), and the append starts a new alerts.jsonl. Rotated
  files older than the retention age are removed. A reader follows the files .N ... .1, alerts.jsonl.
- webhook: POST each alert in order with an `Idempotency-Key` header (the alert's key, see
  anomon.ledger.alert_key). 5xx, 408/429, timeouts and connection errors are retried with
  exponential backoff, so an unreachable receiver delays alerts but never loses them; the cursor
  in the ledger is the spool, and it survives restarts. Other 4xx answers are final: the alert goes
  to a dead-letter file and is counted. Like Alertmanager, but with a spool, because an anomaly
  alert is a one-off event that nobody will re-send.

  Redirects are never followed: urllib would re-send a 301/302/303 as a GET without the body,
  which the target may well answer 200, and the alert would count as delivered. A 3xx is retried
  like a 5xx, with the Location in the log: it says where the receiver wants alerts to go, nothing
  about this alert, so it is a configuration (webhook_url) or proxy problem that applies to every
  alert alike. Dead-lettering them would move the whole stream into a file nobody replays; kept in
  the spool, they all go out once webhook_url is fixed and the daemon restarted.

  The spool is bounded: beyond `max_spool_bytes` of backlog alerts are dead-lettered
  ("spool_full"), and so are alerts older than `max_age_s` once the sender has spent that long
  failing ("expired"). Both ages must pass: an alert's age comes from the wall clock, which can
  jump (an NTP step, a fixed RTC), while the time spent failing is measured on the monotonic
  clock and kept in the ledger across restarts. So a clock stepped forward expires nothing, and
  old alerts still go to a receiver that answers. Every drop is counted, never silent.

Drift alarms (anomon.drift; the ledger's drift_alarms table) are exported the same way, with
`"kind": "drift"` and their own cursors (anomaly alerts carry `"kind": "anomaly"`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomon.config import DEFAULT_LINE, watch_default
from anomon.ledger import Ledger, iso, json_line
from anomon.state import DEAD_LETTER_NAME, JSONL_NAME, cut_torn_tail, last_id, rotated_jsonl

log = logging.getLogger("anomon.alerts")


def append_line(path: Path, obj: Any) -> None:
    """Append one JSON line and make it durable before returning. A torn last line (a crash, or a
    full disk, mid-append) is cut off first, so the new line never joins it into one bad line."""
    cut_torn_tail(path)
    with open(path, "ab") as f:
        f.write((json_line(obj) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def last_jsonl_id(path: Path) -> int:
    """The `id` of the last complete line of a JSONL file; cut off a torn last line first.

    A crash during an append can leave half a line at the end. It is removed (with a warning), so
    the next append starts on a clean line; the alert it held is written again from the ledger.
    """
    cut_torn_tail(path)
    return last_id(path, "id")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: the 3xx answer comes back as an HTTPError with its Location."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class _ExportThread:
    """A thread that wakes on `notify()` (new alerts) or every second, until `stop()`."""

    name = "export"
    final_step = False  # one last catch-up when stopping (only for steps that cannot block)

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"anomon-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _sleep(self, seconds: float) -> bool:
        """Wait, waking early on stop; True if stopping."""
        return self._stop.wait(seconds)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:  # e.g. disk full; try again shortly, never die
                log.exception("%s exporter error", self.name)
                busy = False
                self._sleep(1.0)
            if not busy:
                self._wake.wait(1.0)
                self._wake.clear()
        if self.final_step:
            try:
                self.step()
            except Exception:
                log.exception("%s exporter error", self.name)

    def step(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError


class JsonlExporter(_ExportThread):
    """Appends every alert to STATE/alerts.jsonl, in id order."""

    name = "alerts-jsonl"
    CURSOR = "alerts_jsonl"
    DRIFT_CURSOR = "alerts_jsonl_drift"  # drift alarms: lines with kind "drift", drift_alarm_id
    final_step = True

    EXPIRY_CHECK_S = 60.0  # how often rotated files are checked against max_age_s

    def __init__(self, ledger: Ledger, state_dir: Path, *, max_bytes: int | None = None,
                 keep_files: int = watch_default("alerts_jsonl_keep_files"),
                 max_age_s: float | None = None, on_rotated: Callable[[], None] = lambda: None,
                 on_removed: Callable[[int], None] = lambda n: None) -> None:
        super().__init__()
        self._ledger = ledger
        self.state_dir = state_dir
        self.path = state_dir / JSONL_NAME
        self._cursor: int | None = None
        self._drift_cursor: int | None = None
        self._max_bytes = max_bytes  # None: never rotated
        self._keep = keep_files
        self._max_age_s = max_age_s
        self._on_rotated = on_rotated
        self._on_removed = on_removed
        self._next_expiry = 0.0

    def step(self) -> bool:
        if self._cursor is None:  # first step runs on this thread: the connection is ours
            self._cursor = max(last_jsonl_id(self.path), self._ledger.cursor(self.CURSOR))
            self._drift_cursor = max(last_id(self.path, "drift_alarm_id"), self._ledger.cursor(self.DRIFT_CURSOR))
        alerts = self._ledger.alerts_after(self._cursor, 500)
        for a in alerts:
            if self._full():
                self.rotate()
            append_line(self.path, a)
            self._cursor = a["id"]
        if alerts:
            self._ledger.set_cursor(self.CURSOR, self._cursor)
        drifts = self._ledger.drift_alarms_after(self._drift_cursor, 500)  # type: ignore[arg-type]
        for a in drifts:
            if self._full():
                self.rotate()
            append_line(self.path, a)
            self._drift_cursor = a["drift_alarm_id"]
        if drifts:
            self._ledger.set_cursor(self.DRIFT_CURSOR, self._drift_cursor)  # type: ignore[arg-type]
        alerts = alerts + drifts
        if time.monotonic() >= self._next_expiry:
            self._next_expiry = time.monotonic() + self.EXPIRY_CHECK_S
            self.remove_old()
        return bool(alerts)

    def _full(self) -> bool:
        if self._max_bytes is None:
            return False
        try:
            return self.path.stat().st_size >= self._max_bytes
        except FileNotFoundError:
            return False

    def rotate(self) -> None:
        """alerts.jsonl -> .1 -> .2 ... -> .keep_files (replacing the oldest). The ledger's cursor
        is written first: once renamed, alerts.jsonl's last line no longer says where the export
        stopped, and the cursor must, or a restart would write those alerts again."""
        assert self._cursor is not None
        self._ledger.set_cursor(self.CURSOR, self._cursor)
        if self._drift_cursor is not None:
            self._ledger.set_cursor(self.DRIFT_CURSOR, self._drift_cursor)
        for n in range(self._keep, 0, -1):
            src = self.path if n == 1 else rotated_jsonl(self.state_dir, n - 1)
            try:
                os.replace(src, rotated_jsonl(self.state_dir, n))
            except FileNotFoundError:
                pass
        _fsync_dir(self.state_dir)
        self._on_rotated()
        log.info("%s rotated to %s (%d kept); alerts from id %d go to a new %s", self.path.name,
                 rotated_jsonl(self.state_dir, 1).name, self._keep, self._cursor + 1, self.path.name)

    def remove_old(self) -> int:
        """Remove rotated files beyond keep_files (the setting was lowered) or, with a retention
        age, whose last alert is older than it; returns how many went."""
        now = time.time()
        removed = 0
        for p in sorted(self.state_dir.glob(f"{JSONL_NAME}.*")):
            suffix = p.name[len(JSONL_NAME) + 1:]
            if not suffix.isdigit():
                continue
            try:
                old = self._max_age_s is not None and now - p.stat().st_mtime > self._max_age_s
                if int(suffix) > self._keep or old:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        if removed:
            self._on_removed(removed)
            log.info("removed %d rotated alerts file(s) past retention", removed)
        return removed


def _what(alert: dict[str, Any]) -> str:
    """How the log names an export: "alert 12", or "drift alarm 3"."""
    return f"drift alarm {alert['drift_alarm_id']}" if alert.get("kind") == "drift" else f"alert {alert['id']}"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WebhookSender(_ExportThread):
    """POSTs every alert to `url`, in order, retrying until it is accepted or dead-lettered."""

    name = "webhook"
    CURSOR = "webhook"
    # Milliseconds of failed delivery since the last answer, kept with the cursor (the exports
    # table) so a restart goes on counting toward max_age_s instead of starting from zero.
    FAILING = "webhook_failing_ms"
    DRIFT_CURSOR = "webhook_drift"

    def __init__(self, ledger: Ledger, state_dir: Path, url: str, *, line: str = DEFAULT_LINE,
                 timeout_s: float = watch_default("webhook_timeout_s"),
                 max_backoff_s: float = watch_default("webhook_max_backoff_s"),
                 max_age_s: float = watch_default("webhook_max_age_s"),
                 max_spool_bytes: int = watch_default("webhook_max_spool_bytes"),
                 on_result: Callable[[str], None] = lambda result: None) -> None:
        # One sender per line, each with its own cursor (the line `default` keeps the names of a
        # daemon from before lines, so an upgrade neither re-sends nor skips an alert).
        self.line = line
        if line != DEFAULT_LINE:
            self.name = f"webhook:{line}"
            self.CURSOR = f"webhook:{line}"
            self.FAILING = f"webhook_failing_ms:{line}"
            self.DRIFT_CURSOR = f"webhook_drift:{line}"
        super().__init__()
        self._ledger = ledger
        self.url = url
        self.dead_letter = state_dir / DEAD_LETTER_NAME
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s
        self._max_age_s = max_age_s
        self._max_spool_bytes = max_spool_bytes
        self._on_result = on_result
        self._failed_s: float | None = None  # read from the ledger on the first step (its thread)
        self._failing_since: float | None = None  # monotonic, start of this process's failing run
        self._failed_before = 0.0  # seconds failed before _failing_since (earlier runs, restarts)

    def step(self) -> bool:
        if self._failed_s is None:
            self._failed_before = self._failed_s = self._ledger.cursor(self.FAILING) / 1000.0
        cursor = self._ledger.cursor(self.CURSOR)
        alerts = self._ledger.alerts_after(cursor, 100, line=self.line)
        for a in alerts:
            if not self._deliver(a):
                return False  # stopping
            self._ledger.set_cursor(self.CURSOR, a["id"])
        drifts = self._ledger.drift_alarms_after(self._ledger.cursor(self.DRIFT_CURSOR), 100, line=self.line)
        for a in drifts:
            if not self._deliver(a):
                return False
            self._ledger.set_cursor(self.DRIFT_CURSOR, a["drift_alarm_id"])
        return bool(alerts or drifts)

    def _deliver(self, alert: dict[str, Any]) -> bool:
        """Send until accepted or dead-lettered; False only if asked to stop meanwhile."""
        body = json_line(alert).encode()
        what = _what(alert)
        delay = 0.5
        while True:
            if self._expired(alert):
                self._dead(alert, "expired", None, "")
                return True
            if "id" in alert and self._backlog_bytes(alert["id"], len(body)) > self._max_spool_bytes:
                self._dead(alert, "spool_full", None, "")
                return True
            attempt_at = time.monotonic()
            status, detail = self._post(body, alert["key"])
            if status is not None and 200 <= status < 300:
                self._answered()
                self._on_result("success")
                log.info("webhook delivered %s", what, extra={"alert_id": alert.get("id"), "status": status,
                                                              "drift_alarm_id": alert.get("drift_alarm_id")})
                return True
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                self._answered()  # the receiver is there; it refused this alert
                self._dead(alert, f"http_{status}", status, detail)
                return True
            self._failed(attempt_at)
            self._on_result("retry")
            if status is not None and 300 <= status < 400:
                why = f"HTTP {status} redirect to {detail or '(no Location)'}, not followed: fix webhook_url"
            else:
                why = detail if status is None else f"HTTP {status}"
            log.warning("webhook: %s not delivered (%s); retrying in %.1f s", what, why,
                        delay, extra={"alert_id": alert.get("id"), "status": status,
                                      "drift_alarm_id": alert.get("drift_alarm_id")})
            if self._sleep(delay):
                self._failed(attempt_at)
                return False
            delay = min(delay * 2, self._max_backoff_s)

    def _expired(self, alert: dict[str, Any]) -> bool:
        """Older than max_age_s by the wall clock AND max_age_s spent failing by the monotonic
        clock: a clock step alone never expires anything."""
        if self._failing_s() <= self._max_age_s:
            return False
        return time.time() - alert["created_at"] > self._max_age_s

    def _failing_s(self) -> float:
        if self._failing_since is None:
            return self._failed_before
        return self._failed_before + (time.monotonic() - self._failing_since)

    def _failed(self, attempt_at: float) -> None:
        """Count the time since this failing run's first attempt and keep it in the ledger."""
        if self._failing_since is None:
            self._failing_since = attempt_at
        self._store_failing(self._failing_s())

    def _answered(self) -> None:
        self._failing_since = None
        self._failed_before = 0.0
        self._store_failing(0.0)

    def _store_failing(self, seconds: float) -> None:
        if self._failed_s is not None and round(seconds, 3) == round(self._failed_s, 3):
            return
        self._failed_s = seconds
        self._ledger.set_cursor(self.FAILING, int(seconds * 1000))

    def _backlog_bytes(self, alert_id: int, body_len: int) -> int:
        """Rough size of what waits (this alert's size times the alerts not yet delivered)."""
        if self._max_spool_bytes <= 0:
            return 0
        n = self._ledger.pending_alerts(alert_id - 1, line=self.line)
        return n * body_len

    def _post(self, body: bytes, key: str) -> tuple[int | None, str]:
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Idempotency-Key": key,
            "User-Agent": "anomon-webhook"})
        try:
            with _OPENER.open(req, timeout=self._timeout_s) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as e:
            with e:
                if 300 <= e.code < 400:  # a redirect, refused by _NoRedirects: where it pointed
                    return e.code, (e.headers.get("Location") or "") if e.headers else ""
                try:
                    detail = e.read(500).decode(errors="replace")
                except Exception:
                    detail = ""
            return e.code, detail
        except (urllib.error.URLError, OSError, ValueError) as e:  # refused, DNS, timeout, reset
            reason = getattr(e, "reason", e)
            return None, str(reason) or type(e).__name__

    def _dead(self, alert: dict[str, Any], reason: str, status: int | None, detail: str) -> None:
        append_line(self.dead_letter, {"at": iso(time.time()), "reason": reason, "status": status,
                                       "response": detail[:500], "alert": alert})
        self._on_result("dead_letter")
        log.error("webhook: %s dead-lettered (%s), see %s", _what(alert), reason, self.dead_letter,
                  extra={"alert_id": alert.get("id"), "drift_alarm_id": alert.get("drift_alarm_id"),
                         "reason": reason})
