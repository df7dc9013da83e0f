"""The size-bounded anomalies folder (anomon.anomalies): real files, restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anomon.anomalies import AnomalyStore


def test_anomaly_store_keeps_copies_within_the_size_limit(tmp_path: Path) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    amap = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    store = AnomalyStore(tmp_path / "anomalies", max_bytes=20_000)
    paths = []
    for i in range(12):
        data = bytes([i]) * 3000
        copy, heat = store.save(f"/w/cam/{i}.png", f"{i:064x}", data, img, amap, vmax=1.0)
        paths.append((Path(copy), Path(heat)))
        assert Path(copy).read_bytes() == data
    on_disk = sum(p.stat().st_size for p in (tmp_path / "anomalies").iterdir())
    assert on_disk == store.total_bytes <= 20_000
    assert not paths[0][0].exists() and paths[-1][0].exists() and paths[-1][1].exists()  # oldest went
    before = store.total_bytes
    store.save("/w/cam/11.png", f"{11:064x}", bytes([11]) * 3000, img, amap, vmax=1.0)  # same again
    assert store.total_bytes == before  # overwritten, not counted twice
    again = AnomalyStore(tmp_path / "anomalies", max_bytes=20_000)  # a restart measures the folder
    assert again.total_bytes == before
    assert not list((tmp_path / "anomalies").glob("*.tmp"))
