"""End-to-end: the real `anomon watch` daemon as a subprocess, real files, real HTTP.

Each test asserts on what an operator would see: the ledger (one row per image), /metrics (read
with prometheus_client's parser), /alerts, alerts.jsonl, the exit status, and the log.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anomon.daemon_process import DaemonProcessError
from anomon.ledger import alert_key, ledger_id_of, open_readonly
from conftest import ANOMON, REPO, Daemon, TinyModel, WebhookReceiver, free_port, png_bytes, normal_array

pytestmark = pytest.mark.e2e

SCORED_N = 'anomon_images_scored_total{verdict="normal"}'
SCORED_A = 'anomon_images_scored_total{verdict="anomalous"}'


def err(reason: str) -> str:
    return f'anomon_image_errors_total{{reason="{reason}"}}'


def rows(d: Daemon, under: Path | None = None) -> list[dict[str, Any]]:
    conn = open_readonly(d.state / "ledger.sqlite3")
    try:
        q = "SELECT * FROM images"
        args: tuple[Any, ...] = ()
        if under is not None:
            q += " WHERE path LIKE ?"
            args = (f"{os.path.realpath(under)}/%",)
        return [dict(r) for r in conn.execute(q + " ORDER BY id", args)]
    finally:
        conn.close()


def alert_rows(d: Daemon) -> list[dict[str, Any]]:
    return d.table("alerts")


def wait_rows(d: Daemon, under: Path, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    d.wait_for(lambda: len(rows(d, under)) >= n, timeout, f"{n} ledger rows under {under}")
    return rows(d, under)


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def wait_deltas(d: Daemon, before: dict[str, float], want: dict[str, float], timeout: float = 10.0) -> dict[str, float]:
    """Counters move just after the ledger commit: wait until they all show `want`."""
    seen: dict[str, float] = {}

    def ok() -> bool:
        after = d.metrics()
        seen.update({k: delta(before, after, k) for k in want})
        return all(seen[k] == v for k, v in want.items())

    try:
        d.wait_for(ok, timeout, "metrics")
    except DaemonProcessError:
        raise AssertionError(f"metric deltas {seen} != {want}") from None
    return d.metrics()


# -- one daemon shared by the tests that only add files ---------------------------------------------


@pytest.fixture(scope="module")
def shared(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("shared"), tiny_model.path, max_pixels=1600)
    d.start()
    yield d
    rc = d.stop()
    assert rc == 0, d.log_tail()


def test_normal_and_anomalous_images_are_counted_and_alerted(shared: Daemon, tiny_model: TinyModel) -> None:
    d, sub = shared, shared.watch / "mixed"
    before = d.metrics()
    for i in range(6):
        tiny_model.normal_png(sub / f"n{i}.png", i)
    for i in range(3):
        tiny_model.anomalous_png(sub / f"a{i}.png", i)
    got = wait_rows(d, sub, 9)
    verdicts = {Path(r["path"]).name: r["verdict"] for r in got}
    assert verdicts == {**{f"n{i}.png": "normal" for i in range(6)},
                        **{f"a{i}.png": "anomalous" for i in range(3)}}
    assert all(r["model_id"] and r["sha256"] and r["p_value"] is not None for r in got)
    after = wait_deltas(d, before, {"anomon_alerts_total": 3, SCORED_N: 6, SCORED_A: 3,
                                    "anomon_anomaly_score_count": 9, "anomon_intake_latency_seconds_count": 9})
    assert after["anomon_ready"] == 1 and after["anomon_last_scored_timestamp_seconds"] > time.time() - 60
    assert after["anomon_score_threshold"] == pytest.approx(tiny_model.threshold)

    # /alerts and alerts.jsonl both carry the three anomalous images, with copies and heat maps
    alerts = [a for a in d.get("/alerts?since=0").json()["alerts"] if "/mixed/" in a["path"]]
    assert sorted(Path(a["path"]).name for a in alerts) == ["a0.png", "a1.png", "a2.png"]
    for a in alerts:
        assert Path(a["anomaly_image"]).read_bytes() == Path(a["path"]).read_bytes()
        assert Path(a["heatmap"]).stat().st_size > 0
    last = alerts[-1]["id"]
    assert all(a["id"] > last for a in d.get(f"/alerts?since={last}").json()["alerts"])
    d.wait_for(lambda: {a["key"] for a in alerts} <= {
        json.loads(line)["key"] for line in (d.state / "alerts.jsonl").read_text().splitlines()},
        10, "alerts.jsonl")
    assert d.get("/alerts?since=abc").status == 400


def test_metrics_exposition_follows_the_conventions(shared: Daemon) -> None:
    text = shared.get("/metrics").text
    m = shared.metrics()
    for reason in ("empty", "truncated", "corrupt", "not_image", "too_large", "unreadable",
                   "vanished", "refused"):
        assert err(reason) in m  # every child exists from the start
    for name in ("anomon_queue_depth", "anomon_rescans_total", "anomon_duplicates_total",
                 'anomon_webhook_deliveries_total{result="dead_letter"}',
                 'anomon_model_reloads_total{result="failure"}', "anomon_intake_latency_seconds_count",
                 "anomon_scoring_duration_seconds_count", "process_resident_memory_bytes"):
        assert name in m, name
    (model_id,) = {r["model_id"] for r in rows(shared) if r["model_id"]} or {"?"}
    assert [k for k in m if k.startswith("anomon_model_info")] == [
        f'anomon_model_info{{channels="1",image_size="32",line="default",model_id="{model_id}"}}']
    assert any(k.startswith("anomon_build_info{version=") for k in m)
    assert not any(k == "up" or k.startswith("up{") for k in m)
    assert "/" not in "".join(line.split("}")[0] for line in text.splitlines()
                              if line.startswith("anomon_") and "{" in line)  # no path labels
    assert m["anomon_rescans_total"] >= 1
    assert shared.get("/healthz").status == 200


def test_bad_inputs_are_counted_by_reason_and_the_daemon_stays_ready(
        shared: Daemon, tiny_model: TinyModel, tmp_path: Path) -> None:
    d, sub = shared, shared.watch / "bad"
    sub.mkdir()
    before = d.metrics()
    good = png_bytes(normal_array(__import__("numpy").random.default_rng(3)))
    (sub / "empty.png").write_bytes(b"")
    (sub / "truncated.png").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    i = corrupt.index(b"IDAT") + 8
    corrupt[i : i + 50] = bytes(b ^ 0x5A for b in corrupt[i : i + 50])
    (sub / "corrupt.png").write_bytes(bytes(corrupt))
    (sub / "notimage.png").write_text("hello, I am text")
    (sub / "large.png").write_bytes(png_bytes(normal_array(__import__("numpy").random.default_rng(4), 64)))
    os.mkfifo(sub / "fifo.png")  # open() of a FIFO fails to give data even for root: unreadable
    outside = tiny_model.normal_png(tmp_path / "outside.png", 1)
    os.symlink(outside, sub / "escape.png")
    inside = tiny_model.normal_png(sub / "inside.png", 2)
    os.symlink(inside, sub / "alias.png")
    n_vanish = 20
    for k in range(n_vanish):
        p = sub / f"gone{k}.png"
        p.write_bytes(good)
        p.unlink()

    expected = {"empty": 1, "truncated": 1, "corrupt": 1, "not_image": 1, "too_large": 1,
                "unreadable": 1, "refused": 1}
    got = wait_rows(d, sub, 8 + n_vanish, timeout=30)  # 7 errors + inside.png + the vanished
    by_name = {Path(r["path"]).name: r for r in got}
    for name, reason in [("empty.png", "empty"), ("truncated.png", "truncated"),
                         ("corrupt.png", "corrupt"), ("notimage.png", "not_image"),
                         ("large.png", "too_large"), ("fifo.png", "unreadable"),
                         ("escape.png", "refused")]:
        assert by_name[name]["verdict"] == "error" and by_name[name]["reason"] == reason, by_name[name]
    assert by_name["escape.png"]["sha256"] is None  # refused: never read
    assert by_name["inside.png"]["verdict"] == "normal" and "alias.png" not in by_name
    gone = [r for r in got if Path(r["path"]).name.startswith("gone")]
    assert len(gone) == n_vanish == len({r["path"] for r in gone})  # each exactly once
    n_vanished = sum(r["reason"] == "vanished" for r in gone)
    assert n_vanished >= n_vanish // 2  # the rest were read before the delete, which is fine
    wait_deltas(d, before, {**{err(r): n for r, n in expected.items()}, err("vanished"): n_vanished})
    assert d.get("/readyz").status == 200 and d.get("/healthz").status == 200
    # ...and it still scores
    tiny_model.normal_png(sub / "after.png", 5)
    assert wait_rows(d, sub, 9 + n_vanish)[-1]["verdict"] == "normal"
    assert len(rows(d, sub)) == 9 + n_vanish  # nothing counted twice by a later look


def test_replacing_a_file_new_bytes_new_verdict_same_bytes_duplicate(shared: Daemon, tiny_model: TinyModel) -> None:
    d, sub = shared, shared.watch / "replace"
    before = d.metrics()
    p = tiny_model.anomalous_png(sub / "part.png", 0)
    wait_rows(d, sub, 1)
    first = p.read_bytes()
    tiny_model.anomalous_png(p, 1)  # same name, new bytes: a new image
    second = p.read_bytes()
    assert first != second
    got = wait_rows(d, sub, 2)
    assert [r["verdict"] for r in got] == ["anomalous", "anomalous"]
    time.sleep(0.05)
    p.write_bytes(second)  # same name, same bytes (new mtime): a duplicate
    wait_deltas(d, before, {"anomon_duplicates_total": 1, "anomon_alerts_total": 2})  # no 2nd alert
    time.sleep(0.5)
    assert len(rows(d, sub)) == 2
    assert delta(before, d.metrics(), "anomon_duplicates_total") == 1


def test_half_written_files_are_scored_once_after_completion(shared: Daemon, tiny_model: TinyModel) -> None:
    d, sub = shared, shared.watch / "slow"
    sub.mkdir()
    before = d.metrics()
    data = png_bytes(tiny_model.normals[0], "slow")
    half = len(data) // 2

    def open_writer() -> None:  # keeps the file open through the pause
        with open(sub / "open.png", "wb") as f:
            f.write(data[:half])
            f.flush()
            time.sleep(2.5)
            f.write(data[half:])

    def reopening_writer() -> None:  # closes after the first half, comes back later
        (sub / "reopen.png").write_bytes(data[:half])
        time.sleep(2.5)
        with open(sub / "reopen.png", "ab") as f:
            f.write(data[half:])

    def renaming_writer() -> None:  # temporary name, then rename into place
        tmp = sub / "renamed.png.part"
        with open(tmp, "wb") as f:
            f.write(data[:half])
            f.flush()
            time.sleep(2.5)
            f.write(data[half:])
        os.rename(tmp, sub / "renamed.png")

    threads = [threading.Thread(target=w) for w in (open_writer, reopening_writer, renaming_writer)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    assert rows(d, sub) == []  # mid-pause: nothing judged yet
    for t in threads:
        t.join()
    got = wait_rows(d, sub, 3, timeout=15)
    time.sleep(1.0)
    got = rows(d, sub)
    assert sorted(Path(r["path"]).name for r in got) == ["open.png", "renamed.png", "reopen.png"]
    assert all(r["verdict"] == "normal" and r["size"] == len(data) for r in got)
    wait_deltas(d, before, {err("truncated"): 0, err("empty"): 0, SCORED_N: 3})


def test_burst_of_1000_files_is_scored_exactly_once(shared: Daemon, tiny_model: TinyModel) -> None:
    d, sub = shared, shared.watch / "burst"
    before = d.metrics()
    t0 = time.monotonic()
    for i in range(1000):
        if i % 50 == 0:
            tiny_model.anomalous_png(sub / f"{i:04d}.png", 100 + i)
        else:
            tiny_model.normal_png(sub / f"{i:04d}.png", 1000 + i)
    got = wait_rows(d, sub, 1000, timeout=120)
    elapsed = time.monotonic() - t0
    time.sleep(1.0)
    got = rows(d, sub)
    assert len(got) == 1000 == len({r["path"] for r in got})
    wait_deltas(d, before, {SCORED_A: 20, SCORED_N: 980, "anomon_duplicates_total": 0})
    print(f"1000 files scored in {elapsed:.1f} s")


def test_verdicts_command_lists_the_ledger(shared: Daemon, tiny_model: TinyModel) -> None:
    d, sub = shared, shared.watch / "listing"
    tiny_model.normal_png(sub / "n.png", 7)
    tiny_model.anomalous_png(sub / "a.png", 7)
    wait_rows(d, sub, 2)

    runs = {  # in parallel: each CLI start imports torch, which is most of its time
        "jsonl": ["--state", str(d.state), "--format", "jsonl"],
        "csv": ["--state", str(d.state), "--anomalous-only", "--since", "1h", "--format", "csv"],
        "table": ["--state", str(d.state), "--format", "table"],
        "bad_since": ["--state", str(d.state), "--since", "yesterday-ish"],
        "no_ledger": ["--state", str(d.workdir / "nope")],
    }
    n_before = len(rows(d))
    procs = {k: subprocess.Popen(ANOMON + ["verdicts", *a], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO) for k, a in runs.items()}
    r = {k: (*p.communicate(timeout=60), p.returncode) for k, p in procs.items()}
    r = {k: (rc, out, errout) for k, (out, errout, rc) in r.items()}

    rc, out, errout = r["jsonl"]
    assert rc == 0, errout
    listed = [json.loads(line) for line in out.splitlines()]
    assert n_before <= len(listed) <= len(rows(d))  # everything in the ledger (it may still grow)
    mine = {Path(x["path"]).name: x for x in listed if "/listing/" in x["path"]}
    assert mine["a.png"]["verdict"] == "anomalous" and mine["n.png"]["verdict"] == "normal"
    assert {"path", "score", "p_value", "verdict", "reason", "model_id", "arrived", "scored"} <= set(mine["a.png"])
    rc, out, _ = r["csv"]
    assert rc == 0 and out.splitlines()[0].startswith("id,scored,line,verdict")
    assert all(",anomalous," in line for line in out.splitlines()[1:])
    assert any("/listing/a.png" in line for line in out.splitlines())
    rc, out, _ = r["table"]
    assert rc == 0 and "ANOMALOUS" in out and "/listing/n.png" in out
    rc, _, errout = r["bad_since"]
    assert rc == 2 and errout.startswith("anomon: error: --since") and errout.count("\n") == 1
    rc, _, errout = r["no_ledger"]
    assert rc == 2 and "no ledger" in errout and "Traceback" not in errout


# -- daemons of their own ----------------------------------------------------------------------------


def _write_burst(sub: Path, tiny_model: TinyModel, n: int, pause: float = 0.0, start: int = 0) -> None:
    for i in range(start, start + n):
        if i % 10 == 3:
            tiny_model.anomalous_png(sub / f"{i:04d}.png", 500 + i)
        else:
            tiny_model.normal_png(sub / f"{i:04d}.png", 5000 + i)
        if pause:
            time.sleep(pause)


def _check_consistent(d: Daemon, n: int) -> None:
    """Ledger = the input set, each once; every anomalous row has one alert and vice versa."""
    got = rows(d)
    assert len(got) == n == len({r["path"] for r in got})
    anomalous = {r["id"] for r in got if r["verdict"] == "anomalous"}
    assert {a["image_id"] for a in alert_rows(d)} == anomalous
    assert len(anomalous) == sum(1 for i in range(n) if i % 10 == 3)


def test_kill_9_mid_burst_loses_nothing_and_scores_nothing_twice(daemon_factory, tiny_model: TinyModel) -> None:
    d = daemon_factory(tiny_model.path, "kill9")
    d.start()
    n = 300
    writer = threading.Thread(target=_write_burst, args=(d.watch, tiny_model, n, 0.008))
    writer.start()
    for at in (40, 140):  # two kills at different points of the burst, restarted each time
        d.wait_for(lambda: len(rows(d)) >= at, 60, f"{at} rows")
        d.kill9()
        d.start()
    writer.join()
    d.wait_for(lambda: len(rows(d)) >= n, 90, "all rows")
    fresh = tiny_model.normal_png(d.watch / "fresh.png", 99_999)
    t0 = time.monotonic()
    d.wait_for(lambda: len(rows(d)) == n + 1, 10, "the fresh image")
    assert time.monotonic() - t0 < 2.0
    fresh.unlink()
    time.sleep(0.5)
    got = rows(d)
    got = [r for r in got if r["path"] != str(fresh)]
    assert len(got) == n == len({r["path"] for r in got})
    _check_consistent_rows(d, got, n)
    # alerts.jsonl caught up, each alert once
    d.wait_for(lambda: len((d.state / "alerts.jsonl").read_text().splitlines()) == len(alert_rows(d)),
               10, "alerts.jsonl")
    ids = [json.loads(x)["id"] for x in (d.state / "alerts.jsonl").read_text().splitlines()]
    assert ids == sorted(set(ids)) == [a["id"] for a in alert_rows(d)]
    assert d.stop() == 0


def _check_consistent_rows(d: Daemon, got: list[dict[str, Any]], n: int) -> None:
    anomalous = {r["id"] for r in got if r["verdict"] == "anomalous"}
    assert {a["image_id"] for a in alert_rows(d)} == anomalous
    assert len(anomalous) == sum(1 for i in range(n) if i % 10 == 3)


def test_sigterm_under_load_exits_0_in_time_and_restart_scores_the_rest(daemon_factory, tiny_model: TinyModel) -> None:
    # Polling mode (network shares), switched on by the flag over the TOML file's polling = false.
    d = daemon_factory(tiny_model.path, "term", polling=False, poll_interval_s=0.3)
    d.start(extra_args=["--polling"])
    assert d.metric("anomon_intake_polling") == 1
    _write_burst(d.watch, tiny_model, 100)
    d.wait_for(lambda: len(rows(d)) >= 20, 60, "20 rows")
    t0 = time.monotonic()
    rc = d.stop(timeout=12)
    took = time.monotonic() - t0
    assert rc == 0 and took < 10.0, (rc, took)
    partial = rows(d)
    assert {a["image_id"] for a in alert_rows(d)} == {r["id"] for r in partial if r["verdict"] == "anomalous"}
    # restart with a backlog: 10 more files arrive while it is down
    _write_burst(d.watch, tiny_model, 10, start=100)
    d.start(extra_args=["--polling"])
    d.wait_for(lambda: len(rows(d)) >= 110, 60, "all 110 rows")
    time.sleep(0.5)
    _check_consistent(d, 110)
    assert d.stop() == 0
    logs = d.log_lines()
    assert all("ts" in line and "level" in line for line in logs)  # one JSON object per line


def test_sighup_and_file_replacement_reload_and_a_corrupt_model_is_refused(
        daemon_factory, tiny_model: TinyModel, tiny_bundle_b: Path, tmp_path: Path) -> None:
    from anomon.detector import Detector

    id_a = Detector.load(tiny_model.path, device="cpu").model_id
    id_b = Detector.load(tiny_bundle_b, device="cpu").model_id
    assert id_a != id_b
    model = tmp_path / "model.anomon"
    shutil.copy(tiny_model.path, model)
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.2)
    d = daemon_factory(model, "reload")
    d.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})

    def info_ids() -> list[str]:
        return [k.split('model_id="')[1].split('"')[0] for k in d.metrics() if k.startswith("anomon_model_info")]

    reloads = lambda r: d.metric(f'anomon_model_reloads_total{{result="{r}"}}')  # noqa: E731
    assert info_ids() == [id_a]
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: reloads("success") == 1, 15, "SIGHUP reload")
    tmp = model.with_suffix(".new")
    shutil.copy(tiny_bundle_b, tmp)
    os.replace(tmp, model)  # replaced on disk: picked up without a signal
    d.wait_for(lambda: info_ids() == [id_b], 15, "switch to model b")
    assert reloads("success") == 2
    tiny_model.normal_png(d.watch / "after_switch.png", 1)
    assert wait_rows(d, d.watch, 1)[0]["model_id"] == id_b

    model.write_bytes(b"definitely not a safetensors bundle" * 10)  # corrupt in place
    d.wait_for(lambda: reloads("failure") == 1, 15, "refused reload")
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: reloads("failure") == 2, 15, "refused SIGHUP reload")
    assert info_ids() == [id_b] and d.get("/readyz").status == 200
    tiny_model.normal_png(d.watch / "after_corrupt.png", 2)
    assert wait_rows(d, d.watch, 2)[-1]["model_id"] == id_b  # the old model keeps serving
    assert any(line.get("level") == "error" and "refused" in line.get("msg", "") for line in d.log_lines())

    messages = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            messages.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
    assert d.stop() == 0
    try:
        while True:
            messages.append(notify.recv(4096).decode())
    except socket.timeout:
        pass
    notify.close()
    text = "\n".join(messages)
    assert "READY=1" in text and "WATCHDOG=1" in text and "STOPPING=1" in text


def test_bad_configuration_and_corrupt_state_fail_at_start_with_one_line(
        tiny_model: TinyModel, tmp_path: Path) -> None:
    watch = tmp_path / "in"
    watch.mkdir()
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text(f'model = "{tiny_model.path}"\nwatch = ["{watch}"]\nbatch_size = 0\n')
    zero_state = tmp_path / "zero"
    zero_state.mkdir()
    (zero_state / "ledger.sqlite3").write_bytes(b"")
    base = ["watch", "--model", str(tiny_model.path), "--watch", str(watch)]
    cases = {
        "batch_size": ["watch", "--config", str(bad_toml), "--state", str(tmp_path / "s1")],
        "listen": base + ["--listen", "nonsense", "--state", str(tmp_path / "s2")],
        "ledger.sqlite3": base + ["--state", str(zero_state), "--listen", f"127.0.0.1:{free_port()}"],
        "watch folder not found": ["watch", "--model", str(tiny_model.path), "--watch",
                                   str(tmp_path / "missing"), "--state", str(tmp_path / "s3")],
    }
    procs = {k: subprocess.Popen(ANOMON + v, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO) for k, v in cases.items()}
    for needle, p in procs.items():
        out, errout = p.communicate(timeout=60)
        assert p.returncode == 2, (needle, errout)
        lines = [x for x in errout.splitlines() if x.startswith("anomon: error:")]
        assert len(lines) == 1 and needle in lines[0], (needle, errout)
        assert "Traceback" not in errout
    assert (zero_state / "ledger.sqlite3").read_bytes() == b""  # never silently replaced


def test_a_start_that_fails_says_one_thing_and_leaves_no_state(tiny_model: TinyModel, tmp_path: Path) -> None:
    """A bad model or a busy port: one error line, no "stopped; 0 image(s) left waiting" story about a
    daemon that never ran, and no state folder or ledger left behind to puzzle the next start."""
    watch = tmp_path / "in"
    watch.mkdir()
    broken = tmp_path / "broken.anomon"
    broken.write_bytes(tiny_model.path.read_bytes()[:500])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            "model": (["--model", str(broken), "--listen", f"127.0.0.1:{free_port()}"], "broken.anomon"),
            "port": (["--model", str(tiny_model.path), "--listen", f"127.0.0.1:{port}"], "cannot listen"),
        }
        for name, (args, needle) in cases.items():
            state = tmp_path / f"state-{name}"
            r = subprocess.run(ANOMON + ["watch", "--watch", str(watch), "--state", str(state)] + args,
                               capture_output=True, text=True, cwd=REPO, timeout=120)
            assert r.returncode == 2, r.stderr
            errors = [x for x in r.stderr.splitlines() if x.startswith("anomon: error:")]
            assert len(errors) == 1 and needle in errors[0], r.stderr
            assert "stopped" not in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert not state.exists(), (name, list(state.iterdir()))


# -- webhook -------------------------------------------------------------------------------------------


def test_webhook_retries_through_an_outage_and_dead_letters_a_4xx(daemon_factory, tiny_model: TinyModel) -> None:
    rx = WebhookReceiver([503])
    d = daemon_factory(tiny_model.path, "hook", webhook_url=rx.url, webhook_max_backoff_s=0.4,
                       webhook_timeout_s=1.0)
    d.start()
    for i in range(3):
        tiny_model.anomalous_png(d.watch / f"a{i}.png", i)
    tiny_model.normal_png(d.watch / "n.png", 0)
    wait_rows(d, d.watch, 4)
    d.wait_for(lambda: d.metric('anomon_webhook_deliveries_total{result="retry"}') >= 2, 10,
               "retries during the outage")
    d.kill9()  # a crash during the outage...
    d.start()
    rx.answer(200)  # ...then the receiver recovers
    d.wait_for(lambda: len(rx.delivered()) == 3, 30, "all alerts delivered")
    conn = open_readonly(d.state / "ledger.sqlite3")
    keys = {alert_key(ledger_id_of(conn), a["id"]) for a in alert_rows(d)}
    conn.close()
    assert rx.delivered() == keys
    assert {k for k, _, _ in rx.got} == keys  # retried with the same key, nothing else
    assert all(b["key"] == k for k, _, b in rx.got)
    m = wait_deltas(d, {}, {'anomon_webhook_deliveries_total{result="success"}': 3,
                            'anomon_webhook_deliveries_total{result="dead_letter"}': 0})

    rx.answer(400)  # a final "no": dead-lettered, counted, not retried
    tiny_model.anomalous_png(d.watch / "a_rejected.png", 10)
    d.wait_for(lambda: d.metric('anomon_webhook_deliveries_total{result="dead_letter"}') == 1, 15, "dead letter")
    dead = [json.loads(x) for x in (d.state / "webhook-dead-letter.jsonl").read_text().splitlines()]
    assert len(dead) == 1 and dead[0]["status"] == 400 and dead[0]["alert"]["path"].endswith("a_rejected.png")
    time.sleep(1.0)
    assert sum(1 for _, s, _ in rx.got if s == 400) == 1
    rx.answer(200)
    tiny_model.anomalous_png(d.watch / "a_later.png", 11)  # delivery goes on
    d.wait_for(lambda: len(rx.delivered()) == 4, 15, "delivery after the dead letter")
    assert d.stop() == 0
    rx.close()


def test_new_bytes_with_the_same_size_and_mtime_are_a_new_image(shared: Daemon, tiny_model: TinyModel) -> None:
    """`cp -p` of a fixed-size frame (a BMP) over the last one: same size, same mtime, new bytes.
    The close-after-write event says the file was written, so the daemon looks at the bytes."""
    from conftest import anomalous_array

    d, sub = shared, shared.watch / "same_stat"
    sub.mkdir()
    path = sub / "frame.bmp"
    stamp = 1_700_000_000_123_456_789

    def write_bmp(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="BMP")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, buf.getvalue())
            os.utime(fd, ns=(stamp, stamp))  # as cp -p does, before the close
        finally:
            os.close(fd)
        return buf.getvalue()

    first = write_bmp(tiny_model.normals[0])
    wait_rows(d, sub, 1)
    second = write_bmp(anomalous_array(np.random.default_rng(7)))
    assert len(first) == len(second)
    got = wait_rows(d, sub, 2)
    assert [r["verdict"] for r in got] == ["normal", "anomalous"]
    assert (got[0]["size"], got[0]["mtime_ns"]) == (got[1]["size"], got[1]["mtime_ns"]) == (len(first), stamp)
    write_bmp(anomalous_array(np.random.default_rng(7)))  # the same bytes again: nothing new
    time.sleep(2.0)
    assert len(rows(d, sub)) == 2


def test_running_out_of_file_descriptors_is_transient_not_a_verdict(daemon_factory, tiny_model: TinyModel) -> None:
    """EMFILE while reading an image says nothing about the image: it is tried again once the
    process can open files, never recorded as "unreadable" for good, and the scorer lives on."""
    import resource

    d = daemon_factory(tiny_model.path, reconcile_interval_s=3600.0).start()
    pid = d.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Open files stay open; a new one would need a number below 3, and 0-2 are taken: no open()
    # can succeed now, as when idle connections have used up the limit.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
    try:
        tiny_model.normal_png(d.watch / "starved.png", 0)
        d.wait_for(lambda: any("starved.png" in str(line.get("msg", "")) and line.get("level") == "warning"
                               for line in d.log_lines()), 30, "the failed read")
        time.sleep(1.0)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    got = wait_rows(d, d.watch, 1, timeout=30)
    assert [(Path(r["path"]).name, r["verdict"]) for r in got] == [("starved.png", "normal")]
    assert d.metric(err("unreadable")) == 0
    assert d.get("/healthz").status == 200  # the scoring thread is alive
    tiny_model.anomalous_png(d.watch / "after.png", 0)
    assert [r["verdict"] for r in wait_rows(d, d.watch, 2)] == ["normal", "anomalous"]


def test_a_49_megapixel_png_is_scored_in_bounded_memory(daemon_factory, tiny_model: TinyModel) -> None:
    """7000x7000 pixels in a small PNG (the default max_pixels lets it in): scored and alerted with
    a heat map, without the daemon's memory growing by gigabytes (it was 6.5 GB: the overlay was
    blended at full size)."""
    from conftest import anomalous_array

    d = daemon_factory(tiny_model.path).start()
    base_kb = _status_kb(d.proc.pid, "VmRSS")
    big = Image.fromarray(anomalous_array(np.random.default_rng(3))).resize((7000, 7000), Image.Resampling.NEAREST)
    tmp = d.workdir / "big.png.tmp"
    big.save(tmp, format="PNG")
    del big
    os.rename(tmp, d.watch / "big.png")
    got = wait_rows(d, d.watch, 1, timeout=120)
    assert got[0]["verdict"] == "anomalous", got
    peak_mb = (_status_kb(d.proc.pid, "VmHWM") - base_kb) / 1024
    assert peak_mb < 1200, f"peak RSS grew by {peak_mb:.0f} MB"
    alerts = d.get("/alerts?since=0").json()["alerts"]
    heat = Image.open(alerts[0]["heatmap"])
    assert max(heat.size) == 1024 and heat.size[0] == heat.size[1]


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def test_gif_is_scored_and_garbage_behind_a_png_signature_is_corrupt(shared: Daemon, tiny_model: TinyModel) -> None:
    """A .gif was ignored without a trace; 100 KB of garbage after a PNG signature was called
    "truncated" (waited for as an unfinished write) instead of "corrupt"."""
    d, sub = shared, shared.watch / "formats"
    sub.mkdir()
    before = d.metrics()
    buf = io.BytesIO()
    Image.fromarray(tiny_model.normals[1]).save(buf, format="GIF")
    (sub / "frame.gif").write_bytes(buf.getvalue())
    (sub / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(100_000))
    got = {Path(r["path"]).name: r for r in wait_rows(d, sub, 2, timeout=30)}
    assert got["frame.gif"]["verdict"] == "normal"
    assert (got["garbage.png"]["verdict"], got["garbage.png"]["reason"]) == ("error", "corrupt")
    wait_deltas(d, before, {err("corrupt"): 1, err("truncated"): 0, SCORED_N: 1})


def test_a_folder_swapped_for_a_symlink_after_intake_is_never_read_through(daemon_factory, tiny_model: TinyModel,
                                                                           tmp_path: Path) -> None:
    """`sub/` is a real folder when the image arrives and a symlink to a folder outside by the time
    the scorer reads it: the read must not follow it (O_NOFOLLOW on the last component alone let 55
    outside files be read)."""
    from conftest import anomalous_array

    d = daemon_factory(tiny_model.path).start()
    outside = tmp_path / "outside"
    outside.mkdir()
    tiny_model.anomalous_png(outside / "x.png", 1)  # what a followed link would read
    # Keep the scorer busy for a few seconds, so the swap happens between intake and read.
    big = Image.fromarray(anomalous_array(np.random.default_rng(5))).resize((7000, 7000), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png", format="PNG")
    for i in range(4):
        shutil.copy(tmp_path / "big.png", d.watch / f".big{i}.tmp")
        os.rename(d.watch / f".big{i}.tmp", d.watch / f"big{i}.png")
    sub = d.watch / "sub"
    sub.mkdir()
    tiny_model.normal_png(sub / "x.png", 2)
    time.sleep(0.5)  # intake has handed it on (close-after-write is complete at once)
    assert len(rows(d)) < 4, "the scorer was not busy: the race did not happen"
    (sub / "x.png").unlink()
    sub.rmdir()
    sub.symlink_to(outside, target_is_directory=True)
    d.wait_for(lambda: any(Path(r["path"]).name == "x.png" for r in rows(d)), 120, "a row for sub/x.png")
    x = [r for r in rows(d) if Path(r["path"]).name == "x.png"]
    assert [(r["verdict"], r["reason"]) for r in x] in ([("error", "refused")], [("error", "vanished")]), x
    assert all(r["sha256"] is None for r in x)  # never read


def test_a_file_name_that_is_not_utf8_is_scored_once_and_breaks_nothing(daemon_factory, tiny_model: TinyModel) -> None:
    """`bad\\xff.png` (bytes no encoding can name) could not be stored: the start-up scan failed,
    every rescan crashed, files after it in directory order were never scored."""
    from conftest import anomalous_array

    d = daemon_factory(tiny_model.path, reconcile_interval_s=1.0).start()
    odd = os.path.join(os.fsencode(d.watch), b"bad\xff.png")
    with open(odd, "wb") as f:
        f.write(png_bytes(tiny_model.normals[0], tag="odd"))
    for i in range(3):
        tiny_model.normal_png(d.watch / f"n{i}.png", i)

    def by_name() -> dict[bytes, dict[str, Any]]:
        return {os.path.basename(r["path"] if isinstance(r["path"], bytes) else os.fsencode(r["path"])): r
                for r in rows(d)}

    with open(os.path.join(os.fsencode(d.watch), b"spot\xfe.png"), "wb") as f:  # and an alert for one
        f.write(png_bytes(anomalous_array(np.random.default_rng(4)), tag="odd-alert"))
    d.wait_for(lambda: len(by_name()) == 5, 30, "5 rows")
    assert by_name()[b"bad\xff.png"]["verdict"] == "normal"
    assert by_name()[b"spot\xfe.png"]["verdict"] == "anomalous"
    alert, = d.get("/alerts?since=0").json()["alerts"]
    assert os.fsencode(alert["path"]).endswith(b"spot\xfe.png") and Path(alert["heatmap"]).is_file()
    d.wait_for(lambda: (d.state / "alerts.jsonl").is_file(), 10, "alerts.jsonl")
    line, = (d.state / "alerts.jsonl").read_text().splitlines()
    assert os.fsencode(json.loads(line)["path"]).endswith(b"spot\xfe.png")  # lossless
    time.sleep(2.5)  # rescans over the odd name
    assert d.stop() == 0
    d.start()
    tiny_model.normal_png(d.watch / "n9.png", 9)
    d.wait_for(lambda: len(by_name()) == 6, 30, "the file after a restart")
    assert len(rows(d)) == 6  # nothing twice
    text = "\n".join(str(line.get("msg")) for line in d.log_lines())
    assert "Traceback" not in d.log_path.read_text() and "intake error" not in text
    r = subprocess.run(ANOMON + ["verdicts", "--state", str(d.state), "--format", "jsonl"], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "bad\\udcff.png" in r.stdout, r.stdout + r.stderr
