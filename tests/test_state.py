"""The state folder's small file chores: the marker, torn JSONL lines, traces of an earlier ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomon import state


def test_marker_round_trip_and_an_unreadable_one_is_named(tmp_path: Path) -> None:
    assert state.read_marker(tmp_path) is None
    state.write_marker(tmp_path, state.Marker("abc", "", 7))
    assert state.read_marker(tmp_path) == state.Marker("abc", "", 7)
    assert [p.name for p in tmp_path.iterdir()] == [state.MARKER_NAME]  # no temporary file left
    (tmp_path / state.MARKER_NAME).write_text('{"ledger_id": "abc"')
    with pytest.raises(state.MarkerError, match=state.MARKER_NAME):
        state.read_marker(tmp_path)


def test_cut_torn_tail(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    assert state.cut_torn_tail(p) == 0  # missing
    p.write_text('{"id": 1}\n')
    assert state.cut_torn_tail(p) == 0 and p.read_text() == '{"id": 1}\n'
    p.write_text('{"id": 1}\n{"id": 2, "to')
    assert state.cut_torn_tail(p) == len('{"id": 2, "to') and p.read_text() == '{"id": 1}\n'
    p.write_text('{"id": 2, "to')
    assert state.cut_torn_tail(p) > 0 and p.read_text() == ""


def test_a_torn_line_longer_than_the_tail_is_ended_not_joined(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(state, "_TAIL_BYTES", 16)
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n' + '{"id": 2, "long": "' + "x" * 40)
    state.cut_torn_tail(p)
    with open(p, "a") as f:
        f.write('{"id": 3}\n')
    assert p.read_text().splitlines()[-1] == '{"id": 3}'


def test_last_id_reads_without_changing_the_file(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    assert state.last_id(p, "id") == 0
    text = '{"id": 4}\n{"id": 5}\nnot json\n{"id": 6, "to'
    p.write_text(text)
    assert state.last_id(p, "id") == 5 and p.read_text() == text
    d = tmp_path / "dead.jsonl"
    d.write_text(json.dumps({"reason": "http_400", "alert": {"id": 9}}) + "\n")
    assert state.last_id(d, "alert", "id") == 9


def test_traces_and_highest_alert_id(tmp_path: Path) -> None:
    (tmp_path / state.LOCK_NAME).write_text("1\n")
    (tmp_path / state.ANOMALIES_DIR).mkdir()
    (tmp_path / state.JSONL_NAME).write_text("")
    assert state.traces(tmp_path) == [] and state.highest_alert_id(tmp_path, None) == 0
    (tmp_path / state.ANOMALIES_DIR / "a.png").write_bytes(b"x")
    (tmp_path / state.JSONL_NAME).write_text('{"id": 3}\n')
    (tmp_path / state.DEAD_LETTER_NAME).write_text('{"alert": {"id": 8}}\n{"alert": {"id": 5}}\n')
    assert state.traces(tmp_path) == [state.JSONL_NAME, state.DEAD_LETTER_NAME, "anomalies/"]
    assert state.highest_alert_id(tmp_path, None) == 8
    assert state.highest_alert_id(tmp_path, state.Marker("abc", "", 11)) == 11
