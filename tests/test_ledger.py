"""The ledger: one row per image, all-or-nothing batches, and refusal of state it cannot trust."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anomon.ledger import (
    Ledger,
    LedgerError,
    Sighting,
    Verdict,
    alerts_after,
    counts,
    open_readonly,
    verdict_rows,
)


def _v(path: str, sha: str | None, verdict: str = "normal", **kw) -> Verdict:
    return Verdict(path=path, verdict=verdict, arrived_at=1.0, scored_at=2.0, size=10,
                   mtime_ns=100, sha256=sha, score=0.1, **kw)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger.open(tmp_path / "ledger.sqlite3")
    yield led
    led.close()


def test_absent_ledger_is_created_and_reopened_with_same_id(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "ledger.sqlite3"
    led = Ledger.open(p)
    lid = led.ledger_id
    led.record([_v("/w/a.png", "aa")])
    led.close()
    led2 = Ledger.open(p)
    assert led2.ledger_id == lid
    assert led2.find("/w/a.png", "aa") is not None
    led2.close()


def test_record_fills_ids_and_raises_alert_only_for_anomalous(ledger: Ledger) -> None:
    a, b = _v("/w/a.png", "aa"), _v("/w/b.png", "bb", "anomalous")
    ledger.record([a, b])
    assert a.image_id and a.alert_id is None
    assert b.image_id and b.alert_id == 1
    alerts = ledger.alerts_after(0)
    assert [x["path"] for x in alerts] == ["/w/b.png"]
    assert alerts[0]["key"] == f"anomon-{ledger.ledger_id}-1"
    assert ledger.alerts_after(1) == []


def test_same_path_same_bytes_cannot_get_a_second_row(ledger: Ledger) -> None:
    ledger.record([_v("/w/a.png", "aa")])
    with pytest.raises(sqlite3.IntegrityError):
        ledger.record([_v("/w/b.png", "bb"), _v("/w/a.png", "aa")])
    # all or nothing: b was rolled back with the duplicate a
    assert ledger.find("/w/b.png", "bb") is None
    # same path, new bytes = a new image; same bytes, other path = another image
    ledger.record([_v("/w/a.png", "a2"), _v("/w/c.png", "aa")])
    conn = open_readonly(ledger.path)
    assert counts(conn) == {"normal": 3}


def test_seen_marks_cover_duplicates_and_errors(ledger: Ledger) -> None:
    v = _v("/w/a.png", "aa")
    ledger.record([v])
    assert ledger.is_seen("/w/a.png", 10, 100)
    assert not ledger.is_seen("/w/a.png", 10, 101)
    ledger.record([], [Sighting("/w/a.png", 10, 101, v.image_id)])
    assert ledger.is_seen("/w/a.png", 10, 101)
    err = Verdict(path="/w/gone.png", verdict="error", reason="vanished", arrived_at=1, scored_at=2)
    ledger.record([err])  # no size: recorded, but nothing to mark as seen
    rows = list(verdict_rows(open_readonly(ledger.path)))
    assert [r["verdict"] for r in rows] == ["normal", "error"]
    assert rows[1]["reason"] == "vanished"


def test_nan_scores_are_stored_as_null(ledger: Ledger) -> None:
    v = _v("/w/a.png", "aa")
    v.score = float("nan")
    ledger.record([v])
    (row,) = verdict_rows(open_readonly(ledger.path))
    assert row["score"] is None


def test_export_cursors_persist(ledger: Ledger) -> None:
    assert ledger.cursor("webhook") == 0
    ledger.set_cursor("webhook", 7)
    other = ledger.reopen()
    assert other.cursor("webhook") == 7
    other.close()


def test_readonly_filters(ledger: Ledger) -> None:
    ledger.record([_v("/w/a.png", "aa"), _v("/w/b.png", "bb", "anomalous")])
    conn = open_readonly(ledger.path)
    assert [r["path"] for r in verdict_rows(conn, anomalous_only=True)] == ["/w/b.png"]
    assert list(verdict_rows(conn, since=3.0)) == []
    assert len(alerts_after(conn, 0)) == 1


@pytest.mark.parametrize("content", [b"", b"this is not a database at all" * 100])
def test_zero_byte_or_garbage_ledger_is_refused_by_name(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "ledger.sqlite3"
    p.write_bytes(content)
    with pytest.raises(LedgerError, match="ledger.sqlite3"):
        Ledger.open(p)
    assert p.read_bytes() == content  # never "repaired" into an empty ledger


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite3"
    sqlite3.connect(p).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(LedgerError, match="not an anomon ledger"):
        Ledger.open(p)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite3"
    Ledger.open(p).close()
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    with pytest.raises(LedgerError, match="newer anomon"):
        Ledger.open(p)


def test_orphan_wal_without_ledger_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite3"
    Path(f"{p}-wal").write_bytes(b"x" * 4096)
    with pytest.raises(LedgerError, match="write-ahead log"):
        Ledger.open(p)


def test_torn_wal_tail_keeps_committed_rows(tmp_path: Path) -> None:
    """A crash can leave half a frame at the end of the WAL; SQLite's checksums ignore it."""
    p = tmp_path / "ledger.sqlite3"
    script = textwrap.dedent(f"""
        import os, signal
        from anomon.ledger import Ledger, Verdict
        led = Ledger.open({str(p)!r})
        for i in range(20):
            led.record([Verdict(path=f"/w/{{i}}.png", verdict="normal", arrived_at=1, scored_at=2,
                                size=1, mtime_ns=i, sha256=str(i))])
        os.kill(os.getpid(), signal.SIGKILL)   # no clean close: the WAL is left as it is
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    wal = Path(f"{p}-wal")
    assert wal.stat().st_size > 0
    with open(wal, "ab") as f:
        f.write(os.urandom(1000))  # a torn, garbage frame
    led = Ledger.open(p)
    assert all(led.find(f"/w/{i}.png", str(i)) for i in range(20))
    led.close()
