"""The bundle file format on its own (anomon.bundle): round trip, what the id covers, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomon import bundle
from anomon.atomic import atomic_write
from anomon.errors import BundleError

META = {"format": bundle.BUNDLE_FORMAT, "threshold": 1.5, "calibration": {"n": 3, "calibrated_at": "t0"},
        "training": {"trained_at": "t0"}}


def test_round_trip_and_what_the_id_covers(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    data, model_id = bundle.dumps(META, tensors)
    meta, back, same_id = bundle.loads(data, "m")
    assert same_id == model_id and meta == META and torch.equal(back["w"], tensors["w"])
    later = {**META, "training": {"trained_at": "t1"}, "calibration": {"n": 3, "calibrated_at": "t1"}}
    assert bundle.dumps(later, tensors)[1] == model_id  # timestamps decide no verdict
    assert bundle.dumps({**META, "threshold": 1.6}, tensors)[1] != model_id
    assert bundle.dumps(META, {"w": tensors["w"] + 1})[1] != model_id
    path = tmp_path / "m.anomon"
    atomic_write(path, data)
    assert bundle.read(path) == data and not list(tmp_path.glob(".*tmp"))


def test_refusals_are_one_line(tmp_path: Path) -> None:
    data, _ = bundle.dumps(META, {"w": torch.zeros(64)})
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF
    newer, _ = bundle.dumps({**META, "format": bundle.BUNDLE_FORMAT + 1}, {"w": torch.zeros(1)})
    for blob, needle in ((bytes(tampered), "integrity"), (b"\x00" * 4, "too short"), (newer, "newer"),
                         (b"\x08" + b"\x00" * 7 + b"not json", "bad header")):
        with pytest.raises(BundleError, match=needle):
            bundle.loads(blob, "m")
    with pytest.raises(BundleError, match="not found"):
        bundle.read(tmp_path / "missing")
    with pytest.raises(BundleError, match="directory"):
        bundle.read(tmp_path)
