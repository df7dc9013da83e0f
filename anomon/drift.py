"""Drift: are the images judged normal still like the calibration images?

The threshold judges one image at a time. A slow failure (a lamp that dims, a lens that gets
dirty, a camera knocked a little) raises every score a bit, and no single image crosses the
threshold. `DriftTest` tests, after every image, the hypothesis "the images judged normal are
exchangeable with the calibration images" with a conformal test martingale (Vovk, Nouretdinov,
Gammerman, "Testing exchangeability on-line", ICML 2003; Vovk, "Testing randomness online",
Statistical Science 36(4), 2021): each image gives a p-value, a betting strategy stakes its capital
M on it (M starts at 1), and under the hypothesis M is a nonnegative martingale. By Ville's
inequality P(M ever reaches 1/alpha) <= alpha, however long the line runs and however often M is
looked at: a drift alarm (M >= 1/alpha) is false with probability at most alpha per reset.

Three choices, and why:

1. The p-values are online conformal p-values, not the verdicts' p-values. A verdict's p-value
   compares the image with the same n calibration scores every time; given those n scores,
   successive p-values are not independent uniforms but draws from one fixed distribution, off
   uniform by about 0.3/sqrt(n) in its mean. A martingale betting on them drifts up for ever
   whenever the calibration set happened to score a little low: with n = 50 Gaussian scores,
   1 run in 20 crossed 100 within 20,000 images (Ville allows 1 in 100), one of them to 10^14
   (bench/results/drift.md measures it on real photos). So each image is ranked among the
   calibration scores AND every image tested since the last reset (the inductive conformal
   martingale of Volkhonskiy, Burnaev, Nouretdinov, Gammerman, Vovk, COPA 2017):

       p_t = (#{bag > s_t} + tau_t * #{bag == s_t}) / |bag|,  bag including s_t,  tau_t ~ U(0, 1)

   Under exchangeability these are independent and exactly uniform (the smoothed conformal
   p-value; Vovk, Gammerman, Shafer, "Algorithmic Learning in a Random World", 2005), whatever
   the calibration set's size. Without tau the p-values sit on a grid of 1/|bag| and are
   conservative; with a small calibration set (the tiny test model has 3 scores below its
   threshold) the grid is coarse and every image would lose a little, so tau is drawn: a small
   calibration set then costs power for the first images only, never validity.
   The bag grows with every image, so scores are kept rounded to 10 significant bits (about
   3 decimal digits; `score_keys`): a fixed rounding, so the ties it makes are broken by tau and
   the p-values stay exactly uniform, and the bag is a histogram of ~1,000 bins per doubling of
   the score range instead of a list of every score.

2. Only images judged normal are tested, against the calibration scores below the threshold.
   Anomalous images are alerted one by one; counting them would make a steady scrap rate (1 % bad
   parts every day) read as drift, and a consistent test alarms on it sooner or later. Given the
   threshold, the calibration scores below it and the production scores at or below it are
   draws from the same truncated distribution, so the guarantee is exact. A change that pushes
   most images over the threshold is the anomaly-rate alert's (AnomonAnomalyRateHigh) to see.

3. The bet is f(p) = 1.5 - p (the betting function 1 + eps (p - 1/2) of Vovk's Simple Jumper
   with eps = -1): it stakes on small p-values, i.e. on images scoring higher than the ones
   before, and can at most multiply a stake by 1.5 per image (an alarm at alpha = 0.01 takes 12
   images at least). One stake is started at every image and they are mixed (the mixture over
   change points of the e-detectors of Shin, Ramdas, Rinaldo, NEJSDS 2024, with weights that sum
   to one so that Ville's inequality still holds):

       M_t = ln2 / ln(t + 2) + sum_{s <= t} w_s prod_{u = s..t} f(p_u),
       w_s = ln2 (1 / ln(s + 1) - 1 / ln(s + 2))   (sum over all s: 1)

   The first term is the stake not placed yet. Given the past, E f(p_t) = 1 under the
   hypothesis, so E[M_t | past] = M_{t-1}: a test martingale, M_0 = 1. The point of the mixture:
   drift starts after months of a good line. A single bet started at the reset, or the Simple
   Jumper (tried: J = 0.01), has lost nearly all of its capital by then (the jumper about 0.0027
   nats per healthy image, 10^-22 after 20,000 images) and must win it all back first; here the
   stake started as the drift begins weighs w_s ~ 0.7 / (s ln(s)^2), 10^-7 at s = 20,000 and
   10^-8.4 at a million, so the delay grows only with the log of the healthy history, and under
   the hypothesis the gauge stays near log10(ln2 / ln(t + 2)) (-1.15 after 20,000 images)
   instead of sinking for ever. On synthetic Gaussian scores (50 calibration scores, threshold
   at 5 %), a mean ramping to +1.5 sd over 1,000 images after 20,000 healthy ones alarmed after
   310-410 images here and 720-830 with the jumper; a +0.5 sd step after 110-200 here and
   750-1,000 with the jumper; mixing bets eps in {-1, -1/2, -1/4} was no faster.

State is per line (`line`; today one model is one line, ""): the ledger keeps it in the same
transaction as the verdicts it has seen (anomon.ledger `DriftRecord`), so a restart resumes the
evidence and a crash neither loses nor counts twice an image's bet. It starts again from the
calibration scores when a new model serves (its calibration is another reference) and on the
operator's reset.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomon.calibrate import exceeds

# The bet f(p) = 1 + EPSILON (p - 1/2) = 1.5 - p. Stored with the state (METHOD): a state kept by
# another method is not resumed but reset.
EPSILON = -1.0
METHOD = "start-mixture ln2/ln; bet 1.5-p; online smoothed p-values; 10-bit score keys"
_LN2 = math.log(2.0)
_LN10 = math.log(10.0)
# float64 has 52 mantissa bits; dropping 42 keeps 10 (a relative rounding of at most 2^-10).
_DROPPED_BITS = 42
_MAGNITUDE = np.int64(0x7FFF_FFFF_FFFF_FFFF)


def _log_weight(s: int) -> float:
    """ln w_s, the stake of the bet started at image s (1, 2, ...): ln2 (1/ln(s+1) - 1/ln(s+2))."""
    a, b = math.log(s + 1.0), math.log(s + 2.0)
    return math.log(_LN2 * math.log1p(1.0 / (s + 1.0)) / (a * b))  # b - a, without cancellation


def _log_unplaced(t: int) -> float:
    """ln of the stake not placed after t images: ln2 / ln(t + 2) (1 at t = 0)."""
    return math.log(_LN2 / math.log(t + 2.0))


def log10_martingale(log_placed: float, images: int) -> float:
    """log10 M from ln of the placed stakes' capital and the images tested."""
    return float(np.logaddexp(_log_unplaced(images), log_placed)) / _LN10


def bet(log_placed: float, image: int, p: float) -> float:
    """ln of the placed stakes' capital after image number `image` (1, 2, ...) with p-value `p`:
    its new stake joins the ones placed, and all bet, A_t = (A_t-1 + w_t) f(p_t)."""
    return float(np.logaddexp(log_placed, _log_weight(image))) + math.log1p(EPSILON * (p - 0.5))


def martingale_path(p_values: Any) -> np.ndarray:
    """log10 M after each of a sequence of p-values, from M_0 = 1: the same bet as DriftTest's,
    for any p-values (the bench runs it on the verdicts' own p-values to show why not those)."""
    out = np.empty(len(p_values))
    log_placed = -math.inf
    for t, p in enumerate(p_values, 1):
        log_placed = bet(log_placed, t, float(p))
        out[t - 1] = log10_martingale(log_placed, t)
    return out


def score_keys(scores: Any) -> np.ndarray:
    """Scores as int64 keys that keep their order, rounded down to 10 significant bits: a fixed,
    monotone function of the score, so ranking keys ranks scores (ties broken by the p-value's tau)."""
    bits = np.asarray(scores, dtype=np.float64).view(np.int64)
    ordered = np.where(bits < 0, -(bits & _MAGNITUDE), bits)  # negative floats: larger = closer to 0
    return ordered >> _DROPPED_BITS


@dataclass(frozen=True)
class Alarm:
    """The martingale reached 1/alpha for the first time since its reset."""

    log10: float
    images: int  # images tested since the reset, this one included
    index: int  # position of the image in the scores handed to `step`


@dataclass(frozen=True)
class Step:
    """What one batch of scores does to the test, computed without changing it (`DriftTest.step`):
    recorded in the ledger with the batch's verdicts, then applied (`DriftTest.apply`), so a batch
    that is never recorded never moves the martingale."""

    p_values: np.ndarray  # per score; NaN where the image was not tested (anomalous, not finite)
    log_placed: float  # ln of the capital of the stakes placed so far (-inf before the first)
    log10: float
    images: int
    added: dict[int, int]  # score key -> images added to the bag
    alarm: Alarm | None


class DriftTest:
    """One line's test of "the images judged normal are exchangeable with the calibration images".

    `log10` is log10 of the martingale M (0 at a reset; >= log10(1/alpha) is an alarm); `images`
    counts the images tested since the reset. Use from one thread.
    """

    def __init__(self, calibration_scores: Any, threshold: float, *, model_id: str,
                 alpha: float = 0.01, line: str = "", rng: np.random.Generator | None = None) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
        cal = np.asarray(calibration_scores, dtype=np.float64).ravel()
        # Strictly below: the threshold is itself a calibration score, always the largest one a
        # normal verdict can be compared with; leaving it in would make the p-values conservative.
        below = cal[np.isfinite(cal) & (cal < threshold)]
        self._reference = np.sort(score_keys(below))
        self.threshold = float(threshold)
        self.model_id = model_id
        self.alpha = alpha
        self.line = line
        self._rng = rng if rng is not None else np.random.default_rng()
        self.reset("start")

    @classmethod
    def for_detector(cls, det: Any, **kwargs: Any) -> DriftTest:
        """The test against a loaded Detector's calibration scores and threshold."""
        return cls(np.asarray(det.calibration_scores_, dtype=np.float64), det.threshold_,
                   model_id=det.model_id, **kwargs)

    @property
    def alarm_log10(self) -> float:
        """log10(1/alpha): the martingale's alarm level on the log10 scale."""
        return -math.log10(self.alpha)

    @property
    def reference_size(self) -> int:
        return int(self._reference.size)

    # -- evidence ------------------------------------------------------------------------------

    def reset(self, reason: str, at: float | None = None) -> None:
        """Back to M = 1 and a bag of the calibration scores only."""
        self._keys, self._counts = _histogram(self._reference, np.ones(self._reference.size, np.int64))
        self._cumulative = np.cumsum(self._counts)
        self.log_placed = -math.inf
        self.log10 = 0.0
        self.images = 0
        self.alarmed = False
        self.reset_at = time.time() if at is None else at
        self.reset_reason = reason

    def step(self, scores: Any) -> Step:
        """The p-values and the martingale after `scores` (one batch, in verdict order). Scores above
        the threshold (anomalous verdicts) and non-finite ones are not tested. Changes nothing."""
        x = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        tested = np.isfinite(x) & ~exceeds(x, self.threshold)
        p_values = np.full(x.shape, np.nan)
        keys = score_keys(x)
        log_placed, log10, images = self.log_placed, self.log10, self.images
        total = int(self._cumulative[-1]) if self._cumulative.size else 0
        added: dict[int, int] = {}
        alarm: Alarm | None = None
        earlier: list[int] = []
        for i in np.flatnonzero(tested):
            k = int(keys[i])
            lo, hi = np.searchsorted(self._keys, k, "left"), np.searchsorted(self._keys, k, "right")
            at_or_below = int(self._cumulative[hi - 1]) if hi else 0
            greater = total - at_or_below + sum(e > k for e in earlier)
            equal = (int(self._counts[lo]) if lo < hi else 0) + sum(e == k for e in earlier) + 1
            earlier.append(k)
            p = (greater + self._rng.random() * equal) / (total + len(earlier))
            p_values[i] = p
            images += 1
            log_placed = bet(log_placed, images, p)
            log10 = log10_martingale(log_placed, images)
            added[k] = added.get(k, 0) + 1
            if alarm is None and not self.alarmed and log10 >= self.alarm_log10:
                alarm = Alarm(log10, images, int(i))
        return Step(p_values, log_placed, log10, images, added, alarm)

    def apply(self, step: Step) -> None:
        """Take a step (after the ledger recorded it)."""
        if step.added:
            keys = np.fromiter(step.added, dtype=np.int64, count=len(step.added))
            counts = np.fromiter(step.added.values(), dtype=np.int64, count=len(step.added))
            self._keys, self._counts = _histogram(np.r_[self._keys, keys], np.r_[self._counts, counts])
            self._cumulative = np.cumsum(self._counts)
        self.log_placed, self.log10, self.images = step.log_placed, step.log10, step.images
        self.alarmed = self.alarmed or step.alarm is not None

    def update(self, scores: Any) -> Step:
        """`step` then `apply`: for callers with nothing to record in between (tests, the bench)."""
        s = self.step(scores)
        self.apply(s)
        return s

    # -- persistence ---------------------------------------------------------------------------

    def state(self, after: Step | None = None) -> dict[str, Any]:
        """The martingale's state (as it will be `after` a step, if given), JSON-ready; the bag's
        additions are stored beside it."""
        placed, log10, images, alarmed = ((self.log_placed, self.log10, self.images, self.alarmed)
                                          if after is None else (after.log_placed, after.log10, after.images,
                                                                 self.alarmed or after.alarm is not None))
        return {"method": METHOD, "model_id": self.model_id,
                "log_placed": placed if math.isfinite(placed) else None, "log10": log10,
                "images": images, "alarmed": alarmed, "reset_at": self.reset_at,
                "reset_reason": self.reset_reason}

    def state_json(self, after: Step | None = None) -> str:
        return json.dumps(self.state(after))

    def added(self) -> list[tuple[int, int]]:
        """The bag minus the calibration scores: (score key, images) pairs, as the ledger keeps them."""
        ref_keys, ref_counts = _histogram(self._reference, np.ones(self._reference.size, np.int64))
        extra = dict(zip(self._keys.tolist(), self._counts.tolist()))
        for k, n in zip(ref_keys.tolist(), ref_counts.tolist()):
            extra[k] -= n
        return [(k, n) for k, n in extra.items() if n]

    def restore(self, state_json: str, added: Iterable[tuple[int, int]]) -> tuple[str, str] | None:
        """Resume from a stored state. None when resumed; else (why, message), why being "model"
        (kept for another model), "method" or "unreadable"; the test is then left as it was."""
        try:
            st = json.loads(state_json)
            if st.get("model_id") != self.model_id:
                return "model", f"it was kept for model {st.get('model_id')}, and {self.model_id} serves now"
            if st.get("method") != METHOD:
                return "method", f"it was kept by another method ({st.get('method')!r})"
            placed = st["log_placed"]
            log_placed = -math.inf if placed is None else float(placed)
            images = int(st["images"])
            if images < 0 or math.isnan(log_placed) or log_placed == math.inf:
                raise ValueError("out of range")
            pairs = [(int(k), int(n)) for k, n in added]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return "unreadable", f"its stored state cannot be read ({type(e).__name__}: {e})"
        keys = np.array([k for k, _ in pairs], dtype=np.int64)
        counts = np.array([n for _, n in pairs], dtype=np.int64)
        self._keys, self._counts = _histogram(np.r_[self._reference, keys],
                                              np.r_[np.ones(self._reference.size, np.int64), counts])
        self._cumulative = np.cumsum(self._counts)
        self.log_placed, self.images = log_placed, images
        self.log10 = log10_martingale(log_placed, images)
        self.alarmed = bool(st.get("alarmed", False))
        self.reset_at = float(st.get("reset_at", time.time()))
        self.reset_reason = str(st.get("reset_reason", "start"))
        return None


def _histogram(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the summed counts of each."""
    if keys.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq.astype(np.int64), np.bincount(inverse, weights=counts).astype(np.int64)


__all__ = ["Alarm", "DriftTest", "Step", "bet", "log10_martingale", "martingale_path", "score_keys"]
