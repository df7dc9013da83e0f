"""The state folder's layout, in one place, and the lock that gives it one daemon.

    STATE/
      lock                        flock'ed by the running daemon; holds its pid
      ledger.sqlite3 (+ -wal)     every verdict and alert, exactly once (anomon.ledger)
      alerts.jsonl                every alert, in id order (anomon.alerts)
      webhook-dead-letter.jsonl   alerts the webhook gave up on
      anomalies/                  copies of anomalous images and their heat maps, size-bounded

Every module that reads or writes the folder takes its names from here, so the layout cannot
drift apart between the daemon, `anomon verdicts` and the demo.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "lock"
LEDGER_NAME = "ledger.sqlite3"
JSONL_NAME = "alerts.jsonl"
DEAD_LETTER_NAME = "webhook-dead-letter.jsonl"
ANOMALIES_DIR = "anomalies"


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
