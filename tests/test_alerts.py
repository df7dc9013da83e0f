"""Alert exports: alerts.jsonl (torn lines, restarts) and the webhook (retries, dead letters).
Real ledger, real files, a real local HTTP receiver."""

from __future__ import annotations

import json
import threading
import time
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


def test_too_old_and_too_much_backlog_are_dead_lettered_and_counted(ledger: Ledger, tmp_path: Path) -> None:
    rx = WebhookReceiver([200])
    _alerting(ledger, 1, scored_at=time.time() - 3600)
    _alerting(ledger, 3, start=1)
    results: list[str] = []
    _sender(ledger, tmp_path, rx.url, results, max_age_s=60, max_spool_bytes=500).step()
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "webhook-dead-letter.jsonl").read_text().splitlines()]
    assert reasons[0] == "expired" and "spool_full" in reasons
    assert results.count("dead_letter") == len(reasons) and "success" in results
    assert ledger.cursor("webhook") == 4
    rx.close()


# -- anomalies folder ------------------------------------------------------------------------------
