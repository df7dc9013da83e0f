"""Retention: old ledger rows pruned in small transactions, alerts.jsonl rotated, and exactly once
kept for pruned images whose files are still in the folder (unit tests on tiny ledgers, and the
real daemon)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from anomon import state
from anomon.alerts import JsonlExporter
from anomon.config import WatchConfig
from anomon.judgements import judge
from anomon.ledger import DriftAlarm, DriftRecord, Ledger, Sighting, Verdict
from anomon.retention import Policy, Retention, file_gone

DAY = 86400.0
NOW = 1_800_000_000.0


def _v(path: str, i: int, *, verdict: str = "normal", age_days: float = 0.0, line: str = "default") -> Verdict:
    t = NOW - age_days * DAY
    return Verdict(path=path, verdict=verdict, arrived_at=t, scored_at=t, line=line, size=100 + i,
                   mtime_ns=1000 + i, sha256=f"{i:064x}", score=0.1, model_id="m")


@pytest.fixture
def led(tmp_path: Path) -> Ledger:
    led = Ledger.open(tmp_path / "state" / "ledger.sqlite3")
    yield led
    led.close()


def _rows(led: Ledger, table: str = "images") -> int:
    return int(led._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _retention(led: Ledger, **kw) -> Retention:
    policy = Policy(kw.pop("max_age_s", None), kw.pop("max_images", None))
    kw.setdefault("pause_s", 0)
    return Retention(led.reopen(), policy, cursors=kw.pop("cursors", [JsonlExporter.CURSOR]), **kw)


# -- the ledger: what is pruned, what is kept -------------------------------------------------------


def test_old_rows_are_pruned_and_their_files_stay_seen_and_found(led: Ledger, tmp_path: Path) -> None:
    old = [_v(f"/in/old{i}.png", i, age_days=40) for i in range(10)]
    new = [_v(f"/in/new{i}.png", 100 + i, age_days=1) for i in range(5)]
    led.record(old + new)
    r = _retention(led, max_age_s=30 * DAY, batch=3).run_pass(now=NOW)
    assert (r.images, r.batches) == (10, 4)  # 3 + 3 + 3 + 1: small transactions
    assert _rows(led) == 5 and _rows(led, "pruned") == 10
    for v in old:  # a rescan does not queue them; touched with the same bytes: a duplicate of the same id
        assert led.is_seen(v.path, v.size, v.mtime_ns)
        assert led.find(v.path, v.sha256) == v.image_id
    assert led.find("/in/old0.png", f"{99:064x}") is None  # new bytes at that path: a new image
    # A sighting of a pruned image (touched, same bytes) can be recorded: seen has no foreign key.
    led.record([], [Sighting("/in/old0.png", 100, 5555, old[0].image_id)])
    assert led.is_seen("/in/old0.png", 100, 5555)
    assert _retention(led, max_age_s=30 * DAY).run_pass(now=NOW).images == 0  # nothing left to do


def test_max_images_keeps_the_newest(led: Ledger) -> None:
    led.record([_v(f"/in/{i}.png", i) for i in range(25)])
    r = _retention(led, max_images=7, batch=4).run_pass(now=NOW)
    assert r.images == 18
    ids = [x[0] for x in led._conn.execute("SELECT id FROM images ORDER BY id")]
    assert ids == list(range(19, 26))


def test_alerts_are_pruned_only_once_every_exporter_has_them(led: Ledger) -> None:
    led.record([_v(f"/in/a{i}.png", i, verdict="anomalous", age_days=40) for i in range(6)]
               + [_v(f"/in/b{i}.png", 10 + i, verdict="anomalous", age_days=40, line="press") for i in range(3)])
    alerts = [a["id"] for a in led.alerts_after(0)]
    led.set_cursor(JsonlExporter.CURSOR, alerts[3])  # alerts.jsonl has the first four
    led.set_cursor("webhook:press", alerts[6])        # press's webhook has its first of three
    ret = _retention(led, max_age_s=30 * DAY, cursors=[JsonlExporter.CURSOR],
                     line_cursors={"press": "webhook:press"})
    r = ret.run_pass(now=NOW)
    assert (r.images, r.alerts, r.held) == (4, 4, 5)
    led.set_cursor(JsonlExporter.CURSOR, alerts[-1])
    r = ret.run_pass(now=NOW)
    assert (r.images, r.alerts, r.held) == (3, 3, 2)  # default's two and press's first; its webhook holds 2
    assert [a["line"] for a in led.alerts_after(0)] == ["press", "press"]
    led.set_cursor("webhook:press", alerts[-1])
    assert ret.run_pass(now=NOW).alerts == 2 and _rows(led, "alerts") == 0


def test_judged_alerts_and_drift_alarm_images_are_kept(led: Ledger, tmp_path: Path) -> None:
    vs = [_v(f"/in/{i}.png", i, verdict="anomalous", age_days=40) for i in range(4)]
    alarm = DriftAlarm(line="default", raised_at=NOW, model_id="m", log10_martingale=2.1, alpha=0.01,
                       images=100, at=vs[3])
    led.record(vs, drift=DriftRecord("default", "{}", alarm=alarm))
    led.set_cursor(JsonlExporter.CURSOR, 10**9)
    judge(led.path, "alert", vs[1].alert_id, "false_alarm", "ana")  # type: ignore[arg-type]
    r = _retention(led, max_age_s=30 * DAY).run_pass(now=NOW)
    assert (r.images, r.held) == (2, 2)
    kept = {x[0] for x in led._conn.execute("SELECT id FROM images")}
    assert kept == {vs[1].image_id, vs[3].image_id}
    # The review page's queries still join every judgement to its alert and image.
    from anomon.judgements import Query, items
    conn = sqlite3.connect(led.path)
    conn.row_factory = sqlite3.Row
    got = {(it.id, it.state) for it in items(conn, Query(limit=None)) if it.kind == "alert"}
    conn.close()
    assert got == {(vs[1].alert_id, "false_alarm"), (vs[3].alert_id, "unreviewed")}


def test_records_are_forgotten_only_once_the_file_has_left_a_folder_that_is_there(tmp_path: Path) -> None:
    watch = tmp_path / "in"
    (watch / "day1").mkdir(parents=True)
    files = [watch / "day1" / f"{i}.png" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    (watch / "day1" / "newer.png").write_bytes(b"y")
    led = Ledger.open(tmp_path / "state" / "ledger.sqlite3")
    vs = [_v(str(f), i, age_days=40) for i, f in enumerate(files)]
    led.record(vs)
    ret = _retention(led, max_age_s=30 * DAY)
    assert ret.run_pass(now=NOW).forgotten == 0  # pruned, files still there: records kept
    files[0].unlink()
    assert file_gone(str(files[0])) and not file_gone(str(files[1]))
    assert ret.run_pass(now=NOW).forgotten == 1
    assert not led.is_seen(vs[0].path, vs[0].size, vs[0].mtime_ns) and led.find(vs[0].path, vs[0].sha256) is None
    assert led.find(vs[1].path, vs[1].sha256) == vs[1].image_id
    # A folder that is gone or empty (an unmounted share) forgets nothing.
    for f in [*files[1:], watch / "day1" / "newer.png"]:
        f.unlink()
    assert not file_gone(str(files[1]))
    os.rmdir(watch / "day1")
    assert ret.run_pass(now=NOW).forgotten == 0
    assert led.find(vs[2].path, vs[2].sha256) == vs[2].image_id
    led.close()


def test_a_ledger_from_before_retention_is_migrated_at_open(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    led = Ledger.open(path)
    led.record([_v("/in/a.png", 1), _v("/in/b.png", 2)])
    led.close()
    conn = sqlite3.connect(path)  # put the old table back: seen.image_id REFERENCES images (id)
    conn.executescript("""
        BEGIN;
        CREATE TABLE seen_old (path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
            image_id INTEGER NOT NULL REFERENCES images (id), PRIMARY KEY (path, size, mtime_ns)) WITHOUT ROWID;
        INSERT INTO seen_old SELECT * FROM seen; DROP TABLE seen; ALTER TABLE seen_old RENAME TO seen;
        DROP TABLE pruned; COMMIT;""")
    assert conn.execute("PRAGMA foreign_key_list(seen)").fetchall()
    conn.close()
    led = Ledger.open(path)
    assert led._conn.execute("PRAGMA foreign_key_list(seen)").fetchall() == []
    assert led.is_seen("/in/a.png", 101, 1001) and led.is_seen("/in/b.png", 102, 1002)
    assert _retention(led, max_images=1).run_pass(now=NOW).images == 1
    assert led.find("/in/a.png", f"{1:064x}") is not None
    led.close()


def test_pruning_while_the_worker_records_blocks_it_briefly(led: Ledger) -> None:
    """20,000 old rows pruned while another connection records batches, as the scoring worker does."""
    import threading

    led.record([_v(f"/in/old/{i:05d}.png", i, age_days=40) for i in range(20_000)])
    writer = led.reopen()
    waits: list[float] = []
    stop = threading.Event()

    def work() -> None:
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            writer.record([_v(f"/in/new/{i}-{j}.png", 10**6 + 16 * i + j) for j in range(16)])
            waits.append(time.monotonic() - t0)
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=work)
    t.start()
    try:
        r = _retention(led, max_age_s=30 * DAY, pause_s=0.05).run_pass(now=NOW)
    finally:
        stop.set()
        t.join()
        writer.close()
    assert r.images == 20_000 and r.batches >= 20
    print(f"pruning: {r.batches} transactions, longest {r.longest_s * 1000:.0f} ms, {r.seconds:.2f} s; "
          f"{len(waits)} worker batches meanwhile, slowest {max(waits) * 1000:.0f} ms")
    assert len(waits) > 5
    # Each pruning transaction is short (1,000 rows); a batch waits at most about one of them.
    assert r.longest_s < 2.0 and max(waits) < 2.0 + 1.0, (r.longest_s, max(waits))


# -- alerts.jsonl rotation ------------------------------------------------------------------------------


def _ids(state_dir: Path) -> list[int]:
    files = sorted(state_dir.glob("alerts.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    out = []
    for f in [*files, state_dir / "alerts.jsonl"]:
        if f.exists():
            out += [x["id"] for x in map(json.loads, f.read_text().splitlines()) if x.get("kind") != "drift"]
    return out


def test_rotation_neither_refills_nor_skips_across_restarts(led: Ledger) -> None:
    sd = led.path.parent
    led.record([_v(f"/in/{i}.png", i, verdict="anomalous") for i in range(12)])
    rotated: list[int] = []
    ex = JsonlExporter(led.reopen(), sd, max_bytes=1500, keep_files=50, on_rotated=lambda: rotated.append(1))
    ex.step()
    assert len(rotated) >= 2 and all(p.stat().st_size < 1500 + 1000 for p in sd.glob("alerts.jsonl*"))
    assert _ids(sd) == list(range(1, 13))
    # A restart right after a rotation (alerts.jsonl absent): the ledger's cursor says where it stopped.
    ex.rotate()
    assert not (sd / "alerts.jsonl").exists()
    assert state.highest_alert_id(sd, None) == 12  # the rotated file counts
    led.record([_v(f"/in/x{i}.png", 100 + i, verdict="anomalous") for i in range(3)])
    again = JsonlExporter(led.reopen(), sd, max_bytes=1500, keep_files=50)
    again.step()
    assert _ids(sd) == list(range(1, 16))
    # A ledger cursor behind the file (a crash between the append and the cursor's write).
    led.set_cursor(JsonlExporter.CURSOR, 13)
    JsonlExporter(led.reopen(), sd, max_bytes=1500, keep_files=50).step()
    assert _ids(sd) == list(range(1, 16))


def test_rotated_files_beyond_keep_or_older_than_retention_are_removed(led: Ledger) -> None:
    sd = led.path.parent
    led.record([_v(f"/in/{i}.png", i, verdict="anomalous") for i in range(12)])
    removed: list[int] = []
    ex = JsonlExporter(led.reopen(), sd, max_bytes=1024, keep_files=3, max_age_s=10 * DAY,
                       on_removed=removed.append)
    ex.step()
    names = sorted(p.name for p in sd.glob("alerts.jsonl*"))
    assert names == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2", "alerts.jsonl.3"]
    assert _ids(sd) == list(range(_ids(sd)[0], 13))  # the newest, in order, none twice
    old = sd / "alerts.jsonl.3"
    os.utime(old, (time.time() - 11 * DAY,) * 2)
    (sd / "alerts.jsonl.9").write_text("")  # kept when keep_files was higher
    assert ex.remove_old() == 2 and removed == [2]
    assert not old.exists() and (sd / "alerts.jsonl.2").exists()


def test_a_state_folder_with_only_rotated_alerts_still_refuses_a_missing_ledger(tmp_path: Path) -> None:
    from anomon.ledger import LedgerError

    sd = tmp_path / "s"
    sd.mkdir()
    (sd / "alerts.jsonl.1").write_text('{"id": 7}\n')
    with pytest.raises(LedgerError, match="alerts.jsonl.1"):
        Ledger.open(sd / "ledger.sqlite3")
    led = Ledger.open(sd / "ledger.sqlite3", new_ledger=True)
    led.record([_v("/in/a.png", 1, verdict="anomalous")])
    assert led.alerts_after(0)[0]["id"] == 8  # above the rotated file's ids
    led.close()


# -- configuration ---------------------------------------------------------------------------------------


def test_retention_is_off_unless_configured(tmp_path: Path) -> None:
    cfg = WatchConfig(model=tmp_path / "m", watch=[tmp_path])
    assert not Policy.from_config(cfg).enabled and cfg.alerts_jsonl_max_bytes is None
    cfg = WatchConfig(model=tmp_path / "m", watch=[tmp_path], retention_max_age_days=90, retention_max_images=10**6)
    assert Policy.from_config(cfg) == Policy(90 * DAY, 10**6)
    from anomon.config import load_watch_config
    from anomon.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^invalid configuration \(flags\): retention_max_age_days: "):
        load_watch_config(None, {"model": "m", "watch": ["w"], "retention_max_age_days": 0})


# -- the real daemon ---------------------------------------------------------------------------------------


def _scored(d) -> float:
    m = d.metrics()
    return sum(v for k, v in m.items() if k.startswith("anomon_images_scored_total{"))


@pytest.mark.e2e
def test_daemon_prunes_in_the_background_and_never_scores_a_pruned_file_again(daemon_factory, tiny_model) -> None:
    d = daemon_factory(tiny_model.path, retention_max_images=2, retention_interval_s=0.5,
                       alerts_jsonl_max_bytes=1024, alerts_jsonl_keep_files=20)
    d.start()
    files = [tiny_model.normal_png(d.watch / f"n{i}.png", i) for i in range(4)]
    files += [tiny_model.anomalous_png(d.watch / f"a{i}.png", i) for i in range(4)]
    d.wait_for(lambda: _scored(d) == 8, 60, "8 images scored")
    assert d.metric("anomon_alerts_total{line=\"default\"}") == 4
    # Pruned once alerts.jsonl has their alerts: 6 of 8 rows, in the background, the newest 2 kept.
    d.wait_for(lambda: d.metric("anomon_retention_images_total") == 6, 30, "6 rows pruned")
    assert d.metric("anomon_retention_alerts_total") >= 2
    assert d.metric("anomon_retention_jsonl_rotations_total") >= 1
    kept = {r["path"] for r in d.table()}
    assert len(kept) == 2
    pruned = [f for f in files if str(f.resolve()) not in kept]
    assert len(pruned) == 6 and all(f.exists() for f in pruned)
    assert sorted(_ids(d.state)) == sorted({a for a in _ids(d.state)}) and len(_ids(d.state)) == 4
    assert d.stop() == 0

    # After a restart the start-up rescan finds every file, and scores none of the pruned ones.
    d.start()
    time.sleep(2.0)
    assert _scored(d) == 0 and d.metric("anomon_duplicates_total{line=\"default\"}") == 0
    # Touched with the same bytes (a new mtime, a close-after-write event): duplicates, no verdict.
    for f in pruned[:1] + pruned[-1:]:
        f.write_bytes(f.read_bytes())
    d.wait_for(lambda: d.metric("anomon_duplicates_total{line=\"default\"}") == 2, 30, "2 duplicates")
    tiny_model.anomalous_png(d.watch / "fresh.png", 99)  # the daemon still scores new images
    d.wait_for(lambda: _scored(d) == 1, 30, "the fresh image scored")
    time.sleep(1.0)
    assert _scored(d) == 1 and d.metric("anomon_alerts_total{line=\"default\"}") == 1
    d.wait_for(lambda: len(_ids(d.state)) == 5, 10, "the fresh alert in alerts.jsonl")
    assert sorted(_ids(d.state)) == _ids(d.state) and len(set(_ids(d.state))) == 5  # in order, each once
    assert d.stop() == 0
    passes = [r for r in d.log_lines() if str(r.get("msg", "")).startswith("retention pass")]
    assert passes and any(r.get("retention_images") for r in passes)


def test_rotation_keeps_drift_alarms_once_too(led: Ledger) -> None:
    sd = led.path.parent
    for k in range(6):
        vs = [_v(f"/in/{k}-{i}.png", 10 * k + i, verdict="anomalous") for i in range(2)]
        alarm = DriftAlarm(line="default", raised_at=NOW + k, model_id="m", log10_martingale=2.1, alpha=0.01,
                           images=100, at=vs[0])
        led.record(vs, drift=DriftRecord("default", "{}", alarm=alarm))
    JsonlExporter(led.reopen(), sd, max_bytes=1024, keep_files=50).step()
    JsonlExporter(led.reopen(), sd, max_bytes=1024, keep_files=50).step()  # a restart: nothing again
    lines = [json.loads(x) for f in sorted(sd.glob("alerts.jsonl*")) for x in f.read_text().splitlines()]
    drift = sorted(x["drift_alarm_id"] for x in lines if x.get("kind") == "drift")
    assert drift == list(range(1, 7)) and sorted(_ids(sd)) == list(range(1, 13))
    assert len(list(sd.glob("alerts.jsonl.*"))) >= 4


# -- anomaly copies ---------------------------------------------------------------------------------------


def test_anomaly_copies_older_than_the_retention_age_go_at_each_pass(led: Ledger, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from anomon.anomalies import AnomalyStore

    img = Image.fromarray(np.zeros((16, 16), dtype=np.uint8))
    amap = np.zeros((16, 16), dtype=np.float32)
    store = AnomalyStore(tmp_path / "anomalies", max_bytes=1 << 30, max_age_s=10 * DAY)
    saved = [store.save(f"/in/{i}.png", f"{i:064x}", bytes([i]) * 100, img, amap, vmax=1.0) for i in range(3)]
    old = [Path(p) for p in saved[0]]
    for p in old:  # written 11 days ago, as a restart reads the folder
        os.utime(p, (time.time() - 11 * DAY,) * 2)
    store = AnomalyStore(tmp_path / "anomalies", max_bytes=1 << 30, max_age_s=10 * DAY)
    r = _retention(led, max_age_s=10 * DAY, prune_copies=store.prune).run_pass()
    assert r.copies == 2 and not any(p.exists() for p in old)
    assert all(Path(p).exists() for pair in saved[1:] for p in pair)
    assert store.total_bytes == sum(p.stat().st_size for p in (tmp_path / "anomalies").iterdir())
    assert store.prune(now=time.time() + 11 * DAY) == 4 and store.total_bytes == 0


@pytest.mark.e2e
def test_daemon_keeps_alerts_the_webhook_has_not_delivered(daemon_factory, tiny_model) -> None:
    """The receiver is down: retention prunes around the undelivered alerts, which reach it whole
    (path, score) once it is back, and only then go."""
    from conftest import WebhookReceiver

    rx = WebhookReceiver([503])
    try:
        d = daemon_factory(tiny_model.path, retention_max_images=1, retention_interval_s=0.5,
                           webhook_url=rx.url, webhook_max_backoff_s=0.5)
        d.start()
        for i in range(3):
            tiny_model.anomalous_png(d.watch / f"a{i}.png", i)
        for i in range(3):
            tiny_model.normal_png(d.watch / f"n{i}.png", i)
        d.wait_for(lambda: _scored(d) == 6, 60, "6 images scored")
        d.wait_for(lambda: d.metric("anomon_retention_images_total") >= 2, 30, "the normal rows pruned")
        time.sleep(1.5)  # three more passes
        assert d.metric("anomon_retention_alerts_total") == 0 and len(d.table("alerts")) == 3
        rx.answer(200)
        d.wait_for(lambda: len(rx.delivered()) == 3, 30, "3 alerts delivered")
        d.wait_for(lambda: d.metric("anomon_retention_alerts_total") >= 2, 30, "the delivered alerts pruned")
        bodies = {b["path"]: b for k, s, b in rx.got if s == 200}
        assert sorted(os.path.basename(p) for p in bodies) == ["a0.png", "a1.png", "a2.png"]
        assert all(b["score"] > b["threshold"] for b in bodies.values())
        assert d.stop() == 0
    finally:
        rx.close()
