"""Judgements in the ledger (anomon.judgements) and their offline uses (`anomon review export`,
`--judgements` on train / calibrate / evaluate), on real ledgers written by anomon.ledger."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomon import judgements as J
from anomon.ledger import DriftAlarm, DriftRecord, Ledger, Verdict, open_readonly
from anomon.state import ANOMALIES_DIR
from conftest import REPO, TinyModel, anomalous_array, png_bytes


def make_state(state: Path, alerts: list[tuple[str, str, float]], *, drift: list[tuple[str, float]] = ()) -> Ledger:
    """A state folder whose ledger holds one alert per (name, line, time), each with a kept copy
    and heat map under anomalies/, and a drift alarm per (line, time). Returns the open writer."""
    (state / ANOMALIES_DIR).mkdir(parents=True, exist_ok=True)
    led = Ledger.open(state / "ledger.sqlite3")
    for i, (name, line, t) in enumerate(alerts):
        sha = f"{i:016x}" + "0" * 48
        copy = state / ANOMALIES_DIR / f"{sha[:16]}-{Path(name).stem}.png"
        heat = copy.with_name(copy.stem + ".heatmap.png")
        copy.write_bytes(png_bytes(anomalous_array(np.random.default_rng(i))))
        heat.write_bytes(png_bytes(anomalous_array(np.random.default_rng(100 + i))))
        led.record([Verdict(path=f"/cam/{line}/{name}", line=line, verdict="anomalous", arrived_at=t, scored_at=t,
                            size=1, mtime_ns=i, sha256=sha, model_id="m1", score=5.0 + i, p_value=0.001,
                            threshold=1.0, anomaly_image=str(copy), heatmap=str(heat))])
    for line, t in drift:
        led.record([], drift=DriftRecord(line=line, state="{}", alarm=DriftAlarm(
            line=line, raised_at=t, model_id="m1", log10_martingale=2.1, alpha=0.01, images=500,
            direction="higher")))
    return led


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    make_state(s, [("a.png", "l1", 10.0), ("b.png", "l1", 20.0), ("c.png", "l2", 30.0)],
               drift=[("l1", 25.0)]).close()
    return s


def read(state: Path, q: J.Query = J.Query(limit=None)) -> list[J.Item]:
    conn = open_readonly(state / "ledger.sqlite3")
    try:
        return J.items(conn, q)
    finally:
        conn.close()


def test_a_ledger_nobody_judged_in_reads_as_all_unreviewed_and_gains_no_tables(state: Path) -> None:
    got = read(state)
    assert [it.key for it in got] == ["alert-3", "drift-1", "alert-2", "alert-1"]  # newest first
    assert {it.state for it in got} == {"unreviewed"}
    conn = open_readonly(state / "ledger.sqlite3")
    try:
        assert "judgements" not in J._tables(conn)
        assert J.counts(conn)[("alert", "l1", "unreviewed")] == 2
        assert J.counts(conn)[("alert", "l1", "defect")] == 0
        assert {line for _, line, _ in J.counts(conn)} == {"l1", "l2"}
    finally:
        conn.close()


def test_judgements_are_changeable_and_every_change_is_audited(state: Path) -> None:
    led = state / "ledger.sqlite3"
    c = J.judge(led, "alert", 1, "false_alarm", "ana", remote="127.0.0.1", now=100.0)
    assert (c.before, c.after, c.changed) == ("unreviewed", "false_alarm", True)
    assert not J.judge(led, "alert", 1, "false_alarm", "ana", now=101.0).changed  # a double key press
    J.judge(led, "alert", 1, "defect", "bo", now=102.0)
    J.judge(led, "drift", 1, "defect", "bo", now=103.0)
    J.judge(led, "alert", 2, "defect", "bo", now=104.0)
    J.judge(led, "alert", 2, None, "ana", now=105.0)  # taken back
    by_key = {it.key: it for it in read(state)}
    assert (by_key["alert-1"].state, by_key["alert-1"].who, by_key["alert-1"].judged_at) == ("defect", "bo", 102.0)
    assert by_key["alert-2"].state == "unreviewed" and by_key["drift-1"].state == "defect"
    conn = open_readonly(led)
    try:
        trail = [(a["item_id"], a["before"], a["after"], a["who"]) for a in J.audit(conn)]
        counts = J.counts(conn)
    finally:
        conn.close()
    assert trail == [(1, "unreviewed", "false_alarm", "ana"), (1, "false_alarm", "defect", "bo"),
                     (1, "unreviewed", "defect", "bo"), (2, "unreviewed", "defect", "bo"),
                     (2, "defect", "unreviewed", "ana")]
    assert counts[("alert", "l1", "defect")] == 1 and counts[("alert", "l1", "unreviewed")] == 1
    assert counts[("drift", "l1", "defect")] == 1 and counts[("alert", "l2", "unreviewed")] == 1


@pytest.mark.parametrize("kind, item_id, judgement, who, status", [
    ("alert", 99, "defect", "ana", 404), ("drift", 7, "defect", "ana", 404),
    ("image", 1, "defect", "ana", 400), ("alert", 1, "maybe", "ana", 400),
    ("alert", 1, "defect", "", 400), ("alert", 1, "defect", "x" * 65, 400), ("alert", 1, "defect", "a\nb", 400),
])
def test_a_bad_judgement_is_refused_and_changes_nothing(state: Path, kind: str, item_id: int, judgement: str,
                                                        who: str, status: int) -> None:
    with pytest.raises(J.JudgementError) as e:
        J.judge(state / "ledger.sqlite3", kind, item_id, judgement, who)
    assert e.value.status == status
    conn = open_readonly(state / "ledger.sqlite3")
    try:
        assert list(J.audit(conn)) == []
    finally:
        conn.close()


def test_the_daemon_reopens_a_judged_ledger_and_keeps_recording(state: Path) -> None:
    """The judgement tables are extra tables in the ledger file: its validation at open, the
    scoring worker's writes and a judgement while the writer holds the file all go on."""
    J.judge(state / "ledger.sqlite3", "alert", 1, "defect", "ana")
    led = Ledger.open(state / "ledger.sqlite3")
    try:
        J.judge(state / "ledger.sqlite3", "alert", 2, "false_alarm", "ana")  # while the writer is open
        v = Verdict(path="/cam/l1/d.png", line="l1", verdict="anomalous", arrived_at=40.0, scored_at=40.0,
                    size=1, mtime_ns=9, sha256="f" * 64, score=3.0, threshold=1.0)
        led.record([v])
        assert v.alert_id == 4
    finally:
        led.close()
    assert [(it.key, it.state) for it in read(state)][:1] == [("alert-4", "unreviewed")]
    assert {it.key: it.state for it in read(state)}["alert-2"] == "false_alarm"


def test_the_tally_counts_new_alerts_and_any_judgement_like_a_full_count(state: Path) -> None:
    tally = J.Tally()
    led = state / "ledger.sqlite3"

    def same() -> dict[tuple[str, str, str], int]:
        conn = open_readonly(led)
        try:
            got = tally.counts(conn)
            assert got == J.counts(conn)
            return got
        finally:
            conn.close()

    assert same()[("alert", "l1", "unreviewed")] == 2
    writer = Ledger.open(led)
    writer.record([Verdict(path="/cam/l3/n.png", line="l3", verdict="anomalous", arrived_at=50.0, scored_at=50.0,
                           size=1, mtime_ns=1, sha256="e" * 64, score=3.0, threshold=1.0)])
    assert same()[("alert", "l3", "unreviewed")] == 1  # only the new alert was counted, and added
    J.judge(led, "alert", 1, "defect", "ana")  # an old alert judged: everything counted again
    assert same()[("alert", "l1", "defect")] == 1
    writer.record([Verdict(path="/cam/l1/m.png", line="l1", verdict="anomalous", arrived_at=60.0, scored_at=60.0,
                           size=1, mtime_ns=2, sha256="d" * 64, score=3.0, threshold=1.0)])
    J.judge(led, "alert", 5, "false_alarm", "ana")
    assert same()[("alert", "l1", "false_alarm")] == 1
    writer.close()
    conn = sqlite3.connect(led)  # retention prunes an old alert that nobody judged
    with conn:
        conn.execute("DELETE FROM alerts WHERE id = 2")
    conn.close()
    assert same()[("alert", "l1", "unreviewed")] == 0


def test_filters_and_pages_cover_every_item_once(tmp_path: Path) -> None:
    # Equal times on purpose: the cursor is (time, kind, id), so none is skipped or shown twice.
    alerts = [(f"x{i}.png", "l1" if i % 3 else "l2", float(i // 4)) for i in range(23)]
    s = tmp_path / "state"
    make_state(s, alerts, drift=[("l1", 2.0), ("l2", 2.0)]).close()
    for i in range(1, 24, 2):
        J.judge(s / "ledger.sqlite3", "alert", i, "false_alarm" if i % 4 == 1 else "defect", "ana")
    everything = read(s)
    assert len(everything) == 25
    for q in (J.Query(limit=4), J.Query(line="l1", limit=3), J.Query(state="unreviewed", limit=5),
              J.Query(state="defect", kind="alert", limit=2), J.Query(kind="drift", limit=1)):
        pages: list[J.Item] = []
        before = None
        while True:
            page = read(s, J.Query(q.line, q.state, q.kind, before, q.limit))
            pages += page
            if len(page) < (q.limit or 0) or not page:
                break
            before = page[-1].key
        want = [it.key for it in everything if q.line in (None, it.line) and q.state in (None, it.state)
                and q.kind in (None, it.kind)]
        assert [it.key for it in pages] == want, q
    assert read(s, J.Query(before="alert-999")) == []


def test_labelled_images_come_from_the_kept_copies_even_after_the_state_folder_moved(state: Path,
                                                                                       tmp_path: Path) -> None:
    led = state / "ledger.sqlite3"
    J.judge(led, "alert", 1, "false_alarm", "ana")
    J.judge(led, "alert", 2, "defect", "ana")
    J.judge(led, "alert", 3, "defect", "ana")
    J.judge(led, "drift", 1, "defect", "ana")  # not an image: never a label
    moved = tmp_path / "moved"
    shutil.move(str(state), moved)
    (heat,) = (moved / ANOMALIES_DIR).glob("*-c.png")
    heat.unlink()  # pruned at anomalies_max_bytes, and /cam/l2/c.png is gone too
    got = J.labelled_images(moved, line=None)
    assert [p.name for p in got.normal] == [f"{1 - 1:016x}-a.png"]
    assert [p.parent for p in got.normal + got.anomalous] == [moved / ANOMALIES_DIR] * 2
    assert got.missing == 1
    assert J.judged_lines(moved) == ["l1", "l2"]
    assert J.labelled_images(moved, line="l2").anomalous == []


def test_an_original_still_holding_the_judged_bytes_stands_in_for_a_pruned_copy(tmp_path: Path) -> None:
    s = tmp_path / "state"
    original = tmp_path / "cam" / "p.png"
    original.parent.mkdir()
    original.write_bytes(b"judged bytes")
    import hashlib

    led = Ledger.open(s / "ledger.sqlite3")
    led.record([Verdict(path=str(original), verdict="anomalous", arrived_at=1, scored_at=1, size=12, mtime_ns=1,
                        sha256=hashlib.sha256(b"judged bytes").hexdigest(), score=2.0, threshold=1.0)])
    led.close()
    J.judge(s / "ledger.sqlite3", "alert", 1, "defect", "ana")
    assert J.labelled_images(s).anomalous == [original]
    original.write_bytes(b"other bytes")  # the camera reused the name: not what was judged
    assert J.labelled_images(s).missing == 1


# -- the command line ---------------------------------------------------------------------------


def anomon(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "anomon", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_review_export_writes_csv_and_json_lines_that_survive_odd_names(tmp_path: Path) -> None:
    s = tmp_path / "state"
    odd = 'q"uote <script>alert(1)</script>\nnew,line.png'
    make_state(s, [(odd, "l1", 1.0), ("plain.png", "l1", 2.0)], drift=[("l1", 3.0)]).close()
    J.judge(s / "ledger.sqlite3", "alert", 1, "false_alarm", "ana")
    J.judge(s / "ledger.sqlite3", "drift", 1, "defect", "bo")
    r = anomon("review", "export", "--state", s, "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["kind"], x["id"], x["judgement"], x["who"]) for x in recs] == [
        ("drift", 1, "defect", "bo"), ("alert", 1, "false_alarm", "ana")]
    assert recs[1]["path"] == f"/cam/l1/{odd}" and recs[1]["score"] == 5.0 and recs[1]["model_id"] == "m1"
    r = anomon("review", "export", "--state", s, "--format", "csv", "--all")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["judgement"] for x in rows] == ["defect", "unreviewed", "false_alarm"]
    assert rows[2]["path"] == f"/cam/l1/{odd}"
    r = anomon("review", "export", "--state", s, "--audit")
    assert [json.loads(line)["after"] for line in r.stdout.splitlines()] == ["false_alarm", "defect"]
    r = anomon("review", "export", "--state", tmp_path / "nothing")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no ledger" in r.stderr


def test_judged_alerts_become_labels_for_evaluate_calibrate_and_train(tmp_path: Path, tiny_model: TinyModel) -> None:
    """The review-to-recalibration loop offline: false alarms join the normal images, defects the
    anomalous ones, read from the state folder's kept copies."""
    s = tmp_path / "state"
    make_state(s, [(f"a{i}.png", "default", float(i)) for i in range(4)]).close()
    for i in range(2):  # the kept copies of two alerts are really normal pixels: false alarms
        (copy,) = (s / ANOMALIES_DIR).glob(f"*-a{i}.png")
        tiny_model.normal_png(copy, 50 + i)
    for i, j in ((1, "false_alarm"), (2, "false_alarm"), (3, "defect"), (4, "defect")):
        J.judge(s / "ledger.sqlite3", "alert", i, j, "ana")
    normal = tmp_path / "normal"
    for i in range(20):
        tiny_model.normal_png(normal / f"n{i}.png", i)

    r = anomon("evaluate", tiny_model.path, "--judgements", s)
    assert r.returncode == 0, r.stderr
    assert "2 false alarm(s) as normal images, 2 defect(s) as anomalous images" in r.stderr
    assert ": 2 normal, 2 anomalous images" in r.stdout and "AUROC 1.0000" in r.stdout

    r = anomon("calibrate", tiny_model.path, normal, "--judgements", s, "-o", tmp_path / "re.anomon",
               "--target-fpr", "0.2")
    assert r.returncode == 0, r.stderr
    assert "from 22 normal images" in r.stdout and "(2/2 anomalous)" in r.stdout

    data = tmp_path / "train"
    shutil.copytree(normal, data)
    r = anomon("train", data, "-o", tmp_path / "new.anomon", "--judgements", s, "--epochs", "1",
               "--image-size", "32", "--channels", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    info = json.loads(anomon("info", tmp_path / "new.anomon").stdout)
    assert info["training"]["n_images"] == 22 and info["training"]["n_false_alarms"] == 2

    r = anomon("evaluate", tiny_model.path, "--normal", normal)
    assert r.returncode == 2 and "--judgements" in r.stderr and r.stderr.count("\n") == 1
    r = anomon("evaluate", tiny_model.path, "--judgements", tmp_path / "nothing")
    assert r.returncode == 2 and "no ledger" in r.stderr and r.stderr.count("\n") == 1


def test_judgements_of_several_lines_need_line(tmp_path: Path, tiny_model: TinyModel) -> None:
    s = tmp_path / "state"
    make_state(s, [("a.png", "l1", 1.0), ("b.png", "l2", 2.0)]).close()
    J.judge(s / "ledger.sqlite3", "alert", 1, "defect", "ana")
    J.judge(s / "ledger.sqlite3", "alert", 2, "defect", "ana")
    r = anomon("evaluate", tiny_model.path, "--judgements", s)
    assert r.returncode == 2 and "cover lines l1, l2" in r.stderr and "--line" in r.stderr
    r = anomon("evaluate", tiny_model.path, "--judgements", s, "--line", "l1")
    assert "0 false alarm(s) as normal images, 1 defect(s)" in r.stderr
    assert r.returncode == 2 and "no normal images" in r.stderr  # none judged normal, no --normal
