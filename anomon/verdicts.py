"""`anomon verdicts`: list what the ledger holds, one record per image.

Reads through a read-only connection, so it is safe while the daemon runs.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from anomon.ledger import LedgerError, json_line, open_readonly, verdict_rows
from anomon.state import ledger_path

FIELDS = ["id", "scored", "line", "verdict", "score", "p_value", "threshold", "reason", "model_id", "path",
          "arrived", "size", "sha256", "message"]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class VerdictsError(Exception):
    """A user mistake (bad --since, no ledger); one line."""


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from `2024-05-01`, `2024-05-01T08:00` (UTC unless an offset is given), a
    duration back from now (`90s`, `15m`, `2h`, `1d`, `1w`), or a Unix timestamp."""
    now = time.time() if now is None else now
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    if re.fullmatch(r"\d{9,}(\.\d+)?", t):
        return float(t)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise VerdictsError(
            f"--since: cannot read {text!r}; use a date/time like 2024-05-01T08:00Z, a duration "
            "like 2h or 30m, or a Unix timestamp") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _shown(path: str) -> str:
    """A path for a table or CSV: bytes that are not UTF-8 as \\udcXX, never an encoding error."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _table(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    n = 0
    out.write(f"{'scored (UTC)':<24} {'line':<12} {'verdict':<10} {'score':>10} {'p-value':>8}  {'model':<16} path\n")
    for r in rows:
        verdict = r["verdict"].upper() if r["verdict"] == "anomalous" else r["verdict"]
        if r["verdict"] == "error":
            verdict = f"error:{r['reason']}"
        score = f"{r['score']:.5g}" if r["score"] is not None else ""
        p = f"{r['p_value']:.4f}" if r["p_value"] is not None else ""
        out.write(f"{r['scored']:<24} {r['line']:<12} {verdict:<10} {score:>10} {p:>8}  {r['model_id'] or '':<16} "
                  f"{_shown(r['path'])}\n")
        n += 1
    return n


def write_verdicts(state_dir: Path, out: TextIO, *, since: float | None = None,
                   anomalous_only: bool = False, fmt: str = "jsonl", line: str | None = None) -> int:
    """Write every matching record to `out`; returns how many."""
    try:
        conn = open_readonly(ledger_path(state_dir))
    except LedgerError as e:
        raise VerdictsError(f"{e} (is --state the daemon's state folder?)") from None
    try:
        rows = verdict_rows(conn, since=since, anomalous_only=anomalous_only, line=line)
        if fmt == "table":
            return _table(rows, out)
        n = 0
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore") if fmt == "csv" else None
        if writer:
            writer.writeheader()
        for r in rows:
            if writer:
                writer.writerow({**r, "path": _shown(r["path"])})
            else:
                out.write(json_line({k: r[k] for k in FIELDS}) + "\n")
            n += 1
        return n
    finally:
        conn.close()
