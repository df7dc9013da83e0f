"""Alert exports: alerts.jsonl (torn lines, restarts) and the webhook (retries, dead letters).
Real ledger, real files, a real local HTTP receiver."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from anomon.alerts import JsonlExporter, WebhookSender, last_jsonl_id
from anomon.ledger import Ledger, Verdict, alert_key
from conftest import WebhookReceiver


def _alerting(led: Ledger, n: int, start: int = 0, scored_at: float | None = None) -> None:
    led.record([Verdict(path=f"/w/{i}.png", verdict="anomalous", arrived_at=1.0,
                        scored_at=scored_at or time.time(), size=1, mtime_ns=i, sha256=f"s{i}",
                        score=9.0, threshold=1.0) for i in range(start, start + n)])


@pytest.fixture
def ledger(tmp_path: Path):
    led = Ledger.open(tmp_path / "ledger.sqlite3")
    yield led
    led.close()


# -- alerts.jsonl ----------------------------------------------------------------------------------


def test_last_id_of_missing_empty_and_clean_files(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    assert last_jsonl_id(p) == 0
    p.write_text("")
    assert last_jsonl_id(p) == 0
    p.write_text('{"id": 1}\n{"id": 2}\n')
    assert last_jsonl_id(p) == 2


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "pa')
    assert last_jsonl_id(p) == 2
    assert p.read_text() == '{"id": 1}\n{"id": 2}\n'
    p.write_text('{"id": 7, "no newline at all')
    assert last_jsonl_id(p) == 0 and p.read_text() == ""


def test_jsonl_exporter_writes_each_alert_once_across_restarts(ledger: Ledger, tmp_path: Path) -> None:
    _alerting(ledger, 3)
    out = tmp_path / "alerts.jsonl"
    JsonlExporter(ledger, tmp_path).step()
    _alerting(ledger, 2, start=3)
    with open(out, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"id": 4, "key": "half')
    JsonlExporter(ledger, tmp_path).step()  # a restart: catches up from the file and the cursor
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["id"] for a in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["key"] == alert_key(ledger.ledger_id, 1) and lines[0]["path"] == "/w/0.png"
    out.rename(tmp_path / "alerts.jsonl.1")  # rotated away: the cursor keeps old alerts out
    _alerting(ledger, 1, start=5)
    JsonlExporter(ledger, tmp_path).step()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [6]


# -- webhook ---------------------------------------------------------------------------------------


def _sender(ledger: Ledger, tmp_path: Path, url: str, results: list[str], **kw) -> WebhookSender:
    kw.setdefault("max_backoff_s", 0.05)
    kw.setdefault("timeout_s", 2.0)
    return WebhookSender(ledger, tmp_path, url, on_result=results.append, **kw)


def test_5xx_and_timeouts_are_retried_with_the_same_key(ledger: Ledger, tmp_path: Path) -> None:
    rx = WebhookReceiver([503, 502, 200, 200])
    _alerting(ledger, 2)
    results: list[str] = []
    s = _sender(ledger, tmp_path, rx.url, results)
    assert s.step()
    key1, key2 = (alert_key(ledger.ledger_id, i) for i in (1, 2))
    assert [(k, s) for k, s, _ in rx.got] == [(key1, 503), (key1, 502), (key1, 200), (key2, 200)]
    assert results == ["retry", "retry", "success", "success"]
    assert ledger.cursor("webhook") == 2
    assert not s.step()  # nothing left
    rx.close()

    slow = WebhookReceiver([200], delay_s=1.0)
    _alerting(ledger, 1, start=2)
    results.clear()
    s = _sender(ledger.reopen(), tmp_path, slow.url, results, timeout_s=0.2)  # used on another thread
    t = threading.Thread(target=s.step)
    t.start()
    time.sleep(1.0)
    s.stop()  # stops between retries
    t.join(5)
    assert "retry" in results and ledger.cursor("webhook") == 2  # not given up, not skipped
    slow.close()


def test_unreachable_receiver_keeps_the_alert(ledger: Ledger, tmp_path: Path) -> None:
    _alerting(ledger, 1)
    results: list[str] = []
    s = _sender(ledger.reopen(), tmp_path, "http://127.0.0.1:9/", results)  # nothing listens on 9
    t = threading.Thread(target=s.step)
    t.start()
    time.sleep(0.5)
    s.stop()
    t.join(5)
    assert results and set(results) == {"retry"} and ledger.cursor("webhook") == 0


def test_4xx_is_dead_lettered_not_retried(ledger: Ledger, tmp_path: Path) -> None:
    rx = WebhookReceiver([400, 200])
    _alerting(ledger, 2)
    results: list[str] = []
    _sender(ledger, tmp_path, rx.url, results).step()
    assert results == ["dead_letter", "success"]
    assert [s for _, s, _ in rx.got] == [400, 200]
    (dead,) = [json.loads(x) for x in (tmp_path / "webhook-dead-letter.jsonl").read_text().splitlines()]
    assert dead["reason"] == "http_400" and dead["alert"]["id"] == 1
    rx.close()


def test_429_is_retried(ledger: Ledger, tmp_path: Path) -> None:
    rx = WebhookReceiver([429, 200])
    _alerting(ledger, 1)
    results: list[str] = []
    _sender(ledger, tmp_path, rx.url, results).step()
    assert results == ["retry", "success"]
    rx.close()


def _dead_letters(tmp_path: Path) -> list[dict]:
    path = tmp_path / "webhook-dead-letter.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_too_much_backlog_is_dead_lettered_and_counted(ledger: Ledger, tmp_path: Path) -> None:
    rx = WebhookReceiver([200])
    _alerting(ledger, 4)
    results: list[str] = []
    _sender(ledger, tmp_path, rx.url, results, max_spool_bytes=500).step()
    reasons = [d["reason"] for d in _dead_letters(tmp_path)]
    assert reasons and set(reasons) == {"spool_full"}
    assert results.count("dead_letter") == len(reasons) and "success" in results
    assert ledger.cursor("webhook") == 4
    rx.close()


def test_old_alerts_expire_only_after_max_age_of_failed_delivery(ledger: Ledger, tmp_path: Path) -> None:
    """An alert a day old is still delivered to a receiver that answers; it expires only once the
    sender has been failing for max_age_s (measured on the monotonic clock)."""
    rx = WebhookReceiver([200])
    _alerting(ledger, 1, scored_at=time.time() - 86400)
    results: list[str] = []
    _sender(ledger, tmp_path, rx.url, results, max_age_s=60).step()
    assert results == ["success"] and _dead_letters(tmp_path) == []

    rx.answer(503)
    _alerting(ledger, 1, start=1, scored_at=time.time() - 86400)
    results.clear()
    t0 = time.monotonic()
    _sender(ledger, tmp_path, rx.url, results, max_age_s=1.0).step()
    assert time.monotonic() - t0 >= 1.0  # retried for max_age_s first
    assert results[-1] == "dead_letter" and set(results[:-1]) == {"retry"}
    assert [d["reason"] for d in _dead_letters(tmp_path)] == ["expired"]
    assert ledger.cursor("webhook") == 2
    rx.close()


def _run_for(sender: WebhookSender, seconds: float) -> threading.Thread:
    t = threading.Thread(target=sender.step)
    t.start()
    t.join(seconds)
    return t


def test_a_clock_stepped_forward_does_not_expire_the_spool(
        ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock jumps a year ahead during an outage: nothing is dead-lettered until the
    sender has really been retrying for max_age_s, across a restart too."""
    rx = WebhookReceiver([503])
    _alerting(ledger, 2)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 365 * 86400)
    results: list[str] = []
    first = _sender(ledger.reopen(), tmp_path, rx.url, results, max_age_s=3.0)
    t = _run_for(first, 2.0)  # two seconds of real retrying, "a year" of wall-clock age
    first.stop()
    t.join(5)
    assert results and set(results) == {"retry"} and _dead_letters(tmp_path) == []
    assert ledger.cursor("webhook") == 0

    # A restart goes on from the time already spent retrying, not from zero.
    results.clear()
    again = _sender(ledger.reopen(), tmp_path, rx.url, results, max_age_s=3.0)
    t0 = time.monotonic()
    t = _run_for(again, 10.0)
    assert not t.is_alive() and time.monotonic() - t0 < 2.5
    assert [d["reason"] for d in _dead_letters(tmp_path)] == ["expired", "expired"]
    assert ledger.cursor("webhook") == 2
    rx.close()


class _RedirectingReceiver:
    """POST /hook answers `status` with a Location to /elsewhere, which would accept anything."""

    def __init__(self, status: int) -> None:
        self.got: list[tuple[str, str]] = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                rec.got.append((self.command, self.path))
                if self.path == "/hook":
                    self.send_response(status)
                    self.send_header("Location", "/elsewhere")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = _answer  # noqa: N815

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_not_counted_as_delivered(ledger: Ledger, tmp_path: Path,
                                                                 status: int, caplog) -> None:
    rx = _RedirectingReceiver(status)
    _alerting(ledger, 1)
    results: list[str] = []
    s = _sender(ledger.reopen(), tmp_path, rx.url, results)
    t = _run_for(s, 1.0)
    s.stop()
    t.join(5)
    assert rx.got and set(rx.got) == {("POST", "/hook")}  # never followed, never turned into a GET
    assert results and set(results) == {"retry"}  # kept in the spool, not delivered
    assert ledger.cursor("webhook") == 0 and _dead_letters(tmp_path) == []
    assert any(f"HTTP {status} redirect to /elsewhere" in r.getMessage() for r in caplog.records)
    rx.close()


def test_a_torn_dead_letter_line_is_cut_before_the_next_append(ledger: Ledger, tmp_path: Path) -> None:
    dead = tmp_path / "webhook-dead-letter.jsonl"
    dead.write_text('{"reason": "http_400", "alert": {"id": 0}}\n{"reason": "http_4')  # a crash mid-append
    rx = WebhookReceiver([400])
    _alerting(ledger, 1)
    _sender(ledger, tmp_path, rx.url, []).step()
    lines = [json.loads(x) for x in dead.read_text().splitlines()]  # every line is JSON again
    assert [d["alert"]["id"] for d in lines] == [0, 1]
    rx.close()


# -- anomalies folder ------------------------------------------------------------------------------


# -- lines and drift alarms ------------------------------------------------------------------------


def _drift_alarm(led: Ledger, line: str, i: int) -> None:
    from anomon.ledger import DriftAlarm, DriftRecord

    v = Verdict(path=f"/{line}/d{i}.png", line=line, verdict="normal", arrived_at=1.0, scored_at=time.time(),
                size=1, mtime_ns=i, sha256=f"d{line}{i}", score=0.5, threshold=1.0)
    alarm = DriftAlarm(line=line, raised_at=time.time(), model_id="m", log10_martingale=2.2, alpha=0.01,
                       images=400 + i, direction="higher", at=v)
    led.record([v], drift=DriftRecord(line, "{}", alarm=alarm))


def test_drift_alarms_go_to_alerts_jsonl_once_beside_the_anomaly_alerts(ledger: Ledger, tmp_path: Path) -> None:
    _alerting(ledger, 2)
    _drift_alarm(ledger, "default", 1)
    JsonlExporter(ledger, tmp_path).step()
    _drift_alarm(ledger, "default", 2)
    JsonlExporter(ledger, tmp_path).step()  # a restart: neither kind is written twice
    lines = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["kind"], a.get("id"), a.get("drift_alarm_id")) for a in lines] == [
        ("anomaly", 1, None), ("anomaly", 2, None), ("drift", None, 1), ("drift", None, 2)]
    drift = lines[2]
    assert drift["line"] == "default" and drift["direction"] == "higher" and drift["images"] == 401
    assert drift["key"].startswith(f"anomon-{ledger.ledger_id}-drift-1-") and drift["key"] != lines[3]["key"]
    assert last_jsonl_id(tmp_path / "alerts.jsonl") == 2  # the anomaly alerts' resume point is unchanged


def test_each_lines_webhook_gets_its_lines_alerts_and_drift_alarms(ledger: Ledger, tmp_path: Path) -> None:
    ledger.record([Verdict(path=f"/{ln}/a.png", line=ln, verdict="anomalous", arrived_at=1.0,
                           scored_at=time.time(), size=1, mtime_ns=1, sha256=f"a{ln}", score=9.0, threshold=1.0)
                   for ln in ("default", "weld")])
    _drift_alarm(ledger, "weld", 1)
    rx_default, rx_weld = WebhookReceiver([200]), WebhookReceiver([200])
    results: list[str] = []
    try:
        assert _sender(ledger, tmp_path, rx_default.url, results).step()
        assert _sender(ledger, tmp_path, rx_weld.url, results, line="weld").step()
        assert [(b["kind"], b["line"]) for _, _, b in rx_default.got] == [("anomaly", "default")]
        assert [(b["kind"], b["line"]) for _, _, b in rx_weld.got] == [("anomaly", "weld"), ("drift", "weld")]
        # Each line has its own cursors: the line `default` keeps the names from before lines.
        assert ledger.cursor("webhook") == 1 and ledger.cursor("webhook:weld") == 2
        assert ledger.cursor("webhook_drift:weld") == 1
        assert not _sender(ledger, tmp_path, rx_weld.url, results, line="weld").step()  # nothing twice
    finally:
        rx_default.close()
        rx_weld.close()
