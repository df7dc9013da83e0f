"""STATE/anomalies/: what an operator opens after an alert, the image as it arrived and its heat map.

Kept apart from the alert exporters: these are files for people, written by the scoring worker as
it records an anomaly, bounded by size; the ledger keeps the verdicts regardless.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


class AnomalyStore:
    """Copies of anomalous images and their heat-map overlays, bounded by total size.

    Names start with the image's content hash, so scoring the same image again after a crash
    overwrites the same files instead of adding new ones. When the total passes `max_bytes`, the
    oldest files go first. The ledger keeps the verdicts regardless; these are for people.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        files = []
        for p in root.iterdir():
            if p.is_file():
                st = p.stat()
                files.append((st.st_mtime_ns, p, st.st_size))
        files.sort()
        # Oldest first; a dict keeps insertion order and lets a rewritten file move to the end.
        self._files: dict[Path, int] = {p: s for _, p, s in files}
        self._total = sum(self._files.values())

    def save(self, path: str, sha256: str, data: bytes, img: Image.Image, amap: np.ndarray, *,
             vmax: float, vmin: float = 0.0) -> tuple[str, str]:
        from anomon.heatmap import overlay  # matplotlib: imported only once something is anomalous

        stem, suffix = os.path.splitext(os.path.basename(path))
        base = f"{sha256[:16]}-{stem}"
        copy = self.root / f"{base}{suffix.lower()}"
        heat = self.root / f"{base}.heatmap.png"
        self._write(copy, data)
        tmp = heat.with_name(heat.name + ".tmp")
        overlay(img, amap, vmax=vmax, vmin=vmin).save(tmp, format="PNG")
        self._add(tmp, heat)
        self.prune()
        return str(copy), str(heat)

    def _write(self, dest: Path, data: bytes) -> None:
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        self._add(tmp, dest)

    def _add(self, tmp: Path, dest: Path) -> None:
        os.replace(tmp, dest)
        self._total -= self._files.pop(dest, 0)
        self._files[dest] = size = dest.stat().st_size
        self._total += size

    def prune(self) -> None:
        while self._total > self.max_bytes and self._files:
            p = next(iter(self._files))
            self._total -= self._files.pop(p)
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    @property
    def total_bytes(self) -> int:
        return self._total
