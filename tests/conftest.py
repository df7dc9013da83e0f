"""Shared fixtures: tiny synthetic images, a tiny trained bundle, and the real daemon as a subprocess.

The daemon (anomon.daemon_process, shared with the demo and the bench) starts `anomon watch`
exactly as a user would (its own process, a free port, a TOML config), waits for /readyz, and
stops it with SIGTERM at the end, so the e2e tests exercise the real signal handling, HTTP server
and start-up path, never a mock.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anomon.daemon_process import DaemonProcess, free_port  # free_port: test modules import it from here

REPO = Path(__file__).resolve().parents[1]
ANOMON = [sys.executable, "-m", "anomon.cli"]


# -- images --------------------------------------------------------------------------------------


def normal_array(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A smooth horizontal gradient with a little noise: what the tiny model learns as normal."""
    x = np.linspace(60, 190, size, dtype=np.float32)
    img = np.tile(x, (size, 1)) + rng.normal(0, 4, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def anomalous_array(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A normal image with a large saturated square: far outside what training saw."""
    img = normal_array(rng, size)
    s = size // 3
    img[s : 2 * s, s : 2 * s] = 255 if rng.random() < 0.5 else 0
    img[s + 2 : 2 * s - 2, s + 2 : 2 * s - 2] = 0 if img[s, s] == 255 else 255
    return img


def png_bytes(arr: np.ndarray, tag: str | None = None) -> bytes:
    """PNG bytes; a `tag` (a text chunk) gives the same pixels different bytes."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if tag is not None:
        info = PngInfo()
        info.add_text("anomon-test", tag)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(path: Path, arr: np.ndarray | None = None, *, seed: int = 0, tag: str | None = None) -> Path:
    """Write a PNG in one go (write + close): the common camera case."""
    if arr is None:
        arr = normal_array(np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr, tag))
    return path


@pytest.fixture
def png_writer():
    """`png_writer(path, seed=0, anomalous=False)` -> Path; distinct seeds give distinct bytes."""

    def _write(path: Path | str, *, seed: int = 0, anomalous: bool = False) -> Path:
        rng = np.random.default_rng(seed)
        arr = anomalous_array(rng) if anomalous else normal_array(rng)
        return write_png(Path(path), arr)

    return _write


# -- a tiny trained model --------------------------------------------------------------------------


def _train_bundle(out: Path, data: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(40):
        write_png(data / f"n{i:03d}.png", normal_array(rng))
    cmd = ANOMON + ["train", str(data), "-o", str(out), "--epochs", "2", "--image-size", "32",
                    "--channels", "1", "--seed", str(seed), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, f"anomon train failed:\n{r.stdout}\n{r.stderr}"
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained through the CLI on 40 synthetic 32x32 images (2 epochs, seconds on CPU)."""
    d = tmp_path_factory.mktemp("bundle")
    return _train_bundle(d / "tiny.anomon", d / "data", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle_b(tiny_bundle: Path) -> Path:
    """A second model for reload tests: the tiny bundle recalibrated to another threshold (a new
    model_id), made in-process in well under a second instead of another training run."""
    import numpy as np

    from anomon.detector import Detector

    det = Detector.load(tiny_bundle, device="cpu")
    scores = np.asarray(det.calibration_scores_, dtype=np.float64) * 1.5 + 1.0
    det.calibrate(scores)
    out = tiny_bundle.with_name("tiny_b.anomon")
    det.save(out)
    return out


@dataclass
class TinyModel:
    """The tiny bundle plus images it is sure about.

    A 2-epoch model with 4 held-out images has a noisy threshold, so a fresh random "normal" image
    can land above it. Normal test images therefore reuse the pixels of training images that scored
    well below the threshold (a text chunk makes each file's bytes unique); anomalous ones carry a
    big saturated square, thousands of times the threshold.
    """

    path: Path
    threshold: float
    normals: list[np.ndarray]

    def normal_png(self, path: Path, i: int) -> Path:
        return write_png(path, self.normals[i % len(self.normals)], tag=f"normal-{i}")

    def anomalous_png(self, path: Path, i: int) -> Path:
        return write_png(path, anomalous_array(np.random.default_rng(10_000 + i)), tag=f"anomalous-{i}")


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle: Path) -> TinyModel:
    from anomon.detector import Detector
    from anomon.images import load_arrays

    det = Detector.load(tiny_bundle, device="cpu")
    files = sorted((tiny_bundle.parent / "data").glob("*.png"))
    X, ok, _ = load_arrays(files, image_size=det.image_size, channels=det.channels)
    scores = det.score_samples(X)
    margin = 0.25 * (det.threshold_ - float(scores.min()))
    safe = [np.asarray(Image.open(p)) for p, s in zip(ok, scores) if s < det.threshold_ - margin]
    assert len(safe) >= 10, f"only {len(safe)} clearly normal training images"
    return TinyModel(tiny_bundle, det.threshold_, safe)


# -- the daemon ------------------------------------------------------------------------------------


class Daemon(DaemonProcess):
    """The test daemon: anomon.daemon_process's DaemonProcess with the tests' defaults (a watched
    folder `watch`, a `state` folder, fast intake timings, JSON logs, one torch thread) in
    `workdir`; with no `listen` it gets a free 127.0.0.1 port. Keyword arguments override config
    entries."""

    def __init__(self, workdir: Path, model: Path, **cfg: Any) -> None:
        self.watch = workdir / "in"
        self.state = workdir / "state"
        self.watch.mkdir(parents=True, exist_ok=True)
        defaults: dict[str, Any] = {
            "model": str(model), "watch": [str(self.watch)], "state": str(self.state), "stable_s": 0.3,
            "reconcile_interval_s": 30.0, "incomplete_grace_s": 4.0, "log_format": "json", "device": "cpu",
        }
        super().__init__(workdir, {**defaults, **cfg}, env={"OMP_NUM_THREADS": "1"}, cwd=REPO)

    def table(self, name: str = "images") -> list[dict[str, Any]]:
        """Every row of a ledger table (images, alerts), oldest first, read-only."""
        from anomon.ledger import open_readonly

        conn = open_readonly(self.state / "ledger.sqlite3")
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM {name} ORDER BY id")]
        finally:
            conn.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """`daemon_factory(model, name="d", **config)` -> an unstarted Daemon; all are stopped at the end."""
    made: list[Daemon] = []

    def _make(model: Path, name: str = "d", **cfg: Any) -> Daemon:
        d = Daemon(tmp_path / name, model, **cfg)
        made.append(d)
        return d

    yield _make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()


class WebhookReceiver:
    """A real HTTP webhook receiver on 127.0.0.1: answers `statuses` in turn (the last one repeats;
    `answer` replaces them) and records (Idempotency-Key, status, JSON body) of every POST."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.got: list[tuple[str, int, dict[str, Any]]] = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = rec.statuses[min(len(rec.got), len(rec.statuses) - 1)]
                rec.got.append((self.headers.get("Idempotency-Key", ""), status, body))
                time.sleep(delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, status: int) -> None:
        self.statuses = [status]

    def delivered(self) -> set[str]:
        return {k for k, s, _ in self.got if s == 200}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
