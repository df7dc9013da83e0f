"""Operators' judgements of alerts and drift alarms ("false alarm" / "defect"), kept in the ledger.

Why in the ledger file: a judgement names an alert by its id, which the ledger never gives twice
(not even after a restore, see anomon.ledger), and a backup of the ledger then carries the labels
with the verdicts they judge. Why in tables of their own, created here (CREATE TABLE IF NOT EXISTS,
at the first judgement, through this module's own connection): the scoring worker's schema and
transactions stay exactly as they are, and a ledger nobody has judged in reads as "all unreviewed".

A judgement is changeable: the current one is a row of `judgements` (none = unreviewed), and every
change, an undo included, is a row of `judgement_audit` (before, after, who, when, from where) that
is never updated or deleted. Who is the name the reviewer gives on the page: the review token
proves a reviewer may judge, the name says which one (it is not authenticated on its own).

For a drift alarm, "defect" means "a real change on the line" (the page says "real drift").

Offline, `labelled_images` turns a state folder's judgements into training data: false alarms are
normal images, defects anomalous ones, read from the state folder's copies (STATE/anomalies/).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from anomon.ledger import from_db_path, iso, json_line, line_column, open_readonly
from anomon.state import ANOMALIES_DIR, ledger_path

KINDS: tuple[str, ...] = ("alert", "drift")
JUDGEMENTS: tuple[str, ...] = ("false_alarm", "defect")
STATES: tuple[str, ...] = ("unreviewed",) + JUDGEMENTS
MAX_WHO = 64
_WHO = re.compile(r"[^\x00-\x1f\x7f]{1,%d}" % MAX_WHO)  # printable, one line

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    kind TEXT NOT NULL CHECK (kind IN ('alert', 'drift')),
    item_id INTEGER NOT NULL,    -- alerts.id or drift_alarms.id
    judgement TEXT NOT NULL CHECK (judgement IN ('false_alarm', 'defect')),
    who TEXT NOT NULL,
    judged_at REAL NOT NULL,     -- unix time
    PRIMARY KEY (kind, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS judgement_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    item_id INTEGER NOT NULL,
    before TEXT,                 -- NULL = unreviewed
    after TEXT,
    who TEXT NOT NULL,
    at REAL NOT NULL,
    remote TEXT                  -- the client's address, as the daemon saw it
);
"""


class JudgementError(Exception):
    """A judgement that cannot be recorded (bad value, no such alert); one line. `status` is the
    HTTP status the page answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Change:
    """What `judge` did: the state before and after (STATES), by whom and when."""

    kind: str
    item_id: int
    before: str
    after: str
    who: str
    at: float

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def judge(ledger_file: Path, kind: str, item_id: int, judgement: str | None, who: str, *,
          remote: str | None = None, now: float | None = None) -> Change:
    """Record `judgement` (None = back to unreviewed) of an alert or drift alarm, with its audit
    row, in one transaction. Judging an item again the same way changes nothing and adds no
    audit row (a double key press is not two decisions)."""
    if kind not in KINDS:
        raise JudgementError(f"kind must be one of {', '.join(KINDS)}")
    if judgement is not None and judgement not in JUDGEMENTS:
        raise JudgementError(f"judgement must be one of {', '.join(JUDGEMENTS)}, or null for unreviewed")
    if not isinstance(who, str) or not _WHO.fullmatch(who.strip()):
        raise JudgementError(f"who must be a name of 1 to {MAX_WHO} printable characters")
    who = who.strip()
    at = time.time() if now is None else now
    if not ledger_file.is_file():
        raise JudgementError(f"no ledger at {ledger_file}", status=503)
    # Our own writer connection: the scoring worker's belongs to its thread. busy_timeout waits
    # out its batch commits (milliseconds); synchronous=FULL as the ledger's own commits.
    conn = sqlite3.connect(ledger_file, timeout=10.0, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if "judgements" not in _tables(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            table = "alerts" if kind == "alert" else "drift_alarms"
            if table not in _tables(conn) or conn.execute(
                    f"SELECT 1 FROM {table} WHERE id = ?", (item_id,)).fetchone() is None:
                raise JudgementError(f"no {'alert' if kind == 'alert' else 'drift alarm'} with id {item_id}",
                                     status=404)
            row = conn.execute("SELECT judgement FROM judgements WHERE kind = ? AND item_id = ?",
                               (kind, item_id)).fetchone()
            before = str(row[0]) if row else "unreviewed"
            after = judgement or "unreviewed"
            if before != after:
                if judgement is None:
                    conn.execute("DELETE FROM judgements WHERE kind = ? AND item_id = ?", (kind, item_id))
                else:
                    conn.execute(
                        "INSERT INTO judgements (kind, item_id, judgement, who, judged_at) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (kind, item_id) DO UPDATE SET judgement = excluded.judgement, "
                        "who = excluded.who, judged_at = excluded.judged_at",
                        (kind, item_id, judgement, who, at))
                conn.execute(
                    "INSERT INTO judgement_audit (kind, item_id, before, after, who, at, remote) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (kind, item_id, None if before == "unreviewed" else before, judgement, who, at, remote))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise JudgementError(f"ledger {ledger_file}: cannot record the judgement ({e})", status=503) from None
    finally:
        conn.close()
    return Change(kind, item_id, before, after, who, at)


# -- reading (any thread, a read-only connection) -------------------------------------------------


@dataclass
class Item:
    """An alert or a drift alarm as the page and the export show it, with its judgement."""

    kind: str
    id: int
    line: str
    time: float
    state: str = "unreviewed"
    who: str | None = None
    judged_at: float | None = None
    model_id: str | None = None
    # alerts
    path: str | None = None
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None
    sha256: str | None = None
    anomaly_image: str | None = None
    heatmap: str | None = None
    # drift alarms
    log10_martingale: float | None = None
    alpha: float | None = None
    images: int | None = None
    direction: str | None = None

    @property
    def key(self) -> str:
        """`alert-12`, `drift-3`: how the page and its cursor name an item."""
        return f"{self.kind}-{self.id}"

    def record(self) -> dict[str, Any]:
        """A flat, JSON-ready record for `anomon review export`."""
        return {
            "kind": self.kind, "id": self.id, "line": self.line, "time": iso(self.time),
            "judgement": self.state, "who": self.who, "judged_at": iso(self.judged_at),
            "model_id": self.model_id, "path": self.path, "score": self.score,
            "threshold": self.threshold, "p_value": self.p_value, "sha256": self.sha256,
            "anomaly_image": self.anomaly_image, "heatmap": self.heatmap,
            "log10_martingale": self.log10_martingale, "alpha": self.alpha, "images": self.images,
            "direction": self.direction,
        }


EXPORT_FIELDS: tuple[str, ...] = tuple(Item("alert", 0, "", 0.0).record())


@dataclass(frozen=True)
class Query:
    """Which items: None means any. `state` is one of STATES, or "judged" (either judgement).
    `before` is an item key; the items older than it are listed."""

    line: str | None = None
    state: str | None = None
    kind: str | None = None
    before: str | None = None
    limit: int | None = 50


_KEY = re.compile(r"(alert|drift)-([0-9]{1,18})")


def parse_key(text: str) -> tuple[str, int] | None:
    m = _KEY.fullmatch(text)
    return (m.group(1), int(m.group(2))) if m else None


def items(conn: sqlite3.Connection, q: Query = Query()) -> list[Item]:
    """The items `q` selects, newest first.

    Alerts and drift alarms are read apart, each newest first by id (the order the ledger raised
    them, which needs no sort: a page of the newest 50 of 100,000 alerts reads about 50 rows),
    then interleaved by time. A cursor item splits both: the alerts below it by id, the drift
    alarms by time (and the reverse for a drift alarm), so paging shows every item once."""
    have = _tables(conn)
    cursor: tuple[str, int, float] | None = None
    if q.before is not None:
        key = parse_key(q.before)
        at = _time_of(conn, *key) if key else None
        if key is None or at is None:
            return []
        cursor = (key[0], key[1], at)
    judged = "judgements" in have
    found: list[Item] = []
    if q.kind in (None, "alert"):
        found += _branch(conn, "alert", q, cursor, judged)
    if q.kind in (None, "drift") and "drift_alarms" in have:
        found += _branch(conn, "drift", q, cursor, judged)
    found.sort(key=lambda it: (it.time, it.kind == "alert", it.id), reverse=True)
    return found[:q.limit] if q.limit is not None else found


def _branch(conn: sqlite3.Connection, kind: str, q: Query, cursor: tuple[str, int, float] | None,
            judged: bool) -> list[Item]:
    if kind == "alert":
        sql = ("SELECT 'alert' AS kind, a.id AS id, a.created_at AS t, "
               f"i.{line_column(conn)} AS line, i.model_id AS model_id, i.path AS path, i.score AS score, "
               "i.threshold AS threshold, i.p_value AS p_value, i.sha256 AS sha256, "
               "a.anomaly_image AS anomaly_image, a.heatmap AS heatmap, NULL AS log10_martingale, "
               "NULL AS alpha, NULL AS images, NULL AS direction")
        source, alias, time_col, line_col = " FROM alerts a JOIN images i ON i.id = a.image_id", "a", "a.created_at", \
            f"i.{line_column(conn)}"
    else:
        sql = ("SELECT 'drift' AS kind, d.id AS id, d.raised_at AS t, d.line AS line, d.model_id AS model_id, "
               "NULL AS path, NULL AS score, NULL AS threshold, NULL AS p_value, NULL AS sha256, "
               "NULL AS anomaly_image, NULL AS heatmap, d.log10_martingale AS log10_martingale, "
               "d.alpha AS alpha, d.images AS images, d.direction AS direction")
        source, alias, time_col, line_col = " FROM drift_alarms d", "d", "d.raised_at", "d.line"
    if judged:
        sql += ", j.judgement AS judgement, j.who AS who, j.judged_at AS judged_at" + source
        sql += f" LEFT JOIN judgements j ON j.kind = '{kind}' AND j.item_id = {alias}.id"
    else:
        sql += ", NULL AS judgement, NULL AS who, NULL AS judged_at" + source
    where: list[str] = []
    args: list[Any] = []
    if q.line is not None:
        where.append(f"{line_col} = ?")
        args.append(q.line)
    if q.state is not None and not judged:  # nobody has judged yet: everything is unreviewed
        where.append("1" if q.state == "unreviewed" else "0")
    elif q.state == "unreviewed":
        where.append("j.judgement IS NULL")
    elif q.state == "judged":
        where.append("j.judgement IS NOT NULL")
    elif q.state is not None:
        where.append("j.judgement = ?")
        args.append(q.state)
    if cursor is not None:
        c_kind, c_id, c_time = cursor
        if c_kind == kind:
            where.append(f"{alias}.id < ?")
            args.append(c_id)
        else:  # the other kind: by time; at an equal time an alert comes before a drift alarm
            where.append(f"{time_col} {'<=' if kind == 'drift' else '<'} ?")
            args.append(c_time)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {alias}.id DESC"
    if q.limit is not None:
        sql += " LIMIT ?"
        args.append(q.limit)
    return [_item(r) for r in conn.execute(sql, args)]


def _time_of(conn: sqlite3.Connection, kind: str, item_id: int) -> float | None:
    if kind == "alert":
        row = conn.execute("SELECT created_at FROM alerts WHERE id = ?", (item_id,)).fetchone()
    elif "drift_alarms" in _tables(conn):
        row = conn.execute("SELECT raised_at FROM drift_alarms WHERE id = ?", (item_id,)).fetchone()
    else:
        row = None
    return float(row[0]) if row else None


def _item(r: sqlite3.Row) -> Item:
    return Item(
        kind=r["kind"], id=int(r["id"]), line=str(r["line"]), time=float(r["t"]),
        state=r["judgement"] or "unreviewed", who=r["who"], judged_at=r["judged_at"],
        model_id=r["model_id"], path=from_db_path(r["path"]), score=_finite(r["score"]),
        threshold=_finite(r["threshold"]), p_value=_finite(r["p_value"]), sha256=r["sha256"],
        anomaly_image=from_db_path(r["anomaly_image"]), heatmap=from_db_path(r["heatmap"]),
        log10_martingale=r["log10_martingale"], alpha=r["alpha"], images=r["images"],
        direction=r["direction"])


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def counts(conn: sqlite3.Connection, *, kinds: tuple[str, ...] = KINDS, alerts_after: int = 0,
           upto: int | None = None) -> dict[tuple[str, str, str], int]:
    """{(kind, line, state): n}, every state of every line present (0s included), for the metrics
    and the page's header; `alerts_after` and `upto` bound the alerts' ids (see Tally)."""
    have = _tables(conn)
    out: dict[tuple[str, str, str], int] = {}
    join = " LEFT JOIN judgements j ON j.kind = '{kind}' AND j.item_id = {alias}.id" if "judgements" in have else ""
    state = "COALESCE(j.judgement, 'unreviewed')" if "judgements" in have else "'unreviewed'"
    queries = []
    if "alert" in kinds:
        queries.append(("alert", f"SELECT i.{line_column(conn)}, {state}, COUNT(*) FROM alerts a "
                                 "JOIN images i ON i.id = a.image_id" + join.format(kind="alert", alias="a")
                        + f" WHERE a.id > {int(alerts_after)}"
                        + (f" AND a.id <= {int(upto)}" if upto is not None else "") + " GROUP BY 1, 2"))
    if "drift" in kinds and "drift_alarms" in have:
        queries.append(("drift", f"SELECT d.line, {state}, COUNT(*) FROM drift_alarms d"
                        + join.format(kind="drift", alias="d") + " GROUP BY 1, 2"))
    for kind, sql in queries:
        for line, st, n in conn.execute(sql):
            for s in STATES:
                out.setdefault((kind, str(line), s), 0)
            out[(kind, str(line), str(st))] = int(n)
    return out


class Tally:
    """`counts` kept up to date cheaply, for a page and a /metrics scrape that both ask often.

    Counting every alert by line joins each one to its image: 0.2 s for 100,000 alerts. New
    alerts come with higher ids, so between judgements only those are counted and added. Anything
    else counts everything again: a change in the audit trail (any judgement, by anyone), or a
    total that no longer adds up (retention pruned old alerts; another ledger)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alerts: dict[tuple[str, str, str], int] = {}
        self._upto = -1  # the highest alert id counted; -1: nothing counted yet
        self._audit = -1

    def counts(self, conn: sqlite3.Connection) -> dict[tuple[str, str, str], int]:
        have = _tables(conn)
        audit_id = (conn.execute("SELECT COALESCE(MAX(id), 0) FROM judgement_audit").fetchone()[0]
                    if "judgement_audit" in have else 0)
        top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM alerts").fetchone()[0]
        with self._lock:
            if audit_id == self._audit and top >= self._upto:
                if top > self._upto:
                    for key, n in counts(conn, kinds=("alert",), alerts_after=self._upto, upto=top).items():
                        self._alerts[key] = self._alerts.get(key, 0) + n
                    self._upto = top
                total = conn.execute("SELECT COUNT(*) FROM alerts WHERE id <= ?", (top,)).fetchone()[0]
                stale = total != sum(self._alerts.values())
            else:
                stale = True
            if stale:
                self._alerts, self._upto, self._audit = counts(conn, kinds=("alert",), upto=top), top, audit_id
            out = dict(self._alerts)
        out.update(counts(conn, kinds=("drift",)))  # a handful of rows
        return out


def audit(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    """Every change ever made, oldest first."""
    if "judgement_audit" not in _tables(conn):
        return
    for r in conn.execute("SELECT id, kind, item_id, before, after, who, at, remote FROM judgement_audit ORDER BY id"):
        yield {"id": r["id"], "kind": r["kind"], "item_id": r["item_id"],
               "before": r["before"] or "unreviewed", "after": r["after"] or "unreviewed",
               "who": r["who"], "at": iso(r["at"]), "remote": r["remote"]}


# -- judgements as labelled images (calibrate, evaluate, train) ------------------------------------


@dataclass
class Labelled:
    """A state folder's judged alerts as image files: `normal` (false alarms), `anomalous`
    (defects); `missing` counts judged alerts whose image is no longer there."""

    normal: list[Path] = field(default_factory=list)
    anomalous: list[Path] = field(default_factory=list)
    missing: int = 0


class LabelsError(Exception):
    """A state folder whose judgements cannot be read; one line."""


def labelled_images(state_dir: Path, *, line: str | None = None) -> Labelled:
    """The images of judged alerts: the state folder's copy (what the camera wrote, kept as it
    arrived), or the original file while it still holds the bytes that were judged."""
    conn = _open(state_dir)
    try:
        judged = items(conn, Query(line=line, state="judged", kind="alert", limit=None))
    finally:
        conn.close()
    out = Labelled()
    for it in judged:
        path = image_file(state_dir, it)
        if path is None:
            out.missing += 1
        else:
            (out.normal if it.state == "false_alarm" else out.anomalous).append(path)
    return out


def image_file(state_dir: Path, it: Item) -> Path | None:
    """Where an alert's image is now: its copy under STATE/anomalies/ (looked for by name there,
    so a state folder that was moved still finds its copies), else the original if unchanged."""
    if it.anomaly_image:
        copy = Path(state_dir) / ANOMALIES_DIR / os.path.basename(it.anomaly_image)
        if copy.is_file():
            return copy
    if it.path and it.sha256 and os.path.isfile(it.path):
        try:
            h = hashlib.sha256()
            with open(it.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() == it.sha256:
                return Path(it.path)
        except OSError:
            return None
    return None


def judged_lines(state_dir: Path) -> list[str]:
    """The lines with judged alerts in a state folder's ledger."""
    conn = _open(state_dir)
    try:
        return sorted({it.line for it in items(conn, Query(state="judged", kind="alert", limit=None))})
    finally:
        conn.close()


def _open(state_dir: Path) -> sqlite3.Connection:
    try:
        return open_readonly(ledger_path(state_dir))
    except Exception as e:  # LedgerError, and sqlite3 errors of a damaged file
        raise LabelsError(f"{e} (is {state_dir} a daemon's state folder?)") from None


# -- `anomon review export` -----------------------------------------------------------------------

AUDIT_FIELDS: tuple[str, ...] = ("id", "kind", "item_id", "before", "after", "who", "at", "remote")


def export(state_dir: Path, out: TextIO, *, fmt: str = "jsonl", line: str | None = None,
           everything: bool = False, audit_trail: bool = False) -> int:
    """Write the judgements (or, with `everything`, unreviewed items too; with `audit_trail`,
    every change) as CSV or JSON lines; returns how many records."""
    conn = _open(state_dir)
    try:
        if audit_trail:
            records: Iterable[dict[str, Any]] = audit(conn)
            fields = AUDIT_FIELDS
        else:
            records = (it.record() for it in items(conn, Query(line=line, limit=None))
                       if everything or it.state != "unreviewed")
            fields = EXPORT_FIELDS
        writer = csv.DictWriter(out, fieldnames=fields) if fmt == "csv" else None
        if writer:
            writer.writeheader()
        n = 0
        for rec in records:
            if writer:
                writer.writerow({k: _shown(v) for k, v in rec.items()})
            else:
                out.write(json_line(rec) + "\n")
            n += 1
        return n
    finally:
        conn.close()


def _shown(v: Any) -> Any:
    """CSV cells: text with bytes that are not UTF-8 as \\udcXX, never an encoding error."""
    return v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v
