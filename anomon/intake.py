"""Intake: turn file-system events, start-up backlog and rescans into complete image files.

The watchdog handler only turns events into messages on a queue; it never blocks the observer
thread. One intake thread owns all the state and decides when a file is *complete*:

- at once after close-after-write (inotify IN_CLOSE_WRITE) or a rename into the folder (the
  "write to a temporary name, then rename" idiom);
- otherwise (polling mode, writers that keep the file open, files found by a rescan) once its size
  and mtime stayed unchanged for `stable_s`;
- a file the scorer finds empty or truncated is "not yet", not "bad": it is handed back (`defer`)
  and only judged as empty/truncated if it is still unchanged `incomplete_grace_s` later.

Events are not enough on their own: the kernel drops them when its queue overflows, network shares
deliver none for writes made on another host, and nothing is watched while the daemon is down. So
at start, every `reconcile_interval_s`, and whenever watchdog reports an overflow, the folders are
walked and every image file whose (path, size, mtime_ns) the ledger has not recorded is taken
(`is_seen` asks the ledger). Taking a file twice is harmless: the scorer checks the ledger again.

Paths are resolved before anything else: a symlink that leads outside every watched folder is
handed on as *refused* (recorded and counted, never opened); one that leads inside becomes the
file it points to, so a file and a link to it are one image (beats #1686).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from anomon.config import watch_default
from anomon.images import is_image_path

log = logging.getLogger("anomon.intake")

# watchdog's inotify backend logs this (and nothing else) when the kernel queue overflowed.
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers.inotify_c"

_TICK_S = 0.1  # how often pending files are stat'ed; bounds the completion delay after stable_s
_GONE_WAIT_S = 2.0  # how long a vanished pending file waits for its "deleted" event


def is_under(path: str, top: str) -> bool:
    """`path` is `top` or lies below it (both absolute, normalised; no file system access)."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


@dataclass
class Candidate:
    """A file to score: complete as far as intake can tell."""

    path: str  # the resolved path; for a refused link, the link itself
    arrived_at: float  # unix time the file was first noticed
    completed_at: float  # unix time it was judged complete (start of the intake latency)
    final: bool = False  # empty/truncated now count as such: the grace period is over
    refused: str | None = None  # why it must not be read (reason "refused")
    via: str = "event"  # close | move | stable | scan | deleted (for the log)


@dataclass
class _Pending:
    arrived_at: float
    confirmed: str | None = None  # "close" / "move" / "deleted": complete without waiting
    size: int = -1
    mtime_ns: int = -1
    stable_since: float = field(default_factory=time.monotonic)
    gone_since: float | None = None  # stat failed: waiting for its "deleted" event


@dataclass
class _Deferred:
    arrived_at: float
    size: int
    mtime_ns: int
    until: float


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: forward the few events that matter, nothing else."""

    _FILE_KINDS = frozenset({"created", "modified", "closed", "moved", "deleted"})
    _DIR_KINDS = frozenset({"created", "moved"})

    def __init__(self, sink: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        super().__init__()
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        kinds = self._DIR_KINDS if event.is_directory else self._FILE_KINDS
        if event.event_type in kinds:
            self._sink.put((
                "dir_" + event.event_type if event.is_directory else event.event_type,
                os.fsdecode(event.src_path), os.fsdecode(event.dest_path) if event.dest_path else "",
            ))


class _OverflowWatch(logging.Handler):
    """watchdog reports an inotify queue overflow only in its log: turn that into a rescan."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._callback()


ObserverFactory = Callable[[bool], Any]  # polling -> an unstarted watchdog observer


def default_observer(polling: bool, poll_interval_s: float = 1.0) -> Any:
    return PollingObserver(timeout=poll_interval_s) if polling else Observer()


class Intake:
    """Watches `roots` and puts complete image files, as `Candidate`s, on `out`."""

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        out: queue.Queue[Candidate],
        *,
        is_seen: Callable[[str, int, int], bool],
        ignore_patterns: Iterable[str] = (),
        exclude: Iterable[str | os.PathLike[str]] = (),
        polling: bool = False,
        poll_interval_s: float = watch_default("poll_interval_s"),
        stable_s: float = watch_default("stable_s"),
        incomplete_grace_s: float = watch_default("incomplete_grace_s"),
        reconcile_interval_s: float = watch_default("reconcile_interval_s"),
        on_rescan: Callable[[str], None] | None = None,
        on_polling: Callable[[bool], None] | None = None,
        observer_factory: ObserverFactory | None = None,
    ) -> None:
        self.roots = [os.path.realpath(r) for r in roots]
        self._out = out
        self._is_seen = is_seen
        self._ignore = tuple(ignore_patterns)
        self._exclude = [os.path.realpath(e) for e in exclude]
        self.polling = polling
        self._poll_interval_s = poll_interval_s
        self._stable_s = stable_s
        self._grace_s = incomplete_grace_s
        self._reconcile_s = reconcile_interval_s
        self._on_rescan = on_rescan or (lambda why: None)
        self._on_polling = on_polling or (lambda on: None)
        self._factory = observer_factory or (lambda p: default_observer(p, poll_interval_s))

        self._msgs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._deferred: dict[str, _Deferred] = {}
        self._inflight: dict[str, int] = {}
        # Ready candidates waiting for room in `out`, per `out.key(candidate)` when `out` has
        # such a method (anomon.linequeue: one queue per line), so a full line never holds up
        # another line's images behind its own.
        self._key: Callable[[Candidate], str] = getattr(out, "key", lambda cand: "")
        self._ready: dict[str, deque[Candidate]] = {}
        self._ready_len: dict[str, int] = {}  # read by other threads (backlog); replaced whole
        self._rescan_wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._overflow = _OverflowWatch(lambda: self.request_rescan("inotify overflow"))
        self.startup_scan_done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching (raises OSError if a folder cannot be watched), then scan in the
        background: the observer runs first, so nothing written during the scan is missed."""
        for r in self.roots:
            if not os.path.isdir(r):
                raise FileNotFoundError(errno.ENOENT, "watched folder does not exist", r)
        self._observer = self._start_observer()
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).addHandler(self._overflow)
        self._thread = threading.Thread(target=self._run, name="anomon-intake", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeHandler(self._overflow)
        if self._observer is not None:
            self._observer.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._observer is not None:
            self._observer.join(timeout)

    def _start_observer(self) -> Any:
        try:
            return self._schedule(self.polling)
        except OSError as e:
            if self.polling or e.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            # ENOSPC: fs.inotify.max_user_watches reached; EMFILE: max_user_instances.
            log.warning("inotify limit reached (%s); falling back to polling every %.1f s. Raise "
                        "fs.inotify.max_user_watches / max_user_instances to get events back",
                        e.strerror or e, self._poll_interval_s,
                        extra={"fallback": "polling", "errno": e.errno})
            self.polling = True
            return self._schedule(True)

    def _schedule(self, polling: bool) -> Any:
        observer = self._factory(polling)
        handler = _Handler(self._msgs)
        for r in self.roots:
            observer.schedule(handler, r, recursive=True)
        observer.start()
        self._on_polling(polling)
        log.info("watching %s (%s)", ", ".join(self.roots), "polling" if polling else "inotify")
        return observer

    @property
    def watching(self) -> bool:
        """The observer runs and every watched folder still exists."""
        return (self._observer is not None and self._observer.is_alive()
                and all(os.path.isdir(r) for r in self.roots))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def backlog(self, key: str | None = None) -> int:
        """Complete images waiting to be scored (queued, or waiting for room in the queue); with
        `key`, those of one queue (a line)."""
        if key is None:
            return self._out.qsize() + sum(self._ready_len.values())
        return self._out.depth(key) + self._ready_len.get(key, 0)  # type: ignore[attr-defined]

    # -- messages from other threads -------------------------------------------------------------

    def done(self, path: str) -> None:
        """The scorer has finished with a candidate (recorded, skipped or deferred)."""
        self._msgs.put(("done", path, ""))

    def defer(self, cand: Candidate, size: int, mtime_ns: int) -> None:
        """The scorer found the file empty or truncated: give the writer time to finish."""
        self._msgs.put(("defer", cand.path, "", cand.arrived_at, size, mtime_ns))

    def request_rescan(self, why: str = "requested") -> None:
        self._rescan_wanted.set()
        self._msgs.put(("rescan", why, ""))

    # -- the intake thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._scan("start-up")
        except Exception:  # pragma: no cover - logged, and the periodic scan tries again
            log.exception("start-up scan failed")
        finally:
            self.startup_scan_done.set()
        next_scan = time.monotonic() + self._reconcile_s
        while not self._stop.is_set():
            try:
                self._drain(timeout=_TICK_S)
                self._tick()
                self._flush()
                if self._rescan_wanted.is_set() or time.monotonic() >= next_scan:
                    why = "requested" if self._rescan_wanted.is_set() else "periodic"
                    self._rescan_wanted.clear()
                    self._scan(why)
                    next_scan = time.monotonic() + self._reconcile_s
            except Exception:  # keep intake alive whatever one file does
                log.exception("intake error")
                time.sleep(_TICK_S)

    def _drain(self, timeout: float) -> None:
        try:
            msg = self._msgs.get(timeout=timeout)
        except queue.Empty:
            return
        for _ in range(100_000):
            self._handle(msg)
            try:
                msg = self._msgs.get_nowait()
            except queue.Empty:
                return

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind, src, dest = msg[0], msg[1], msg[2]
        if kind == "done":
            self._release(src)
        elif kind == "defer":  # (the scorer's "done" for it follows)
            if src not in self._pending:  # it changed meanwhile: the new version is on its way
                _, _, _, arrived_at, size, mtime_ns = msg
                self._deferred[src] = _Deferred(arrived_at, size, mtime_ns,
                                                time.monotonic() + self._grace_s)
        elif kind in ("created", "modified"):
            self._touch(src, confirmed=None)
        elif kind == "closed":
            self._touch(src, confirmed="close")
        elif kind == "moved":
            self._forget(src)
            self._touch(dest, confirmed="move")
        elif kind == "deleted":
            p = self._resolve(src)
            if p is not None and p[1] is None and (p[0] in self._pending or p[0] in self._deferred):
                # Deleted before it was scored: the scorer records it as "vanished".
                self._deferred.pop(p[0], None)
                self._pending.setdefault(p[0], _Pending(time.time())).confirmed = "deleted"
        elif kind == "dir_moved":
            # Files under the old name were renamed, not deleted: forget them, take the new tree.
            old = os.path.abspath(src)
            for table in (self._pending, self._deferred):
                for p in [p for p in table if is_under(p, old)]:
                    del table[p]
            self._scan_dir(dest)
        elif kind == "dir_created":
            self._scan_dir(src)
        # "rescan" only wakes the loop; the flag says what to do.

    def _release(self, path: str) -> None:
        n = self._inflight.get(path, 0) - 1
        if n > 0:
            self._inflight[path] = n
        else:
            self._inflight.pop(path, None)

    def _forget(self, path: str) -> None:
        """A file renamed away before it was scored is not lost: its new name arrives as well."""
        p = os.path.abspath(path)
        self._pending.pop(p, None)
        self._deferred.pop(p, None)

    def _touch(self, path: str, confirmed: str | None) -> None:
        res = self._resolve(path)
        if res is None:
            return
        p, refused = res
        if refused is not None:
            now = time.time()
            self._emit(Candidate(p, now, now, refused=refused, via="refused"))
            return
        ent = self._pending.get(p)
        if ent is None:
            old = self._deferred.pop(p, None)
            ent = self._pending[p] = _Pending(old.arrived_at if old else time.time())
        if confirmed:
            ent.confirmed = confirmed
        else:  # written again: whatever closed before is not the end any more
            ent.confirmed = None
            ent.stable_since = time.monotonic()

    def _tick(self) -> None:
        """Hand on files that are complete; check deferred files whose grace period is over."""
        mono = time.monotonic()
        for p, ent in list(self._pending.items()):
            if ent.confirmed:
                self._complete(p, ent, ent.confirmed)
                continue
            try:
                st = os.lstat(p)
            except OSError:
                # Gone already. Its remaining events (close, delete) are still on their way: wait
                # for them, or it would be handed on twice. If they were lost, hand it on anyway;
                # either way the scorer records it once, as "vanished".
                if ent.gone_since is None:
                    ent.gone_since = mono
                elif mono - ent.gone_since >= _GONE_WAIT_S:
                    self._complete(p, ent, "deleted")
                continue
            ent.gone_since = None
            if (st.st_size, st.st_mtime_ns) != (ent.size, ent.mtime_ns):
                ent.size, ent.mtime_ns, ent.stable_since = st.st_size, st.st_mtime_ns, mono
            elif mono - ent.stable_since >= self._stable_s:
                self._complete(p, ent, "stable")
        for p, d in list(self._deferred.items()):
            if mono < d.until:
                continue
            del self._deferred[p]
            try:
                st = os.lstat(p)
                changed = (st.st_size, st.st_mtime_ns) != (d.size, d.mtime_ns)
            except OSError:
                changed = False  # gone: one last look records it as vanished
            if changed:
                self._pending[p] = _Pending(d.arrived_at)
            else:
                now = time.time()
                self._emit(Candidate(p, d.arrived_at, now, final=True, via="grace"))

    def _complete(self, path: str, ent: _Pending, via: str) -> None:
        del self._pending[path]
        self._emit(Candidate(path, ent.arrived_at, time.time(), via=via))

    def _emit(self, cand: Candidate) -> None:
        self._inflight[cand.path] = self._inflight.get(cand.path, 0) + 1
        key = self._key(cand)
        ready = self._ready.setdefault(key, deque())
        ready.append(cand)
        self._ready_len = {**self._ready_len, key: len(ready)}

    def _flush(self) -> None:
        """Move ready candidates into the bounded scoring queue while it has room. Never blocks:
        events keep being handled while the scorer catches up."""
        for ready in self._ready.values():
            while ready:
                try:
                    self._out.put_nowait(ready[0])
                except queue.Full:
                    break
                ready.popleft()
        self._ready_len = {k: len(r) for k, r in self._ready.items()}

    # -- paths -----------------------------------------------------------------------------------

    def _root_of(self, path: str) -> str | None:
        for r in self.roots:
            if is_under(path, r):
                return r
        return None


    def _skipped(self, path: str, root: str) -> bool:
        """Under an excluded folder (the state folder, when it lies inside a watched one), or a
        path component (file or folder name) matching an ignore pattern: temporary, hidden."""
        if any(is_under(path, e) for e in self._exclude):
            return True
        rel = os.path.relpath(path, root)
        return any(fnmatch.fnmatchcase(part, pat) for part in rel.split(os.sep) for pat in self._ignore)

    def _wanted(self, path: str, root: str) -> bool:
        return is_image_path(path) and not self._skipped(path, root)

    def _resolve(self, path: str) -> tuple[str, str | None] | None:
        """(path to score, None), (link, why refused), or None for names we do not want."""
        p = os.path.abspath(path)
        root = self._root_of(p)
        if root is None or not self._wanted(p, root):
            return None
        real = os.path.realpath(p)
        if real == p:
            return p, None
        real_root = self._root_of(real)
        if real_root is None:
            return p, f"{p}: symlink leads outside the watched folders"
        if not self._wanted(real, real_root):
            return None
        return real, None

    # -- rescans ---------------------------------------------------------------------------------

    def _scan(self, why: str) -> None:
        t0 = time.monotonic()
        self._on_rescan(why)
        n = 0
        for r in self.roots:
            n += self._scan_dir(r)
        log.info("rescan (%s): %d new file(s) in %.2f s", why, n, time.monotonic() - t0,
                 extra={"rescan": why, "new_files": n})

    def _scan_dir(self, top: str) -> int:
        """Take every wanted file under `top` that the ledger has not seen in its current state."""
        top = os.path.abspath(top)
        root = self._root_of(top)
        if root is None:
            return 0
        n = 0
        for dirpath, dirnames, filenames in os.walk(top):  # does not follow directory links
            dirnames[:] = [d for d in dirnames if self._keep_dir(os.path.join(dirpath, d), root)]
            for name in filenames:
                if self._stop.is_set():
                    return n
                n += self._consider(os.path.join(dirpath, name))
            self._drain(timeout=0)  # keep up with events during a long walk
            self._flush()
        return n

    def _keep_dir(self, path: str, root: str) -> bool:
        # Links to folders are not followed: inside ones are walked anyway, outside ones refused.
        return not os.path.islink(path) and not self._skipped(path, root)

    def _consider(self, path: str) -> int:
        res = self._resolve(path)
        if res is None:
            return 0
        p, refused = res
        if p in self._pending or p in self._deferred or p in self._inflight:
            return 0
        try:
            st = os.lstat(path if refused else p)
        except OSError:
            return 0
        if self._is_seen(path if refused else p, st.st_size, st.st_mtime_ns):
            return 0
        if refused is not None:
            now = time.time()
            self._emit(Candidate(path, now, now, refused=refused, via="scan"))
            return 1
        now = time.time()
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime_ns / 1e9 < self._stable_s:
            # Written a moment ago: let the stability check decide.
            self._pending[p] = _Pending(now, size=st.st_size, mtime_ns=st.st_mtime_ns)
        else:
            self._emit(Candidate(p, now, now, via="scan"))
        return 1

