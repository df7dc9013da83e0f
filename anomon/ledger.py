"""The SQLite ledger: what was seen, what it was judged, and the alerts raised. It is the checkpoint.

One transaction records a batch of verdicts, marks their files as seen and raises their alerts, and
it is written only AFTER scoring: a crash before the commit leaves those files unrecorded, so the
start-up rescan scores them again; a crash after it can never score them twice. (Fluent Bit lost
records by checkpointing on read; see shared/RELIABILITY.md.) WAL with synchronous=FULL fsyncs every
commit, which survives power loss as well as `kill -9`, and costs one fsync per batch.

Identity: an image is (path, SHA-256 of the whole file). Same path with new bytes is a new image;
same path with the same bytes is a duplicate and gets no second row. The `seen` table remembers
every (path, size, mtime_ns) a verdict covers, so a rescan can tell "already handled" from one
stat() without hashing, including files that were rewritten with identical bytes.

A ledger that exists but is empty, garbage or not ours is refused with its name: starting afresh
would re-score and re-alert every image in the folders (Filebeat, beats #3537; Promtail, loki #1457).
So is a missing ledger in a state folder that has held one (anomon.state.traces), unless the user
asks for a new one (`new_ledger`). A refusal changes nothing on disk: the write-ahead log's header
is checked before SQLite sees it (SQLite discards a WAL whose header it cannot read, with every
commit in it), and the ledger is validated through a read-only connection, which never
checkpoints or removes the WAL, before the writer's connection is opened.

Alert identity survives restores. Alert ids are never reused: at open, a ledger whose alert
sequence is below the highest id the state folder has seen issued (the marker file, alerts.jsonl,
the dead-letter file) was restored from a backup (or replaced); its sequence is moved above that
id and a new *epoch* (random) begins, which goes into the Idempotency-Key of the alerts raised in
it (see `alert_key`). The marker is rewritten before every commit that raises alerts, so it never
lags behind the ledger.

Drift (anomon.drift): the drift test of each line keeps its state in `drift` (one JSON row a
line) and the scores it has seen in `drift_bag` (a histogram), written in the same transaction as
the verdicts they came from, so a crash neither loses nor counts twice an image's bet; each alarm
is a row of `drift_alarms`. These tables are created if absent at every open (an additive change:
schema 1 still, and a ledger without them is read as before).

Retention (anomon.retention) deletes old image rows (and their exported alerts) in short
transactions of its own, but never what exactly-once rests on: a pruned image keeps its `seen`
rows and a `pruned` row (path, image id, SHA-256 as 32 bytes) that `find` consults, until its file
has left the folder. `seen.image_id` therefore has no foreign key (ledgers from before retention
are rebuilt without it at open).

Connections belong to one thread each (sqlite3's default check): the scoring worker writes through
its `Ledger`; other threads call `Ledger.reopen()` or `open_readonly()` for their own connection.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from anomon import state

log = logging.getLogger("anomon.ledger")

SCHEMA_VERSION = 1
# The write-ahead log's header (https://www.sqlite.org/fileformat2.html#walformat): magic number
# (its last bit says the checksum's byte order), format version, page size, checkpoint sequence,
# two salts, and a checksum of the first 24 bytes.
WAL_MAGIC = (0x377F0682, 0x377F0683)
WAL_VERSION = 3007000
WAL_HEADER_BYTES = 32

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    line TEXT NOT NULL DEFAULT 'default',  -- the configured line whose folder holds the file
    size INTEGER,                -- NULL when the file could not be stat'ed (vanished)
    mtime_ns INTEGER,
    sha256 TEXT,                 -- NULL when the bytes were never read (refused, unreadable, vanished)
    model_id TEXT,
    score REAL,
    p_value REAL,
    threshold REAL,
    verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomalous', 'error')),
    reason TEXT,                 -- for verdict = 'error': one of anomon.errors.REASONS
    message TEXT,
    arrived_at REAL NOT NULL,    -- unix time the file was first noticed
    scored_at REAL NOT NULL      -- unix time of the verdict
);
CREATE UNIQUE INDEX images_path_sha ON images (path, sha256) WHERE sha256 IS NOT NULL;
CREATE INDEX images_scored_at ON images (scored_at);
CREATE TABLE seen (
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    image_id INTEGER NOT NULL,   -- images.id; no foreign key: it outlives a row retention prunes
    PRIMARY KEY (path, size, mtime_ns)
) WITHOUT ROWID;
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL UNIQUE REFERENCES images (id),
    created_at REAL NOT NULL,
    anomaly_image TEXT,          -- copy under STATE/anomalies/, if kept
    heatmap TEXT
);
CREATE TABLE exports (name TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
"""
# Added after schema 1 shipped: created at every open when absent.
_DRIFT_SCHEMA = """
CREATE TABLE IF NOT EXISTS drift (line TEXT PRIMARY KEY, state TEXT NOT NULL);  -- JSON, anomon.drift
CREATE TABLE IF NOT EXISTS drift_bag (
    line TEXT NOT NULL,
    key INTEGER NOT NULL,        -- a score rounded to 10 significant bits (anomon.drift.score_keys)
    n INTEGER NOT NULL,          -- images tested since the line's last reset with this key
    PRIMARY KEY (line, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drift_alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    line TEXT NOT NULL,
    raised_at REAL NOT NULL,
    model_id TEXT,
    log10_martingale REAL NOT NULL,
    alpha REAL NOT NULL,
    images INTEGER NOT NULL,     -- images tested since the reset, the one that crossed included
    direction TEXT,              -- 'higher' or 'lower': what the images score compared with before
    image_id INTEGER REFERENCES images (id),  -- the image that took the martingale to 1/alpha
    reset_at REAL                -- the reset the evidence was gathered since
);
"""
# Retention (anomon.retention) prunes old image rows but keeps what exactly-once needs: their `seen`
# rows (a rescan does not queue the file) and one `pruned` row each (path, image id, SHA-256 as 32
# bytes), which Ledger.find consults, so the file touched with the same bytes is still a duplicate.
_RETENTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS pruned (
    path TEXT NOT NULL,
    image_id INTEGER NOT NULL,
    sha256 BLOB,                 -- NULL when the bytes were never read
    PRIMARY KEY (path, image_id)
) WITHOUT ROWID;
"""
# Ledgers from before retention had seen.image_id REFERENCES images (id), which forbids deleting an
# image row its file's seen rows point to; the table is rebuilt without it, once, at open.
_SEEN_MIGRATION = """
CREATE TABLE seen_new (
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    PRIMARY KEY (path, size, mtime_ns)
) WITHOUT ROWID;
INSERT INTO seen_new (path, size, mtime_ns, image_id) SELECT path, size, mtime_ns, image_id FROM seen;
DROP TABLE seen;
ALTER TABLE seen_new RENAME TO seen;
"""
# Ledgers written before lines (one daemon, one model) hold the images of the line `default`; their
# drift test was stored under the line "". Both are made explicit at open, in one transaction.
_LINES_MIGRATION = """
ALTER TABLE images ADD COLUMN line TEXT NOT NULL DEFAULT 'default';
UPDATE drift SET line = 'default' WHERE line = '';
UPDATE drift_bag SET line = 'default' WHERE line = '';
UPDATE drift_alarms SET line = 'default' WHERE line = '';
"""


class LedgerError(Exception):
    """The ledger cannot be used; the message is one line naming the file."""


@dataclass
class Verdict:
    """One row to record: a scored image (normal/anomalous) or one that could not be scored."""

    path: str
    verdict: str  # "normal" | "anomalous" | "error"
    arrived_at: float
    scored_at: float
    line: str = "default"
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    model_id: str | None = None
    score: float | None = None
    p_value: float | None = None
    threshold: float | None = None
    reason: str | None = None
    message: str | None = None
    anomaly_image: str | None = None
    heatmap: str | None = None
    # Filled in by Ledger.record:
    image_id: int | None = None
    alert_id: int | None = None


@dataclass
class Sighting:
    """A file state (path, size, mtime_ns) that an existing row already covers (a duplicate).

    `of` names a Verdict recorded in the same batch, whose id is not known until it is inserted.
    """

    path: str
    size: int
    mtime_ns: int
    image_id: int | None = None
    of: Verdict | None = None


@dataclass
class DriftAlarm:
    """A drift test's martingale reached 1/alpha (anomon.drift); `at` is the image that took it
    there, recorded in the same batch (its id is known once inserted)."""

    line: str
    raised_at: float
    model_id: str
    log10_martingale: float
    alpha: float
    images: int
    direction: str | None = None
    reset_at: float | None = None
    at: Verdict | None = None
    alarm_id: int | None = None  # filled in by Ledger.record


@dataclass
class DriftRecord:
    """One line's drift state to write: its JSON `state`, the score keys to add to its bag, and
    an alarm if this batch raised one. `reset` empties the bag first (a reset's own record)."""

    line: str
    state: str
    added: Sequence[tuple[int, int]] = ()
    alarm: DriftAlarm | None = None
    reset: bool = False


def _connect(path: Path, *, readonly: bool = False, same_thread: bool = True) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0,
                               check_same_thread=same_thread)
    else:  # isolation_level=None: we issue BEGIN/COMMIT ourselves
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=same_thread)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _describe(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _wal_checksum(data: bytes, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum: 32-bit words in the byte order the magic number names."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0 = s1 = 0
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_header_problem(wal: Path) -> str | None:
    """What is wrong with a write-ahead log's header, or None if it is sound (or there is no
    header at all: a WAL shorter than one holds no commit)."""
    try:
        with open(wal, "rb") as f:
            head = f.read(WAL_HEADER_BYTES)
    except FileNotFoundError:
        return None
    if len(head) < WAL_HEADER_BYTES:
        return None
    magic, version = struct.unpack(">II", head[:8])
    if magic not in WAL_MAGIC:
        return f"magic number 0x{magic:08x}, not 0x377f0682 or 0x377f0683"
    if version != WAL_VERSION:
        return f"format version {version}, not {WAL_VERSION}"
    if _wal_checksum(head[:24], big_endian=bool(magic & 1)) != struct.unpack(">II", head[24:32]):
        return "its checksum does not match"
    return None


def _check_wal(path: Path) -> None:
    """Refuse a ledger whose -wal file SQLite would throw away: it ignores a WAL with a bad header,
    so the commits in it would be lost, and the file is reset or removed once the ledger is open."""
    wal = Path(f"{path}-wal")
    problem = wal_header_problem(wal)
    if problem is not None:
        raise LedgerError(
            f"write-ahead log {wal} of ledger {path} has a damaged header ({problem}); it may hold "
            "the latest verdicts, which opening the ledger would discard, so both files are left "
            "untouched: repair the header or restore both from a backup")


def _validate_readonly(path: Path, *, check: bool) -> None:
    """Validate through a read-only connection: refusing it leaves the ledger and its WAL exactly
    as they were (a writer's connection checkpoints and removes the WAL when it closes)."""
    try:
        conn = _connect(path, readonly=True)
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"ledger {path} is not a usable SQLite database ({_describe(e)}); "
                          "restore it from a backup or move it away") from None
    try:
        if check:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise LedgerError(f"ledger {path} is damaged (quick_check: {problems[0]}); restore "
                                  "it from a backup or move it away")
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            raise LedgerError(f"{path} is an SQLite database but not an anomon ledger") from None
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"ledger {path} is not a usable SQLite database ({_describe(e)}); "
                          "restore it from a backup or move it away") from None
    finally:
        conn.close()
    version = int(meta.get("schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise LedgerError(f"ledger {path} was written by a newer anomon (schema {version}, "
                          f"this one reads {SCHEMA_VERSION}); upgrade anomon")
    if version != SCHEMA_VERSION or "ledger_id" not in meta:
        raise LedgerError(f"ledger {path} has an unknown layout (schema {version})")


def _read_marker(state_dir: Path) -> tuple[state.Marker | None, bool]:
    """The state folder's marker (None if absent) and whether it could be read. An unreadable one
    is said in the log and rewritten; the ledger then starts a new epoch, which is always safe."""
    try:
        return state.read_marker(state_dir), True
    except state.MarkerError as e:
        log.warning("%s; it is rewritten", e)
        return None, False


def _alert_sequence(conn: sqlite3.Connection) -> int:
    """The highest alert id this ledger has ever given (AUTOINCREMENT never gives one twice)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'alerts'").fetchone()
    return int(row[0]) if row else 0


def _epochs(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    row = conn.execute("SELECT value FROM meta WHERE key = 'epochs'").fetchone()
    return [(int(first), str(epoch)) for first, epoch in json.loads(row[0])] if row else []


class Ledger:
    """The writer's connection to the ledger (use from one thread)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, ledger_id: str,
                 epochs: Sequence[tuple[int, str]] = ()) -> None:
        self.path = path
        self.ledger_id = ledger_id
        self.epochs = list(epochs)  # [(first alert id, epoch)], oldest first
        self._conn = conn

    @property
    def epoch(self) -> str:
        """The epoch new alerts are raised in ("" until the ledger's first restore)."""
        return self.epochs[-1][1] if self.epochs else ""

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, check: bool = True, new_ledger: bool = False) -> Ledger:
        """Open (or create, if absent) the ledger at `path`; refuse anything we cannot trust.

        The folder holding it is the state folder. An absent ledger is created only if that
        folder shows no trace of an earlier one, or if `new_ledger` is true; its alert ids then
        start above every id the folder has seen. Refusals raise LedgerError (one line, naming
        the file) and leave every file as it was."""
        path = Path(path)
        existed = path.exists()
        if existed:
            if path.is_dir():
                raise LedgerError(f"ledger {path} is a directory, not a file")
            if path.stat().st_size == 0:
                raise LedgerError(
                    f"ledger {path} is empty (0 bytes, e.g. after a crash or a full disk); refusing "
                    "to start afresh, which would score and alert every image again: restore it "
                    "from a backup, or move it away to start a new ledger")
            _check_wal(path)
            _validate_readonly(path, check=check)
        else:
            wal = Path(f"{path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise LedgerError(
                    f"ledger {path} is missing but its write-ahead log {wal} is not: restore the "
                    "ledger, or move the -wal file away to start a new ledger")
            found = state.traces(path.parent)
            if found and not new_ledger:
                raise LedgerError(
                    f"ledger {path.name} is missing from state folder {path.parent}, which has held "
                    f"one ({', '.join(found)}): restore it from a backup, or start a new ledger on "
                    "purpose with --new-ledger (new_ledger = true), which scores and alerts every "
                    "image in the watched folders again")
            path.parent.mkdir(parents=True, exist_ok=True)
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"ledger {path}: cannot switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            marker, marker_ok = _read_marker(path.parent)
            if existed:
                ledger_id = ledger_id_of(conn)
                epochs = cls._continue_ids(path, conn, ledger_id, marker, marker_ok)
            else:
                ledger_id = cls._create(conn, state.highest_alert_id(path.parent, marker))
                epochs = []
            columns = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
            migrate = _LINES_MIGRATION if "line" not in columns else ""
            if conn.execute("PRAGMA foreign_key_list(seen)").fetchone() is not None:
                migrate += _SEEN_MIGRATION
            conn.executescript("BEGIN IMMEDIATE;" + _DRIFT_SCHEMA + _RETENTION_SCHEMA + migrate + "COMMIT;")
            led = cls(path, conn, ledger_id, epochs)
            led._write_marker(_alert_sequence(conn))
            return led
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise LedgerError(f"ledger {path} is not a usable SQLite database ({_describe(e)}); "
                                  "restore it from a backup or move it away") from None
            if isinstance(e, OSError):
                raise LedgerError(f"state folder {path.parent}: cannot write "
                                  f"{state.MARKER_NAME} ({e.strerror or e})") from None
            raise

    @staticmethod
    def _create(conn: sqlite3.Connection, first_alert_after: int) -> str:
        ledger_id = uuid.uuid4().hex[:12]
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # Alert ids start above every id the state folder has seen (alerts.jsonl, the dead-letter
        # file, the marker), so alerts.jsonl writes them instead of taking them for old ones.
        sequence = (f"INSERT INTO sqlite_sequence (name, seq) VALUES ('alerts', {int(first_alert_after)});"
                    if first_alert_after > 0 else "")
        # One script, one transaction: a crash mid-creation leaves no half-made ledger behind.
        conn.executescript(
            "BEGIN IMMEDIATE;" + _SCHEMA
            + f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}'), "
            f"('ledger_id', '{ledger_id}'), ('created_at', '{created}');" + sequence + "COMMIT;")
        return ledger_id

    @staticmethod
    def _continue_ids(path: Path, conn: sqlite3.Connection, ledger_id: str,
                      marker: state.Marker | None, marker_ok: bool) -> list[tuple[int, str]]:
        """The ledger's epochs, after starting a new one if this ledger is behind what the state
        folder has seen issued (restored from a backup, or replaced): its alert sequence then
        moves above the highest id seen, so no id (and no key) is ever given twice."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            epochs = _epochs(conn)
            seq = _alert_sequence(conn)
            highest = state.highest_alert_id(path.parent, marker)
            if highest > seq or not marker_ok:
                epoch = uuid.uuid4().hex[:8]
                first = max(highest, seq) + 1
                epochs.append((first, epoch))
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epochs', ?)",
                             (json.dumps(epochs),))
                if conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'alerts'",
                                (first - 1,)).rowcount == 0:
                    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('alerts', ?)", (first - 1,))
                why = ("the state folder's marker was unreadable" if not marker_ok else
                       f"its alerts end at id {seq} but the state folder has seen ids up to {highest} "
                       "(restored from a backup, replaced, or stopped between raising alerts and "
                       "recording them)")
                log.warning("ledger %s: %s; new alerts get ids from %d in a new epoch %s, so their "
                            "keys name no earlier alert", path, why, first, epoch,
                            extra={"ledger_id": ledger_id, "epoch": epoch, "first_alert_id": first})
            elif marker is not None and marker.ledger_id != ledger_id:
                log.warning("ledger %s (id %s) is not the one state folder %s last saw (id %s)",
                            path, ledger_id, path.parent, marker.ledger_id)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return epochs

    def reopen(self) -> Ledger:
        """Another writer connection to the same (already validated) ledger, to hand to another
        thread (made here, used only there: sqlite3's same-thread check is off for that move)."""
        conn = _connect(self.path, same_thread=False)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return Ledger(self.path, conn, self.ledger_id, self.epochs)

    def close(self) -> None:
        self._conn.close()

    def _write_marker(self, max_alert_id: int) -> None:
        state.write_marker(self.path.parent, state.Marker(self.ledger_id, self.epoch, max_alert_id))

    # -- the scoring worker's questions ----------------------------------------------------------

    def is_seen(self, path: str, size: int, mtime_ns: int) -> bool:
        return is_seen(self._conn, path, size, mtime_ns)

    def last_error(self, path: str) -> str | None:
        """The reason of the path's latest row if that row is an error (else None): a file that
        stays unreadable is recorded once, not at every retry."""
        row = self._conn.execute(
            "SELECT verdict, reason FROM images WHERE path = ? ORDER BY id DESC LIMIT 1", (db_path(path),)).fetchone()
        return str(row[1]) if row and row[0] == "error" else None

    def find(self, path: str, sha256: str) -> int | None:
        """The id of the image with these bytes at this path, if any (its row may have been
        pruned by retention: the image was still seen, and is not scored again)."""
        row = self._conn.execute(
            "SELECT id FROM images WHERE path = ? AND sha256 = ?", (db_path(path), sha256)).fetchone()
        if row is None:
            row = self._conn.execute("SELECT image_id FROM pruned WHERE path = ? AND sha256 = ?",
                                     (db_path(path), _sha_bytes(sha256))).fetchone()
        return int(row[0]) if row else None

    # -- writing ---------------------------------------------------------------------------------

    def record(self, verdicts: Sequence[Verdict], sightings: Sequence[Sighting] = (),
               drift: DriftRecord | None = None) -> None:
        """Record a batch in ONE transaction: rows, seen marks, an alert per anomalous image, and
        the drift test's state after these images (`drift`).

        Fills in `image_id` (and `alert_id` for anomalous ones) on each Verdict. All or nothing:
        on any error the transaction is rolled back and the exception propagates.
        """
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for v in verdicts:
                cur = c.execute(
                    "INSERT INTO images (path, line, size, mtime_ns, sha256, model_id, score, p_value, "
                    "threshold, verdict, reason, message, arrived_at, scored_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (db_path(v.path), v.line, v.size, v.mtime_ns, v.sha256, v.model_id, _num(v.score),
                     _num(v.p_value), _num(v.threshold), v.verdict, v.reason, _text(v.message),
                     v.arrived_at, v.scored_at))
                v.image_id = int(cur.lastrowid)  # type: ignore[arg-type]
                if v.size is not None and v.mtime_ns is not None:
                    c.execute("INSERT OR REPLACE INTO seen (path, size, mtime_ns, image_id) "
                              "VALUES (?, ?, ?, ?)", (db_path(v.path), v.size, v.mtime_ns, v.image_id))
                if v.verdict == "anomalous":
                    cur = c.execute(
                        "INSERT INTO alerts (image_id, created_at, anomaly_image, heatmap) "
                        "VALUES (?, ?, ?, ?)",
                        (v.image_id, v.scored_at, db_path(v.anomaly_image), db_path(v.heatmap)))
                    v.alert_id = int(cur.lastrowid)  # type: ignore[arg-type]
            for s in sightings:
                if s.image_id is None and s.of is not None:
                    s.image_id = s.of.image_id
                c.execute("INSERT OR REPLACE INTO seen (path, size, mtime_ns, image_id) "
                          "VALUES (?, ?, ?, ?)", (db_path(s.path), s.size, s.mtime_ns, s.image_id))
            if drift is not None:
                self._write_drift(drift)
            raised = [v.alert_id for v in verdicts if v.alert_id is not None]
            if raised:
                # Before the commit: the marker never says less than the ledger holds, so a
                # restored ledger is always recognised (after a crash right here it says more,
                # which costs only a new epoch at the next start).
                self._write_marker(max(raised))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            for v in verdicts:
                v.image_id = v.alert_id = None
            if drift is not None and drift.alarm is not None:
                drift.alarm.alarm_id = None
            raise

    def _write_drift(self, d: DriftRecord) -> None:
        c = self._conn
        if d.reset:
            c.execute("DELETE FROM drift_bag WHERE line = ?", (d.line,))
        c.execute("INSERT INTO drift (line, state) VALUES (?, ?) "
                  "ON CONFLICT (line) DO UPDATE SET state = excluded.state", (d.line, d.state))
        c.executemany("INSERT INTO drift_bag (line, key, n) VALUES (?, ?, ?) "
                      "ON CONFLICT (line, key) DO UPDATE SET n = n + excluded.n",
                      [(d.line, int(k), int(n)) for k, n in d.added])
        a = d.alarm
        if a is not None:
            cur = c.execute(
                "INSERT INTO drift_alarms (line, raised_at, model_id, log10_martingale, alpha, images, "
                "direction, image_id, reset_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (a.line, a.raised_at, a.model_id, a.log10_martingale, a.alpha, a.images, a.direction,
                 a.at.image_id if a.at is not None else None, a.reset_at))
            a.alarm_id = int(cur.lastrowid)  # type: ignore[arg-type]

    def write_drift(self, d: DriftRecord) -> None:
        """Write a drift state on its own (a reset), in one transaction."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            self._write_drift(d)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def drift(self, line: str) -> tuple[str, list[tuple[int, int]]] | None:
        """A line's stored drift state (JSON) and bag, or None if it has none."""
        row = self._conn.execute("SELECT state FROM drift WHERE line = ?", (line,)).fetchone()
        if row is None:
            return None
        bag = [(int(k), int(n)) for k, n in
               self._conn.execute("SELECT key, n FROM drift_bag WHERE line = ? ORDER BY key", (line,))]
        return str(row[0]), bag

    def cursor(self, name: str) -> int:
        """The last alert id an exporter (alerts.jsonl, webhook) has handled."""
        row = self._conn.execute("SELECT last_id FROM exports WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, last_id: int) -> None:
        self._conn.execute(
            "INSERT INTO exports (name, last_id) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id", (name, last_id))

    def alerts_after(self, since_id: int, limit: int = 1000, *, line: str | None = None) -> list[dict[str, Any]]:
        return alerts_after(self._conn, since_id, limit, ledger_id=self.ledger_id, epochs=self.epochs,
                            line=line)

    def drift_alarms_after(self, since_id: int, limit: int = 1000, *,
                           line: str | None = None) -> list[dict[str, Any]]:
        return drift_alarms_after(self._conn, since_id, limit, ledger_id=self.ledger_id, line=line)

    def pending_alerts(self, since_id: int, *, line: str | None = None) -> int:
        """How many alerts (of `line`, or all) have an id above `since_id` (an exporter's backlog)."""
        if line is None:
            sql, args = "SELECT COUNT(*) FROM alerts WHERE id > ?", (since_id,)
        else:
            sql = ("SELECT COUNT(*) FROM alerts a JOIN images i ON i.id = a.image_id "
                   "WHERE a.id > ? AND i.line = ?")
            args = (since_id, line)  # type: ignore[assignment]
        return int(self._conn.execute(sql, args).fetchone()[0])

    # -- retention (anomon.retention; its own connection, from reopen()) -------------------------

    def prune_bounds(self, older_than: float | None, keep_images: int | None) -> tuple[int, int]:
        """(upper, below) for `prune_images`: the highest id that may be old enough, and the id
        below which rows are beyond the newest `keep_images` (0: none). Read once per pass."""
        upper = below = 0
        c = self._conn
        if older_than is not None:  # ids grow with time, near enough: the newest old row bounds the scan
            row = c.execute("SELECT id FROM images WHERE scored_at < ? ORDER BY scored_at DESC LIMIT 1",
                            (older_than,)).fetchone()
            upper = int(row[0]) if row else 0
        if keep_images is not None:  # the keep_images-th newest row and everything after it stay
            row = c.execute("SELECT id FROM images ORDER BY id DESC LIMIT 1 OFFSET ?",
                            (max(0, keep_images - 1),)).fetchone()
            below = int(row[0]) if row else 0
            upper = max(upper, below - 1)
        return upper, below

    def prune_images(self, after_id: int, upper: int, below: int, older_than: float | None, *,
                     cursors: Sequence[str], line_cursors: Mapping[str, str] | None = None,
                     limit: int = 1000) -> Pruned:
        """Prune, in ONE short transaction, up to `limit` image rows with ids in (after_id, upper]
        that are older than `older_than` or below `below` (see prune_bounds), with their alerts.

        Kept whatever their age: an image whose alert an exporter has not handled yet (its id
        above any of `cursors`, or above its line's cursor in `line_cursors`), whose alert an
        operator has judged (anomon.judgements), or that a drift alarm names. Each pruned image
        leaves its `seen` rows and a `pruned` row, so its file, still in the folder, is never
        scored again (Ledger.find). `last_id` in the result is where the next batch starts."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            rows = c.execute(
                "SELECT i.id, i.line, a.id FROM images i LEFT JOIN alerts a ON a.image_id = i.id "
                "WHERE i.id > ? AND i.id <= ? AND (i.id < ? OR i.scored_at < ?) ORDER BY i.id LIMIT ?",
                (after_id, upper, below, older_than if older_than is not None else float("-inf"),
                 limit)).fetchall()
            if not rows:
                c.execute("COMMIT")
                return Pruned(0, 0, 0, after_id, True)
            ids = [int(r[0]) for r in rows]
            alert_ids = [int(r[2]) for r in rows if r[2] is not None]
            held: set[int] = set()
            if alert_ids:
                done = min((self.cursor(n) for n in cursors), default=_max_alert_id(c))
                per_line = {ln: self.cursor(n) for ln, n in (line_cursors or {}).items()}
                held |= {int(r[0]) for r in rows if r[2] is not None
                         and (int(r[2]) > done or int(r[2]) > per_line.get(str(r[1]), int(r[2])))}
                judged = _judged_alerts(c, alert_ids)
                held |= {int(r[0]) for r in rows if r[2] is not None and int(r[2]) in judged}
            marks = ",".join("?" * len(ids))
            held |= {int(r[0]) for r in c.execute(
                f"SELECT image_id FROM drift_alarms WHERE image_id IN ({marks})", ids)}
            gone = [i for i in ids if i not in held]
            alerts = 0
            if gone:
                marks = ",".join("?" * len(gone))
                # Vanished files (no stat, no bytes) left nothing a rescan could match: no record.
                c.executemany(
                    "INSERT OR IGNORE INTO pruned (path, image_id, sha256) VALUES (?, ?, ?)",
                    [(r[0], r[1], _sha_bytes(r[2]) if r[2] is not None else None) for r in c.execute(
                        f"SELECT path, id, sha256 FROM images WHERE id IN ({marks}) "
                        "AND (sha256 IS NOT NULL OR size IS NOT NULL)", gone).fetchall()])
                alerts = c.execute(f"DELETE FROM alerts WHERE image_id IN ({marks})", gone).rowcount
                c.execute(f"DELETE FROM images WHERE id IN ({marks})", gone)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return Pruned(len(gone), alerts, len(held), ids[-1], len(rows) < limit)

    def pruned_paths(self, after: str | bytes | None, limit: int = 500) -> list[str | bytes]:
        """Paths of pruned images, in order after `after` (None: from the start), as stored."""
        if after is None:
            sql, args = "SELECT DISTINCT path FROM pruned ORDER BY path LIMIT ?", (limit,)
        else:
            sql, args = "SELECT DISTINCT path FROM pruned WHERE path > ? ORDER BY path LIMIT ?", (after, limit)  # type: ignore[assignment]
        return [r[0] for r in self._conn.execute(sql, args)]

    def forget(self, paths: Sequence[str | bytes], still_gone: Callable[[str | bytes], bool]) -> int:
        """Drop the records of pruned images at `paths` (their `pruned` and `seen` rows), in one
        transaction, for each path `still_gone(path)` confirms inside it (the scoring worker
        cannot commit meanwhile). Returns the pruned images forgotten."""
        c = self._conn
        n = 0
        c.execute("BEGIN IMMEDIATE")
        try:
            for p in paths:
                if not still_gone(p):
                    continue
                c.execute("DELETE FROM seen WHERE path = ? AND image_id IN "
                          "(SELECT image_id FROM pruned WHERE path = ?)", (p, p))
                n += c.execute("DELETE FROM pruned WHERE path = ?", (p,)).rowcount
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return n


@dataclass
class Pruned:
    """What one `Ledger.prune_images` batch did."""

    images: int      # image rows deleted
    alerts: int      # their alert rows
    held: int        # old enough, but kept (unexported or judged alert, drift alarm)
    last_id: int     # the last id looked at: the next batch starts after it
    done: bool       # no more rows in range


def _max_alert_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM alerts").fetchone()[0])


def _judged_alerts(conn: sqlite3.Connection, alert_ids: Sequence[int]) -> set[int]:
    """Which of these alerts an operator has judged (anomon.judgements' table, if it exists)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'judgements'").fetchone() is None:
        return set()
    marks = ",".join("?" * len(alert_ids))
    return {int(r[0]) for r in conn.execute(
        f"SELECT item_id FROM judgements WHERE kind = 'alert' AND item_id IN ({marks})", list(alert_ids))}


def db_path(path: str | None) -> str | bytes | None:
    """A path as SQLite stores it, losslessly: text when it is valid UTF-8, else its raw bytes (a
    BLOB). Linux file names are bytes; one like b"bad\\xff.png" has no text form, and Python hands
    it over as a str with lone surrogates, which SQLite's text cannot hold."""
    if path is None:
        return None
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def from_db_path(value: str | bytes | None) -> str | None:
    """The inverse of db_path: the path as Python's os functions take it."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def json_line(obj: Any) -> str:
    """One JSON line for rows and alerts the ledger hands out: UTF-8 text as is, and the bytes of a
    path that are not UTF-8 as \\udcXX escapes, which JSON readers (and json.loads) take back
    losslessly. Plain json.dumps(ensure_ascii=False) makes a str that cannot be written."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def _text(message: str | None) -> str | None:
    """Display text (a message naming an odd path) with undecodable bytes shown as \\udcXX."""
    if message is None:
        return None
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _sha_bytes(sha256: str) -> bytes | str:
    """A SHA-256 as `pruned` keeps it: 32 bytes instead of 64 hex characters."""
    try:
        return bytes.fromhex(sha256)
    except ValueError:
        return sha256


def _num(x: float | None) -> float | None:
    """NaN/inf become NULL: SQLite has no NaN and JSON exports must stay valid JSON."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


# -- read-only helpers (any thread, own connection) --------------------------------------------


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection, for HTTP handlers and `anomon verdicts`."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    if path.stat().st_size == 0:
        raise LedgerError(f"ledger {path} is empty (0 bytes)")
    try:
        conn = _connect(path, readonly=True)
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"ledger {path} cannot be read ({_describe(e)})") from None
    if version is None or int(version[0]) != SCHEMA_VERSION:
        conn.close()
        raise LedgerError(f"{path} is not an anomon ledger this version can read")
    return conn


def ledger_id_of(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
    return str(row[0]) if row else ""


def is_seen(conn: sqlite3.Connection, path: str, size: int, mtime_ns: int) -> bool:
    row = conn.execute("SELECT 1 FROM seen WHERE path = ? AND size = ? AND mtime_ns = ?",
                       (db_path(path), size, mtime_ns)).fetchone()
    return row is not None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_key(ledger_id: str, alert_id: int, epoch: str = "") -> str:
    """The Idempotency-Key of an alert, sent as a header and as `key` in every export.

    `anomon-<ledger_id>-<alert_id>` for alerts of a ledger's first epoch (every ledger until it
    is first restored, so keys issued before epochs existed stay the same), and
    `anomon-<ledger_id>-<epoch>-<alert_id>` for alerts raised after a restore began a new epoch.
    Unique across ledgers (a receiver shared by several lines, a ledger started afresh) and across
    restores of one ledger, so a receiver never mistakes one alert for another. Receivers should
    treat it as opaque.
    """
    return f"anomon-{ledger_id}-{epoch}-{alert_id}" if epoch else f"anomon-{ledger_id}-{alert_id}"


def epoch_of(epochs: Sequence[tuple[int, str]], alert_id: int) -> str:
    """The epoch an alert was raised in: the last one that began at or below its id."""
    found = ""
    for first, epoch in epochs:
        if first <= alert_id:
            found = epoch
    return found


def line_column(conn: sqlite3.Connection) -> str:
    """`images.line`, or the constant 'default' for a ledger written before lines that no daemon
    has opened since (read-only readers never migrate it)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
    return "line" if "line" in columns else "'default'"


_ALERT_SQL = (
    "SELECT a.id AS id, a.image_id AS image_id, a.created_at AS created_at, a.anomaly_image, "
    "a.heatmap, i.path, {line} AS line, i.score, i.p_value, i.threshold, i.model_id, i.sha256, i.size, "
    "i.arrived_at FROM alerts a JOIN images i ON i.id = a.image_id "
    "WHERE a.id > ? {only} ORDER BY a.id LIMIT ?"
)


def alerts_after(conn: sqlite3.Connection, since_id: int, limit: int = 1000, *,
                 ledger_id: str | None = None,
                 epochs: Sequence[tuple[int, str]] | None = None,
                 line: str | None = None) -> list[dict[str, Any]]:
    """Alerts with id > since_id (of `line`, or all), oldest first, as JSON-ready dicts."""
    lid = ledger_id if ledger_id is not None else ledger_id_of(conn)
    eps = epochs if epochs is not None else _epochs(conn)
    out = []
    column = line_column(conn).replace("line", "i.line")
    only, args = ("AND " + column + " = ?", (since_id, line, limit)) if line is not None else ("", (since_id, limit))
    for r in conn.execute(_ALERT_SQL.format(line=column, only=only), args):
        out.append({
            "kind": "anomaly", "id": r["id"], "key": alert_key(lid, r["id"], epoch_of(eps, r["id"])),
            "time": iso(r["created_at"]),
            "created_at": r["created_at"], "line": r["line"], "path": from_db_path(r["path"]),
            "score": r["score"],
            "p_value": r["p_value"], "threshold": r["threshold"], "model_id": r["model_id"],
            "sha256": r["sha256"], "size": r["size"], "image_id": r["image_id"],
            "anomaly_image": from_db_path(r["anomaly_image"]), "heatmap": from_db_path(r["heatmap"]),
        })
    return out


def drift_alarm_key(ledger_id: str, alarm_id: int, raised_at: float) -> str:
    """The Idempotency-Key of a drift alarm: `anomon-<ledger_id>-drift-<id>-<raised_at in ms>`.
    The time is in it because drift alarm ids are not guarded against a restored ledger the way
    alert ids are (see Ledger.open); two alarms never share the id and the millisecond."""
    return f"anomon-{ledger_id}-drift-{alarm_id}-{int(round(raised_at * 1000))}"


def drift_alarms_after(conn: sqlite3.Connection, since_id: int, limit: int = 1000, *,
                       ledger_id: str | None = None, line: str | None = None) -> list[dict[str, Any]]:
    """Drift alarms with id > since_id (of `line`, or all), oldest first, as JSON-ready dicts
    (`kind` "drift"; they go to alerts.jsonl and the webhook beside the anomaly alerts)."""
    lid = ledger_id if ledger_id is not None else ledger_id_of(conn)
    sql = ("SELECT id, line, raised_at, model_id, log10_martingale, alpha, images, direction, image_id, "
           "reset_at FROM drift_alarms WHERE id > ?")
    args: list[Any] = [since_id]
    if line is not None:
        sql += " AND line = ?"
        args.append(line)
    out = []
    for r in conn.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)):
        out.append({
            "kind": "drift", "drift_alarm_id": r["id"], "key": drift_alarm_key(lid, r["id"], r["raised_at"]),
            "time": iso(r["raised_at"]), "created_at": r["raised_at"], "line": r["line"],
            "model_id": r["model_id"], "direction": r["direction"],
            "log10_martingale": r["log10_martingale"], "alpha": r["alpha"], "images": r["images"],
            "image_id": r["image_id"], "reset_at": iso(r["reset_at"]),
        })
    return out


def verdict_rows(conn: sqlite3.Connection, *, since: float | None = None,
                 anomalous_only: bool = False, line: str | None = None) -> Iterator[dict[str, Any]]:
    """Every recorded image, oldest verdict first."""
    sql = (f"SELECT id, path, {line_column(conn)} AS line, size, sha256, model_id, score, p_value, "
           "threshold, verdict, reason, message, arrived_at, scored_at FROM images WHERE 1 = 1")
    args: list[Any] = []
    if since is not None:
        sql += " AND scored_at >= ?"
        args.append(since)
    if anomalous_only:
        sql += " AND verdict = 'anomalous'"
    if line is not None:
        sql += f" AND {line_column(conn)} = ?"
        args.append(line)
    sql += " ORDER BY scored_at, id"
    for r in conn.execute(sql, args):
        d = dict(r)
        d["path"] = from_db_path(d["path"])
        d["arrived"] = iso(d.pop("arrived_at"))
        d["scored"] = iso(d.pop("scored_at"))
        yield d


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per verdict (and per error reason): a quick summary for tests and `verdicts`."""
    out: dict[str, int] = {}
    for verdict, reason, n in conn.execute(
            "SELECT verdict, reason, COUNT(*) FROM images GROUP BY verdict, reason"):
        out[verdict if verdict != "error" else f"error:{reason}"] = int(n)
    return out
