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

Connections belong to one thread each (sqlite3's default check): the scoring worker writes through
its `Ledger`; other threads call `Ledger.reopen()` or `open_readonly()` for their own connection.
"""

from __future__ import annotations

import math
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
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
    image_id INTEGER NOT NULL REFERENCES images (id),
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


class LedgerError(Exception):
    """The ledger cannot be used; the message is one line naming the file."""


@dataclass
class Verdict:
    """One row to record: a scored image (normal/anomalous) or one that could not be scored."""

    path: str
    verdict: str  # "normal" | "anomalous" | "error"
    arrived_at: float
    scored_at: float
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


class Ledger:
    """The writer's connection to the ledger (use from one thread)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, ledger_id: str) -> None:
        self.path = path
        self.ledger_id = ledger_id
        self._conn = conn

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, check: bool = True, new_ledger: bool = False) -> Ledger:
        """Open (or create, if absent) the ledger at `path`; refuse anything we cannot trust."""
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
        else:
            wal = Path(f"{path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise LedgerError(
                    f"ledger {path} is missing but its write-ahead log {wal} is not: restore the "
                    "ledger, or move the -wal file away to start a new ledger")
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"ledger {path}: cannot switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if existed:
                ledger_id = cls._validate(path, conn, check=check)
            else:
                ledger_id = cls._create(conn)
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"ledger {path} is not a usable SQLite database ({_describe(e)}); "
                              "restore it from a backup or move it away") from None
        return cls(path, conn, ledger_id)

    @staticmethod
    def _create(conn: sqlite3.Connection) -> str:
        ledger_id = uuid.uuid4().hex[:12]
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # One script, one transaction: a crash mid-creation leaves no half-made ledger behind.
        conn.executescript(
            "BEGIN IMMEDIATE;" + _SCHEMA
            + f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}'), "
            f"('ledger_id', '{ledger_id}'), ('created_at', '{created}'); COMMIT;")
        return ledger_id

    @staticmethod
    def _validate(path: Path, conn: sqlite3.Connection, *, check: bool) -> str:
        if check:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise LedgerError(f"ledger {path} is damaged (quick_check: {problems[0]}); restore "
                                  "it from a backup or move it away")
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            raise LedgerError(f"{path} is an SQLite database but not an anomon ledger") from None
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise LedgerError(f"ledger {path} was written by a newer anomon (schema {version}, "
                              f"this one reads {SCHEMA_VERSION}); upgrade anomon")
        if version != SCHEMA_VERSION or "ledger_id" not in meta:
            raise LedgerError(f"ledger {path} has an unknown layout (schema {version})")
        return meta["ledger_id"]

    def reopen(self) -> Ledger:
        """Another writer connection to the same (already validated) ledger, to hand to another
        thread (made here, used only there: sqlite3's same-thread check is off for that move)."""
        conn = _connect(self.path, same_thread=False)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return Ledger(self.path, conn, self.ledger_id)

    def close(self) -> None:
        self._conn.close()

    # -- the scoring worker's questions ----------------------------------------------------------

    def is_seen(self, path: str, size: int, mtime_ns: int) -> bool:
        return is_seen(self._conn, path, size, mtime_ns)

    def last_error(self, path: str) -> str | None:
        """The reason of the path's latest row if that row is an error (else None): a file that
        stays unreadable is recorded once, not at every retry."""
        row = self._conn.execute(
            "SELECT verdict, reason FROM images WHERE path = ? ORDER BY id DESC LIMIT 1", (path,)).fetchone()
        return str(row[1]) if row and row[0] == "error" else None

    def find(self, path: str, sha256: str) -> int | None:
        """The id of the image with these bytes at this path, if any."""
        row = self._conn.execute(
            "SELECT id FROM images WHERE path = ? AND sha256 = ?", (path, sha256)).fetchone()
        return int(row[0]) if row else None

    # -- writing ---------------------------------------------------------------------------------

    def record(self, verdicts: Sequence[Verdict], sightings: Sequence[Sighting] = ()) -> None:
        """Record a batch in ONE transaction: rows, seen marks, and an alert per anomalous image.

        Fills in `image_id` (and `alert_id` for anomalous ones) on each Verdict. All or nothing:
        on any error the transaction is rolled back and the exception propagates.
        """
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for v in verdicts:
                cur = c.execute(
                    "INSERT INTO images (path, size, mtime_ns, sha256, model_id, score, p_value, "
                    "threshold, verdict, reason, message, arrived_at, scored_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (v.path, v.size, v.mtime_ns, v.sha256, v.model_id, _num(v.score),
                     _num(v.p_value), _num(v.threshold), v.verdict, v.reason, v.message,
                     v.arrived_at, v.scored_at))
                v.image_id = int(cur.lastrowid)  # type: ignore[arg-type]
                if v.size is not None and v.mtime_ns is not None:
                    c.execute("INSERT OR REPLACE INTO seen (path, size, mtime_ns, image_id) "
                              "VALUES (?, ?, ?, ?)", (v.path, v.size, v.mtime_ns, v.image_id))
                if v.verdict == "anomalous":
                    cur = c.execute(
                        "INSERT INTO alerts (image_id, created_at, anomaly_image, heatmap) "
                        "VALUES (?, ?, ?, ?)", (v.image_id, v.scored_at, v.anomaly_image, v.heatmap))
                    v.alert_id = int(cur.lastrowid)  # type: ignore[arg-type]
            for s in sightings:
                if s.image_id is None and s.of is not None:
                    s.image_id = s.of.image_id
                c.execute("INSERT OR REPLACE INTO seen (path, size, mtime_ns, image_id) "
                          "VALUES (?, ?, ?, ?)", (s.path, s.size, s.mtime_ns, s.image_id))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            for v in verdicts:
                v.image_id = v.alert_id = None
            raise

    def cursor(self, name: str) -> int:
        """The last alert id an exporter (alerts.jsonl, webhook) has handled."""
        row = self._conn.execute("SELECT last_id FROM exports WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, last_id: int) -> None:
        self._conn.execute(
            "INSERT INTO exports (name, last_id) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id", (name, last_id))

    def alerts_after(self, since_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        return alerts_after(self._conn, since_id, limit, ledger_id=self.ledger_id)

    def pending_alerts(self, since_id: int) -> int:
        """How many alerts have an id above `since_id` (an exporter's backlog)."""
        return int(self._conn.execute("SELECT COUNT(*) FROM alerts WHERE id > ?", (since_id,)).fetchone()[0])


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
                       (path, size, mtime_ns)).fetchone()
    return row is not None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_key(ledger_id: str, alert_id: int) -> str:
    """The Idempotency-Key of an alert: unique across ledgers, so a receiver shared by several
    lines (or a ledger started afresh) never mistakes one alert for another."""
    return f"anomon-{ledger_id}-{alert_id}"


_ALERT_SQL = (
    "SELECT a.id AS id, a.image_id AS image_id, a.created_at AS created_at, a.anomaly_image, "
    "a.heatmap, i.path, i.score, i.p_value, i.threshold, i.model_id, i.sha256, i.size, "
    "i.arrived_at FROM alerts a JOIN images i ON i.id = a.image_id "
    "WHERE a.id > ? ORDER BY a.id LIMIT ?"
)


def alerts_after(conn: sqlite3.Connection, since_id: int, limit: int = 1000, *,
                 ledger_id: str | None = None) -> list[dict[str, Any]]:
    """Alerts with id > since_id, oldest first, as JSON-ready dicts."""
    lid = ledger_id if ledger_id is not None else ledger_id_of(conn)
    out = []
    for r in conn.execute(_ALERT_SQL, (since_id, limit)):
        out.append({
            "id": r["id"], "key": alert_key(lid, r["id"]), "time": iso(r["created_at"]),
            "created_at": r["created_at"], "path": r["path"], "score": r["score"],
            "p_value": r["p_value"], "threshold": r["threshold"], "model_id": r["model_id"],
            "sha256": r["sha256"], "size": r["size"], "image_id": r["image_id"],
            "anomaly_image": r["anomaly_image"], "heatmap": r["heatmap"],
        })
    return out


def verdict_rows(conn: sqlite3.Connection, *, since: float | None = None,
                 anomalous_only: bool = False) -> Iterator[dict[str, Any]]:
    """Every recorded image, oldest verdict first."""
    sql = ("SELECT id, path, size, sha256, model_id, score, p_value, threshold, verdict, reason, "
           "message, arrived_at, scored_at FROM images WHERE 1 = 1")
    args: list[Any] = []
    if since is not None:
        sql += " AND scored_at >= ?"
        args.append(since)
    if anomalous_only:
        sql += " AND verdict = 'anomalous'"
    sql += " ORDER BY scored_at, id"
    for r in conn.execute(sql, args):
        d = dict(r)
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
