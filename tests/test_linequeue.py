"""The per-line scoring queue: lines take turns, a full or paused line holds up no other."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from anomon.intake import Candidate
from anomon.linequeue import LineQueues


def _cand(path: Path) -> Candidate:
    return Candidate(str(path), 0.0, 0.0)


@pytest.fixture
def lq(tmp_path: Path) -> LineQueues:
    for d in ("a", "b", "a/deeper"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    return LineQueues({"a": [str(tmp_path / "a")], "b": [str(tmp_path / "b")]}, maxsize=5,
                      batch_sizes={"a": 2, "b": 3})


def test_paths_go_to_the_line_whose_folder_holds_them(lq: LineQueues, tmp_path: Path) -> None:
    assert lq.line_of(str(tmp_path / "a" / "x.png")) == "a"
    assert lq.line_of(str(tmp_path / "a" / "deeper" / "x.png")) == "a"
    assert lq.line_of(str(tmp_path / "b" / "x.png")) == "b"
    assert lq.line_of(str(tmp_path / "ab" / "x.png")) == "a"  # under no folder: the first line
    nested = LineQueues({"outer": [str(tmp_path / "a")], "inner": [str(tmp_path / "a" / "deeper")]},
                        maxsize=5, batch_sizes={})
    assert nested.line_of(str(tmp_path / "a" / "deeper" / "x.png")) == "inner"  # the closest folder


def test_lines_take_turns_one_batch_each(lq: LineQueues, tmp_path: Path) -> None:
    for i in range(5):
        lq.put_nowait(_cand(tmp_path / "a" / f"{i}.png"))
    for i in range(4):
        lq.put_nowait(_cand(tmp_path / "b" / f"{i}.png"))
    taken = []
    while (got := lq.take(timeout=0.01)) is not None:
        taken.append((got[0], [Path(c.path).name for c in got[1]]))
    assert taken == [("a", ["0.png", "1.png"]), ("b", ["0.png", "1.png", "2.png"]),
                     ("a", ["2.png", "3.png"]), ("b", ["3.png"]), ("a", ["4.png"])]


def test_a_full_line_refuses_only_its_own_images(lq: LineQueues, tmp_path: Path) -> None:
    for i in range(5):
        lq.put_nowait(_cand(tmp_path / "a" / f"{i}.png"))
    with pytest.raises(queue.Full):
        lq.put_nowait(_cand(tmp_path / "a" / "6.png"))
    lq.put_nowait(_cand(tmp_path / "b" / "0.png"))
    assert lq.qsize() == 6 and lq.depth("a") == 5 and lq.depth("b") == 1


def test_a_paused_line_waits_and_the_others_are_served(lq: LineQueues, tmp_path: Path) -> None:
    lq.pause("a")
    lq.put_nowait(_cand(tmp_path / "a" / "0.png"))
    lq.put_nowait(_cand(tmp_path / "b" / "0.png"))
    assert lq.take(timeout=0.01)[0] == "b"  # type: ignore[index]
    assert lq.take(timeout=0.01) is None and lq.depth("a") == 1
    lq.pause("a", False)
    assert lq.take(timeout=0.01)[0] == "a"  # type: ignore[index]


def test_take_wakes_when_an_image_arrives(lq: LineQueues, tmp_path: Path) -> None:
    threading.Timer(0.2, lambda: lq.put_nowait(_cand(tmp_path / "b" / "0.png"))).start()
    t0 = time.monotonic()
    got = lq.take(timeout=5.0)
    assert got is not None and got[0] == "b" and time.monotonic() - t0 < 2.0
