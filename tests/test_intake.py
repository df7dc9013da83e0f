"""Intake with real files and real watchdog observers (no detector needed)."""

from __future__ import annotations

import errno
import logging
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomon.intake import Candidate, Intake, default_observer

IGNORE = [".*", "*~", "*.tmp", "*.part"]


class Harness:
    """An Intake plus a fake scorer: takes candidates, remembers what it saw, reports done."""

    def __init__(self, root: Path, seen: set[tuple[str, int, int]] | None = None, **kw) -> None:
        self.root = root
        self.out: queue.Queue[Candidate] = queue.Queue(maxsize=kw.pop("maxsize", 1000))
        self.seen = seen if seen is not None else set()
        self.rescans: list[str] = []
        self.polling: list[bool] = []
        kw.setdefault("stable_s", 0.3)
        kw.setdefault("incomplete_grace_s", 1.0)
        self.intake = Intake([root], self.out, is_seen=lambda p, s, m: (p, s, m) in self.seen,
                             ignore_patterns=IGNORE, on_rescan=self.rescans.append,
                             on_polling=self.polling.append, **kw)
        self.got: list[Candidate] = []

    def __enter__(self) -> Harness:
        self.intake.start()
        assert self.intake.startup_scan_done.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.intake.stop()

    def take(self, n: int, timeout: float = 10.0) -> list[Candidate]:
        """Collect n candidates (fail on timeout); each is 'scored' (sizes noted) and released."""
        deadline = time.monotonic() + timeout
        got = []
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(got)} of {n}: {[c.path for c in got]}")
            try:
                c = self.out.get(timeout=left)
            except queue.Empty:
                continue
            got.append(c)
            self.got.append(c)
            if c.refused is None and os.path.isfile(c.path):
                st = os.stat(c.path)
                c.size_at_take = st.st_size  # type: ignore[attr-defined]
                self.seen.add((c.path, st.st_size, st.st_mtime_ns))
            self.intake.done(c.path)
        return got

    def quiet(self, seconds: float = 1.0) -> list[Candidate]:
        """Whatever else arrives within `seconds` (should usually be nothing)."""
        extra = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                extra.append(self.out.get(timeout=0.05))
            except queue.Empty:
                pass
        return extra


def _png(path: Path, n: int = 3000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG" + os.urandom(n))
    return path


def test_closed_files_arrive_once_each_and_complete(tmp_path: Path) -> None:
    with Harness(tmp_path) as h:
        for i in range(30):
            _png(tmp_path / "sub" / f"{i}.png")
        got = h.take(30)
        assert sorted(Path(c.path).name for c in got) == sorted(f"{i}.png" for i in range(30))
        assert all(c.size_at_take == 3004 for c in got)  # type: ignore[attr-defined]
        assert {c.via for c in got} <= {"close", "stable", "scan"}
        assert h.quiet() == []


def test_growing_open_file_waits_until_closed(tmp_path: Path) -> None:
    with Harness(tmp_path, stable_s=0.5) as h:
        p = tmp_path / "slow.png"
        with open(p, "wb") as f:
            for _ in range(8):  # grows every 0.2 s: never stable for 0.5 s
                f.write(os.urandom(1000))
                f.flush()
                time.sleep(0.2)
                assert h.out.empty()
        (c,) = h.take(1)
        assert c.path == str(p) and c.size_at_take == 8000  # type: ignore[attr-defined]


def test_temp_name_then_rename_gives_one_candidate(tmp_path: Path) -> None:
    with Harness(tmp_path) as h:
        tmp = tmp_path / "cam1.png.part"
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG" + os.urandom(500))
            f.flush()
            time.sleep(0.6)  # long enough for a stability check: but the name is ignored
            f.write(os.urandom(500))
        os.rename(tmp, tmp_path / "cam1.png")
        (c,) = h.take(1)
        assert c.path == str(tmp_path / "cam1.png") and c.via == "move"
        assert h.quiet() == []


def test_ignored_names_and_non_images_never_arrive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Harness(tmp_path, exclude=[state]) as h:
        for name in [".hidden.png", "a.png~", "b.tmp", "notes.txt", ".cache/x.png", "state/c.png"]:
            _png(tmp_path / name)
        _png(tmp_path / "ok.png")
        (c,) = h.take(1)
        assert c.path.endswith("ok.png")
        assert h.quiet() == []


def test_backlog_at_start_skips_what_the_ledger_has(tmp_path: Path) -> None:
    old = [_png(tmp_path / f"old{i}.png") for i in range(5)]
    for p in old:  # written an hour ago: complete, no need to wait for stability
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    seen = set()
    for p in old[:2]:
        st = os.stat(p)
        seen.add((str(p), st.st_size, st.st_mtime_ns))
    h = Harness(tmp_path, seen=seen)
    with h:
        got = h.take(3)
        assert sorted(c.path for c in got) == sorted(str(p) for p in old[2:])
        assert all(c.via == "scan" for c in got)
        assert h.rescans == ["start-up"]
        assert h.quiet() == []


def test_symlinks_inside_are_the_target_and_outside_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    outside = _png(tmp_path / "secret.png")
    root.mkdir()
    with Harness(root) as h:
        target = _png(root / "real.png")
        (c,) = h.take(1)
        assert c.path == str(target)
        os.symlink(target, root / "alias.png")
        os.symlink(outside, root / "escape.png")
        (c2,) = h.take(1)  # the inside link is the already-taken target: nothing new...
        assert c2.refused and c2.path == str(root / "escape.png")
        extra = h.quiet(1.0)  # ...or at most the target again (the scorer dedups it)
        assert all(e.path == str(target) for e in extra)


def test_deleted_before_scoring_is_handed_on(tmp_path: Path) -> None:
    with Harness(tmp_path, stable_s=5.0) as h:
        p = _png(tmp_path / "gone.png")
        p.unlink()
        (c,) = h.take(1)
        assert c.path == str(p) and not p.exists()


def test_many_quick_create_delete_are_each_handed_on_once(tmp_path: Path) -> None:
    """Events of a file already gone keep arriving after a stat fails: still one candidate each."""
    with Harness(tmp_path) as h:
        for k in range(200):
            p = _png(tmp_path / f"g{k}.png", 10)
            if k % 3 == 0:
                time.sleep(0.002)  # let some ticks fall between a file's events
            p.unlink()
        got = h.take(200, timeout=10)
        assert len({c.path for c in got}) == 200
        assert h.quiet(2.5) == []


def test_late_events_of_a_deleted_file_do_not_hand_it_on_twice(tmp_path: Path) -> None:
    """The exact interleaving: a tick stats the file (gone) between its create and close events."""
    with Harness(tmp_path, observer_factory=lambda polling: _DeafObserver()) as h:
        p = str(tmp_path / "late.png")
        h.intake._msgs.put(("created", p, ""))  # the file itself is already gone
        time.sleep(0.35)  # several ticks stat it and fail
        h.intake._msgs.put(("modified", p, ""))
        h.intake._msgs.put(("closed", p, ""))
        h.intake._msgs.put(("deleted", p, ""))
        (c,) = h.take(1)
        assert c.path == p
        assert h.quiet(2.5) == []


def test_deferred_file_is_final_after_grace_unless_it_changes(tmp_path: Path) -> None:
    with Harness(tmp_path, incomplete_grace_s=0.8) as h:
        a = _png(tmp_path / "a.png", 10)
        b = _png(tmp_path / "b.png", 10)
        got = h.take(2)
        for c in got:  # the scorer says "truncated": hand them back
            st = os.stat(c.path)
            h.intake.defer(c, st.st_size, st.st_mtime_ns)
        time.sleep(0.2)
        with open(b, "ab") as f:  # b's writer comes back and finishes
            f.write(os.urandom(100))
        got2 = {Path(c.path).name: c for c in h.take(2, timeout=5)}
        assert not got2["b.png"].final and got2["b.png"].size_at_take == 114  # type: ignore[attr-defined]
        assert got2["a.png"].final and got2["a.png"].via == "grace"  # unchanged: judge it as it is
        assert a.exists()


class _DeafObserver:
    """An observer whose events are all lost, as after an inotify queue overflow."""

    def schedule(self, *a, **k) -> None: ...
    def start(self) -> None: self._alive = True
    def stop(self) -> None: self._alive = False
    def join(self, timeout=None) -> None: ...
    def is_alive(self) -> bool: return getattr(self, "_alive", False)


def test_rescan_finds_files_whose_events_were_lost(tmp_path: Path) -> None:
    with Harness(tmp_path, observer_factory=lambda polling: _DeafObserver(),
                 reconcile_interval_s=3600) as h:
        for i in range(5):
            _png(tmp_path / f"{i}.png")
        assert h.quiet(0.7) == []  # no events: nothing yet
        # watchdog's own overflow warning is what triggers the rescan
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost")
        assert len(h.take(5)) == 5
        assert h.rescans == ["start-up", "requested"]


def test_periodic_rescan(tmp_path: Path) -> None:
    with Harness(tmp_path, observer_factory=lambda polling: _DeafObserver(),
                 reconcile_interval_s=0.5) as h:
        _png(tmp_path / "x.png")
        (c,) = h.take(1, timeout=5)
        assert c.via == "scan" and "periodic" in h.rescans


def test_watch_limit_falls_back_to_polling(tmp_path: Path) -> None:
    def factory(polling: bool):
        if not polling:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return default_observer(True, 0.2)

    with Harness(tmp_path, observer_factory=factory) as h:
        assert h.intake.polling and h.polling == [True]
        _png(tmp_path / "p.png")
        (c,) = h.take(1, timeout=5)
        assert c.path.endswith("p.png")


def test_other_errors_from_the_observer_are_not_hidden(tmp_path: Path) -> None:
    def factory(polling: bool):
        raise OSError(errno.EACCES, "permission denied")

    h = Harness(tmp_path, observer_factory=factory)
    with pytest.raises(OSError):
        h.intake.start()


def test_missing_folder_fails_at_start(tmp_path: Path) -> None:
    h = Harness(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        h.intake.start()


def test_polling_mode_sees_another_process_write(tmp_path: Path) -> None:
    with Harness(tmp_path, polling=True, poll_interval_s=0.3) as h:
        code = ("import os,sys; [open(os.path.join(sys.argv[1], f'{i}.png'), 'wb')"
                ".write(b'\\x89PNG' + os.urandom(99)) for i in range(10)]")
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
        t0 = time.monotonic()
        got = h.take(10, timeout=5)
        assert len({c.path for c in got}) == 10
        assert time.monotonic() - t0 < 2 * 0.3 + 0.3 + 1.0  # two intervals + stable_s + slack


def test_full_queue_holds_candidates_without_losing_any(tmp_path: Path) -> None:
    with Harness(tmp_path, maxsize=3) as h:
        for i in range(20):
            _png(tmp_path / f"{i}.png")
        time.sleep(1.0)
        assert h.out.qsize() == 3 and h.intake.backlog() == 20
        got = h.take(20)
        assert len({c.path for c in got}) == 20
