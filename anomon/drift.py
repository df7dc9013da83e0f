"""Drift: are the images judged normal still like the calibration images?

The threshold judges one image at a time. A slow failure (a lamp that dims, a lens that gets
dirty, a camera knocked a little) moves every score a bit, and no single image crosses the
threshold. `DriftTest` tests, after every image, the hypothesis "the images judged normal are
exchangeable with the calibration images" with a conformal test martingale (Vovk, Nouretdinov,
Gammerman, "Testing exchangeability on-line", ICML 2003; Vovk, "Testing randomness online",
Statistical Science 36(4), 2021): each image gives a p-value, a betting strategy stakes its capital
M on it (M starts at 1), and under the hypothesis M is a nonnegative martingale. By Ville's
inequality P(M ever reaches 1/alpha) <= alpha, however long the line runs and however often M is
looked at: a drift alarm (M >= 1/alpha) is false with probability at most alpha per reset.
bench/drift.py measures it (bench/results/drift.md); the synthetic figures below are its.

Four choices, and why:

1. The p-values are online conformal p-values, not the verdicts' p-values. A verdict's p-value
   compares the image with the same n calibration scores every time; given those n scores,
   successive p-values are not independent uniforms but draws from one fixed distribution, off
   uniform by about 0.3/sqrt(n) in its mean, and a martingale betting on them grows for ever
   whenever that distribution leans one way: with n = 50 Gaussian calibration scores, this
   module's bets on the verdicts' p-values crossed 100 within 20,000 unchanged images in 54 runs
   of 100 (Ville allows 1). So each image is ranked among the calibration scores AND every image
   tested since the last reset (the inductive conformal martingale of Volkhonskiy, Burnaev,
   Nouretdinov, Gammerman, Vovk, COPA 2017):

       p_t = (#{bag > s_t} + tau_t * #{bag == s_t}) / |bag|,  bag including s_t,  tau_t ~ U(0, 1)

   Under exchangeability these are independent and exactly uniform (the smoothed conformal
   p-value; Vovk, Gammerman, Shafer, "Algorithmic Learning in a Random World", 2005), whatever
   the calibration set's size (0 of those 100 runs crossed 100). Without tau the p-values sit on a
   grid of 1/|bag| and are conservative: with a small calibration set (the tiny test model has 3
   scores below its threshold) the grid is coarse and the first images would cost evidence in
   whichever direction the rounding goes, so tau is drawn; a small calibration set then costs
   power for the first images only, never validity. The price of ranking against past images:
   a change already there at the reset is compared with the calibration images alone, so a mild
   one may never be seen (a +0.5 sd step from the first image: 5 runs of 6 never alarmed) -
   reset after fixing the cause, or recalibrate. The bag grows with every image, so scores are
   kept rounded to 10 significant bits (about 3 decimal digits; `score_keys`): a fixed rounding,
   so the ties it makes are broken by tau and the p-values stay exactly uniform, and the bag is a
   histogram of at most ~1,000 bins per doubling of the score range, not a list of every score.

2. Only images judged normal are tested, against the calibration scores below the threshold.
   Anomalous images are alerted one by one; counting them would make a steady scrap rate (1 % bad
   parts every day) read as drift, and a consistent test alarms on it sooner or later. Given the
   threshold, the calibration scores below it and the production scores at or below it are
   draws from the same truncated distribution, so the guarantee is exact. A change that pushes
   most images over the threshold is the anomaly-rate alert's (AnomonAnomalyRateHigh) to see.

3. Both directions. Half of every stake bets f(p) = 1.5 - p (on small p-values: images scoring
   higher than before), half f(p) = 0.5 + p (on large ones: lower than before); these are the
   betting functions 1 + eps (p - 1/2), eps = -1 and +1, of Vovk's Simple Jumper. Higher is the
   drift one expects, but on the real photos a dimming lamp raised the casting photos' scores and
   LOWERED KolektorSDD's, and a blurring lens lowered both: the autoencoder rebuilds a darker or
   blurred photo better and sees fewer edges, so the images look "more normal" while the detector
   goes blind to the cracks it was trained to see. A bet on small p-values only would have missed
   three of these four changes. Each image multiplies a bet by at most 1.5, so an alarm at
   alpha = 0.01 takes at least 15 images.

4. One stake is started at every image, and the stakes are mixed with weights that sum to one
   (the mixture over change points of the e-detectors of Shin, Ramdas, Rinaldo, NEJSDS 2024,
   which sum them unweighted and bound the mean time to a false alarm instead):

       M_t = ln2 / ln(t + 2) + sum_{s <= t} w_s (prod_{u=s..t} f_down(p_u) + prod_{u=s..t} f_up(p_u)) / 2,
       w_s = ln2 (1 / ln(s + 1) - 1 / ln(s + 2))   (sum over all s: 1)

   The first term is the stake not placed yet. Given the past, E f(p_t) = 1 under the
   hypothesis, so E[M_t | past] = M_{t-1}: a test martingale, M_0 = 1. Why a mixture: drift
   starts after months of a good line. A bet placed once at the reset, or the Simple Jumper
   (J = 0.01), has lost nearly all of its capital by then (the jumper about 0.004 nats per healthy
   image, 10^-30 to 10^-38 after 20,000) and must win it all back first; here the stake started as the drift
   begins weighs w_s ~ 0.7 / (s ln(s)^2), 10^-6.5 at s = 20,000 and 10^-8.4 at a million, so the
   delay grows with the log of the healthy history only, and on a healthy line the gauge stays
   near log10(ln2 / ln(t + 2)) (-1.15 after 20,000 images) instead of sinking for ever. Images to
   the alarm on Gaussian scores (50 calibration scores, threshold at 5 %, 6 runs), median [range],
   this mixture vs the Simple Jumper on the same p-values: a mean ramping up by 1.5 sd over 1,000
   images right after the reset 468 [327-663] vs 471 [287-643]; the same ramp after 20,000 healthy
   images 452 [374-510] vs 985 [922-1187]; a +0.5 sd step after 20,000 healthy images 286
   [179-383] vs 1562 [1253-1966].

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

# Two bets, each given half of every stake: f(p) = 1 + eps (p - 1/2) with eps = -1 (wins on small
# p-values: images scoring higher than before) and eps = +1 (wins on large ones: lower than before).
EPSILONS: tuple[float, float] = (-1.0, 1.0)
DIRECTIONS: tuple[str, str] = ("higher", "lower")  # what the images score, when each bet wins
# Stored with the state: a state kept by another method is not resumed but reset.
METHOD = "start-mixture ln2/ln; bets 1.5-p and 0.5+p; online smoothed p-values; 10-bit score keys"
NOTHING_PLACED: tuple[float, float] = (-math.inf, -math.inf)
_LN2 = math.log(2.0)
_LN10 = math.log(10.0)
# float64 has 52 mantissa bits; dropping 42 keeps 10 (a relative rounding of at most 2^-10).
_DROPPED_BITS = 42
_MAGNITUDE = np.int64(0x7FFF_FFFF_FFFF_FFFF)


def _log_weight(s: int) -> float:
    """ln w_s, the stake placed at image s (1, 2, ...): ln2 (1/ln(s+1) - 1/ln(s+2))."""
    a, b = math.log(s + 1.0), math.log(s + 2.0)
    return math.log(_LN2 * math.log1p(1.0 / (s + 1.0)) / (a * b))  # b - a, without cancellation


def _log_unplaced(t: int) -> float:
    """ln of the stake not placed after t images: ln2 / ln(t + 2) (1 at t = 0)."""
    return math.log(_LN2 / math.log(t + 2.0))


def log10_martingale(placed: tuple[float, float], images: int) -> float:
    """log10 M from ln of each bet's capital (`placed`) after `images` images."""
    return float(np.logaddexp.reduce([_log_unplaced(images), *placed])) / _LN10


def bet(placed: tuple[float, float], image: int, p: float) -> tuple[float, float]:
    """Each bet's capital (ln) after image number `image` (1, 2, ...) with p-value `p`: half of
    the image's stake joins each bet, and both bet, A_t = (A_t-1 + w_t / 2) f(p_t)."""
    half = _log_weight(image) - _LN2
    down, up = (float(np.logaddexp(a, half)) + math.log1p(e * (p - 0.5)) for a, e in zip(placed, EPSILONS))
    return down, up


def direction(placed: tuple[float, float]) -> str:
    """Which way the images have moved ("higher" or "lower" scores), by the bet holding more."""
    return DIRECTIONS[int(placed[1] > placed[0])]


def martingale_path(p_values: Any) -> np.ndarray:
    """log10 M after each of a sequence of p-values, from M_0 = 1: the same bets as DriftTest's,
    for any p-values (the bench runs them on the verdicts' own p-values to show why not those)."""
    out = np.empty(len(p_values))
    placed = NOTHING_PLACED
    for t, p in enumerate(p_values, 1):
        placed = bet(placed, t, float(p))
        out[t - 1] = log10_martingale(placed, t)
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
    direction: str  # "higher" or "lower": what the images score compared with before


@dataclass(frozen=True)
class Step:
    """What one batch of scores does to the test, computed without changing it (`DriftTest.step`):
    recorded in the ledger with the batch's verdicts, then applied (`DriftTest.apply`), so a batch
    that is never recorded never moves the martingale."""

    p_values: np.ndarray  # per score; NaN where the image was not tested (anomalous, not finite)
    placed: tuple[float, float]  # ln of each bet's capital (-inf before the first image)
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
        self.placed = NOTHING_PLACED
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
        placed, log10, images = self.placed, self.log10, self.images
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
            placed = bet(placed, images, p)
            log10 = log10_martingale(placed, images)
            added[k] = added.get(k, 0) + 1
            if alarm is None and not self.alarmed and log10 >= self.alarm_log10:
                alarm = Alarm(log10, images, int(i), direction(placed))
        return Step(p_values, placed, log10, images, added, alarm)

    def apply(self, step: Step) -> None:
        """Take a step (after the ledger recorded it)."""
        if step.added:
            keys = np.fromiter(step.added, dtype=np.int64, count=len(step.added))
            counts = np.fromiter(step.added.values(), dtype=np.int64, count=len(step.added))
            self._keys, self._counts = _histogram(np.r_[self._keys, keys], np.r_[self._counts, counts])
            self._cumulative = np.cumsum(self._counts)
        self.placed, self.log10, self.images = step.placed, step.log10, step.images
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
        placed, log10, images, alarmed = ((self.placed, self.log10, self.images, self.alarmed)
                                          if after is None else (after.placed, after.log10, after.images,
                                                                 self.alarmed or after.alarm is not None))
        return {"method": METHOD, "model_id": self.model_id,
                "placed": [a if math.isfinite(a) else None for a in placed], "log10": log10,
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
            down, up = (-math.inf if a is None else float(a) for a in st["placed"])
            images = int(st["images"])
            if images < 0 or not all(math.isinf(a) and a < 0 or math.isfinite(a) for a in (down, up)):
                raise ValueError("out of range")
            pairs = [(int(k), int(n)) for k, n in added]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return "unreadable", f"its stored state cannot be read ({type(e).__name__}: {e})"
        keys = np.array([k for k, _ in pairs], dtype=np.int64)
        counts = np.array([n for _, n in pairs], dtype=np.int64)
        self._keys, self._counts = _histogram(np.r_[self._reference, keys],
                                              np.r_[np.ones(self._reference.size, np.int64), counts])
        self._cumulative = np.cumsum(self._counts)
        self.placed, self.images = (down, up), images
        self.log10 = log10_martingale(self.placed, images)
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


__all__ = ["DIRECTIONS", "Alarm", "DriftTest", "Step", "bet", "direction", "log10_martingale",
           "martingale_path", "score_keys"]
