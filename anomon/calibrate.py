"""Thresholds from normal images only, with a false-alarm guarantee users can rely on.

The threshold is a *conformal* quantile of held-out normal scores: with n calibration scores and a
target false-alarm rate F, it is the k-th smallest score, k = ceil((n + 1) * (1 - F)). If new normal
images are exchangeable with the calibration images, P(new normal score > threshold) <= F, whatever
the score's distribution. A plain np.quantile gives no such guarantee on small sets.

Each verdict also carries a conformal p-value: (1 + #{calibration scores >= s}) / (n + 1).
Anomalous images are never required; when given, `evaluate` reports how the threshold performs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.utils.validation import check_is_fitted, column_or_1d

from anomon.errors import CalibrationError


class ConformalThreshold(BaseEstimator):
    """Fits `threshold_` on normal scores (higher = more anomalous) at `target_fpr`."""

    def __init__(self, target_fpr: float = 0.05) -> None:
        self.target_fpr = target_fpr

    def fit(self, scores: np.ndarray) -> ConformalThreshold:
        if not 0.0 < self.target_fpr < 1.0:
            raise CalibrationError(f"target false-alarm rate must be between 0 and 1, got {self.target_fpr}")
        s = np.sort(column_or_1d(np.asarray(scores, dtype=np.float64)))
        if s.size == 0:
            raise CalibrationError("no calibration scores")
        if not np.all(np.isfinite(s)):
            raise CalibrationError("calibration scores contain NaN or infinity")
        n = s.size
        k = math.ceil((n + 1) * (1.0 - self.target_fpr))
        # With too few images the guarantee cannot be met; use the largest score and say so
        # through `guaranteed_`, so callers can warn instead of silently promising F.
        self.guaranteed_ = k <= n
        k = min(k, n)
        self.threshold_ = float(s[k - 1])
        self.calibration_scores_ = s
        self.n_calibration_ = n
        # P(new normal > s_(k)) for continuous exchangeable scores.
        self.expected_fpr_ = (n + 1 - k) / (n + 1)
        return self

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "calibration_scores_")
        return p_values(self.calibration_scores_, scores)


def p_values(sorted_calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values: share of calibration scores at or above each score (+1 smoothing)."""
    cal = np.asarray(sorted_calibration, dtype=np.float64)
    s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
    at_or_above = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_or_above) / (cal.size + 1.0)


def exceeds(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The decision rule, stated once: anomalous = score strictly above the threshold. The
    conformal guarantee is P(normal score > threshold) <= F, so a tie with the k-th calibration
    score is normal."""
    return np.asarray(scores, dtype=np.float64) > threshold


def min_images_for(target_fpr: float) -> int:
    """Smallest calibration set for which the conformal guarantee at `target_fpr` holds."""
    return math.ceil(1.0 / target_fpr) - 1


@dataclass(frozen=True)
class Evaluation:
    auroc: float
    average_precision: float
    false_alarm_rate: float
    detection_rate: float
    n_normal: int
    n_anomalous: int
    threshold: float
    roc: tuple[np.ndarray, np.ndarray]


def evaluate(normal_scores: np.ndarray, anomalous_scores: np.ndarray, threshold: float) -> Evaluation:
    """Ranking quality (AUROC, AP) and the operating point at `threshold` (anomalous = score > t)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.asarray(anomalous_scores, dtype=np.float64)
    if normal.size == 0 or anomalous.size == 0:
        raise CalibrationError("evaluation needs at least one normal and one anomalous image")
    y = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
    s = np.r_[normal, anomalous]
    fpr, tpr, _ = roc_curve(y, s)
    return Evaluation(
        auroc=float(roc_auc_score(y, s)),
        average_precision=float(average_precision_score(y, s)),
        false_alarm_rate=float(np.mean(exceeds(normal, threshold))),
        detection_rate=float(np.mean(exceeds(anomalous, threshold))),
        n_normal=int(normal.size),
        n_anomalous=int(anomalous.size),
        threshold=float(threshold),
        roc=(fpr, tpr),
    )
