"""The scoring queue of a daemon with several lines: one bounded FIFO per line, served in turn.

Why not one queue: the scoring worker is one thread (one writer of verdicts, one model in memory
at a time on the CPU), so whoever is first in a shared queue is scored first. A camera that dumps
5,000 images would then hold every other line's verdicts back for minutes. Here each line waits in
its own queue and the worker takes one micro-batch (the line's batch size) from each line that has
images, in turn, so a burst on one line costs the others at most one batch per turn.

A line can be paused (its model failed to load): its images wait, up to its bound, while the
others are served, and are scored once a model loads. Images beyond a line's bound wait in intake
(anomon.intake keeps them per line, so one full line never blocks another's images behind it).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Sequence

from anomon.intake import Candidate, is_under


class LineQueues:
    """Per-line bounded queues with round-robin batches; `put_nowait`/`qsize` as intake uses a
    `queue.Queue`, `key` tells intake which queue a candidate goes to."""

    def __init__(self, roots: dict[str, Sequence[str]], *, maxsize: int,
                 batch_sizes: dict[str, int]) -> None:
        if not roots:
            raise ValueError("no lines")
        self.lines = list(roots)
        # Longest root first, so a path is matched to the most specific folder.
        self._roots = sorted(((os.path.realpath(r), ln) for ln, rs in roots.items() for r in rs),
                             key=lambda t: len(t[0]), reverse=True)
        self._maxsize = maxsize
        self._batch = {ln: max(1, batch_sizes.get(ln, 1)) for ln in self.lines}
        self._q: dict[str, deque[Candidate]] = {ln: deque() for ln in self.lines}
        self._paused: set[str] = set()
        self._next = 0  # index in self.lines of the line served next
        self._cond = threading.Condition()

    # -- which line -----------------------------------------------------------------------------

    def line_of(self, path: str) -> str:
        """The line whose folder holds `path` (the first line for a path under none: intake
        only hands over paths under a watched folder, and the scorer refuses any other)."""
        for root, line in self._roots:
            if is_under(path, root):
                return line
        return self.lines[0]

    def key(self, cand: Candidate) -> str:
        return self.line_of(cand.path)

    # -- intake's side --------------------------------------------------------------------------

    def put_nowait(self, cand: Candidate) -> None:
        line = self.line_of(cand.path)
        with self._cond:
            q = self._q[line]
            if len(q) >= self._maxsize:
                raise queue.Full
            q.append(cand)
            self._cond.notify()

    def qsize(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._q.values())

    def depth(self, line: str) -> int:
        with self._cond:
            return len(self._q[line])

    # -- the scorer's side ----------------------------------------------------------------------

    def pause(self, line: str, paused: bool = True) -> None:
        with self._cond:
            if paused:
                self._paused.add(line)
            else:
                self._paused.discard(line)
                self._cond.notify()

    def take(self, timeout: float) -> tuple[str, list[Candidate]] | None:
        """The next line in turn that has images (and is not paused), with up to its batch size
        of them; None if none arrived within `timeout` seconds."""
        with self._cond:
            got = self._take()
            if got is None and self._cond.wait(timeout):
                got = self._take()
            return got

    def _take(self) -> tuple[str, list[Candidate]] | None:
        n = len(self.lines)
        for i in range(n):
            line = self.lines[(self._next + i) % n]
            q = self._q[line]
            if q and line not in self._paused:
                self._next = (self._next + i + 1) % n
                return line, [q.popleft() for _ in range(min(len(q), self._batch[line]))]
        return None
