"""End-to-end: one daemon, several lines (issue 12, part 1). The real `anomon watch`, real files,
real HTTP: each line is scored by its own model, carries its name everywhere an operator looks, is
served in turn with the others, and a broken model stops only its own line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from anomon.detector import Detector
from conftest import Daemon, TinyModel, WebhookReceiver

pytestmark = pytest.mark.e2e


def _lines_daemon(tmp_path: Path, lines: dict[str, dict[str, Any]], **cfg: Any) -> tuple[Daemon, dict[str, Path]]:
    """A Daemon whose config has `[[lines]]` instead of model + watch: {name: {"model": ..., ...}}."""
    d = Daemon(tmp_path / "d", Path("unused"), **cfg)
    del d.cfg["model"], d.cfg["watch"]
    folders = {}
    entries = []
    for name, extra in lines.items():
        folders[name] = tmp_path / "cams" / name
        folders[name].mkdir(parents=True)
        entries.append({"name": name, "watch": [str(folders[name])], **{k: str(v) if isinstance(v, Path)
                                                                          else v for k, v in extra.items()}})
    d.cfg["lines"] = entries
    return d, folders


def _by_line(d: Daemon) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in d.table():
        out.setdefault(r["line"], []).append(r)
    return out


def test_each_line_is_scored_by_its_own_model_and_named_everywhere(
        tmp_path: Path, tiny_model: TinyModel, tiny_bundle_b: Path) -> None:
    hook_all, hook_b = WebhookReceiver([200]), WebhookReceiver([200])
    d, cams = _lines_daemon(tmp_path, {"left": {"model": tiny_model.path},
                                       "right": {"model": tiny_bundle_b, "webhook_url": hook_b.url},
                                       "loose": {"model": tiny_model.path, "target_fpr": 0.5}},
                            webhook_url=hook_all.url)
    id_left = Detector.load(tiny_model.path, device="cpu").model_id
    id_right = Detector.load(tiny_bundle_b, device="cpu").model_id
    try:
        d.start()
        for name in ("left", "right"):
            tiny_model.normal_png(cams[name] / f"ok_{name}.png", 0)
            tiny_model.anomalous_png(cams[name] / f"bad_{name}.png", 1)
        d.wait_for(lambda: len(d.table()) == 4, 30, "4 verdicts")
        rows = _by_line(d)
        assert "loose" not in rows
        for name, model_id in (("left", id_left), ("right", id_right)):
            assert {r["model_id"] for r in rows[name]} == {model_id}
            assert {Path(r["path"]).parent for r in rows[name]} == {cams[name].resolve()}
            assert sorted(r["verdict"] for r in rows[name]) == ["anomalous", "normal"]

        m = d.metrics()
        for name, model_id in (("left", id_left), ("right", id_right)):
            assert m[f'anomon_images_scored_total{{line="{name}",verdict="normal"}}'] == 1
            assert m[f'anomon_alerts_total{{line="{name}"}}'] == 1
            assert m[f'anomon_line_up{{line="{name}"}}'] == 1
            assert any(k.startswith("anomon_model_info{") and f'line="{name}"' in k and model_id in k for k in m)
        assert m['anomon_score_threshold{line="left"}'] != m['anomon_score_threshold{line="right"}']
        # The same bundle at a looser false-alarm target: a lower threshold, set from the bundle's
        # calibration scores, under its own model id.
        assert m['anomon_score_threshold{line="loose"}'] < m['anomon_score_threshold{line="left"}']
        assert not any(k.startswith("anomon_model_info{") and 'line="loose"' in k and id_left in k for k in m)
        assert "anomon_ready" in m and not any(k.startswith("anomon_ready{") for k in m)  # process-wide

        alerts = d.get("/alerts").json()["alerts"]
        assert sorted(a["line"] for a in alerts) == ["left", "right"]
        jsonl = [json.loads(x) for x in (d.state / "alerts.jsonl").read_text().splitlines()]
        assert sorted(a["line"] for a in jsonl) == ["left", "right"]
        # Each line's alerts go to its own webhook (right has one; left uses the daemon-wide one).
        d.wait_for(lambda: len(hook_all.got) >= 1 and len(hook_b.got) >= 1, 15, "webhooks")
        time.sleep(0.5)
        assert [b["line"] for _, _, b in hook_all.got] == ["left"]
        assert [b["line"] for _, _, b in hook_b.got] == ["right"]
        assert any("line" in x and x.get("line") == "right" for x in d.log_lines()
                   if x.get("msg", "").startswith("anomalous"))
    finally:
        d.stop()
        hook_all.close()
        hook_b.close()


def test_a_burst_on_one_line_does_not_starve_another(tmp_path: Path, tiny_model: TinyModel) -> None:
    """1,000 images land on `busy` at once, then 5 on `quiet`: the quiet line's images are scored
    within a few batches, not after the burst (with one shared queue they waited for all 1,000)."""
    d, cams = _lines_daemon(tmp_path, {"busy": {"model": tiny_model.path, "batch_size": 4},
                                       "quiet": {"model": tiny_model.path, "batch_size": 4}})
    d.start()
    try:
        stage = tmp_path / "stage"
        stage.mkdir()
        n_burst = 1000
        for i in range(n_burst):
            tiny_model.normal_png(stage / f"b{i:04d}.png", i)
        for i in range(n_burst):  # renamed in, as a camera writer does: complete on arrival
            os.rename(stage / f"b{i:04d}.png", cams["busy"] / f"b{i:04d}.png")
        d.wait_for(lambda: len(d.table()) >= 20, 30, "the burst to start")
        for i in range(5):
            tiny_model.normal_png(stage / f"q{i}.png", i)
            os.rename(stage / f"q{i}.png", cams["quiet"] / f"q{i}.png")
        d.wait_for(lambda: len(_by_line(d).get("quiet", [])) == 5, 60, "the quiet line's images")
        busy_done = len(_by_line(d)["busy"])
        assert busy_done < n_burst - 200, (
            f"the quiet line waited for {busy_done} of the busy line's {n_burst} images")
        d.wait_for(lambda: len(d.table()) == n_burst + 5, 180, "the whole burst")
    finally:
        d.stop()


def test_a_broken_model_stops_only_its_line_until_a_good_one_arrives(
        tmp_path: Path, tiny_model: TinyModel, tiny_bundle_b: Path) -> None:
    broken = tmp_path / "broken.anomon"
    broken.write_bytes(b"not a model at all" * 20)
    good_a = tmp_path / "a.anomon"
    shutil.copy(tiny_model.path, good_a)
    d, cams = _lines_daemon(tmp_path, {"a": {"model": good_a}, "b": {"model": broken}})
    d.start()  # ready: line a serves
    try:
        ready = d.get("/readyz")
        body = ready.json()
        assert ready.status == 200 and body["checks"]["lines"]["a"] == "serving"
        assert body["checks"]["lines"]["b"].startswith("waiting for a model")
        assert d.metric('anomon_line_up{line="a"}') == 1 and d.metric('anomon_line_up{line="b"}') == 0
        tiny_model.normal_png(cams["a"] / "a0.png", 0)
        tiny_model.normal_png(cams["b"] / "b0.png", 1)
        d.wait_for(lambda: len(d.table()) == 1, 20, "line a's verdict")
        time.sleep(1.5)  # line b's image waits: not scored, not recorded as an error
        assert [r["line"] for r in d.table()] == ["a"]
        assert any(x.get("level") == "error" and x.get("line") == "b" for x in d.log_lines())

        # Line a's model is replaced: only a reloads; b still waits.
        tmp = good_a.with_suffix(".new")
        shutil.copy(tiny_bundle_b, tmp)
        os.replace(tmp, good_a)
        d.wait_for(lambda: d.metric('anomon_model_reloads_total{line="a",result="success"}') == 1, 15, "a reload")
        assert d.metric('anomon_model_reloads_total{line="b",result="success"}') == 0

        # A good model for b: its waiting image is scored, and the line is up.
        tmp = broken.with_suffix(".new")
        shutil.copy(tiny_model.path, tmp)
        os.replace(tmp, broken)
        d.wait_for(lambda: [r["line"] for r in d.table()] == ["a", "b"], 20, "line b's waiting image")
        assert d.metric('anomon_line_up{line="b"}') == 1
        assert d.get("/readyz").json()["checks"]["lines"]["b"] == "serving"
        # SIGHUP reloads every line, each on its own.
        d.signal(signal.SIGHUP)
        d.wait_for(lambda: d.metric('anomon_model_reloads_total{line="a",result="success"}') == 2
                   and d.metric('anomon_model_reloads_total{line="b",result="success"}') == 2, 15, "SIGHUP")
    finally:
        d.stop()


def test_no_line_with_a_model_is_a_start_error_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.anomon"
    broken.write_bytes(b"junk" * 100)
    d, _ = _lines_daemon(tmp_path, {"a": {"model": broken}, "b": {"model": broken}})
    d.start(wait_ready=False)
    assert d.proc is not None and d.proc.wait(60) != 0
    out = d.log_tail()
    assert "no line's model could be loaded" in out and "Traceback" not in out
