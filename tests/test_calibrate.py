"""The conformal threshold keeps its false-alarm promise; p-values mean what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomon.calibrate import CalibrationError, ConformalThreshold, evaluate, min_images_for, p_values


def test_threshold_is_the_conformal_order_statistic() -> None:
    scores = np.arange(1, 100, dtype=float)  # n = 99
    cal = ConformalThreshold(target_fpr=0.05).fit(scores[::-1])
    k = math.ceil(100 * 0.95)  # 95
    assert cal.threshold_ == 95.0 == scores[k - 1]
    assert cal.guaranteed_
    assert cal.expected_fpr_ == pytest.approx(5 / 100)


def test_too_few_images_is_flagged_not_hidden() -> None:
    cal = ConformalThreshold(target_fpr=0.05).fit(np.arange(10.0))
    assert not cal.guaranteed_ and cal.threshold_ == 9.0
    assert min_images_for(0.05) == 19
    assert ConformalThreshold(target_fpr=0.05).fit(np.arange(19.0)).guaranteed_


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
def test_realised_false_alarm_rate_stays_near_target(dist: str) -> None:
    rng = np.random.default_rng(1)
    draw = (lambda n: rng.normal(size=n)) if dist == "normal" else (lambda n: rng.lognormal(size=n))
    rates = []
    for _ in range(300):
        t = ConformalThreshold(target_fpr=0.05).fit(draw(200)).threshold_
        rates.append(np.mean(draw(2000) > t))
    mean = float(np.mean(rates))
    # The guarantee: E[FPR] <= target; conformal is tight, so it is also close to it.
    assert 0.040 <= mean <= 0.0505, mean


def test_p_values() -> None:
    cal = np.sort(np.arange(1.0, 20.0))  # 19 scores
    p = p_values(cal, np.array([0.0, 10.0, 19.0, 100.0]))
    assert p[0] == 1.0  # below everything
    assert p[1] == pytest.approx((1 + 10) / 20)
    assert p[2] == pytest.approx(2 / 20)
    assert p[3] == pytest.approx(1 / 20)  # never 0: at most as extreme as one in n + 1
    assert np.all(np.diff(p) <= 0)


def test_bad_calibration_input() -> None:
    with pytest.raises(CalibrationError):
        ConformalThreshold().fit(np.array([]))
    with pytest.raises(CalibrationError):
        ConformalThreshold().fit(np.array([1.0, np.nan]))
    with pytest.raises(CalibrationError):
        ConformalThreshold(target_fpr=1.5).fit(np.arange(5.0))


def test_evaluate_reports_operating_point() -> None:
    ev = evaluate(np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.8, 1.0, 2.0]), threshold=0.85)
    assert ev.false_alarm_rate == 0.25 and ev.detection_rate == pytest.approx(2 / 3)
    assert 0.5 < ev.auroc < 1.0
    with pytest.raises(CalibrationError):
        evaluate(np.array([1.0]), np.array([]), 0.5)
