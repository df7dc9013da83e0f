"""`anomon verdicts`: what the ledger holds, per line, in the formats a user pipes elsewhere."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from anomon.ledger import Ledger, Verdict
from anomon.state import ledger_path
from anomon.verdicts import write_verdicts


def _ledger(state: Path) -> None:
    led = Ledger.open(ledger_path(state))
    led.record([Verdict(path=f"/cam/{ln}/{i}.png", line=ln, verdict=v, arrived_at=1.0, scored_at=2.0 + i,
                        size=1, mtime_ns=i, sha256=f"{ln}{i}", score=s, threshold=1.0)
                for i, (ln, v, s) in enumerate([("press-1", "normal", 0.2), ("weld-2", "anomalous", 3.0),
                                                ("weld-2", "normal", 0.4)])])
    led.close()


def test_every_format_names_the_line_and_line_filters(tmp_path: Path) -> None:
    _ledger(tmp_path)
    out = io.StringIO()
    assert write_verdicts(tmp_path, out, fmt="jsonl") == 3
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["line"] for r in rows] == ["press-1", "weld-2", "weld-2"]

    out = io.StringIO()
    assert write_verdicts(tmp_path, out, fmt="csv", line="weld-2") == 2
    assert [(r["line"], r["verdict"]) for r in csv.DictReader(io.StringIO(out.getvalue()))] == [
        ("weld-2", "anomalous"), ("weld-2", "normal")]

    out = io.StringIO()
    assert write_verdicts(tmp_path, out, fmt="table", anomalous_only=True) == 1
    header, row = out.getvalue().splitlines()
    assert header.split()[2] == "line" and "weld-2" in row and "ANOMALOUS" in row

    assert write_verdicts(tmp_path, io.StringIO(), line="no-such-line") == 0
