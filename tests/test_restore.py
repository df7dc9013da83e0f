"""End-to-end: the state folder after an operator's repair, with the real daemon.

A damaged write-ahead log, a deleted ledger, a ledger restored from a backup: the daemon either
refuses with one line that names the problem and keeps every file as it was, or goes on with
alert identities that never name two images.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, TinyModel, WebhookReceiver

pytestmark = pytest.mark.e2e


def rows(d: Daemon) -> list[dict[str, Any]]:
    return d.table("images")


def jsonl(d: Daemon) -> list[dict[str, Any]]:
    path = d.state / "alerts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def refused(d: Daemon, *extra: str) -> str:
    """Start, expect exit status 2, and return the one error line it printed."""
    mark = len(d.log_lines())
    d.start(wait_ready=False, extra_args=list(extra))
    assert d.proc is not None and d.proc.wait(60) == 2, d.log_tail()
    errors = [x["msg"] for x in d.log_lines()[mark:] if x["msg"].startswith("anomon: error:")]
    assert len(errors) == 1 and "Traceback" not in d.log_tail(), d.log_tail()
    return errors[0]


def remove_ledger(d: Daemon) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{d.state / 'ledger.sqlite3'}{suffix}").unlink(missing_ok=True)


def test_a_damaged_wal_header_is_refused_by_name_and_the_wal_is_kept(daemon_factory, tiny_model: TinyModel) -> None:
    d = daemon_factory(tiny_model.path, "wal")
    d.start()
    for i in range(60):
        tiny_model.normal_png(d.watch / f"n{i:02d}.png", i)
    d.wait_for(lambda: len(rows(d)) == 60, 60, "60 verdicts")
    d.kill9()  # no checkpoint at exit: the -wal file holds the verdicts
    wal = d.state / "ledger.sqlite3-wal"
    good = wal.read_bytes()
    assert len(good) > 32
    garbled = b"\x00garbled header\x00".ljust(32, b"\xff") + good[32:]
    wal.write_bytes(garbled)
    db = (d.state / "ledger.sqlite3").read_bytes()

    line = refused(d)
    assert "ledger.sqlite3-wal" in line and "header" in line, line
    assert wal.read_bytes() == garbled and (d.state / "ledger.sqlite3").read_bytes() == db

    wal.write_bytes(good)  # what the WAL held was worth keeping: every verdict comes back
    d.start()
    assert len(rows(d)) == 60
    assert d.stop() == 0


def test_a_deleted_ledger_is_refused_and_new_ledger_continues_the_alert_ids(
        daemon_factory, tiny_model: TinyModel) -> None:
    d = daemon_factory(tiny_model.path, "deleted")
    d.start()
    for i in range(3):
        tiny_model.anomalous_png(d.watch / f"a{i}.png", i)
    for i in range(2):
        tiny_model.normal_png(d.watch / f"n{i}.png", i)
    d.wait_for(lambda: len(rows(d)) == 5 and len(jsonl(d)) == 3, 60, "5 verdicts, 3 alerts exported")
    assert d.stop() == 0
    remove_ledger(d)

    line = refused(d)
    assert str(d.state) in line and "--new-ledger" in line, line
    assert not (d.state / "ledger.sqlite3").exists()

    d.start(extra_args=["--new-ledger"])  # on purpose: everything is scored and alerted again
    d.wait_for(lambda: len(rows(d)) == 5 and len(jsonl(d)) == 6, 60, "all re-scored, 3 more alerts exported")
    lines = jsonl(d)
    ids = [a["id"] for a in lines]
    assert ids == sorted(set(ids)) and min(ids[3:]) > max(ids[:3])
    assert len({a["key"] for a in lines}) == 6
    assert d.stop() == 0


def test_a_restored_ledger_never_gives_an_alert_key_to_another_image(
        daemon_factory, tiny_model: TinyModel, tmp_path: Path) -> None:
    rx = WebhookReceiver([200])
    d = daemon_factory(tiny_model.path, "restored", webhook_url=rx.url, webhook_max_backoff_s=0.4)
    d.start()
    for i in range(3):
        tiny_model.anomalous_png(d.watch / f"a{i}.png", i)
    d.wait_for(lambda: len(rx.delivered()) == 3 and len(jsonl(d)) == 3, 60, "3 alerts out")
    backup = tmp_path / "backup.sqlite3"
    src = sqlite3.connect(f"file:{d.state / 'ledger.sqlite3'}?mode=ro", uri=True)  # an online backup
    dst = sqlite3.connect(backup)
    src.backup(dst)
    dst.close()
    src.close()
    for i in range(3, 6):
        tiny_model.anomalous_png(d.watch / f"a{i}.png", i)
    d.wait_for(lambda: len(rx.delivered()) == 6 and len(jsonl(d)) == 6, 60, "6 alerts out")
    assert d.stop() == 0

    remove_ledger(d)  # what the refusal messages advise: restore the ledger from a backup
    (d.state / "ledger.sqlite3").write_bytes(backup.read_bytes())
    d.start()  # the rescan finds a3..a5, which the backup lacks, and scores them again
    d.wait_for(lambda: len(rows(d)) == 6, 60, "6 verdicts")
    d.wait_for(lambda: len(rx.delivered()) == 9 and len(jsonl(d)) == 9, 30,
               "the re-raised alerts delivered under new keys and written to alerts.jsonl")
    assert d.stop() == 0
    rx.close()

    images: dict[str, set[str]] = {}  # Idempotency-Key -> the images sent under it
    for key, _, body in rx.got:
        assert body["key"] == key
        images.setdefault(key, set()).add(body["sha256"])
    assert all(len(v) == 1 for v in images.values()), images
    lines = jsonl(d)
    assert [a["id"] for a in lines] == sorted({a["id"] for a in lines})
    assert len({a["key"] for a in lines}) == 9
