"""The drift test (anomon/drift.py): the martingale in-process, then the real daemon.

In-process: under exchangeable scores the martingale stays below 1/alpha (Ville: P(ever) <= alpha),
its p-values are uniform even with ties and three calibration scores, and it grows fast on scores
that drift up (or down) after a long healthy stretch. Against `anomon watch`: normal images one
grey level brighter (none of them over the threshold) raise anomon_drift_martingale_log10 to an
alarm in the ledger, a kill -9 and a restart keep the evidence (every image bet on once), SIGUSR1
and a new model reset it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from anomon.drift import NOTHING_PLACED, DriftTest, log10_martingale, score_keys
from anomon.ledger import Ledger, open_readonly
from conftest import Daemon, TinyModel, write_png

LOG10 = "anomon_drift_martingale_log10"
IMAGES = "anomon_drift_images"
ALARMS = "anomon_drift_alarms_total"


def _gaussian_test(seed: int, n_cal: int = 50, **kw: Any) -> tuple[DriftTest, np.random.Generator]:
    rng = np.random.default_rng(seed)
    cal = rng.normal(size=n_cal)
    threshold = float(np.sort(cal)[math.ceil((n_cal + 1) * 0.95) - 1])
    return DriftTest(cal, threshold, model_id="m", rng=np.random.default_rng(seed + 1000), **kw), rng


def _run(test: DriftTest, scores: np.ndarray, batch: int = 16) -> tuple[float, int]:
    """Feed `scores` in batches: the largest log10 after a batch, and the alarms raised."""
    top, alarms = -math.inf, 0
    for i in range(0, len(scores), batch):
        s = test.update(scores[i:i + batch])
        top, alarms = max(top, s.log10), alarms + (s.alarm is not None)
    return top, alarms


# -------------------------------------------------------------------------- in-process: the martingale


def test_score_keys_keep_the_order_of_scores_and_round_to_10_bits() -> None:
    rng = np.random.default_rng(0)
    x = np.sort(np.r_[rng.normal(0, 10, 2000), -rng.exponential(1e-3, 100), 0.0, -0.0, 1e-300,
                      -1e-300, np.inf, -np.inf, 3.0, 3.0 * (1 + 2.0 ** -12)])
    k = score_keys(x)
    assert np.all(np.diff(k) >= 0)  # monotone: ranking keys ranks scores
    assert score_keys(3.0) == score_keys(3.0 * (1 + 2.0 ** -12))  # 10 significant bits
    assert score_keys(3.0) < score_keys(3.0 * (1 + 2.0 ** -9))
    assert score_keys(-0.0) == score_keys(0.0)


def test_unchanged_scores_stay_below_the_alarm_level_in_most_runs() -> None:
    """Ville's inequality: P(the martingale ever reaches 1/alpha) <= alpha. Ten runs of 20,000
    exchangeable images: expected alarms 0.1 at most; and the martingale never sinks below the
    stake not placed yet, ln2/ln(t+2) (so drift that starts late is not buried under old losses)."""
    alarms, finals = 0, []
    for seed in range(10):
        test, rng = _gaussian_test(seed)
        top, raised = _run(test, rng.normal(size=20_000), batch=64)
        alarms += raised
        assert top < 2.0, f"seed {seed}: log10 of the martingale reached {top:.2f}"
        floor = math.log10(math.log(2) / math.log(test.images + 2))
        assert test.log10 >= floor - 1e-9
        finals.append(test.log10)
    assert alarms == 0
    assert max(finals) < 0.5  # no evidence piles up on unchanged images


def test_p_values_are_uniform_with_ties_and_three_calibration_scores() -> None:
    """Smoothed online p-values: exactly uniform under exchangeability, however coarse the scores
    (here 5 distinct values) and however small the calibration set."""
    rng = np.random.default_rng(3)
    draw = lambda n: rng.choice([0.1, 0.2, 0.3, 0.4, 0.5], size=n)  # noqa: E731
    test = DriftTest(draw(3), 10.0, model_id="m", rng=np.random.default_rng(4))
    ps = np.concatenate([test.update(draw(32)).p_values for _ in range(200)])
    assert ps.size == 6400 and 0 < ps.min() and ps.max() <= 1
    assert stats.kstest(ps, "uniform").pvalue > 0.001
    assert abs(ps.mean() - 0.5) < 0.02


def test_scores_drifting_up_after_a_long_healthy_stretch_alarm_within_a_few_hundred_images() -> None:
    """20,000 healthy images, then the mean creeps up by 1.5 sd over 1,000 images (a lamp that
    dims): the alarm comes within 600 drifting images, and each step's alarm says where."""
    delays = []
    for seed in range(3):
        test, rng = _gaussian_test(seed)
        _run(test, rng.normal(size=20_000), batch=64)
        assert not test.alarmed
        ramp = rng.normal(size=3000) + np.minimum(np.arange(3000) / 1000, 1.0) * 1.5
        start = test.images
        for i in range(0, 3000, 8):
            s = test.update(ramp[i:i + 8])
            if s.alarm is not None:
                assert s.alarm.log10 >= 2.0 and s.alarm.images > start and s.alarm.direction == "higher"
                assert not np.isnan(s.p_values[s.alarm.index])
                delays.append(i + s.alarm.index + 1)
                break
        else:
            pytest.fail(f"seed {seed}: no alarm within 3,000 drifting images")
    assert max(delays) < 600, delays


def test_scores_drifting_down_alarm_too() -> None:
    """A blurring lens lowers the scores on the casting photos (bench/results/drift.md): the
    images look "more normal" than the calibration ones, and the detector sees less. Half of every
    stake bets on that side."""
    test, rng = _gaussian_test(11)
    _run(test, rng.normal(size=5000), batch=64)
    x = rng.normal(size=3000) - np.minimum(np.arange(3000) / 1000, 1.0) * 1.5
    for i in range(0, 3000, 8):
        s = test.update(x[i:i + 8])
        if s.alarm is not None:
            assert s.alarm.direction == "lower" and i < 800
            break
    else:
        pytest.fail("no alarm on scores drifting down")


def test_an_alarm_is_raised_once_per_reset() -> None:
    test, rng = _gaussian_test(7)
    s = test.update(rng.normal(size=16) + 10.0)  # all above the threshold: alerted, not tested
    assert np.isnan(s.p_values).all() and test.images == 0
    for _ in range(2):
        # at the threshold: judged normal, and higher than every calibration score below it
        top, alarms = _run(test, np.full(320, test.threshold), batch=8)
        assert alarms == 1 and test.alarmed and top >= 2
        test.reset("operator")
        assert (test.log10, test.images, test.alarmed, test.reset_reason) == (0.0, 0, False, "operator")


def test_anomalous_and_non_finite_scores_are_not_tested() -> None:
    test = DriftTest([0.1, 0.2, 0.3, 0.4], 0.4, model_id="m", rng=np.random.default_rng(0))
    assert test.reference_size == 3  # the threshold itself is left out
    s = test.update([0.45, np.inf, np.nan, 0.05, 0.4])
    assert np.isnan(s.p_values[:3]).all() and not np.isnan(s.p_values[3:]).any()
    assert test.images == 2 and sum(n for _, n in test.added()) == 2


def test_a_step_changes_nothing_until_applied() -> None:
    test, rng = _gaussian_test(1)
    test.update(rng.normal(size=100))
    before = (test.log10, test.images, test.state_json(), test.added())
    s = test.step(rng.normal(size=16) + 1)
    assert (test.log10, test.images, test.state_json(), test.added()) == before
    assert test.state(after=s)["images"] == s.images > test.images
    test.apply(s)
    assert test.images == s.images and test.log10 == s.log10


def test_state_round_trip_and_refusals() -> None:
    test, rng = _gaussian_test(2)
    test.update(rng.normal(size=300) + 0.5)
    again, _ = _gaussian_test(2)
    assert again.restore(test.state_json(), test.added()) is None
    assert (again.log10, again.images, again.alarmed) == (test.log10, test.images, test.alarmed)
    x = rng.normal(size=40)
    again._rng, test._rng = np.random.default_rng(9), np.random.default_rng(9)
    assert np.array_equal(again.update(x).p_values, test.update(x).p_values, equal_nan=True)
    other = DriftTest([0.0, 1.0], 2.0, model_id="another")
    assert other.restore(test.state_json(), test.added())[0] == "model"
    assert again.restore("{not json", [])[0] == "unreadable"
    assert log10_martingale(NOTHING_PLACED, 0) == 0.0  # M_0 = 1


def test_the_ledger_keeps_the_drift_state_with_the_batch(tmp_path: Path) -> None:
    """An additive table: a ledger gets it at open; state, bag and alarm go in record()'s
    transaction, and a reset empties the bag."""
    from anomon.ledger import DriftAlarm, DriftRecord, Verdict

    led = Ledger.open(tmp_path / "ledger.sqlite3")
    assert led.drift("") is None
    v = Verdict(path="/x/a.png", verdict="normal", arrived_at=1.0, scored_at=2.0, size=1, mtime_ns=1,
                sha256="ab", score=0.1, p_value=0.5, threshold=1.0)
    alarm = DriftAlarm(line="default", raised_at=2.0, model_id="m", log10_martingale=2.1, alpha=0.01,
                       images=30, reset_at=1.0, at=v)
    led.record([v], drift=DriftRecord("", '{"x": 1}', added=[(5, 1), (7, 2)], alarm=alarm))
    led.record([], drift=DriftRecord("", '{"x": 2}', added=[(5, 3)]))
    assert led.drift("") == ('{"x": 2}', [(5, 4), (7, 2)])
    assert alarm.alarm_id == 1
    led.write_drift(DriftRecord("", '{"x": 3}', reset=True))
    assert led.drift("") == ('{"x": 3}', [])
    led.close()
    conn = open_readonly(tmp_path / "ledger.sqlite3")
    (row,) = conn.execute("SELECT * FROM drift_alarms").fetchall()
    assert row["image_id"] == v.image_id and row["log10_martingale"] == 2.1 and row["images"] == 30
    conn.close()
    Ledger.open(tmp_path / "ledger.sqlite3").close()  # opened again: the tables are kept as they are


# -------------------------------------------------------------------------- the real daemon


def _brighter(a: np.ndarray, by: int) -> np.ndarray:
    return np.clip(a.astype(np.int16) + by, 0, 255).astype(np.uint8)


def _write(folder: Path, arrays: list[np.ndarray], prefix: str, n: int,
           change: Any = lambda a: a) -> list[Path]:
    """n PNGs cycling through `arrays` (changed by `change`), each with its own bytes."""
    return [write_png(folder / f"{prefix}_{i:04d}.png", change(arrays[i % len(arrays)]), tag=f"{prefix}-{i}")
            for i in range(n)]


def _normal_rows(d: Daemon) -> int:
    return sum(1 for r in d.table() if r["verdict"] == "normal")


@pytest.fixture(scope="module")
def drift_model(tiny_model: TinyModel,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """The tiny model calibrated on half of its clearly normal images, plus one score of 10 that
    puts the threshold far above them, and the other half to feed. The tiny bundle's own 4
    calibration images were held out of training and score higher than the training images the
    tests reuse as normals; the drift test would rightly call those "lower than calibration". Here
    the fed images are exchangeable with the calibration ones, and a grey level brighter stays
    under the threshold."""
    from PIL import Image

    from anomon.detector import Detector

    det = Detector.load(tiny_model.path, device="cpu")
    arrays = tiny_model.normals
    scores = det.score_samples(np.stack([det.preprocess(Image.fromarray(a)) for a in arrays]))
    det.calibrate(np.r_[scores[::2], 10.0])
    assert det.threshold_ == 10.0
    out = tmp_path_factory.mktemp("drift") / "drift.anomon"
    det.save(out)
    return out, arrays[1::2]


@pytest.mark.e2e
def test_images_drifting_brighter_raise_a_drift_alarm_kept_across_a_kill_9_and_reset_by_sigusr1(
        daemon_factory, drift_model: tuple[Path, list[np.ndarray]]) -> None:
    model, normals = drift_model
    d: Daemon = daemon_factory(model, "drift")
    d.start()
    assert d.metric(LOG10) == 0.0 and d.metric(IMAGES) == 0
    assert d.metric('anomon_drift_resets_total{reason="operator"}') == 0

    # 60 normal images: the evidence stays low
    _write(d.watch, normals, "same", 60)
    d.wait_for(lambda: len(d.table()) >= 60, 60, "60 rows")
    d.wait_for(lambda: d.metric(IMAGES) == _normal_rows(d) == 60, 10, "the drift test to catch up")
    assert d.metric(LOG10) < 1.0 and d.metric(ALARMS) == 0
    assert d.metric("anomon_p_value_count") == 60

    # the lamp brightens by one grey level out of 255: every score rises, none crosses the threshold
    brighter = _write(d.watch, normals, "bright", 150, change=lambda a: _brighter(a, 1))
    d.wait_for(lambda: d.metric(ALARMS) == 1, 90, "the drift alarm")
    rows = d.table()
    bright_rows = [r for r in rows if "/bright_" in r["path"]]
    assert all(r["verdict"] == "normal" for r in rows)  # not a threshold story
    (alarm,) = d.table("drift_alarms")
    assert alarm["log10_martingale"] >= 2.0 and alarm["alpha"] == 0.01 and alarm["line"] == "default"
    assert alarm["direction"] == "higher"
    at = next(r for r in rows if r["id"] == alarm["image_id"])
    assert "/bright_" in at["path"]
    shifted_before = sum(1 for r in bright_rows if r["id"] <= at["id"])
    assert shifted_before <= 40, f"alarm after {shifted_before} brighter images"
    assert any(line.get("level") == "warning" and line.get("msg", "").startswith("DRIFT")
               and "higher" in line["msg"] for line in d.log_lines())
    # exported like the anomaly alerts: a line of kind "drift" in alerts.jsonl
    exported = lambda: [json.loads(x) for x in (d.state / "alerts.jsonl").read_text().splitlines()]  # noqa: E731
    d.wait_for(lambda: (d.state / "alerts.jsonl").exists() and any(a["kind"] == "drift" for a in exported()),
               10, "the drift alarm in alerts.jsonl")
    (line,) = [a for a in exported() if a["kind"] == "drift"]
    assert line["drift_alarm_id"] == alarm["id"] and line["direction"] == "higher" and line["line"] == "default"

    # kill -9 while brighter images are still being scored; the restart resumes the evidence,
    # and every normal verdict is bet on exactly once (state and verdicts share a transaction)
    d.wait_for(lambda: len(d.table()) >= 60 + 100, 60, "most of the brighter images")
    d.kill9()
    d.start()
    d.wait_for(lambda: len(d.table()) == 60 + len(brighter), 60, "all rows after the restart")
    d.wait_for(lambda: d.metric(IMAGES) == _normal_rows(d) == 60 + len(brighter), 10,
               "the drift test to catch up")
    value = d.metric(LOG10)
    assert value >= 2.0 and d.metric(ALARMS) == 0  # resumed, and not alarmed a second time
    assert len(d.table("drift_alarms")) == 1
    assert d.stop() == 0
    d.start()
    assert d.metric(LOG10) == pytest.approx(value, abs=1e-12)  # a plain restart keeps it exactly

    # the operator fixed the lamp: SIGUSR1 starts the evidence again
    d.signal(signal.SIGUSR1)
    d.wait_for(lambda: d.metric('anomon_drift_resets_total{reason="operator"}') == 1, 10, "the reset")
    assert d.metric(LOG10) == 0.0 and d.metric(IMAGES) == 0
    assert d.get("/readyz").status == 200
    assert d.stop() == 0
    d.start()
    assert d.metric(LOG10) == 0.0 and d.metric(IMAGES) == 0  # the reset is kept too
    assert d.stop() == 0


@pytest.mark.e2e
def test_a_new_model_starts_the_drift_test_again(daemon_factory, tiny_model: TinyModel, tiny_bundle_b: Path,
                                                 tmp_path: Path) -> None:
    model = tmp_path / "model.anomon"
    shutil.copy(tiny_model.path, model)
    d: Daemon = daemon_factory(model, "drift_model")
    d.start()
    _write(d.watch, tiny_model.normals, "same", 30)
    d.wait_for(lambda: d.metric(IMAGES) == 30, 60, "30 images tested")
    tmp = model.with_suffix(".new")
    shutil.copy(tiny_bundle_b, tmp)
    os.replace(tmp, model)
    d.wait_for(lambda: d.metric('anomon_drift_resets_total{reason="model"}') == 1, 15, "the reset")
    assert d.metric(IMAGES) == 0 and d.metric(LOG10) == 0.0
    assert d.stop() == 0
    # back to model a while the daemon is down: the stored test was kept for b, so it starts again
    shutil.copy(tiny_model.path, model)
    d.start()
    assert d.metric('anomon_drift_resets_total{reason="model"}') == 1 and d.metric(IMAGES) == 0
    assert d.stop() == 0


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5])
def test_drift_alpha_outside_0_1_is_refused_by_name(alpha: float, tmp_path: Path) -> None:
    from anomon.config import load_watch_config
    from anomon.errors import ConfigError

    with pytest.raises(ConfigError, match="drift_alpha"):
        load_watch_config(None, {"model": "m", "watch": [str(tmp_path)], "drift_alpha": alpha})
    assert load_watch_config(None, {"model": "m", "watch": [str(tmp_path)]}).drift_alpha == 0.01
