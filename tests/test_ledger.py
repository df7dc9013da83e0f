"""The ledger: one row per image, all-or-nothing batches, and refusal of state it cannot trust."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anomon.ledger import (
    DriftRecord,
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


# -- the write-ahead log's header (a refusal must never delete the evidence) -------------------------


def _write_then_kill9(p: Path, n: int) -> None:
    """n committed verdicts left in the WAL by a process killed with SIGKILL (never checkpointed)."""
    script = textwrap.dedent(f"""
        import os, signal
        from anomon.ledger import Ledger, Verdict
        led = Ledger.open({str(p)!r})
        for i in range(n):
            led.record([Verdict(path=f"/w/{{i}}.png", verdict="anomalous", arrived_at=1, scored_at=2,
                                size=1, mtime_ns=i, sha256=str(i))])
        os.kill(os.getpid(), signal.SIGKILL)
    """).replace("range(n)", f"range({n})")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr


@pytest.mark.parametrize("damage", ["magic", "checksum"])
def test_a_wal_with_a_damaged_header_is_refused_by_name_and_kept(tmp_path: Path, damage: str) -> None:
    p = tmp_path / "ledger.sqlite3"
    _write_then_kill9(p, 60)
    wal = Path(f"{p}-wal")
    good = wal.read_bytes()
    bad = bytearray(good)
    if damage == "magic":
        bad[:32] = os.urandom(32)
    else:
        bad[17] ^= 0xFF  # a salt byte: right magic, wrong checksum
    wal.write_bytes(bytes(bad))
    db = p.read_bytes()
    with pytest.raises(LedgerError) as e:
        Ledger.open(p)
    msg = str(e.value)
    assert "ledger.sqlite3-wal" in msg and "header" in msg and "\n" not in msg, msg
    import gc

    gc.collect()  # no connection left behind to checkpoint and delete the WAL later
    assert wal.read_bytes() == bytes(bad) and p.read_bytes() == db  # nothing deleted or reset
    wal.write_bytes(good)  # the evidence was worth keeping: with its header back, all 60 are there
    led = Ledger.open(p)
    assert all(led.find(f"/w/{i}.png", str(i)) for i in range(60))
    led.close()


def test_a_refused_ledger_keeps_its_wal(tmp_path: Path) -> None:
    """A ledger refused after SQLite opened it (here: a newer schema) keeps its -wal file."""
    p = tmp_path / "ledger.sqlite3"
    _write_then_kill9(p, 5)
    c = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    assert c.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 5
    c.close()
    script = textwrap.dedent(f"""
        import os, signal, sqlite3
        c = sqlite3.connect({str(p)!r}, isolation_level=None)
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script], capture_output=True)
    wal = Path(f"{p}-wal")
    before = wal.read_bytes()
    with pytest.raises(LedgerError, match="newer anomon"):
        Ledger.open(p)
    import gc

    gc.collect()
    assert wal.read_bytes() == before


# -- a ledger that is gone, and one restored from a backup ------------------------------------------


def _alert_verdicts(start: int, n: int) -> list[Verdict]:
    return [_v(f"/w/a{i}.png", f"a{i}", "anomalous") for i in range(start, start + n)]


def _remove_ledger(p: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{p}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("trace", ["marker", "alerts.jsonl", "webhook-dead-letter.jsonl", "anomalies"])
def test_a_missing_ledger_in_a_used_state_folder_is_refused(tmp_path: Path, trace: str) -> None:
    p = tmp_path / "ledger.sqlite3"
    if trace == "marker":
        Ledger.open(p).close()
        _remove_ledger(p)
    elif trace == "anomalies":
        (tmp_path / "anomalies").mkdir()
        (tmp_path / "anomalies" / "abc_part.png").write_bytes(b"png")
    else:
        (tmp_path / trace).write_text('{"id": 7, "alert": {"id": 7}}\n')
    with pytest.raises(LedgerError) as e:
        Ledger.open(p)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--new-ledger" in msg and "\n" not in msg, msg
    assert not p.exists()


def test_an_unused_state_folder_gets_a_ledger(tmp_path: Path) -> None:
    (tmp_path / "lock").write_text("123\n")  # every start takes the lock first: not a trace
    (tmp_path / "anomalies").mkdir()  # empty
    (tmp_path / "alerts.jsonl").write_text("")
    Ledger.open(tmp_path / "ledger.sqlite3").close()


def test_a_new_ledger_numbers_its_alerts_above_every_earlier_one(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite3"
    led = Ledger.open(p)
    led.record(_alert_verdicts(0, 12))
    old_keys = {a["key"] for a in led.alerts_after(0)}
    led.close()
    _remove_ledger(p)
    (tmp_path / "alerts.jsonl").write_text('{"id": 5}\n{"id": 7}\n{"id": 8, "to')  # torn, and behind
    led = Ledger.open(p, new_ledger=True)
    led.record(_alert_verdicts(0, 1))
    (a,) = led.alerts_after(0)
    assert a["id"] == 13 and a["key"] not in old_keys
    led.close()

    _remove_ledger(p)
    (tmp_path / "webhook-dead-letter.jsonl").write_text('{"reason": "http_400", "alert": {"id": 40}}\n')
    led = Ledger.open(p, new_ledger=True)
    led.record(_alert_verdicts(0, 1))
    assert [a["id"] for a in led.alerts_after(0)] == [41]
    led.close()


def _backup(p: Path, to: Path) -> None:
    src = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    dst = sqlite3.connect(to)
    src.backup(dst)
    dst.close()
    src.close()


def _restore(backup: Path, p: Path) -> None:
    _remove_ledger(p)
    p.write_bytes(backup.read_bytes())


def test_a_restored_ledger_never_reuses_an_alert_identity(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite3"
    led = Ledger.open(p)
    led.record(_alert_verdicts(0, 3))
    _backup(p, tmp_path / "backup.sqlite3")
    led.record(_alert_verdicts(3, 3))
    issued = {a["key"]: a["path"] for a in led.alerts_after(0)}
    led.close()

    _restore(tmp_path / "backup.sqlite3", p)
    led = Ledger.open(p)
    kept = led.alerts_after(0)
    assert [issued[a["key"]] for a in kept] == [a["path"] for a in kept]  # old alerts: same keys
    led.record(_alert_verdicts(3, 3))  # the images the backup lacks, scored again
    new = led.alerts_after(3)
    assert all(a["id"] > 6 for a in new)
    assert not {a["key"] for a in new} & set(issued)  # no key names another image
    keys = {a["key"]: a["path"] for a in led.alerts_after(0)}
    led.close()
    led = Ledger.open(p)  # a plain restart changes nothing
    assert {a["key"]: a["path"] for a in led.alerts_after(0)} == keys
    led.record(_alert_verdicts(6, 1))
    assert led.alerts_after(0)[-1]["id"] == max(a["id"] for a in new) + 1
    led.close()


def test_restarts_keep_alert_keys_and_ids(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite3"
    led = Ledger.open(p)
    led.record(_alert_verdicts(0, 2))
    keys = [a["key"] for a in led.alerts_after(0)]
    assert keys == [f"anomon-{led.ledger_id}-1", f"anomon-{led.ledger_id}-2"]
    led.close()
    led = Ledger.open(p)
    led.record(_alert_verdicts(2, 1))
    assert [a["key"] for a in led.alerts_after(0)] == keys + [f"anomon-{led.ledger_id}-3"]
    led.close()


def test_an_unreadable_marker_is_rewritten_and_new_alerts_get_a_new_epoch(tmp_path: Path, caplog) -> None:
    """Without a trustworthy marker a restore cannot be ruled out: a new epoch is always safe."""
    p = tmp_path / "ledger.sqlite3"
    led = Ledger.open(p)
    led.record(_alert_verdicts(0, 2))
    old = {a["key"] for a in led.alerts_after(0)}
    led.close()
    (tmp_path / "ledger-marker.json").write_bytes(b'{"ledger_id": "x", "epo')
    led = Ledger.open(p)
    led.record(_alert_verdicts(2, 1))
    (a,) = led.alerts_after(2)
    assert a["id"] == 3 and a["key"] not in old and a["key"].endswith(f"-{led.epoch}-3") and led.epoch
    assert {x["key"] for x in led.alerts_after(0)} >= old  # earlier alerts keep their keys
    led.close()
    assert any("ledger-marker.json" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "ledger-marker.json").read_text())["max_alert_id"] == 3


def test_a_path_that_is_not_utf8_is_stored_losslessly(tmp_path: Path) -> None:
    """Linux names are bytes: b"bad\\xff.png" is kept as its bytes, found again by the same str,
    and handed out as the str Python's os functions take."""
    import os

    from anomon.ledger import json_line, verdict_rows

    odd = os.fsdecode(b"/w/bad\xff.png")
    led = Ledger.open(tmp_path / "ledger.sqlite3")
    led.record([Verdict(path=odd, verdict="anomalous", arrived_at=1.0, scored_at=2.0, size=3, mtime_ns=4,
                        sha256="s", score=9.0, threshold=1.0, message=f"{odd}: fine")])
    assert led.is_seen(odd, 3, 4) and led.find(odd, "s") is not None and not led.is_seen("/w/bad.png", 3, 4)
    row, = verdict_rows(led._conn)
    assert os.fsencode(row["path"]) == b"/w/bad\xff.png"
    alert, = led.alerts_after(0)
    assert json.loads(json_line(alert))["path"] == odd
    led.close()


def test_rows_carry_their_line(ledger: Ledger) -> None:
    ledger.record([_v("/w/a.png", "a" * 64, "anomalous", line="left"), _v("/w/b.png", "b" * 64)])
    conn = open_readonly(ledger.path)
    assert {r["path"]: r["line"] for r in verdict_rows(conn)} == {"/w/a.png": "left", "/w/b.png": "default"}
    assert [a["line"] for a in alerts_after(conn, 0)] == ["left"]


def test_a_ledger_from_before_lines_is_read_and_migrated_as_line_default(tmp_path: Path) -> None:
    p = tmp_path / "ledger.sqlite"
    led = Ledger.open(p)
    led.record([_v("/w/a.png", "a" * 64, "anomalous")])
    led.write_drift(DriftRecord("", '{"x": 1}', added=[(5, 2)]))
    led.close()
    conn = sqlite3.connect(p)  # the schema as it shipped before lines
    conn.execute("ALTER TABLE images DROP COLUMN line")
    conn.commit()
    conn.close()

    ro = open_readonly(p)  # a reader that does not migrate (anomon verdicts, /alerts)
    assert [r["line"] for r in verdict_rows(ro)] == ["default"]
    assert [a["line"] for a in alerts_after(ro, 0)] == ["default"]
    ro.close()

    led = Ledger.open(p)  # the daemon's open migrates, keeping every row and the drift state
    led.record([_v("/w/b.png", "b" * 64, line="right")])
    assert led.drift("default") == ('{"x": 1}', [(5, 2)])
    assert led.drift("") is None
    conn = open_readonly(p)
    assert {r["path"]: r["line"] for r in verdict_rows(conn)} == {"/w/a.png": "default", "/w/b.png": "right"}
