"""Retention: months of images on a bounded disk. One background thread, one job: prune the ledger.

What grows, and what bounds it:
- ledger rows: image rows older than `retention_max_age_days` (by verdict time) or beyond the
  newest `retention_max_images` are deleted by this thread, with their alerts;
- alerts.jsonl: rotated by its exporter at `alerts_jsonl_max_bytes` (anomon.alerts.JsonlExporter),
  which also removes rotated files older than the retention age;
- anomaly copies: bounded by `anomalies_max_bytes` (anomon.anomalies), and by the retention age:
  each pass asks the store to remove copies and heat maps older than it.

What is never pruned, whatever its age: an alert an exporter has not handled yet (its id above the
alerts.jsonl cursor, or above its line's webhook cursor: pruning it would lose it), an alert an
operator has judged on the review page (a label for training, and the page's history; judged
alerts are few, bounded by people's time), a drift alarm and the image it names.

Exactly once still holds for pruned images. Each one leaves a compact record: its `seen` rows (a
rescan does not even queue its file) and a `pruned` row (path, image id, 32-byte SHA-256), which
Ledger.find consults, so its file, touched or rewritten with the same bytes, is a duplicate, not a
new image. The record is forgotten once the file has left the folder (deleted or moved away):
until then a file in the folder is never scored twice; after that, the same bytes copied in
again at the same path count as a new image. A file counts as gone only when its folder is there
and not empty, so a network share that is not mounted, or a folder moved away, forgets nothing.

Small transactions: SQLite has one writer at a time, and the scoring worker commits a batch every
few milliseconds under load. Each pruning transaction deletes at most `BATCH` rows, fewer when the
disk is slow: the batch is sized to take about `TARGET_S` (1,000 rows took 120-280 ms with fsync
on a shared VM, bench/results/disk_usage.md), and the thread pauses between transactions, so a
verdict waits for at most one short transaction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from anomon.config import WatchConfig
from anomon.ledger import Ledger

log = logging.getLogger("anomon.retention")

BATCH = 1000          # image rows per pruning transaction, at most
MIN_BATCH = 50
TARGET_S = 0.05       # what one pruning transaction should take: the scoring worker waits that long
PAUSE_S = 0.05        # between transactions: the scoring worker's commits go first
FORGET_CHECKS = 2000  # pruned images' paths stat'ed per pass (round robin over all of them)
FIRST_PASS_S = 30.0   # the first pass after start, at the latest


@dataclass(frozen=True)
class Policy:
    """What to keep: rows younger than `max_age_s` and the newest `max_images` (None: no bound)."""

    max_age_s: float | None = None
    max_images: int | None = None

    @classmethod
    def from_config(cls, cfg: WatchConfig) -> Policy:
        days = cfg.retention_max_age_days
        return cls(days * 86400.0 if days is not None else None, cfg.retention_max_images)

    @property
    def enabled(self) -> bool:
        return self.max_age_s is not None or self.max_images is not None

    def describe(self) -> str:
        parts = []
        if self.max_age_s is not None:
            parts.append(f"older than {self.max_age_s / 86400.0:g} day(s)")
        if self.max_images is not None:
            parts.append(f"beyond the newest {self.max_images}")
        return " or ".join(parts) or "nothing"


@dataclass
class PassResult:
    """What one pass did."""

    images: int = 0
    alerts: int = 0
    held: int = 0         # old enough but kept (alert not exported yet or judged, drift alarm)
    forgotten: int = 0    # records of pruned images whose file has gone
    copies: int = 0       # anomaly copies and heat maps removed for their age
    batches: int = 0
    longest_s: float = 0.0  # the longest pruning transaction
    seconds: float = 0.0


def file_gone(path: str | bytes) -> bool:
    """The file is not there, and its folder is there and not empty (so an unmounted share or a
    folder moved away never counts as every file in it gone). Any other doubt: not gone."""
    try:
        os.lstat(path)
        return False
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        with os.scandir(os.path.dirname(path) or ".") as it:
            return any(True for _ in it)
    except OSError:
        return False


class Retention:
    """The background pruner. `ledger` is its own connection (Ledger.reopen(), handed over
    before start()); `cursors` are the alerts.jsonl exporter's cursor names, `line_cursors` each
    webhook line's; an alert above one of them is not pruned."""

    def __init__(self, ledger: Ledger, policy: Policy, *, cursors: Sequence[str] = (),
                 line_cursors: Mapping[str, str] | None = None, interval_s: float = 300.0,
                 batch: int = BATCH, pause_s: float = PAUSE_S, forget_checks: int = FORGET_CHECKS,
                 on_pass: Callable[[PassResult], None] = lambda r: None,
                 prune_copies: Callable[[], int] | None = None) -> None:
        self._ledger = ledger
        self.policy = policy
        self._cursors = list(cursors)
        self._line_cursors = dict(line_cursors or {})
        self.interval_s = interval_s
        self._batch = batch
        self._pause_s = pause_s
        self._forget_checks = forget_checks
        self._on_pass = on_pass
        self._prune_copies = prune_copies  # AnomalyStore.prune: removes copies past the age
        self._forget_after: str | bytes | None = None  # where the round robin over pruned paths is
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="anomon-retention", daemon=True)

    def start(self) -> None:
        log.info("retention: image rows %s are pruned every %g s", self.policy.describe(), self.interval_s)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the transaction in hand (one batch: milliseconds)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            wait = min(self.interval_s, FIRST_PASS_S)
            while not self._stop.wait(wait):
                wait = self.interval_s
                try:
                    self.run_pass()
                except Exception:  # a full disk, a locked ledger: the next pass tries again
                    log.exception("retention pass failed; trying again in %g s", self.interval_s)
        finally:
            self._ledger.close()

    def run_pass(self, now: float | None = None) -> PassResult:
        """Prune what the policy says, in transactions of at most `batch` rows, then forget the
        records of pruned images whose files have gone, and remove anomaly copies past the age.
        Safe to run while the scoring worker writes; a stop ends it after the transaction in hand."""
        t0 = time.monotonic()
        now = time.time() if now is None else now
        r = PassResult()
        older = now - self.policy.max_age_s if self.policy.max_age_s is not None else None
        upper, below = self._ledger.prune_bounds(older, self.policy.max_images)
        after = 0
        limit = min(self._batch, 200)  # then sized to take about TARGET_S
        while upper > after:
            b0 = time.monotonic()
            got = self._ledger.prune_images(after, upper, below, older, cursors=self._cursors,
                                            line_cursors=self._line_cursors, limit=limit)
            took = time.monotonic() - b0
            r.longest_s = max(r.longest_s, took)
            limit = int(min(self._batch, max(MIN_BATCH, limit * TARGET_S / max(took, 1e-3))))
            r.batches += 1
            r.images += got.images
            r.alerts += got.alerts
            r.held += got.held
            after = got.last_id
            if got.done or self._stop.wait(self._pause_s):
                break
        if not self._stop.is_set():
            r.forgotten = self._forget()
        if self._prune_copies is not None and not self._stop.is_set():
            r.copies = self._prune_copies()
        r.seconds = time.monotonic() - t0
        self._on_pass(r)
        log.info("retention pass: pruned %d image row(s) and %d alert(s) (%s) in %d transaction(s), the "
                 "longest %.0f ms; kept %d old one(s) (alert not yet exported, or judged; drift alarm); "
                 "forgot %d pruned image(s) whose file has gone; removed %d anomaly file(s) past the age; "
                 "%.2f s", r.images, r.alerts, self.policy.describe(), r.batches, r.longest_s * 1000, r.held,
                 r.forgotten, r.copies, r.seconds,
                 extra={"retention_images": r.images, "retention_alerts": r.alerts, "retention_held": r.held,
                        "retention_forgotten": r.forgotten, "retention_copies": r.copies})
        return r

    def _forget(self) -> int:
        """Check the next `forget_checks` pruned images' paths; forget those whose file is gone."""
        paths = self._ledger.pruned_paths(self._forget_after, self._forget_checks)
        self._forget_after = paths[-1] if len(paths) == self._forget_checks else None  # else: wrap
        gone = [p for p in paths if file_gone(p)]
        n = 0
        for i in range(0, len(gone), 500):
            n += self._ledger.forget(gone[i:i + 500], file_gone)
            if self._stop.is_set():
                break
        return n
