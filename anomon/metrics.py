"""Every Prometheus metric the daemon exports, declared once, with its help text.

Dashboards and alert rules (deploy/) rely on these names: change one and they break silently. Other
modules only call `.inc()`, `.set()`, `.observe()` on the attributes of `Metrics`; they never build a
metric name. A `Metrics` object owns its own `CollectorRegistry`, so a test can build as many as it
likes without "Duplicated timeseries" errors, and the daemon serves exactly what it declared here.

Conventions (prometheus.io/docs/practices/naming): `anomon_` prefix, base units (seconds), `_total`
counters, no file path as a label (unbounded cardinality), no `up` (Prometheus makes it), timestamps
rather than "seconds since". Every labelled child is created at start so rates and alerts work from
the first scrape instead of appearing with the first event.
"""

from __future__ import annotations

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

from anomon import __version__
from anomon.errors import REASONS

VERDICTS: tuple[str, ...] = ("normal", "anomalous")
RELOAD_RESULTS: tuple[str, ...] = ("success", "failure")
WEBHOOK_RESULTS: tuple[str, ...] = ("success", "retry", "dead_letter")
DRIFT_RESET_REASONS: tuple[str, ...] = ("model", "operator")

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


def score_buckets(threshold: float) -> tuple[float, ...]:
    """Histogram buckets placed around `threshold` (any positive float)."""
    if not threshold > 0:  # also catches NaN
        threshold = 1.0
    return tuple(sorted({round(threshold * f, 12) for f in SCORE_BUCKET_FACTORS}))


class Metrics:
    """The daemon's metrics, registered in one registry (`self.registry`)."""

    def __init__(self, threshold: float, *, registry: CollectorRegistry | None = None,
                 process_collectors: bool = True) -> None:
        # The `_created` series double the exposition and no dashboard here uses them.
        disable_created_metrics()
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.bucket_threshold = threshold
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self.images_scored = Counter(
            "anomon_images_scored_total", "Images scored, by verdict.", ["verdict"], registry=r)
        self.image_errors = Counter(
            "anomon_image_errors_total",
            "Images that could not be scored, by reason (recorded in the ledger and skipped).",
            ["reason"], registry=r)
        self.anomaly_score = Histogram(
            "anomon_anomaly_score",
            "Anomaly score of each scored image (higher = more anomalous). Buckets are multiples of "
            "the threshold of the model loaded at start.",
            buckets=score_buckets(threshold), registry=r)
        self.score_threshold = Gauge(
            "anomon_score_threshold", "Decision threshold of the current model: score above it = anomalous.",
            registry=r)
        self.scoring_duration = Histogram(
            "anomon_scoring_duration_seconds",
            "Time to score one image (read, decode, its share of the batched forward pass).",
            buckets=DURATION_BUCKETS, registry=r)
        self.intake_latency = Histogram(
            "anomon_intake_latency_seconds",
            "Time from an image file being complete (or found by a rescan) to its verdict.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "anomon_queue_depth", "Complete images waiting to be scored.", registry=r)
        self.last_scored = Gauge(
            "anomon_last_scored_timestamp_seconds",
            "Unix time of the last verdict (0 = none since start).", registry=r)
        self.model_info = Info(
            "anomon_model", "The model in use (only the current model's series is present).",
            registry=r)
        self.model_reloads = Counter(
            "anomon_model_reloads_total", "Model reloads (SIGHUP or model file replaced), by result.",
            ["result"], registry=r)
        self.build_info = Info("anomon_build", "anomon version.", registry=r)
        self.alerts = Counter(
            "anomon_alerts_total", "Alerts raised (one per anomalous image).", registry=r)
        self.duplicates = Counter(
            "anomon_duplicates_total",
            "Images seen again with the same path and the same bytes (no second verdict or alert).",
            registry=r)
        self.webhook_deliveries = Counter(
            "anomon_webhook_deliveries_total",
            "Webhook delivery attempts, by result (retry = 5xx/timeout, will try again; "
            "dead_letter = given up, written to the dead-letter file).",
            ["result"], registry=r)
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
            "drift towards higher (lower) scores.", buckets=P_VALUE_BUCKETS, registry=r)
        self.drift_log10 = Gauge(
            "anomon_drift_martingale_log10",
            "log10 of the drift test's martingale: the evidence that the images judged normal no "
            "longer look like the calibration images, gathered since the last reset (0 at a reset; "
            "log10(1/drift_alpha) = an alarm, 2 at the default 0.01).", registry=r)
        self.drift_images = Gauge(
            "anomon_drift_images",
            "Images judged normal that the drift test has seen since its last reset.", registry=r)
        self.drift_alarms = Counter(
            "anomon_drift_alarms_total",
            "Drift alarms: the martingale reached 1/drift_alpha for the first time since a reset "
            "(recorded in the ledger's drift_alarms table).", registry=r)
        self.drift_resets = Counter(
            "anomon_drift_resets_total",
            "Drift test resets, by reason (model = another model serves; operator = SIGUSR1).",
            ["reason"], registry=r)

        for v in VERDICTS:
            self.images_scored.labels(verdict=v)
        for reason in REASONS:
            self.image_errors.labels(reason=reason)
        for res in RELOAD_RESULTS:
            self.model_reloads.labels(result=res)
        for res in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result=res)
        for reason in DRIFT_RESET_REASONS:
            self.drift_resets.labels(reason=reason)
        self.build_info.info({"version": __version__})
        self.score_threshold.set(threshold)

    def set_model(self, model_id: str, image_size: str, channels: int, threshold: float) -> None:
        """Describe the model now serving; `Info.info` replaces the previous series atomically."""
        self.model_info.info(
            {"model_id": model_id, "image_size": image_size, "channels": str(channels)})
        self.score_threshold.set(threshold)
