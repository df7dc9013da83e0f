"""Fashion-MNIST one-vs-rest benchmark for anomon's detector, against raw-pixel baselines.

Protocol (issue): for each class, train on that class's 6,000 training images with 10% held out for
calibration, then score the full 10,000-image test set (that class normal, the other nine anomalous).

anomon is trained exactly as a user would: the images are written as PNG files and `anomon train`
runs as a subprocess with its default settings, so the benchmark measures the shipped code path
(decoding, preprocessing, defaults, calibration, bundle) rather than a re-implementation of it.
The test images are decoded by the same `anomon.images.load_arrays` the CLI and daemon use.
Baselines see the same 90% training split as anomon (the detector's seeded split, replicated from
TrainConfig's seed and holdout), so every column answers the same question.

    python bench/fashion_mnist.py                # all 10 classes, full test set (~15-25 min on 2 cores)
    python bench/fashion_mnist.py --classes 0,6 --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import math
import os
import platform
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzipped IDX file (the format's header is tiny; no library needed)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, got {arr.size} values")
    return arr.reshape(shape)


def load_fashion_mnist(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels uint8 (N,)) for split 'train' or 't10k'."""
    images = _read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = _read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def split_class(
    train_x: np.ndarray, train_y: np.ndarray, cls: int, holdout: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibration) images of one class: a seeded random 10% goes to calibration."""
    x = train_x[train_y == cls]
    perm = np.random.default_rng(seed).permutation(len(x))
    n_cal = int(round(holdout * len(x)))
    return x[perm[n_cal:]], x[perm[:n_cal]]


# --- baselines on raw pixels (float in [0,1], flattened) --------------------------------------


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) / 255.0


def iforest_scores(fit_x: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.ensemble import IsolationForest

    model = IsolationForest(random_state=seed, n_jobs=1).fit(_flat(fit_x))
    return -model.score_samples(_flat(test_x))  # sklearn: higher = more normal; flip it


def knn1_scores(fit_x: np.ndarray, test_x: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """Euclidean distance to the nearest training image."""
    a, b = _flat(test_x), _flat(fit_x)
    b2 = (b * b).sum(1)
    out = np.empty(len(a), dtype=np.float64)
    for i in range(0, len(a), chunk):
        q = a[i : i + chunk]
        d2 = (q * q).sum(1)[:, None] + b2[None, :] - 2.0 * q @ b.T
        out[i : i + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def pca_scores(fit_x: np.ndarray, test_x: np.ndarray, variance: float = 0.9) -> np.ndarray:
    """Squared reconstruction error with the components that explain `variance` of the data."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=variance, svd_solver="full").fit(_flat(fit_x))
    t = _flat(test_x)
    rec = pca.inverse_transform(pca.transform(t))
    return ((t - rec) ** 2).mean(1)


BASELINES = {"IsolationForest": iforest_scores, "1-NN": knn1_scores, "PCA": pca_scores}


# --- the benchmark -------------------------------------------------------------------------------

RESULTS = Path(__file__).resolve().parent / "results" / "fashion_mnist.md"
QUICK_TEST_IMAGES = 2000


def _write_pngs(images: np.ndarray, folder: Path) -> None:
    """Zero-padded names keep the files in dataset order (anomon reads folders sorted by name),
    which is what lets the baselines replicate the detector's calibration split."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")


def _anomon_exe() -> list[str]:
    exe = Path(sys.executable).with_name("anomon")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "anomon"]


def _train_anomon(folder: Path, model_path: Path) -> float:
    """Run `anomon train` with default settings; returns its wall-clock seconds."""
    cmd = [*_anomon_exe(), "train", str(folder), "-o", str(model_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"fashion_mnist: `{shlex.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def _conformal_fpr(scores_normal: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores_normal > threshold))


def _baseline_fpr(fn, fit: np.ndarray, cal: np.ndarray, test: np.ndarray, normal: np.ndarray, alpha: float) -> tuple[float, float]:
    """AUROC and realised FPR for a baseline, thresholded like anomon (conformal on `cal`)."""
    from sklearn.metrics import roc_auc_score

    s = fn(fit, np.concatenate([cal, test]))
    s_cal, s_test = s[: len(cal)], s[len(cal) :]
    k = min(math.ceil((len(cal) + 1) * (1 - alpha)), len(cal))
    thr = np.sort(s_cal)[k - 1]
    return float(roc_auc_score(~normal, s_test)), float(np.mean(s_test[normal] > thr))


def run(classes: list[int], quick: bool, out: Path, workdir: Path | None) -> str:
    import torch
    from sklearn.metrics import roc_auc_score

    from anomon.config import TrainConfig
    from anomon.detector import Detector
    from anomon.images import iter_image_files, load_arrays

    cfg = TrainConfig()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("t10k")
    if quick:
        idx = np.sort(np.random.default_rng(0).permutation(len(test_x))[:QUICK_TEST_IMAGES])
        test_x, test_y = test_x[idx], test_y[idx]

    tmp_ctx = tempfile.TemporaryDirectory(prefix="anomon-fmnist-") if workdir is None else None
    root = Path(tmp_ctx.name) if tmp_ctx else workdir
    assert root is not None
    _write_pngs(test_x, root / "test")
    test_files = list(iter_image_files(root / "test"))

    rows = []
    for c in classes:
        fit, cal = split_class(train_x, train_y, c, holdout=cfg.holdout, seed=cfg.seed)
        folder = root / f"train_{c}"
        _write_pngs(train_x[train_y == c], folder)
        model_path = root / f"class_{c}.anomon"
        wall = _train_anomon(folder, model_path)

        det = Detector.load(model_path)
        X, ok, failed = load_arrays(test_files, image_size=det.image_size, channels=det.channels)
        assert not failed and len(ok) == len(test_x)
        t0 = time.perf_counter()
        scores = det.score_samples(X)
        ips = len(X) / (time.perf_counter() - t0)
        normal = test_y == c
        row = {
            "cls": c,
            "anomon": float(roc_auc_score(~normal, scores)),
            "fpr": _conformal_fpr(scores[normal], det.threshold_),
            "train_wall": wall,
            "train_s": float(det.metadata.get("train_seconds", float("nan"))),
            "epochs": det.metadata.get("epochs_run"),
            "ips": ips,
        }
        for name, fn in BASELINES.items():
            row[name], row[name + "_fpr"] = _baseline_fpr(fn, fit, cal, test_x, normal, cfg.target_fpr)
        rows.append(row)
        print(
            f"class {c} {CLASS_NAMES[c]:12s} anomon {row['anomon']:.4f} (fpr {row['fpr']:.3f}) "
            f"IF {row['IsolationForest']:.4f} 1-NN {row['1-NN']:.4f} PCA {row['PCA']:.4f} | "
            f"train {wall:.1f}s wall ({row['train_s']:.1f}s fit, {row['epochs']} epochs) | {ips:.0f} img/s",
            flush=True,
        )
        model_path.unlink()
    if tmp_ctx:
        tmp_ctx.cleanup()

    cmd = "python bench/fashion_mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Fashion-MNIST one-vs-rest: anomon vs raw-pixel baselines",
        "",
        f"`{cmd.strip()}` — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"nproc {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: timings are noisy)",
        "",
        f"Test set: {len(test_x)} images{' (--quick subset)' if quick else ''}; training: 6,000 images of the "
        f"class, {cfg.holdout:.0%} held out for calibration; anomon with `anomon train` defaults. "
        f"FPR = realised false-alarm rate on the test normals at target {cfg.target_fpr:.0%} "
        "(conformal threshold from the held-out images; baselines thresholded the same way, in brackets).",
        "",
        "| class | anomon AUROC | IsolationForest | 1-NN | PCA | train s (wall / fit) | epochs | score img/s | FPR @5% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    methods = ("anomon", "IsolationForest", "1-NN", "PCA")

    def auc(row: dict[str, Any], k: str) -> str:  # the best of the row in bold
        return f"**{row[k]:.4f}**" if row[k] == max(row[j] for j in methods) else f"{row[k]:.4f}"

    for r in rows:
        lines.append(
            f"| {r['cls']} {CLASS_NAMES[r['cls']]} | {auc(r, 'anomon')} | {auc(r, 'IsolationForest')} "
            f"({r['IsolationForest_fpr']:.3f}) | {auc(r, '1-NN')} ({r['1-NN_fpr']:.3f}) | {auc(r, 'PCA')} "
            f"({r['PCA_fpr']:.3f}) | {r['train_wall']:.1f} / {r['train_s']:.1f} | {r['epochs']} | "
            f"{r['ips']:.0f} | {r['fpr']:.3f} |"
        )
    m = {k: float(np.mean([r[k] for r in rows])) for k in (*methods, "train_wall", "train_s", "ips", "fpr")}
    fprs = [r["fpr"] for r in rows]
    lines.append(
        f"| **mean** | {auc(m, 'anomon')} | {auc(m, 'IsolationForest')} | {auc(m, '1-NN')} | {auc(m, 'PCA')} | "
        f"{m['train_wall']:.1f} / {m['train_s']:.1f} | | {m['ips']:.0f} | {m['fpr']:.3f} (min {min(fprs):.3f}, max {max(fprs):.3f}) |"
    )
    lines.append("")
    lines.append("Bold: the best AUROC of the row.")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated class ids")
    ap.add_argument("--quick", action="store_true", help=f"score a {QUICK_TEST_IMAGES}-image subset of the test set")
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    ap.add_argument("--workdir", type=Path, help="keep PNGs here instead of a temporary folder")
    args = ap.parse_args(argv)
    try:
        classes = [int(c) for c in args.classes.split(",")]
        if not classes or any(not 0 <= c <= 9 for c in classes):
            raise ValueError
    except ValueError:
        ap.error("--classes must be comma-separated ids 0-9")
    print(run(classes, args.quick, args.out, args.workdir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
