"""`anomon watch`: intake -> batched scoring -> verdict -> ledger (+ alerts, metrics, logs).

Threads, and the one job each has:
- watchdog observer: file-system events -> intake messages (never blocks);
- intake: decides when a file is complete; start-up backlog and periodic rescans (anomon.intake);
- scoring worker (exactly one): takes up to `batch_size` waiting images, reads each file once
  (hash and decode the same bytes), scores them in one forward pass, and records the whole batch
  in one ledger transaction. It is the only writer of verdicts, so "seen?" then "record" cannot race;
- exporters: alerts.jsonl and the webhook (anomon.alerts), from the ledger's alerts table;
- HTTP: /metrics /healthz /readyz /alerts (anomon.web);
- main: signals, model reloads, systemd notifications, gauges.

The scoring worker also owns the drift test (anomon.drift): it bets on each batch's scores, and the
test's new state goes into the batch's ledger transaction. It starts again when another model
serves (the worker notices the new model_id between batches) and on SIGUSR1 (the operator's reset).

Nothing is marked done before its verdict is committed, so `kill -9` at any point loses nothing:
the start-up rescan finds every file the ledger has not recorded. SIGTERM stops intake, lets the
worker finish the batch in hand, and leaves the rest to the next start's rescan.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomon import state
from anomon.alerts import JsonlExporter, WebhookSender
from anomon.anomalies import AnomalyStore
from anomon.config import WatchConfig
from anomon.drift import DriftTest, Step
from anomon.errors import StartupError
from anomon.heap import HeapTrimmer
from anomon.images import ImageError, read_file
from anomon.intake import Candidate, Intake
from anomon.ledger import (DriftAlarm, DriftRecord, Ledger, LedgerError, Sighting, Verdict, is_seen,
                           open_readonly)
from anomon.logs import setup_logging
from anomon.metrics import Metrics
from anomon.scoring import Prepared, decode, records
from anomon.systemd import sd_notify, watchdog_interval
from anomon.web import WebServer

log = logging.getLogger("anomon.service")

# How stale the worker's heartbeat may be before /healthz says the loop is stuck. A batch of large
# images on a slow CPU can take a while; a wedged worker takes forever.
HEALTHY_BEAT_S = 120.0
_MAYBE_INCOMPLETE = ("empty", "truncated")
_WRITTEN = ("close", "move")  # Candidate.via values that prove the file was just written
# Read errors that say nothing about the file: the process or the machine is short of something.
# Never recorded; the file is tried again after incomplete_grace_s (and at every rescan).
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR,
                        errno.EBUSY, errno.ENOBUFS})
# Errors that may clear up (an operator fixes the permissions): recorded once, as "unreadable",
# without marking the file's state seen, so every rescan tries it again and a fixed file is scored.
_RETRIED = frozenset({errno.EACCES, errno.EPERM})
# The drift test's line (anomon.drift): today one daemon, one model, one line.
DRIFT_LINE = ""
# What a drift alarm's direction suggests to look at (bench/results/drift.md: a dimming lamp raised
# the casting photos' scores and lowered KolektorSDD's; a blurring lens lowered both).
_DRIFT_HIGHER = "lighting, dirt, a moved camera, a new material, or more small defects"
_DRIFT_LOWER = ("blur (focus, a dirty lens), less light or contrast, or images with less in them: defects "
                "may go unseen")


# ------------------------------------------------------------------------------ reading one file


@dataclass
class _Scorable:
    """A file read once: its bytes (hashed, kept for the anomaly copy) and the decoded image,
    ready for the scoring path. Its stat lives in the verdict."""

    cand: Candidate
    sha256: str
    data: bytes
    prepared: Prepared


def _error(cand: Candidate, reason: str, message: str, st: os.stat_result | None = None,
           sha256: str | None = None) -> Verdict:
    return Verdict(path=cand.path, verdict="error", reason=reason, message=message,
                   arrived_at=cand.arrived_at, scored_at=time.time(),
                   size=st.st_size if st else None, mtime_ns=st.st_mtime_ns if st else None,
                   sha256=sha256)


# ------------------------------------------------------------------------------ the service


class Service:
    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.state = Path(cfg.state).absolute()
        self.ledger_file = state.ledger_path(self.state)
        self._roots = sorted((os.path.realpath(w) for w in cfg.watch), key=len, reverse=True)
        self.detector: Any = None
        self.ledger: Ledger | None = None
        self.metrics: Metrics | None = None
        self.intake: Intake | None = None
        self.web: WebServer | None = None
        self.queue: queue.Queue[Candidate] = queue.Queue(maxsize=cfg.queue_size)
        self.exporters: list[Any] = []
        self.anomalies: AnomalyStore | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._worker_beat = time.monotonic()
        self._worker_error: str | None = None
        self._lock_fd: int | None = None
        self._model_stat: tuple[int, int, int] | None = None
        self._ready_sent = False
        self.drift: DriftTest | None = None  # the scoring worker's, once it runs
        self._drift_reset = threading.Event()

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to "watching"; raises StartupError with one line on any user problem."""
        cfg = self.cfg
        for d in cfg.watch:
            if not Path(d).is_dir():
                raise StartupError(f"watch folder not found (or not a folder): {d}")

        # The model and the port first: a start that fails on either leaves no state behind.
        from anomon.detector import Detector  # torch: imported after the cheap checks

        self.detector = Detector.load(cfg.model, device=cfg.device)  # BundleError: one line
        self._model_stat = self._stat_model()
        det = self.detector
        self.metrics = m = Metrics(det.threshold_)
        m.set_model(det.model_id, det.size_label, det.channels, det.threshold_)
        log.info("model %s loaded from %s (threshold %.5g, %s px, %d channel(s))", det.model_id,
                 cfg.model, det.threshold_, det.size_label, det.channels,
                 extra={"model_id": det.model_id})
        try:
            self.web = WebServer(cfg.host, cfg.port, registry=m.registry, ready=self.ready_checks,
                                 healthy=self.healthy, ledger_file=self.ledger_file)
        except OSError as e:
            raise StartupError(f"cannot listen on {cfg.listen}: {e.strerror or e}") from None

        try:
            self.state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot create state folder {self.state}: {e.strerror or e}") from None
        try:
            self._lock_fd = state.lock(self.state)
        except state.StateInUse as e:
            raise StartupError(str(e)) from None
        try:
            self.ledger = Ledger.open(self.ledger_file, new_ledger=cfg.new_ledger)
        except LedgerError as e:
            raise StartupError(str(e)) from None
        try:
            self.drift = self._resume_drift(self.ledger, det)
        except Exception as e:  # sqlite3 errors: a ledger that opened but cannot be written
            raise StartupError(f"ledger {self.ledger_file}: cannot read or write the drift test's "
                               f"state ({type(e).__name__}: {e})") from None
        if cfg.anomalies_dir:
            self.anomalies = AnomalyStore(self.state / state.ANOMALIES_DIR, cfg.anomalies_max_bytes)
            import anomon.heatmap  # noqa: F401  (matplotlib: now, not on the first anomaly)
        self.web.start()
        log.info("serving /metrics /healthz /readyz /alerts on http://%s:%d", cfg.host, self.web.port)

        self._worker = threading.Thread(target=self._work, name="anomon-scorer", daemon=True)
        self._worker.start()

        self.intake = Intake(
            [str(p) for p in cfg.watch], self.queue, is_seen=self._seen_checker(),
            ignore_patterns=cfg.ignore_patterns, exclude=[self.state], polling=cfg.polling,
            poll_interval_s=cfg.poll_interval_s, stable_s=cfg.stable_s,
            incomplete_grace_s=cfg.incomplete_grace_s, reconcile_interval_s=cfg.reconcile_interval_s,
            on_rescan=lambda why: m.rescans.inc(), on_polling=lambda on: m.polling.set(int(on)))
        try:
            self.intake.start()
        except OSError as e:
            raise StartupError(f"cannot watch {e.filename or 'the folders'}: {e.strerror or e}") from None
        # Evaluated at scrape time, so they never lag behind /readyz or the queue.
        m.ready.set_function(lambda: float(self.is_ready()))
        m.queue_depth.set_function(self.intake.backlog)

        self.exporters.append(JsonlExporter(self.ledger.reopen(), self.state))
        if cfg.webhook_url:
            self.exporters.append(WebhookSender(
                self.ledger.reopen(), self.state, cfg.webhook_url, timeout_s=cfg.webhook_timeout_s,
                max_backoff_s=cfg.webhook_max_backoff_s, max_age_s=cfg.webhook_max_age_s,
                max_spool_bytes=cfg.webhook_max_spool_bytes,
                on_result=lambda r: m.webhook_deliveries.labels(result=r).inc()))
        for e in self.exporters:
            e.start()

    def _seen_checker(self):
        """`is_seen` for the intake thread, on that thread's own read-only connection."""
        local = threading.local()

        def check(path: str, size: int, mtime_ns: int) -> bool:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = open_readonly(self.ledger_file)
            return is_seen(conn, path, size, mtime_ns)

        return check

    # -- health ------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """The loops are alive (a failing ledger write shows in /readyz, not here: restarting
        the process would not free a full disk)."""
        worker_ok = (self._worker is not None and self._worker.is_alive()
                     and time.monotonic() - self._worker_beat < HEALTHY_BEAT_S)
        intake_ok = self.intake is None or self.intake.alive or self._stop.is_set()
        return worker_ok and intake_ok

    def ready_checks(self) -> dict[str, bool]:
        i = self.intake
        return {
            "model_loaded": self.detector is not None,
            "ledger_open": self.ledger is not None and self._worker_error is None,
            "watcher_running": i is not None and i.watching,
            "startup_rescan_done": i is not None and i.startup_scan_done.is_set(),
            "scorer_running": self._worker is not None and self._worker.is_alive(),
            "not_stopping": not self._stop.is_set(),
        }

    def is_ready(self) -> bool:
        return all(self.ready_checks().values())

    # -- main loop ---------------------------------------------------------------------------

    def run_forever(self) -> None:
        assert self.metrics is not None and self.intake is not None
        ping_every = watchdog_interval()
        next_ping = 0.0
        while not self._stop.wait(0.25):
            if not self._ready_sent and self.is_ready():
                self._ready_sent = True
                log.info("ready: start-up rescan done, %d image(s) waiting", self.intake.backlog())
                sd_notify("READY=1\nSTATUS=watching")
            if ping_every is not None and time.monotonic() >= next_ping and self.healthy():
                sd_notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
            if self._reload.is_set():
                self._reload.clear()
                self.reload_model("SIGHUP")
            elif self._model_changed():
                self.reload_model("model file changed")

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def request_drift_reset(self) -> None:
        """The operator's reset (SIGUSR1); the scoring worker carries it out between batches."""
        self._drift_reset.set()

    def shutdown(self, started: bool = True) -> None:
        """Stop intake, let the worker finish the batch in hand, stop the exporters and HTTP; all
        within stop_timeout_s. Images still queued are not lost: the next start's rescan has them.
        After a failed start (`started=False`) it only releases what was opened, silently: the
        user reads the one error line, not a "stopped" story about a daemon that never ran."""
        deadline = time.monotonic() + self.cfg.stop_timeout_s - 0.5
        self._stop.set()
        if started:
            sd_notify("STOPPING=1")
        left = lambda: max(0.1, deadline - time.monotonic())  # noqa: E731
        if self.intake is not None:
            self.intake.stop(timeout=min(2.0, left()))
        self._worker_stop.set()
        if self._worker is not None:
            self._worker.join(left())
            if self._worker.is_alive():
                log.error("scorer did not finish its batch in time; exiting anyway (its images "
                          "are not recorded and will be scored after the restart)")
        for e in self.exporters:
            e.stop(timeout=min(2.0, left()))
        if self.web is not None:
            self.web.stop()
        if self.ledger is not None:
            self.ledger.close()
        if started:
            log.info("stopped; %d image(s) left waiting are scored at the next start", self.queue.qsize())

    # -- model reloads -----------------------------------------------------------------------

    def _stat_model(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.cfg.model)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _model_changed(self) -> bool:
        """The file changed and then stayed the same for a moment (a writer may be mid-copy)."""
        now = self._stat_model()
        if now is None or now == self._model_stat:
            return False
        time.sleep(0.3)
        if self._stat_model() != now:
            return False
        return True

    def reload_model(self, why: str) -> bool:
        """Load the new model beside the old one and switch atomically; keep the old on failure."""
        from anomon.detector import BundleError, Detector

        assert self.metrics is not None
        self._model_stat = self._stat_model()
        old = self.detector
        try:
            new = Detector.load(self.cfg.model, device=self.cfg.device)
        except BundleError as e:
            self.metrics.model_reloads.labels(result="failure").inc()
            log.error("model reload (%s) refused, still serving %s: %s", why, old.model_id, e,
                      extra={"model_id": old.model_id, "reload": "failure"})
            return False
        self.detector = new  # one reference swap; the worker takes it at its next batch
        self.metrics.set_model(new.model_id, new.size_label, new.channels, new.threshold_)
        self.metrics.model_reloads.labels(result="success").inc()
        base = self.metrics.bucket_threshold
        if base > 0 and not 0.5 <= new.threshold_ / base <= 2.0:
            log.warning("new threshold %.5g is far from %.5g, which the anomon_anomaly_score buckets "
                        "were placed around; restart to re-place them", new.threshold_, base)
        log.info("model reloaded (%s): %s -> %s (threshold %.5g)", why, old.model_id, new.model_id,
                 new.threshold_, extra={"model_id": new.model_id, "previous_model_id": old.model_id,
                                        "reload": "success"})
        return True

    # -- the scoring worker ------------------------------------------------------------------

    def _work(self) -> None:
        writer = self.ledger.reopen()  # type: ignore[union-attr]  # this thread's own connection
        heap = HeapTrimmer()  # trimmed here, between batches, never while this thread allocates
        try:
            while not self._worker_stop.is_set():
                self._worker_beat = time.monotonic()
                self._drift_chores(writer)
                try:
                    batch = [self.queue.get(timeout=0.2)]
                except queue.Empty:
                    heap.idle()
                    continue
                while len(batch) < self.cfg.batch_size:
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                try:
                    self._score_batch(writer, batch)
                    self._worker_error = None
                except Exception as e:  # e.g. disk full: nothing recorded, the rescan retries
                    self._worker_error = f"{type(e).__name__}: {e}"
                    log.exception("could not score or record a batch of %d; they are retried at the "
                                  "next rescan", len(batch))
                    self._worker_stop.wait(1.0)
                finally:
                    for c in batch:
                        self.intake.done(c.path)  # type: ignore[union-attr]
                try:
                    heap.scored()
                except Exception:  # trimming is a nicety; it must never end the scoring thread
                    log.exception("heap trim failed")
        finally:
            writer.close()

    def _score_batch(self, led: Ledger, batch: list[Candidate]) -> None:
        det = self.detector  # one model for the whole batch, even if a reload lands meanwhile
        m = self.metrics
        assert m is not None
        if self.drift is not None and self.drift.model_id != det.model_id:
            self._reset_drift(led, "model", det)
        t0 = time.perf_counter()
        verdicts: list[Verdict] = []
        sightings: list[Sighting] = []
        scorable: list[_Scorable] = []
        in_batch: dict[tuple[str, str], Verdict] = {}
        for cand in batch:
            got = self._read(led, cand)
            if got is None:
                continue
            if isinstance(got, Verdict):
                verdicts.append(got)
                continue
            st, data, seen_state = got
            sha = hashlib.sha256(data).hexdigest()
            # Identity first, decoding second: same path + same bytes is a duplicate whatever
            # the bytes are (a corrupt file copied in twice is one error, not two).
            earlier = in_batch.get((cand.path, sha))
            existing = None if earlier is not None else led.find(cand.path, sha)
            if earlier is not None or existing is not None:
                if earlier is not None and (earlier.size, earlier.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    continue  # the same file queued twice: not a duplicate, just once
                if seen_state:
                    continue  # written again with the bytes it had: nothing new, nothing to count
                sightings.append(Sighting(cand.path, st.st_size, st.st_mtime_ns, existing, of=earlier))
                continue
            item = self._decode(det, cand, st, sha, data)
            if item is None:
                continue
            if isinstance(item, Verdict):
                v = item
            else:
                v = Verdict(path=cand.path, verdict="normal", arrived_at=cand.arrived_at, scored_at=0.0,
                            size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha,
                            model_id=det.model_id, threshold=det.threshold_)
                scorable.append(item)
            in_batch[(cand.path, sha)] = v
            verdicts.append(v)

        if scorable:
            now = time.time()
            for s, r in zip(scorable, records(det, [s.prepared for s in scorable], heatmaps=True)):
                v = in_batch[(s.cand.path, s.sha256)]
                v.score, v.p_value, v.scored_at = r.score, r.p_value, now
                if r.anomalous:
                    v.verdict = "anomalous"
                    if self.anomalies is not None:
                        try:
                            v.anomaly_image, v.heatmap = self.anomalies.save(
                                s.cand.path, s.sha256, s.data, s.prepared.image, r.heatmap,
                                vmax=det.heat_vmax, vmin=det.heat_vmin)
                        except Exception as e:  # a full disk must not cost the verdict
                            log.error("could not keep a copy of %s: %s", s.cand.path, e)
        elapsed = time.perf_counter() - t0
        if not verdicts and not sightings:
            return
        drift, step, drift_record = self._drift_step(det, verdicts)
        led.record(verdicts, sightings, drift_record)  # THE checkpoint: after scoring, one transaction
        if drift is not None and step is not None:
            self._drift_taken(drift, step, drift_record)

        per_image = elapsed / max(1, len(scorable))
        cand_of = {(s.cand.path, s.sha256): s.cand for s in scorable}
        alerts = 0
        for v in verdicts:
            if v.verdict == "error":
                m.image_errors.labels(reason=v.reason).inc()
                log.warning("not scored: %s [%s]", v.message, v.reason,
                            extra={"path": v.path, "reason": v.reason, "image_id": v.image_id})
                continue
            m.images_scored.labels(verdict=v.verdict).inc()
            m.anomaly_score.observe(v.score if v.score is not None else float("inf"))
            if v.p_value is not None:
                m.p_value.observe(v.p_value)
            m.scoring_duration.observe(per_image)
            cand = cand_of[(v.path, v.sha256)]  # type: ignore[index]
            m.intake_latency.observe(max(0.0, v.scored_at - cand.completed_at))
            m.last_scored.set(v.scored_at)
            if v.alert_id is not None:
                alerts += 1
                m.alerts.inc()
            log.info("%s %s score=%.5g", v.verdict, v.path, v.score or 0.0, extra={
                "path": v.path, "score": v.score, "p_value": v.p_value, "verdict": v.verdict,
                "model_id": v.model_id, "image_id": v.image_id, "alert_id": v.alert_id})
        for dup in sightings:
            m.duplicates.inc()
            log.info("duplicate (same path, same bytes as image %s): %s", dup.image_id, dup.path,
                     extra={"path": dup.path, "duplicate_of": dup.image_id})
        if alerts:
            for e in self.exporters:
                e.notify()

    # -- the drift test (scoring worker; start() before the worker runs) ----------------------

    def _new_drift(self, det: Any) -> DriftTest:
        return DriftTest.for_detector(det, alpha=self.cfg.drift_alpha, line=DRIFT_LINE)

    def _resume_drift(self, led: Ledger, det: Any) -> DriftTest:
        """The drift test as the ledger left it for this model, or a fresh one (recorded)."""
        test = self._new_drift(det)
        stored = led.drift(test.line)
        if stored is not None:
            refused = test.restore(*stored)
            if refused is None:
                log.info("drift test resumed: martingale 10^%.3g after %d image(s) judged normal since "
                         "its reset (%s)", test.log10, test.images, test.reset_reason,
                         extra={"drift_log10": test.log10, "drift_images": test.images})
                self._show_drift(test)
                return test
            why, message = refused
            if why == "model":
                assert self.metrics is not None
                self.metrics.drift_resets.labels(reason="model").inc()
                test.reset("model")
            log.info("drift test starts again from the calibration images: %s", message,
                     extra={"drift_reset": why})
        led.write_drift(DriftRecord(test.line, test.state_json(), reset=True))
        self._show_drift(test)
        return test

    def _reset_drift(self, led: Ledger, reason: str, det: Any = None) -> None:
        """Start the evidence again: for another model (`det`), or the operator's reset."""
        old = self.drift
        assert old is not None and self.metrics is not None
        if det is not None:
            new = self._new_drift(det)
        else:
            new = copy.copy(old)  # reset() replaces the arrays it holds, so the two share nothing
        new.reset(reason)
        led.write_drift(DriftRecord(new.line, new.state_json(), reset=True))
        self.drift = new
        self.metrics.drift_resets.labels(reason=reason).inc()
        self._show_drift(new)
        why = ("by the operator (SIGUSR1)" if reason == "operator"
               else f"for model {new.model_id} (was {old.model_id})")
        log.info("drift test reset %s: martingale was 10^%.3g after %d image(s) judged normal; the "
                 "evidence starts again from the calibration images", why, old.log10, old.images,
                 extra={"drift_reset": reason, "drift_log10": old.log10, "drift_images": old.images,
                        "model_id": new.model_id})

    def _drift_chores(self, led: Ledger) -> None:
        """Between batches: the operator's reset, and a reset for a model that just began serving
        (so the gauge shows it at once, not at the next image)."""
        if self.drift is None:
            return
        try:
            if self._drift_reset.is_set():
                self._reset_drift(led, "operator")
                self._drift_reset.clear()
            det = self.detector
            if det is not None and self.drift.model_id != det.model_id:
                self._reset_drift(led, "model", det)
        except Exception:  # e.g. a full disk: the test keeps its evidence until the write succeeds
            log.exception("could not reset the drift test; trying again in a second")
            self._worker_stop.wait(1.0)

    def _drift_step(self, det: Any, verdicts: list[Verdict]
                    ) -> tuple[DriftTest | None, Step | None, DriftRecord | None]:
        """The drift test's bet on this batch's scores, and what the ledger is to record of it."""
        drift = self.drift
        scored = [v for v in verdicts if v.verdict != "error" and v.score is not None]
        if drift is None or not scored:
            return None, None, None
        step = drift.step([v.score for v in scored])
        alarm = None
        if step.alarm is not None:
            alarm = DriftAlarm(line=drift.line, raised_at=time.time(), model_id=det.model_id,
                               log10_martingale=step.alarm.log10, alpha=drift.alpha,
                               images=step.alarm.images, direction=step.alarm.direction,
                               reset_at=drift.reset_at, at=scored[step.alarm.index])
        record = DriftRecord(drift.line, drift.state_json(after=step), added=list(step.added.items()),
                             alarm=alarm)
        return drift, step, record

    def _drift_taken(self, drift: DriftTest, step: Step, record: DriftRecord | None) -> None:
        """After the ledger recorded the batch: move the test, the gauges, and say any alarm."""
        drift.apply(step)
        self._show_drift(drift)
        alarm = record.alarm if record is not None else None
        if alarm is not None:
            assert self.metrics is not None
            self.metrics.drift_alarms.inc()
            hint = (_DRIFT_HIGHER if alarm.direction == "higher" else _DRIFT_LOWER)
            log.warning(
                "DRIFT: the images judged normal no longer look like the calibration images: they score "
                "%s than before (%s). Evidence 10^%.3g >= 1/alpha = %g after %d image(s) since the drift "
                "test's reset; a false alarm has probability at most %g. Fix the cause and reset the test "
                "(SIGUSR1), or recalibrate (anomon calibrate) if the change is wanted",
                alarm.direction, hint, alarm.log10_martingale, 1.0 / alarm.alpha, alarm.images, alarm.alpha,
                extra={"drift_alarm_id": alarm.alarm_id, "drift_log10": alarm.log10_martingale,
                       "drift_images": alarm.images, "drift_direction": alarm.direction,
                       "image_id": alarm.at.image_id if alarm.at else None, "model_id": alarm.model_id})

    def _show_drift(self, drift: DriftTest) -> None:
        if self.metrics is not None:
            self.metrics.drift_log10.set(drift.log10)
            self.metrics.drift_images.set(drift.images)

    def _root_of(self, path: str) -> str | None:
        """The watched folder (symlinks resolved) that `path` lies in; None if none does."""
        for root in self._roots:
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return root
        return None

    def _read(self, led: Ledger, cand: Candidate) -> tuple[os.stat_result, bytes, bool] | Verdict | None:
        """The file's stat and bytes, and whether the ledger has seen this (size, mtime); an error
        row; or None if the ledger already covers this exact file state (queued twice, or found
        again by a rescan). A file that was just written (close-after-write, or renamed in) is
        read even then: `cp -p` and fixed-size frames give new bytes the old size and mtime."""
        if cand.refused is None:
            try:
                # Not following any symlink from the watched folder down: a watched file must not
                # lead out of the folder, even if a folder on its path was swapped for a link.
                root = self._root_of(cand.path)
                if root is None:
                    raise ImageError("refused", f"{cand.path}: outside the watched folders")
                st, data = read_file(cand.path, max_bytes=self.cfg.max_bytes, follow_symlinks=False,
                                     beneath=root)
            except ImageError as e:
                if e.errno in _TRANSIENT:
                    log.warning("cannot read %s now (%s); trying again", cand.path, e, extra={"path": cand.path})
                    self.intake.defer(cand, -1, -1)  # type: ignore[union-attr]  # back after the grace period
                    return None
                if e.errno in _RETRIED:
                    if led.last_error(cand.path) == e.reason:
                        return None  # recorded already; the next rescan tries again
                    return _error(cand, e.reason, str(e), None)  # no stat: its state is not "seen"
                reason, message = e.reason, str(e)
            else:
                seen = led.is_seen(cand.path, st.st_size, st.st_mtime_ns)
                return None if seen and cand.via not in _WRITTEN else (st, data, seen)
        else:
            reason, message = "refused", cand.refused  # never opened
        try:
            lst: os.stat_result | None = os.lstat(cand.path)
        except OSError:
            lst = None
        if lst is not None and led.is_seen(cand.path, lst.st_size, lst.st_mtime_ns):
            return None
        return _error(cand, reason, message, lst)

    def _decode(self, det: Any, cand: Candidate, st: os.stat_result, sha: str,
                data: bytes) -> _Scorable | Verdict | None:
        """The model's input; an error row; or None when the file looks unfinished (handed back
        to intake, which judges it as it is only if it stays unchanged for the grace period)."""
        try:
            prepared = decode(det, data, cand.path, max_pixels=self.cfg.max_pixels)
        except ImageError as e:
            if e.reason in _MAYBE_INCOMPLETE and not cand.final:
                self.intake.defer(cand, st.st_size, st.st_mtime_ns)  # type: ignore[union-attr]
                log.debug("looks unfinished, waiting for the writer: %s", cand.path)
                return None
            return _error(cand, e.reason, str(e), st, sha)
        return _Scorable(cand, sha, data, prepared)


# ------------------------------------------------------------------------------ entry point


def run(cfg: WatchConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    setup_logging(cfg.log_format, cfg.log_level)
    svc = Service(cfg)

    def on_stop(signum: int, frame: Any) -> None:
        if svc._stop.is_set():  # a second signal: the user insists
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: stopping", signal.Signals(signum).name)
        svc.request_stop()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda s, f: svc.request_reload())
    signal.signal(signal.SIGUSR1, lambda s, f: svc.request_drift_reset())
    t_start = time.monotonic()
    try:
        svc.start()
        log.info("started in %.1f s", time.monotonic() - t_start)
        svc.run_forever()
    except Exception:
        svc.shutdown(started=False)
        raise
    svc.shutdown()
    return 0

