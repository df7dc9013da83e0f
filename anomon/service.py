"""`anomon watch`: intake -> batched scoring -> verdict -> ledger (+ alerts, metrics, logs).

Threads, and the one job each has:
- watchdog observer: file-system events -> intake messages (never blocks);
- intake: decides when a file is complete; start-up backlog and periodic rescans (anomon.intake);
- scoring worker (exactly one): takes up to `batch_size` waiting images of one line, reads each
  file once (hash and decode the same bytes), scores them in one forward pass of that line's model,
  and records the whole batch in one ledger transaction. It is the only writer of verdicts, so
  "seen?" then "record" cannot race. Lines take turns (anomon.linequeue), one batch each;
- exporters: alerts.jsonl and the webhook (anomon.alerts), from the ledger's alerts table;
- HTTP: /metrics /healthz /readyz /alerts (anomon.web);
- main: signals, model reloads, systemd notifications, gauges.

Lines: each configured line (WatchConfig.all_lines; one line `default` for `model` + `watch`) has
its folders, its model, its drift test and its metrics' children. A line's model is loaded and
reloaded on its own; with several lines, one whose model fails to load at start waits (its images
queue, `anomon_line_up` is 0, /readyz names it) while the others are scored, and starts once its
model file is replaced by a good one (or at SIGHUP).

The scoring worker also owns the drift tests (anomon.drift): it bets on each batch's scores, and the
line's test's new state goes into the batch's ledger transaction. A line's test starts again when
another model serves it (the worker notices the new model_id between batches) and on SIGUSR1 (the
operator's reset, every line).

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
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomon import state
from anomon.alerts import JsonlExporter, WebhookSender
from anomon.anomalies import AnomalyStore
from anomon.config import LineConfig, WatchConfig
from anomon.drift import DriftTest, Step
from anomon.errors import StartupError
from anomon.heap import HeapTrimmer
from anomon.images import ImageError, read_file
from anomon.intake import Candidate, Intake, is_under
from anomon.ledger import (DriftAlarm, DriftRecord, Ledger, LedgerError, Sighting, Verdict, is_seen,
                           open_readonly)
from anomon.linequeue import LineQueues
from anomon.logs import setup_logging
from anomon.metrics import LineMetrics, Metrics
from anomon.retention import PassResult, Policy, Retention
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


def _error(line: str, cand: Candidate, reason: str, message: str, st: os.stat_result | None = None,
           sha256: str | None = None) -> Verdict:
    return Verdict(path=cand.path, line=line, verdict="error", reason=reason, message=message,
                   arrived_at=cand.arrived_at, scored_at=time.time(),
                   size=st.st_size if st else None, mtime_ns=st.st_mtime_ns if st else None,
                   sha256=sha256)


# ------------------------------------------------------------------------------ one line


class _Line:
    """What the daemon holds for one line. `detector` is swapped whole by a reload (the worker
    takes one reference per batch); `drift` belongs to the scoring worker once it runs."""

    def __init__(self, cfg: LineConfig, device: str) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.device = device
        self.detector: Any = None
        self.load_error: str | None = None  # why the model did not load at start (None: serving)
        self.model_stat: tuple[int, int, int] | None = None
        self.metrics: LineMetrics | None = None
        self.drift: DriftTest | None = None

    def stat_model(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.cfg.model)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def load(self) -> Any:
        """The line's model from its bundle, at the line's own false-alarm target if it has one
        (the bundle's calibration scores, the same conformal rule); BundleError if unusable."""
        from anomon.detector import Detector  # torch: imported after the cheap checks

        self.model_stat = self.stat_model()
        det = Detector.load(self.cfg.model, device=self.device)
        if self.cfg.target_fpr is not None and self.cfg.target_fpr != det.target_fpr:
            file_id = det.model_id
            det.calibrate(det.calibration_scores_.numpy(), self.cfg.target_fpr)
            log.info("line %s: threshold %.5g for its target false-alarm rate %g (bundle %s set %g); "
                     "model id %s stands for this bundle at this target", self.name, det.threshold_,
                     self.cfg.target_fpr, file_id, det.calibration_info_.get("target_fpr", 0.0),
                     det.model_id, extra={"line": self.name, "model_id": det.model_id})
        return det


# ------------------------------------------------------------------------------ the service


class Service:
    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.state = Path(cfg.state).absolute()
        self.ledger_file = state.ledger_path(self.state)
        self.lines = {ln.name: _Line(ln, cfg.device) for ln in cfg.all_lines()}
        self._roots = sorted((os.path.realpath(w) for ln in self.lines.values() for w in ln.cfg.watch),
                             key=len, reverse=True)
        self.ledger: Ledger | None = None
        self.metrics: Metrics | None = None
        self.intake: Intake | None = None
        self.web: WebServer | None = None
        self.queue = LineQueues({n: [str(w) for w in ln.cfg.watch] for n, ln in self.lines.items()},
                                maxsize=cfg.queue_size,
                                batch_sizes={n: ln.cfg.batch_size or cfg.batch_size for n, ln in self.lines.items()})
        self.exporters: list[Any] = []
        self.retention: Retention | None = None
        self.anomalies: AnomalyStore | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._worker_beat = time.monotonic()
        self._worker_error: str | None = None
        self._lock_fd: int | None = None
        self._ready_sent = False
        self._drift_reset = threading.Event()

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to "watching"; raises StartupError with one line on any user problem."""
        cfg = self.cfg
        for ln in self.lines.values():
            for d in ln.cfg.watch:
                if not Path(d).is_dir():
                    where = "" if len(self.lines) == 1 else f" (line {ln.name})"
                    raise StartupError(f"watch folder not found (or not a folder){where}: {d}")
        real = sorted((os.path.realpath(w), ln.name) for ln in self.lines.values() for w in ln.cfg.watch)
        for (a, la), (b, lb) in zip(real, real[1:]):
            if is_under(b, a):  # links can hide what config saw
                raise StartupError(f"watch folders overlap (lines {la} and {lb}) once links are "
                                   f"resolved: {a} and {b}; each folder belongs to one line")

        # The models and the port first: a start that fails on either leaves no state behind.
        self._load_models()
        self.metrics = m = Metrics({n: (ln.detector.threshold_ if ln.detector else None)
                                    for n, ln in self.lines.items()})
        for ln in self.lines.values():
            ln.metrics = m.line(ln.name)
            ln.metrics.set_drift_alpha(ln.cfg.drift_alpha or cfg.drift_alpha)
            if ln.detector is not None:
                det = ln.detector
                ln.metrics.set_model(det.model_id, det.size_label, det.channels, det.threshold_, det.target_fpr)
            else:
                ln.metrics.up.set(0)
                self.queue.pause(ln.name)
        from anomon.review import ReviewPage  # review: the page at /review (its token is read now)

        review = ReviewPage(self.state, token=cfg.review_secret(), metrics=m) if cfg.review_page else None
        try:
            self.web = WebServer(cfg.host, cfg.port, registry=m.registry, ready=self.ready_checks,
                                 healthy=self.healthy, ledger_file=self.ledger_file, review=review)
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
            for ln in self.lines.values():
                if ln.detector is not None:
                    ln.drift = self._resume_drift(self.ledger, ln)
        except Exception as e:  # sqlite3 errors: a ledger that opened but cannot be written
            raise StartupError(f"ledger {self.ledger_file}: cannot read or write the drift test's "
                               f"state ({type(e).__name__}: {e})") from None
        if cfg.anomalies_dir:
            self.anomalies = AnomalyStore(self.state / state.ANOMALIES_DIR, cfg.anomalies_max_bytes,
                                          max_age_s=Policy.from_config(cfg).max_age_s)
            import anomon.heatmap  # noqa: F401  (matplotlib: now, not on the first anomaly)
        self.web.start()
        log.info("serving /metrics /healthz /readyz /alerts%s on http://%s:%d",
                 "" if review is None else f" /review ({'judging' if review.judging else 'read-only'})",
                 cfg.host, self.web.port)

        self._worker = threading.Thread(target=self._work, name="anomon-scorer", daemon=True)
        self._worker.start()

        self.intake = Intake(
            [str(w) for ln in self.lines.values() for w in ln.cfg.watch], self.queue, is_seen=self._seen_checker(),
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
        intake = self.intake
        for ln in self.lines.values():
            ln.metrics.queue_depth.set_function(  # type: ignore[union-attr]
                lambda name=ln.name: intake.backlog(name))

        policy = Policy.from_config(cfg)
        self.exporters.append(JsonlExporter(
            self.ledger.reopen(), self.state, max_bytes=cfg.alerts_jsonl_max_bytes,
            keep_files=cfg.alerts_jsonl_keep_files, max_age_s=policy.max_age_s,
            on_rotated=m.retention_jsonl_rotations.inc, on_removed=m.retention_jsonl_removed.inc))
        for ln in self.lines.values():
            if ln.cfg.webhook_url:
                self.exporters.append(WebhookSender(
                    self.ledger.reopen(), self.state, ln.cfg.webhook_url, line=ln.name,
                    timeout_s=cfg.webhook_timeout_s, max_backoff_s=cfg.webhook_max_backoff_s,
                    max_age_s=cfg.webhook_max_age_s, max_spool_bytes=cfg.webhook_max_spool_bytes,
                    on_result=lambda r, lm=ln.metrics: lm.webhook_deliveries[r].inc()))  # type: ignore[union-attr]
        for e in self.exporters:
            e.start()
        if policy.enabled:  # retention (anomon.retention): its own connection and thread
            self.retention = Retention(
                self.ledger.reopen(), policy, cursors=[JsonlExporter.CURSOR],
                line_cursors={e.line: e.CURSOR for e in self.exporters if isinstance(e, WebhookSender)},
                interval_s=cfg.retention_interval_s, on_pass=lambda r: _count_pass(m, r),
                prune_copies=self.anomalies.prune if self.anomalies is not None else None)
            self.retention.start()

    def _load_models(self) -> None:
        """Every line's model. One line: a model that does not load stops the start (one line of
        error, as ever). Several: that line waits for a good model and the others start; only
        if none loads does the start fail."""
        from anomon.detector import BundleError

        for ln in self.lines.values():
            try:
                ln.detector = ln.load()
            except BundleError as e:
                if len(self.lines) == 1:
                    raise
                ln.load_error = str(e)
                log.error("line %s: model not loaded, its images wait until a good model is in place "
                          "(replace the file or SIGHUP): %s", ln.name, e,
                          extra={"line": ln.name, "reload": "failure"})
                continue
            det = ln.detector
            log.info("%smodel %s loaded from %s (threshold %.5g, %s px, %d channel(s))",
                     "" if len(self.lines) == 1 else f"line {ln.name}: ", det.model_id, ln.cfg.model,
                     det.threshold_, det.size_label, det.channels,
                     extra={"model_id": det.model_id, "line": ln.name})
        if all(ln.detector is None for ln in self.lines.values()):
            raise StartupError("no line's model could be loaded: " + "; ".join(
                f"{ln.name}: {ln.load_error}" for ln in self.lines.values()))

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

    def ready_checks(self) -> dict[str, Any]:
        """/readyz's checks. The daemon is ready while at least one line has a model: a line
        whose model failed to load is down on its own (`lines` says which and why, and
        anomon_line_up is 0), it does not make the host's other lines look down."""
        i = self.intake
        lines = {"lines": {n: ("serving" if ln.detector is not None else f"waiting for a model: {ln.load_error}")
                           for n, ln in self.lines.items()}} if len(self.lines) > 1 else {}
        return {
            "model_loaded": any(ln.detector is not None for ln in self.lines.values()),
            "ledger_open": self.ledger is not None and self._worker_error is None,
            "watcher_running": i is not None and i.watching,
            "startup_rescan_done": i is not None and i.startup_scan_done.is_set(),
            "scorer_running": self._worker is not None and self._worker.is_alive(),
            "not_stopping": not self._stop.is_set(),
            **lines,
        }

    def is_ready(self) -> bool:
        return all(v for v in self.ready_checks().values() if isinstance(v, bool))

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
                for ln in self.lines.values():
                    self.reload_model("SIGHUP", ln)
            else:
                for ln in self.lines.values():
                    if self._model_changed(ln):
                        self.reload_model("model file changed", ln)

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
        if self.retention is not None:
            self.retention.stop(timeout=min(2.0, left()))
        for e in self.exporters:
            e.stop(timeout=min(2.0, left()))
        if self.web is not None:
            self.web.stop()
        if self.ledger is not None:
            self.ledger.close()
        if started:
            log.info("stopped; %d image(s) left waiting are scored at the next start", self.queue.qsize())

    # -- model reloads -----------------------------------------------------------------------

    def _model_changed(self, ln: _Line) -> bool:
        """The file changed and then stayed the same for a moment (a writer may be mid-copy)."""
        now = ln.stat_model()
        if now is None or now == ln.model_stat:
            return False
        time.sleep(0.3)
        if ln.stat_model() != now:
            return False
        return True

    def reload_model(self, why: str, ln: _Line) -> bool:
        """Load a line's new model beside the old one and switch atomically; keep the old on
        failure. A line that had no model starts scoring with its first good one."""
        from anomon.detector import BundleError

        lm = ln.metrics
        assert lm is not None
        old = ln.detector
        who = self._who(ln)
        try:
            new = ln.load()
        except BundleError as e:
            lm.model_reloads["failure"].inc()
            still = f"still serving {old.model_id}" if old is not None else "its images still wait"
            log.error("%smodel reload (%s) refused, %s: %s", who, why, still, e,
                      extra={"model_id": old.model_id if old else None, "reload": "failure", "line": ln.name})
            return False
        ln.detector = new  # one reference swap; the worker takes it at its next batch
        ln.load_error = None
        lm.set_model(new.model_id, new.size_label, new.channels, new.threshold_, new.target_fpr)
        lm.model_reloads["success"].inc()
        if old is None:
            self.queue.pause(ln.name, False)
        base = lm.bucket_threshold
        if base > 0 and not 0.5 <= new.threshold_ / base <= 2.0:
            log.warning("%snew threshold %.5g is far from %.5g, which the anomon_anomaly_score buckets "
                        "were placed around; restart to re-place them", who, new.threshold_, base,
                        extra={"line": ln.name})
        log.info("%smodel reloaded (%s): %s -> %s (threshold %.5g)", who, why,
                 old.model_id if old is not None else "none", new.model_id, new.threshold_,
                 extra={"model_id": new.model_id, "previous_model_id": old.model_id if old else None,
                        "reload": "success", "line": ln.name})
        return True

    # -- the scoring worker ------------------------------------------------------------------

    def _work(self) -> None:
        writer = self.ledger.reopen()  # type: ignore[union-attr]  # this thread's own connection
        heap = HeapTrimmer()  # trimmed here, between batches, never while this thread allocates
        try:
            while not self._worker_stop.is_set():
                self._worker_beat = time.monotonic()
                self._drift_chores(writer)
                got = self.queue.take(timeout=0.2)
                if got is None:
                    heap.idle()
                    continue
                line, batch = got
                try:
                    self._score_batch(writer, self.lines[line], batch)
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

    def _score_batch(self, led: Ledger, ln: _Line, batch: list[Candidate]) -> None:
        det = ln.detector  # one model for the whole batch, even if a reload lands meanwhile
        m = ln.metrics
        assert m is not None and det is not None
        if ln.drift is None or ln.drift.model_id != det.model_id:
            self._reset_drift(led, ln, "model", det)
        t0 = time.perf_counter()
        verdicts: list[Verdict] = []
        sightings: list[Sighting] = []
        scorable: list[_Scorable] = []
        in_batch: dict[tuple[str, str], Verdict] = {}
        for cand in batch:
            got = self._read(led, ln.name, cand)
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
            item = self._decode(det, ln.name, cand, st, sha, data)
            if item is None:
                continue
            if isinstance(item, Verdict):
                v = item
            else:
                v = Verdict(path=cand.path, line=ln.name, verdict="normal", arrived_at=cand.arrived_at, scored_at=0.0,
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
        drift, step, drift_record = self._drift_step(ln, det, verdicts)
        led.record(verdicts, sightings, drift_record)  # THE checkpoint: after scoring, one transaction
        if drift is not None and step is not None:
            self._drift_taken(ln, drift, step, drift_record)

        per_image = elapsed / max(1, len(scorable))
        cand_of = {(s.cand.path, s.sha256): s.cand for s in scorable}
        alerts = 0
        for v in verdicts:
            if v.verdict == "error":
                m.image_errors[v.reason].inc()  # type: ignore[index]
                log.warning("not scored: %s [%s]", v.message, v.reason,
                            extra={"path": v.path, "reason": v.reason, "image_id": v.image_id,
                                   "line": ln.name})
                continue
            m.images_scored[v.verdict].inc()
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
                "model_id": v.model_id, "image_id": v.image_id, "alert_id": v.alert_id, "line": ln.name})
        for dup in sightings:
            m.duplicates.inc()
            log.info("duplicate (same path, same bytes as image %s): %s", dup.image_id, dup.path,
                     extra={"path": dup.path, "duplicate_of": dup.image_id, "line": ln.name})
        if alerts:
            for e in self.exporters:
                e.notify()

    # -- the drift tests (scoring worker; start() before the worker runs) ---------------------

    def _new_drift(self, ln: _Line, det: Any) -> DriftTest:
        return DriftTest.for_detector(det, alpha=ln.cfg.drift_alpha or self.cfg.drift_alpha, line=ln.name)

    def _resume_drift(self, led: Ledger, ln: _Line) -> DriftTest:
        """A line's drift test as the ledger left it for this model, or a fresh one (recorded)."""
        assert ln.metrics is not None
        test = self._new_drift(ln, ln.detector)
        stored = led.drift(test.line)
        if stored is not None:
            refused = test.restore(*stored)
            if refused is None:
                log.info("%sdrift test resumed: martingale 10^%.3g after %d image(s) judged normal "
                         "since its reset (%s)", self._who(ln), test.log10, test.images, test.reset_reason,
                         extra={"drift_log10": test.log10, "drift_images": test.images, "line": ln.name})
                self._show_drift(ln, test)
                return test
            why, message = refused
            if why == "model":
                ln.metrics.drift_resets["model"].inc()
                test.reset("model")
            log.info("%sdrift test starts again from the calibration images: %s", self._who(ln), message,
                     extra={"drift_reset": why, "line": ln.name})
        led.write_drift(DriftRecord(test.line, test.state_json(), reset=True))
        self._show_drift(ln, test)
        return test

    def _reset_drift(self, led: Ledger, ln: _Line, reason: str, det: Any = None) -> None:
        """Start a line's evidence again: for another model (`det`), or the operator's reset."""
        old = ln.drift
        assert ln.metrics is not None
        if det is not None:
            new = self._new_drift(ln, det)
        else:
            assert old is not None
            new = copy.copy(old)  # reset() replaces the arrays it holds, so the two share nothing
        new.reset(reason)
        led.write_drift(DriftRecord(new.line, new.state_json(), reset=True))
        ln.drift = new
        ln.metrics.drift_resets[reason].inc()
        self._show_drift(ln, new)
        if old is None:  # the line's first model since start: nothing to reset, only to begin
            return
        why = ("by the operator (SIGUSR1)" if reason == "operator"
               else f"for model {new.model_id} (was {old.model_id})")
        log.info("%sdrift test reset %s: martingale was 10^%.3g after %d image(s) judged normal; the "
                 "evidence starts again from the calibration images", self._who(ln), why, old.log10,
                 old.images, extra={"drift_reset": reason, "drift_log10": old.log10,
                                    "drift_images": old.images, "model_id": new.model_id, "line": ln.name})

    def _drift_chores(self, led: Ledger) -> None:
        """Between batches: the operator's reset, and a reset for a model that just began serving
        (so the gauge shows it at once, not at the next image)."""
        try:
            operator = self._drift_reset.is_set()
            for ln in self.lines.values():
                det = ln.detector
                if det is None:
                    continue
                if ln.drift is None or ln.drift.model_id != det.model_id:
                    self._reset_drift(led, ln, "model", det)
                elif operator:
                    self._reset_drift(led, ln, "operator")
            if operator:
                self._drift_reset.clear()
        except Exception:  # e.g. a full disk: the test keeps its evidence until the write succeeds
            log.exception("could not reset the drift test; trying again in a second")
            self._worker_stop.wait(1.0)

    def _drift_step(self, ln: _Line, det: Any, verdicts: list[Verdict]
                    ) -> tuple[DriftTest | None, Step | None, DriftRecord | None]:
        """The line's drift test's bet on this batch's scores, and what the ledger is to record."""
        drift = ln.drift
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

    def _drift_taken(self, ln: _Line, drift: DriftTest, step: Step, record: DriftRecord | None) -> None:
        """After the ledger recorded the batch: move the test, the gauges, and say any alarm."""
        drift.apply(step)
        self._show_drift(ln, drift)
        alarm = record.alarm if record is not None else None
        if alarm is not None:
            assert ln.metrics is not None
            ln.metrics.drift_alarms.inc()
            hint = (_DRIFT_HIGHER if alarm.direction == "higher" else _DRIFT_LOWER)
            log.warning(
                "DRIFT%s: the images judged normal no longer look like the calibration images: they "
                "score %s than before (%s). Evidence 10^%.3g >= 1/alpha = %g after %d image(s) since the "
                "drift test's reset; a false alarm has probability at most %g. Fix the cause and reset "
                "the test (SIGUSR1), or recalibrate (anomon calibrate) if the change is wanted",
                "" if len(self.lines) == 1 else f" on line {ln.name}",
                alarm.direction, hint, alarm.log10_martingale, 1.0 / alarm.alpha, alarm.images, alarm.alpha,
                extra={"drift_alarm_id": alarm.alarm_id, "drift_log10": alarm.log10_martingale,
                       "drift_images": alarm.images, "drift_direction": alarm.direction,
                       "image_id": alarm.at.image_id if alarm.at else None, "model_id": alarm.model_id,
                       "line": ln.name})

    @staticmethod
    def _show_drift(ln: _Line, drift: DriftTest) -> None:
        if ln.metrics is not None:
            ln.metrics.drift_log10.set(drift.log10)
            ln.metrics.drift_images.set(drift.images)

    def _who(self, ln: _Line) -> str:
        """A log line's prefix naming the line, when there is more than one."""
        return "" if len(self.lines) == 1 else f"line {ln.name}: "

    def _root_of(self, path: str) -> str | None:
        """The watched folder (symlinks resolved) that `path` lies in; None if none does."""
        for root in self._roots:
            if is_under(path, root):
                return root
        return None

    def _read(self, led: Ledger, line: str, cand: Candidate) -> tuple[os.stat_result, bytes, bool] | Verdict | None:
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
                    return _error(line, cand, e.reason, str(e), None)  # no stat: its state is not "seen"
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
        return _error(line, cand, reason, message, lst)

    def _decode(self, det: Any, line: str, cand: Candidate, st: os.stat_result, sha: str,
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
            return _error(line, cand, e.reason, str(e), st, sha)
        return _Scorable(cand, sha, data, prepared)


def _count_pass(m: Metrics, r: PassResult) -> None:
    """A retention pass's removals, in the metrics (anomon_retention_*)."""
    m.retention_images.inc(r.images)
    m.retention_alerts.inc(r.alerts)
    m.retention_forgotten.inc(r.forgotten)
    m.retention_anomaly_files.inc(r.copies)
    m.retention_last_pass.set(time.time())


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

