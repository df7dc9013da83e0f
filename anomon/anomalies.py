"""STATE/anomalies/: what an operator opens after an alert, the image as it arrived and its heat map.

Kept apart from the alert exporters: these are files for people, written by the scoring worker as
it records an anomaly, bounded by size; the ledger keeps the verdicts regardless.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


class AnomalyStore:
    """Copies of anomalous images and their heat-map overlays, bounded by total size and age.

    Names start with the image's content hash, so scoring the same image again after a crash
    overwrites the same files instead of adding new ones. When the total passes `max_bytes`, the
    oldest files go first; so do files older than `max_age_s` (retention, anomon.retention, which
    calls prune() from its own thread: a lock keeps the books). The ledger keeps the verdicts
    regardless; these are for people.
    """

    def __init__(self, root: Path, max_bytes: int, max_age_s: float | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        root.mkdir(parents=True, exist_ok=True)
        files = []
        for p in root.iterdir():
            if p.is_file():
                st = p.stat()
                files.append((st.st_mtime_ns, p, st.st_size))
        files.sort()
        # Oldest first; a dict keeps insertion order and lets a rewritten file move to the end.
        self._files: dict[Path, int] = {p: s for _, p, s in files}
        self._mtimes: dict[Path, float] = {p: t / 1e9 for t, p, _ in files}
        self._total = sum(self._files.values())
        self._lock = threading.Lock()

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
        with self._lock:
            os.replace(tmp, dest)
            self._total -= self._files.pop(dest, 0)
            self._mtimes.pop(dest, None)
            st = dest.stat()
            self._files[dest] = st.st_size
            self._mtimes[dest] = st.st_mtime
            self._total += st.st_size

    def prune(self, now: float | None = None) -> int:
        """Remove the oldest files while over `max_bytes`, and every file older than `max_age_s`;
        returns how many went for their age."""
        cutoff = None if self.max_age_s is None else (time.time() if now is None else now) - self.max_age_s
        expired = 0
        with self._lock:
            while self._files:
                p = next(iter(self._files))
                old = cutoff is not None and self._mtimes.get(p, 0.0) < cutoff
                if not old and self._total <= self.max_bytes:
                    break
                expired += old
                self._total -= self._files.pop(p)
                self._mtimes.pop(p, None)
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        return expired

    @property
    def total_bytes(self) -> int:
        return self._total
