"""anomon.heap: when the scoring thread gives freed memory back."""

from __future__ import annotations

import pytest


def test_heap_trim_is_available_on_glibc() -> None:
    """The daemon trims glibc's heaps periodically (see trim_heap for the measurement)."""
    import platform

    from anomon.heap import trim_heap

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert trim_heap() is True


def test_heap_is_trimmed_after_a_burst_and_periodically_under_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trim once the queue has been idle a while, and every TRIM_EVERY_S while a burst lasts, never
    between the batches of a steady trickle (each trim makes the next batch fault its buffers in)."""
    from anomon import heap as heap_module

    clock = [1000.0]
    trims: list[float] = []
    monkeypatch.setattr(heap_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(heap_module, "trim_heap", lambda: trims.append(clock[0]) or True)
    heap = heap_module.HeapTrimmer()

    heap.idle()
    assert trims == []  # nothing scored yet: nothing to give back
    for _ in range(30):  # a trickle: a batch every 0.5 s, the queue briefly empty between them
        clock[0] += 0.25
        heap.scored()
        clock[0] += 0.25
        heap.idle()
    assert trims == [1010.25]  # only the periodic trim, at the first batch 10 s after the start
    clock[0] += heap_module.IDLE_TRIM_S
    heap.idle()
    heap.idle()
    assert trims == [1010.25, 1015.0 + heap_module.IDLE_TRIM_S]  # the burst is over: once, not again
