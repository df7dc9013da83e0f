"""The state folder's layout, in one place, and the lock that gives it one daemon.

    STATE/
      lock                        flock'ed by the running daemon; holds its pid
      ledger.sqlite3 (+ -wal)     every verdict and alert, exactly once (anomon.ledger)
      ledger-marker.json          the ledger this folder last saw and the highest alert id it issued
      alerts.jsonl                every alert, in id order (anomon.alerts)
      alerts.jsonl.1 ... .N       older alerts, rotated out at alerts_jsonl_max_bytes (.1 newest)
      webhook-dead-letter.jsonl   alerts the webhook gave up on
      anomalies/                  copies of anomalous images and their heat maps, size-bounded

Every module that reads or writes the folder takes its names from here, so the layout cannot
drift apart between the daemon, `anomon verdicts` and the demo. So do the folder's small file
chores: the marker (written atomically), the JSONL files' torn last lines, and the question "has
a ledger lived here?", which anomon.ledger asks before creating one (this module imports only
anomon.atomic, so the ledger and the exporters can both use it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomon.atomic import atomic_write

log = logging.getLogger("anomon.state")

LOCK_NAME = "lock"
LEDGER_NAME = "ledger.sqlite3"
MARKER_NAME = "ledger-marker.json"
JSONL_NAME = "alerts.jsonl"
DEAD_LETTER_NAME = "webhook-dead-letter.jsonl"
ANOMALIES_DIR = "anomalies"
# How far back from the end of a JSONL file its last complete lines are looked for.
_TAIL_BYTES = 1 << 20


class StateInUse(Exception):
    """Another daemon holds the state folder's lock."""

    def __init__(self, state: Path, pid: str) -> None:
        super().__init__(f"state folder {state} is in use by another anomon watch (pid {pid})")
        self.pid = pid


def ledger_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / LEDGER_NAME


def lock(state_dir: str | os.PathLike[str]) -> int:
    """Take the folder's lock for this process (released when the process ends, however it ends).

    One daemon per state folder: two would both score and alert every image. Returns the file
    descriptor to keep open; raises StateInUse naming the holder's pid.
    """
    path = Path(state_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateInUse(Path(state_dir), other) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def holder(state_dir: str | os.PathLike[str]) -> str | None:
    """The pid of a daemon holding the folder's lock, or None; never takes the lock itself."""
    path = Path(state_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


# ------------------------------------------------------------------------------ the ledger marker


@dataclass
class Marker:
    """What the state folder knows of its ledger, kept outside it: which ledger it last saw, in
    which epoch, and the highest alert id it has issued. A ledger restored from a backup holds
    fewer alerts than the marker says were issued; anomon.ledger then starts a new epoch."""

    ledger_id: str
    epoch: str
    max_alert_id: int


class MarkerError(Exception):
    """The marker file exists but cannot be read (the message names it)."""


def read_marker(state_dir: str | os.PathLike[str]) -> Marker | None:
    """The folder's marker; None if there is none; MarkerError if it is unreadable."""
    path = Path(state_dir) / MARKER_NAME
    try:
        data = json.loads(path.read_bytes())
        return Marker(str(data["ledger_id"]), str(data["epoch"]), int(data["max_alert_id"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MarkerError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def write_marker(state_dir: str | os.PathLike[str], marker: Marker) -> None:
    data = {"ledger_id": marker.ledger_id, "epoch": marker.epoch, "max_alert_id": marker.max_alert_id}
    atomic_write(Path(state_dir) / MARKER_NAME, (json.dumps(data) + "\n").encode())


# ------------------------------------------------------------------------------ JSONL files


def cut_torn_tail(path: Path) -> int:
    """Cut off a torn last line (a crash mid-append) so the next append starts on a clean line;
    returns the bytes cut. Only the last `_TAIL_BYTES` are searched for the previous line end."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        tail_len = min(size, _TAIL_BYTES)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        cut = tail.rfind(b"\n")
        if cut < 0 and tail_len < size:
            log.error("%s: last line is torn and longer than %d bytes; appending after it",
                      path, _TAIL_BYTES, extra={"file": str(path)})
            f.write(b"\n")  # the torn line stays one bad line, the next ones stay valid
            f.flush()
            os.fsync(f.fileno())
            return 0
        keep = size - tail_len + cut + 1
        log.warning("%s: cutting off a torn last line (%d bytes) left by a crash", path, size - keep,
                    extra={"file": str(path)})
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def last_lines(path: Path) -> list[bytes]:
    """The complete lines at the end of a JSONL file (its last `_TAIL_BYTES`), never changing it:
    a torn last line is left out, and so is a first line that starts before the tail does."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except FileNotFoundError:
        return []
    lines = tail.split(b"\n")[:-1]  # the part after the last newline is torn (or empty)
    if size > _TAIL_BYTES and lines:
        lines = lines[1:]
    return [x for x in lines if x.strip()]


def _json_id(line: bytes, *keys: str) -> int | None:
    try:
        obj: Any = json.loads(line)
        for k in keys:
            obj = obj[k]
        return int(obj)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def last_id(path: Path, *keys: str) -> int:
    """The id (at `keys`, e.g. ("id",) or ("alert", "id")) of the last complete, readable line."""
    for line in reversed(last_lines(path)):
        got = _json_id(line, *keys)
        if got is not None:
            return got
    return 0


# ------------------------------------------------------------------------------ has a ledger lived here?


def rotated_jsonl(state_dir: str | os.PathLike[str], n: int) -> Path:
    """alerts.jsonl's n-th rotated file (1 = the newest), see anomon.alerts.JsonlExporter."""
    return Path(state_dir) / f"{JSONL_NAME}.{n}"


def traces(state_dir: str | os.PathLike[str]) -> list[str]:
    """What in the folder shows that a ledger has lived in it (the lock does not: every start,
    even a failed one, takes it)."""
    d = Path(state_dir)
    found = []
    for name in (MARKER_NAME, JSONL_NAME, rotated_jsonl(d, 1).name, DEAD_LETTER_NAME):
        try:
            if (d / name).stat().st_size > 0:
                found.append(name)
        except FileNotFoundError:
            pass
    try:
        if any((d / ANOMALIES_DIR).iterdir()):
            found.append(f"{ANOMALIES_DIR}/")
    except (FileNotFoundError, NotADirectoryError):
        pass
    return found


def highest_alert_id(state_dir: str | os.PathLike[str], marker: Marker | None) -> int:
    """The highest alert id this folder has seen issued: in the marker, alerts.jsonl (or, just
    after a rotation, alerts.jsonl.1) or the dead-letter file. New alerts must be numbered above
    it, or alerts.jsonl skips them and a receiver takes them for ones it already has."""
    d = Path(state_dir)
    dead = [_json_id(line, "alert", "id") for line in last_lines(d / DEAD_LETTER_NAME)]
    return max([marker.max_alert_id if marker else 0, last_id(d / JSONL_NAME, "id"),
                last_id(rotated_jsonl(d, 1), "id"), *(x for x in dead if x is not None)])
