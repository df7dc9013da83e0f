"""The command line as a user runs it: real subprocesses, real files, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, anomalous_array, normal_array, write_png
from PIL import Image

ANOMON = [sys.executable, "-m", "anomon"]


def run(*args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(ANOMON + [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=REPO)
    if ok is True:
        assert r.returncode == 0, r.stderr
    return r


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("anomon: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(5)
    for i in range(30):
        write_png(root / "normal" / f"n{i:02d}.png", normal_array(rng))
    for i in range(8):
        write_png(root / "anomalous" / f"a{i:02d}.png", anomalous_array(rng))
    return {"normal": root / "normal", "anomalous": root / "anomalous", "root": root}


def test_score_jsonl_csv_table_and_heatmaps(tiny_bundle: Path, images, tmp_path: Path) -> None:
    r = run("score", tiny_bundle, images["anomalous"], images["normal"] / "n00.png", "--heatmaps", tmp_path / "hm")
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(recs) == 9
    for rec in recs:
        assert set(rec) >= {"path", "score", "threshold", "anomalous", "p_value", "model_id"}
        assert 0 < rec["p_value"] <= 1
        assert Path(rec["heatmap"]).is_file()
    assert Image.open(tmp_path / "hm" / "a00.png").size == (32, 32)  # original size
    info = json.loads(run("info", tiny_bundle).stdout)
    assert {r["model_id"] for r in recs} == {info["model_id"]}
    rows = list(csv.DictReader(io.StringIO(run("score", tiny_bundle, images["anomalous"], "--format", "csv").stdout)))
    assert len(rows) == 8 and rows[0]["model_id"] == info["model_id"]
    table = run("score", tiny_bundle, images["anomalous"], "--format", "table").stdout
    assert "a00.png" in table and "verdict" in table


def test_unreadable_image_gives_error_record_and_exit_2(tiny_bundle: Path, images, tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    shutil.copytree(images["anomalous"], d)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    (d / "notes.jpg").write_text("not an image")
    r = run("score", tiny_bundle, d, ok=None)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    recs = {Path(x["path"]).name: x for x in map(json.loads, r.stdout.splitlines())}
    assert len(recs) == 10
    assert recs["broken.png"]["error"] == "truncated"
    assert recs["notes.jpg"]["error"] == "not_image"
    assert sum("score" in x for x in recs.values()) == 8  # the others were still scored


def test_calibrate_rewrites_bundle_and_reports(tiny_bundle: Path, images, tmp_path: Path) -> None:
    model = tmp_path / "m.anomon"
    shutil.copy(tiny_bundle, model)
    before = json.loads(run("info", model).stdout)
    r = run("calibrate", model, images["normal"], "--target-fpr", "0.2", "--anomalous", images["anomalous"])
    assert "threshold" in r.stdout and "expected false-alarm rate" in r.stdout
    assert "AUROC" in r.stdout and "detection rate" in r.stdout
    after = json.loads(run("info", model).stdout)
    assert after["model_id"] != before["model_id"]
    assert after["calibration"]["n"] == 30 and after["calibration"]["target_fpr"] == 0.2
    assert not list(tmp_path.glob(".*.tmp"))


def test_evaluate_report(tiny_bundle: Path, images, tmp_path: Path) -> None:
    earlier = tmp_path / "rep" / "heatmaps"  # an earlier report's ranking must not mix with this one
    earlier.mkdir(parents=True)
    (earlier / "01_normal_gone_long_ago.png").write_bytes(b"stale")
    (earlier / "my_notes.png").write_bytes(b"the user's own file")
    r = run("evaluate", tiny_bundle, "--normal", images["normal"], "--anomalous", images["anomalous"], "--report", tmp_path / "rep")
    assert "AUROC" in r.stdout
    for name in ("roc.png", "histogram.png", "summary.json"):
        assert (tmp_path / "rep" / name).is_file()
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert 0.0 <= summary["auroc"] <= 1.0 and len(summary["top_scoring"]) == 12
    ranked = sorted(p.name for p in earlier.glob("*.png") if p.name != "my_notes.png")
    assert len(ranked) == 12 and "01_normal_gone_long_ago.png" not in ranked
    assert (earlier / "my_notes.png").read_bytes() == b"the user's own file"


def test_user_mistakes_are_one_line(tiny_bundle: Path, images, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("train", tmp_path / "nope", "-o", tmp_path / "m", ok=None), "not found")
    assert_one_line_error(run("train", empty, "-o", tmp_path / "m", ok=None), "no images found")
    assert_one_line_error(run("train", images["normal"], "-o", tmp_path / "no" / "m", "--epochs", "1", ok=None), "does not exist")
    assert_one_line_error(run("train", images["normal"], "-o", tmp_path / "m", "--target-fpr", "2", ok=None), "target-fpr")
    bad = tmp_path / "bad"
    shutil.copytree(images["normal"], bad)
    (bad / "zz.png").write_bytes(b"")
    assert_one_line_error(run("train", bad, "-o", tmp_path / "m", "--epochs", "1", ok=None), "zz.png", "--skip-bad")
    big = tmp_path / "big"
    big.mkdir()
    Image.new("1", (9000, 9000)).save(big / "huge.png")
    r = run("score", tiny_bundle, big, ok=None)
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "too_large"
    garbage = tmp_path / "garbage.anomon"
    garbage.write_bytes(b"hello")
    tampered = tmp_path / "tampered.anomon"
    data = bytearray(tiny_bundle.read_bytes())
    data[-50] ^= 0x55
    tampered.write_bytes(bytes(data))
    for model, needle in [(garbage, "not an anomon model bundle"), (tampered, "integrity"), (tmp_path / "none", "not found")]:
        assert_one_line_error(run("score", model, images["normal"], ok=None), needle)
        assert_one_line_error(run("info", model, ok=None), needle)
    assert_one_line_error(run("score", tiny_bundle, tmp_path / "missing.png", ok=None), "no such file")
    assert_one_line_error(run("evaluate", tiny_bundle, "--normal", images["normal"], ok=None), "--anomalous")
    assert_one_line_error(run("frobnicate", ok=None), "invalid choice")
    assert_one_line_error(run("train", images["normal"], "-o", tmp_path / "m", "--image-size", "80x32", ok=None), "65")
    assert_one_line_error(run("train", images["normal"], "-o", tmp_path / "m", "--image-size", "0", ok=None), "between 8 and 1024")


def test_train_writes_a_usable_bundle_with_skip_bad(images, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(images["normal"], data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n")
    out = tmp_path / "m.anomon"
    r = run("train", data, "-o", out, "--epochs", "2", "--seed", "3", "--skip-bad")
    assert "written to" in r.stdout and "broken.png" in r.stderr
    info = json.loads(run("info", out).stdout)
    assert info["preprocessing"] == {"image_size": 32, "channels": 1, "resize": "bilinear"}  # auto-detected
    assert info["training"]["n_images"] == 30 and info["n_parameters"] > 0
    assert info["warnings"] == [] and info["training"]["stopped_by_budget"] is False


def test_training_cut_by_its_budget_says_so_everywhere(images, tmp_path: Path) -> None:
    out = tmp_path / "m.anomon"
    r = run("train", images["normal"], "-o", out, "--epochs", "500", "--time-budget", "2")
    assert "WARNING: training was cut short by its time budget" in r.stderr
    info = json.loads(run("info", out).stdout)
    assert info["training"]["stopped_by_budget"] is True
    assert info["training"]["steps_run"] < info["training"]["steps_planned"]
    assert any("time budget" in w for w in info["warnings"])
    r = run("evaluate", out, "--normal", images["normal"], "--anomalous", images["anomalous"], "--report", tmp_path / "rep")
    assert "WARNING: training was cut short" in r.stdout
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["warnings"]


def test_calibrating_or_evaluating_on_the_training_folder_is_flagged(tiny_bundle: Path, images, tmp_path: Path) -> None:
    trained_on = tiny_bundle.parent / "data"
    r = run("calibrate", tiny_bundle, trained_on, "-o", tmp_path / "re.anomon", "--target-fpr", "0.2")
    assert "WARNING" in r.stderr and "training folder" in r.stderr, r.stderr
    r = run("evaluate", tiny_bundle, "--normal", trained_on, "--anomalous", images["anomalous"])
    assert "WARNING" in r.stderr and "training folder" in r.stderr, r.stderr
    r = run("evaluate", tiny_bundle, "--normal", images["normal"], "--anomalous", images["anomalous"])
    assert "WARNING" not in r.stderr, r.stderr  # held-out images: nothing to warn about


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["verdicts", "--state", "{tmp}"], ["watch", "--help"]])
def test_light_commands_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    """They start in a fraction of a second: no torch, scikit-learn or matplotlib behind them."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = ("import sys\nfrom anomon.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))" % argv)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []", r.stdout + r.stderr


def test_every_flag_of_every_command_is_explained() -> None:
    """`--help` is the manual: each command has a description or help line, each flag a help text,
    and `watch --help` names the endpoints, the signals and what log_format = auto does."""
    import argparse

    from anomon.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"anomon {name}: {'/'.join(action.option_strings) or action.dest} has no help"
    text = sub.choices["watch"].format_help()
    for needle in ("/metrics", "/healthz", "/readyz", "/alerts", "SIGHUP", "SIGTERM", "log_format", "deploy/anomon.toml"):
        assert needle in text, needle
