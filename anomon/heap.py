"""Keeping the daemon's resident memory flat over months: glibc heap trimming, and when to do it."""

from __future__ import annotations

import functools
import time
from typing import Any


TRIM_EVERY_S = 10.0  # under sustained load
IDLE_TRIM_S = 1.0  # once the queue has been empty this long after a batch


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Give freed heap memory back to the OS; keeps the daemon's RSS flat over months.

    Each batch allocates and frees tens of MB of activations on the scoring thread, and glibc keeps
    such freed blocks in fragmented per-thread heaps: measured with bench/daemon_throughput.py,
    RSS grew from 561 to 1,012 MB over 13,000 images. Fixing the mmap threshold at 1 MiB kept it
    flat but cost 20-25% of the throughput (every batch faulted its buffers in again); trimming
    now and then costs one such refill each time.
    """
    try:
        trim = _malloc_trim()
        return trim is not None and trim(0) >= 0
    except Exception:  # find_library runs subprocesses and temp files: EMFILE, ENOMEM...
        return False


class HeapTrimmer:
    """When the scoring thread trims: after a burst, and every TRIM_EVERY_S while one lasts.

    Trimming once the queue has been empty for a second hands a burst's buffers back as soon as it
    is over (so the resting size does not depend on when a timer last fired: trimming every 10 s
    from the main loop left the resting RSS anywhere in a 500-610 MB band), yet a steady
    trickle of images, which empties the queue between batches for less than a second, does not
    pay for faulting the buffers in again before every image.
    """

    def __init__(self) -> None:
        self.last_batch = self.last_trim = time.monotonic()
        self.dirty = False
        _malloc_trim()  # found now, while files can be opened, not in the middle of a crisis

    def scored(self) -> None:
        self.last_batch = time.monotonic()
        self.dirty = True
        if self.last_batch - self.last_trim >= TRIM_EVERY_S:
            self._trim()

    def idle(self) -> None:
        if self.dirty and time.monotonic() - self.last_batch >= IDLE_TRIM_S:
            self._trim()

    def _trim(self) -> None:
        trim_heap()
        self.last_trim = time.monotonic()
        self.dirty = False
