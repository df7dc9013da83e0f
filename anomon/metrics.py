"""Every Prometheus metric the daemon exports, declared once, with its help text.

Dashboards and alert rules (deploy/) rely on these names: change one and they break silently. Other
modules only call `.inc()`, `.set()`, `.observe()` on the attributes of `Metrics`; they never build a
metric name. A `Metrics` object owns its own `CollectorRegistry`, so a test can build as many as it
likes without "Duplicated timeseries" errors, and the daemon serves exactly what it declared here.

Conventions (prometheus.io/docs/practices/naming): `anomon_` prefix, base units (seconds), `_total`
counters, no file path as a label (unbounded cardinality), no `up` (Prometheus makes it), timestamps
rather than "seconds since". Every labelled child is created at start so rates and alerts work from
the first scrape instead of appearing with the first event.

Lines: every series that describes images or a model carries a `line` label, whose values are the
configured line names only (bounded; `default` for a daemon with one model). Process-wide series
(readiness, rescans, polling, build, process_*) have none. The service talks to one line's
children through `Metrics.line(name)`, a `LineMetrics` made once per line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from anomon import __version__
from anomon.errors import REASONS

VERDICTS: tuple[str, ...] = ("normal", "anomalous")
RELOAD_RESULTS: tuple[str, ...] = ("success", "failure")
WEBHOOK_RESULTS: tuple[str, ...] = ("success", "retry", "dead_letter")
DRIFT_RESET_REASONS: tuple[str, ...] = ("model", "operator")
REVIEW_STATES: tuple[str, ...] = ("unreviewed", "false_alarm", "defect")  # anomon.judgements.STATES

log = logging.getLogger("anomon.metrics")

# Score buckets as multiples of the detector's threshold: the interesting region is near the
# threshold (is the line drifting towards it?), not near zero. The buckets are fixed for the life of
# the process, from the model loaded at start: Prometheus cannot change a histogram's buckets
# without breaking `rate()` over the change, so after a reload to a model with a very different
# threshold the buckets are coarser until the next restart (the daemon logs a warning then).
SCORE_BUCKET_FACTORS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)

# Per-image scoring time: a tiny CPU model takes ~1 ms, a large one on a slow CPU a second or more.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# File complete -> verdict: includes the queue wait, which a start-up backlog stretches to minutes.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)


# Conformal p-values (the verdicts'): uniform on normal images like the calibration ones, piling up
# near 0 (or 1) when images drift towards higher (lower) scores. Fixed buckets, whatever the model.
P_VALUE_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def score_buckets(threshold: float | Iterable[float]) -> tuple[float, ...]:
    """Histogram buckets placed around `threshold` (any positive float), or around each of several
    (one histogram serves every line; each line's region near its own threshold is resolved)."""
    thresholds = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
    out: set[float] = set()
    for t in thresholds or [1.0]:
        if not t > 0:  # also catches NaN
            t = 1.0
        out |= {round(t * f, 12) for f in SCORE_BUCKET_FACTORS}
    return tuple(sorted(out))


@dataclass
class LineMetrics:
    """One line's children of the labelled metrics (made once, so scoring never looks them up)."""

    name: str
    images_scored: dict[str, Any]
    image_errors: dict[str, Any]
    anomaly_score: Any
    score_threshold: Any
    scoring_duration: Any
    intake_latency: Any
    queue_depth: Any
    last_scored: Any
    model_info: Any
    model_reloads: dict[str, Any]
    alerts: Any
    duplicates: Any
    webhook_deliveries: dict[str, Any]
    p_value: Any
    drift_log10: Any
    drift_level: Any
    target_fpr: Any
    drift_images: Any
    drift_alarms: Any
    drift_resets: dict[str, Any]
    up: Any
    bucket_threshold: float

    def set_model(self, model_id: str, image_size: str, channels: int, threshold: float,
                  target_fpr: float | None = None) -> None:
        """Describe the model now serving; `Info.info` replaces the previous series atomically."""
        if target_fpr is not None:
            self.target_fpr.set(target_fpr)
        self.model_info.info({"model_id": model_id, "image_size": image_size, "channels": str(channels)})
        self.score_threshold.set(threshold)
        self.up.set(1)

    def set_drift_alpha(self, alpha: float) -> None:
        self.drift_level.set(-math.log10(alpha))


class Metrics:
    """The daemon's metrics, registered in one registry (`self.registry`)."""

    def __init__(self, thresholds: Mapping[str, float | None] | float, *,
                 registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        """`thresholds`: each line's threshold at start (None for a line whose model did not
        load), which places the score buckets; a float is the one line `default`."""
        if isinstance(thresholds, (int, float)):
            thresholds = {"default": float(thresholds)}
        known = [t for t in thresholds.values() if t is not None]
        # The `_created` series double the exposition and no dashboard here uses them.
        disable_created_metrics()
        r = self.registry = registry if registry is not None else CollectorRegistry()
        L = ["line"]  # noqa: N806
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self.images_scored = Counter(
            "anomon_images_scored_total", "Images scored, by line and verdict.", ["line", "verdict"], registry=r)
        self.image_errors = Counter(
            "anomon_image_errors_total",
            "Images that could not be scored, by reason (recorded in the ledger and skipped).",
            ["line", "reason"], registry=r)
        self.anomaly_score = Histogram(
            "anomon_anomaly_score",
            "Anomaly score of each scored image (higher = more anomalous). Buckets are multiples of "
            "the thresholds of the models loaded at start.",
            L, buckets=score_buckets(known), registry=r)
        self.score_threshold = Gauge(
            "anomon_score_threshold", "Decision threshold of the line's current model: score above it = anomalous.",
            L, registry=r)
        self.scoring_duration = Histogram(
            "anomon_scoring_duration_seconds",
            "Time to score one image (read, decode, its share of the batched forward pass).",
            L, buckets=DURATION_BUCKETS, registry=r)
        self.intake_latency = Histogram(
            "anomon_intake_latency_seconds",
            "Time from an image file being complete (or found by a rescan) to its verdict.",
            L, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "anomon_queue_depth", "Complete images waiting to be scored.", L, registry=r)
        self.last_scored = Gauge(
            "anomon_last_scored_timestamp_seconds",
            "Unix time of the line's last verdict (0 = none since start).", L, registry=r)
        self.model_info = Info(
            "anomon_model", "The line's model in use (only the current model's series is present).",
            L, registry=r)
        self.model_reloads = Counter(
            "anomon_model_reloads_total", "Model reloads (SIGHUP or model file replaced), by result.",
            ["line", "result"], registry=r)
        self.build_info = Info("anomon_build", "anomon version.", registry=r)
        self.alerts = Counter(
            "anomon_alerts_total", "Alerts raised (one per anomalous image).", L, registry=r)
        self.duplicates = Counter(
            "anomon_duplicates_total",
            "Images seen again with the same path and the same bytes (no second verdict or alert).",
            L, registry=r)
        self.webhook_deliveries = Counter(
            "anomon_webhook_deliveries_total",
            "Webhook delivery attempts, by result (retry = 5xx/timeout, will try again; "
            "dead_letter = given up, written to the dead-letter file).",
            ["line", "result"], registry=r)
        self.ready = Gauge(
            "anomon_ready",
            "1 when the model is loaded, the ledger open, the watcher running and the start-up "
            "rescan done.", registry=r)
        self.rescans = Counter(
            "anomon_rescans_total",
            "Folder rescans against the ledger (start-up, periodic, after an inotify overflow).",
            registry=r)
        self.polling = Gauge(
            "anomon_intake_polling",
            "1 when the watcher polls the folders (configured, or fallback after the inotify "
            "watch limit was reached), 0 with inotify.", registry=r)

        self.p_value = Histogram(
            "anomon_p_value",
            "Conformal p-value of each scored image: the share of calibration scores at or above its "
            "score. Uniform while images look like the calibration images; piles up near 0 (1) when they "
            "drift towards higher (lower) scores.", L, buckets=P_VALUE_BUCKETS, registry=r)
        self.drift_log10 = Gauge(
            "anomon_drift_martingale_log10",
            "log10 of the drift test's martingale: the evidence that the images judged normal no "
            "longer look like the calibration images, gathered since the last reset (0 at a reset; "
            "log10(1/drift_alpha) = an alarm, 2 at the default 0.01).", L, registry=r)
        self.target_fpr = Gauge(
            "anomon_target_false_alarm_ratio",
            "The false-alarm rate the line's threshold was set for (the bundle's target_fpr, or the "
            "line's own): the confirmed false-alarm rate from the review page should stay near it.",
            L, registry=r)
        self.drift_level = Gauge(
            "anomon_drift_alarm_level_log10",
            "log10(1/drift_alpha) of the line: the value of anomon_drift_martingale_log10 at which "
            "its drift test raises an alarm (2 at the default drift_alpha 0.01).", L, registry=r)
        self.drift_images = Gauge(
            "anomon_drift_images",
            "Images judged normal that the drift test has seen since its last reset.", L, registry=r)
        self.drift_alarms = Counter(
            "anomon_drift_alarms_total",
            "Drift alarms: the martingale reached 1/drift_alpha for the first time since a reset "
            "(recorded in the ledger's drift_alarms table).", L, registry=r)
        self.drift_resets = Counter(
            "anomon_drift_resets_total",
            "Drift test resets, by reason (model = another model serves; operator = SIGUSR1).",
            ["line", "reason"], registry=r)
        self.line_up = Gauge(
            "anomon_line_up",
            "1 while the line has a model and its images are scored; 0 when its model failed to load "
            "at start (its images wait; the other lines go on).", L, registry=r)

        # retention (anomon.retention): process-wide, what the background passes removed
        self.retention_images = Counter(
            "anomon_retention_images_total",
            "Image rows pruned from the ledger by retention (older than retention_max_age_days or "
            "beyond retention_max_images); a compact record of each is kept while its file is there.",
            registry=r)
        self.retention_alerts = Counter(
            "anomon_retention_alerts_total",
            "Alert rows pruned with their images (only alerts every exporter had handled).", registry=r)
        self.retention_forgotten = Counter(
            "anomon_retention_forgotten_total",
            "Records of pruned images dropped because their file had left the watched folder.", registry=r)
        self.retention_anomaly_files = Counter(
            "anomon_retention_anomaly_files_total",
            "Anomaly copies and heat maps removed from STATE/anomalies/ for being older than "
            "retention_max_age_days (anomalies_max_bytes removes the oldest beyond it, uncounted).",
            registry=r)
        self.retention_jsonl_rotations = Counter(
            "anomon_retention_jsonl_rotations_total",
            "alerts.jsonl rotations (it reached alerts_jsonl_max_bytes).", registry=r)
        self.retention_jsonl_removed = Counter(
            "anomon_retention_jsonl_files_removed_total",
            "Rotated alerts.jsonl files removed (older than retention_max_age_days, or beyond "
            "alerts_jsonl_keep_files).", registry=r)
        self.retention_last_pass = Gauge(
            "anomon_retention_last_pass_timestamp_seconds",
            "Unix time the last retention pass over the ledger ended (0 = none since start).", registry=r)

        self.build_info.info({"version": __version__})
        self._lines = {name: self._line(name, t) for name, t in thresholds.items()}

    def _line(self, name: str, threshold: float | None) -> LineMetrics:
        """Create every child of one line now, at zero (see the module's docstring)."""
        lm = LineMetrics(
            name=name,
            images_scored={v: self.images_scored.labels(line=name, verdict=v) for v in VERDICTS},
            image_errors={x: self.image_errors.labels(line=name, reason=x) for x in REASONS},
            anomaly_score=self.anomaly_score.labels(line=name),
            score_threshold=self.score_threshold.labels(line=name),
            scoring_duration=self.scoring_duration.labels(line=name),
            intake_latency=self.intake_latency.labels(line=name),
            queue_depth=self.queue_depth.labels(line=name),
            last_scored=self.last_scored.labels(line=name),
            model_info=self.model_info.labels(line=name),
            model_reloads={x: self.model_reloads.labels(line=name, result=x) for x in RELOAD_RESULTS},
            alerts=self.alerts.labels(line=name),
            duplicates=self.duplicates.labels(line=name),
            webhook_deliveries={x: self.webhook_deliveries.labels(line=name, result=x) for x in WEBHOOK_RESULTS},
            p_value=self.p_value.labels(line=name),
            drift_log10=self.drift_log10.labels(line=name),
            drift_level=self.drift_level.labels(line=name),
            target_fpr=self.target_fpr.labels(line=name),
            drift_images=self.drift_images.labels(line=name),
            drift_alarms=self.drift_alarms.labels(line=name),
            drift_resets={x: self.drift_resets.labels(line=name, reason=x) for x in DRIFT_RESET_REASONS},
            up=self.line_up.labels(line=name),
            bucket_threshold=threshold if threshold is not None else 0.0,
        )
        if threshold is not None:
            lm.score_threshold.set(threshold)
        return lm

    def line(self, name: str) -> LineMetrics:
        return self._lines[name]


    # -- review (anomon.review) -------------------------------------------------------------------

    def count_judgements(self, counts: Callable[[], Mapping[tuple[str, str, str], int]]) -> None:
        """Export the operators' judgements: `counts()` gives {(kind, line, state): n} from the
        ledger and is read at every scrape (alerts come from the scorer and judgements from the
        page, and the ledger already counts both; a copy in memory could only lag behind it)."""
        self.reviews = Counter(
            "anomon_reviews_total",
            "Judgements given on the review page since start, by the judgement (unreviewed = one "
            "taken back); changing a judgement counts again.", ["judgement"], registry=self.registry)
        for s in REVIEW_STATES:
            self.reviews.labels(judgement=s)
        self.registry.register(_JudgementCollector(counts, lines=list(getattr(self, "_lines", ()))))


_JUDGEMENT_FAMILIES = {
    "alert": ("anomon_alert_judgements",
              "Alerts in the ledger by the operator's current judgement on the review page "
              "(unreviewed, false_alarm, defect), by line. false_alarm / (false_alarm + defect) is the "
              "share of reviewed alerts that were false alarms."),
    "drift": ("anomon_drift_alarm_judgements",
              "Drift alarms in the ledger by the operator's current judgement (unreviewed, "
              "false_alarm, defect = a real change), by line."),
}


class _JudgementCollector(Collector):
    """anomon_alert_judgements and anomon_drift_alarm_judgements, counted in the ledger at each
    scrape. Every state of every configured line is present, at zero until something is judged."""

    def __init__(self, counts: Callable[[], Mapping[tuple[str, str, str], int]], lines: list[str]) -> None:
        self._counts = counts
        self._lines = lines

    def describe(self) -> list[Metric]:  # without it, registering would read the ledger
        return [GaugeMetricFamily(name, text, labels=["line", "judgement"])
                for name, text in _JUDGEMENT_FAMILIES.values()]

    def collect(self) -> list[Metric]:
        try:
            found = dict(self._counts())
        except Exception:  # a ledger that cannot be read must not take /metrics down with it
            log.warning("cannot count the review judgements in the ledger", exc_info=True)
            found = {}
        families = []
        for kind, (name, text) in _JUDGEMENT_FAMILIES.items():
            g = GaugeMetricFamily(name, text, labels=["line", "judgement"])
            lines = sorted(set(self._lines) | {ln for k, ln, _ in found if k == kind})
            for line in lines:
                for s in REVIEW_STATES:
                    g.add_metric([line, s], found.get((kind, line, s), 0))
            families.append(g)
        return families
