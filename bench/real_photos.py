"""Real inspection photos: anomon against raw-pixel baselines on four public defect sets.

Fashion-MNIST tells whether the detector ranks one clothing class against nine others; a line
inspector needs to know whether it finds a scratch on an otherwise identical part. This script
measures that on KolektorSDD (commutator cracks), casting (pump impellers), BSData-1130 (ball-screw
pitting) and PIPED (paper impurities, one model per paper type), all read where they were extracted
(see bench/real_photo_sets.py for the layouts; nothing is downloaded or copied).

Protocol, the same for every set: the normal images are split 70% training / 10% calibration /
20% test (seeded, bench/real_photo_sets.split), every defective image is a test image. anomon is
trained as a user trains it, `python -m anomon train DIR -o MODEL` with its defaults on a folder of
symlinks to the training images, then recalibrated at 5% on the calibration normals, which it never
saw. The baselines (1-NN, PCA, IsolationForest and mean intensity, on 64x64 greyscale pixels) use the
same training images and the same conformal threshold (anomon.calibrate.ConformalThreshold), so every
column answers the same question. Mean intensity is a confound check: where it scores high, the
defects are findable from brightness alone.

    python bench/real_photos.py /work/data/stoy95536+KolektorSDD_Yolov8_Datasets \\
        /work/data/Mahdi-Kriaa+Casting_Defect_Detection /work/data/2Obe+BSData /work/data/bianconif+PIPED
    python bench/real_photos.py DIR... --quick      # smoke test: small subsets, 1 epoch, to /tmp
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from real_photo_sets import PhotoSet, Sample, discover, split, subsample  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "real_photos.md"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "real_photos_quick.md"
QUICK_NORMAL, QUICK_DEFECTIVE = 60, 30  # --quick caps per set (per paper type for PIPED)
TARGET_FPR = 0.05
BATCH = 32
BASELINE_SIZE = 64  # baselines see 64x64 greyscale
PEAK_TOLERANCE = 0.02  # of the image diagonal: a peak this close to the mask counts as inside
MARGIN = 0.03  # anomon's target: the best baseline's AUROC plus this
FAMILIES = ("KolektorSDD", "casting", "BSData-1130", "PIPED")
BASELINE_NAMES = ("1-NN", "PCA", "IsolationForest", "mean intensity")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def family(name: str) -> str:
    """"PIPED/PA_BDP01_TL" -> "PIPED"; other sets are their own family."""
    return name.split("/")[0]


# --- baselines on raw pixels -----------------------------------------------------------------------


def pixels(samples: list[Sample]) -> np.ndarray:
    """(N, 64*64) greyscale in [0, 1], resized with bilinear, decoded as anomon decodes."""
    from PIL import Image

    from anomon.images import load_image

    out = np.empty((len(samples), BASELINE_SIZE * BASELINE_SIZE), dtype=np.float32)
    for i, s in enumerate(samples):
        img = load_image(s.path).convert("L").resize((BASELINE_SIZE, BASELINE_SIZE), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img, dtype=np.float32).ravel() / 255.0
    return out


def knn1_scores(train: np.ndarray, x: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Euclidean distance to the nearest training image."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=1).fit(train).kneighbors(x)[0][:, 0], {}


def pca_scores(train: np.ndarray, x: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Mean squared reconstruction error with the fewest components explaining 95% of the variance
    (at most n_train - 1: with more, every training image is reconstructed exactly)."""
    from sklearn.decomposition import PCA

    pca = PCA(svd_solver="full").fit(train)
    k = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), 0.95) + 1)
    k = max(1, min(k, len(train) - 1, len(pca.components_)))
    v = pca.components_[:k]
    z = x - pca.mean_
    return ((z - (z @ v.T) @ v) ** 2).mean(1), {"n_components": k}


def iforest_scores(train: np.ndarray, x: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.ensemble import IsolationForest

    model = IsolationForest(random_state=seed, n_jobs=1).fit(train)
    return -model.score_samples(x), {}  # sklearn: higher = more normal; flip it


def mean_intensity_scores(train: np.ndarray, x: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """|image mean - mean of the training means|: high AUROC here means a brightness confound."""
    return np.abs(x.mean(1) - train.mean(1).mean()), {}


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, dict[str, Any]]]] = {
    "1-NN": knn1_scores,
    "PCA": pca_scores,
    "IsolationForest": iforest_scores,
    "mean intensity": mean_intensity_scores,
}


def operating_point(cal_scores: np.ndarray, test_scores: np.ndarray, defective: np.ndarray) -> dict[str, Any]:
    """AUROC, AP, and the rates at the conformal 5% threshold fitted on the calibration normals."""
    from anomon.calibrate import ConformalThreshold, evaluate

    cal = ConformalThreshold(target_fpr=TARGET_FPR).fit(cal_scores)
    ev = evaluate(test_scores[~defective], test_scores[defective], cal.threshold_)
    return {
        "auroc": ev.auroc,
        "ap": ev.average_precision,
        "fpr": ev.false_alarm_rate,
        "detection": ev.detection_rate,
        "threshold": cal.threshold_,
        "guaranteed": bool(cal.guaranteed_),
    }


# --- anomon ---------------------------------------------------------------------------------------


def train_anomon(train: list[Sample], folder: Path, epochs: int | None, device: str) -> tuple[Path, float]:
    """`python -m anomon train` on a folder of symlinks; returns (bundle, wall seconds).

    Symlink names carry an index because KolektorSDD's train/ and val/ reuse file names.
    """
    for i, s in enumerate(train):
        (folder / f"{i:05d}_{s.path.name}").symlink_to(s.path.resolve())
    model = folder / "model.safetensors"
    cmd = [sys.executable, "-m", "anomon", "train", str(folder), "-o", str(model)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if device != "auto":
        cmd += ["--device", device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    log(f"    {proc.stdout.strip()}")
    return model, wall


def score_anomon(
    det: Any, samples: list[Sample], keep_maps: bool
) -> tuple[np.ndarray, list[np.ndarray], tuple[int, ...], float]:
    """(scores, maps if kept, map shape, seconds) in batches of 32; the time covers decoding and
    preprocessing too, as a user's scoring would. Maps are (h, w), not necessarily square."""
    from anomon.scoring import prepare

    scores, maps, shape = [], [], ()
    t0 = time.perf_counter()
    for i in range(0, len(samples), BATCH):  # the daemon's path: read, decode, preprocess, assess
        a = det.assess(np.stack([prepare(det, s.path).x for s in samples[i : i + BATCH]]))
        scores.append(a.scores)
        shape = tuple(a.maps.shape[1:])
        if keep_maps:
            maps.extend(a.maps)
    return np.concatenate(scores) if scores else np.zeros(0), maps, shape, time.perf_counter() - t0


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anomaly map (h, w) -> (H, W) for size = (W, H), bilinear: the map is resized, not the image."""
    from PIL import Image

    return np.asarray(Image.fromarray(amap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def pool_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask (H, W) -> `shape` by max-pooling each target cell's source block, so a crack one
    pixel wide survives a 5x reduction (nearest-neighbour would drop most of it)."""
    h, w = shape
    rows = (np.arange(h) * mask.shape[0]) // h
    cols = (np.arange(w) * mask.shape[1]) // w
    m = np.logical_or.reduceat(mask, rows, axis=0)
    return np.logical_or.reduceat(m, cols, axis=1)


def peak_in_mask(amap: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's peak, at the mask's size, lies within PEAK_TOLERANCE of the image diagonal
    of a mask pixel (the same as inside the mask dilated by that radius)."""
    full = resize_map(amap, (mask.shape[1], mask.shape[0]))
    r, c = np.unravel_index(int(np.argmax(full)), full.shape)
    pts = np.argwhere(mask)
    tol = PEAK_TOLERANCE * math.hypot(*mask.shape)
    return bool(pts.size) and float(np.min((pts[:, 0] - r) ** 2 + (pts[:, 1] - c) ** 2)) <= tol * tol


def localisation(
    test: list[Sample], scores: np.ndarray, maps: list[np.ndarray], threshold: float
) -> tuple[float | None, int, float | None]:
    """(share of detected defects whose peak is on the mask, how many were judged, pixel AUROC).

    Pixel AUROC runs at the map's resolution over every test image (normals: all-false masks),
    masks max-pooled down to it, so the cost stays bounded whatever the photo size.
    """
    from sklearn.metrics import roc_auc_score

    hits, judged = 0, 0
    pix_scores, pix_labels = [], []
    for s, score, amap in zip(test, scores, maps):
        mask = s.mask() if s.defective else None
        if s.defective and mask is None:
            continue  # a defect without a mask cannot be judged either way
        if mask is not None and score > threshold and mask.any():
            judged += 1
            hits += peak_in_mask(amap, mask)
        pix_scores.append(amap.ravel())
        pix_labels.append(pool_mask(mask, amap.shape).ravel() if mask is not None else np.zeros(amap.size, bool))
    y = np.concatenate(pix_labels) if pix_labels else np.zeros(0, bool)
    pixel_auroc = float(roc_auc_score(y, np.concatenate(pix_scores))) if 0 < y.sum() < y.size else None
    return (hits / judged if judged else None), judged, pixel_auroc


METADATA_SKIP = ("data_dir", "trained_at", "torch", "anomon")  # temporary paths and versions


def run_set(ps: PhotoSet, args: argparse.Namespace) -> dict[str, Any]:
    """Everything measured on one PhotoSet (one model)."""
    from anomon.detector import Detector

    train, cal, test = split(ps, seed=args.seed)
    defective = np.array([s.defective for s in test])
    row: dict[str, Any] = {
        "set": ps.name,
        "n_normal": ps.n_normal,
        "n_defective": ps.n_defective,
        "n_train": len(train),
        "n_cal": len(cal),
        "n_test_normal": int((~defective).sum()),
        "n_test_defective": int(defective.sum()),
        "has_masks": ps.has_masks,
        "notes": ps.notes,
    }
    log(f"{ps.name}: {len(train)} train / {len(cal)} calibration / {row['n_test_normal']}+{row['n_test_defective']} test")

    with tempfile.TemporaryDirectory(prefix="anomon-real-") as tmp:
        model, wall = train_anomon(train, Path(tmp), 1 if args.quick else None, args.device)
        det = Detector.load(model, device=args.device)
    cal_scores = score_anomon(det, cal, keep_maps=False)[0]
    test_scores, maps, map_shape, secs = score_anomon(det, test, keep_maps=ps.has_masks)
    det.calibrate(cal_scores, target_fpr=TARGET_FPR)
    a = operating_point(cal_scores, test_scores, defective)
    assert math.isclose(a["threshold"], det.threshold_)
    loc, judged, pix = localisation(test, test_scores, maps, det.threshold_) if ps.has_masks else (None, 0, None)
    a.update(
        localisation=loc,
        n_localised=judged,
        pixel_auroc=pix,
        train_wall_s=wall,
        fit_s=float(det.metadata.get("train_seconds", float("nan"))),
        score_ips=len(test) / secs,
        working_shape=list(map_shape),
        channels=int(det.channels),
        metadata={k: v for k, v in det.metadata.items() if k not in METADATA_SKIP},
    )
    row["anomon"] = a

    x_train, x_cal, x_test = pixels(train), pixels(cal), pixels(test)
    row["baselines"] = {}
    for name, fn in BASELINES.items():
        s, extra = fn(x_train, np.concatenate([x_cal, x_test]), args.seed)
        row["baselines"][name] = {**operating_point(s[: len(cal)], s[len(cal) :], defective), **extra}
    judge(row)
    b = row["baselines"]
    log(
        f"  anomon AUROC {a['auroc']:.3f} (FPR {a['fpr']:.3f}, det {a['detection']:.2f}, "
        f"loc {fmt(loc)}, pixel {fmt(pix)}) | "
        + " ".join(f"{n} {b[n]['auroc']:.3f}" for n in BASELINE_NAMES)
        + f" | train {wall:.0f}s, {a['score_ips']:.0f} img/s"
    )
    return row


def judge(row: dict[str, Any]) -> None:
    """Best baseline (all four, mean intensity included) and whether anomon beats it by MARGIN."""
    best = max(BASELINE_NAMES, key=lambda n: row["baselines"][n]["auroc"])
    row["best_baseline"] = best
    row["target"] = min(1.0, row["baselines"][best]["auroc"] + MARGIN)
    row["met"] = bool(row["anomon"]["auroc"] >= row["target"])


def mean_row(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row averaging `rows` field by field (None where no row has the figure)."""

    def avg(values: list[Any]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    keys = ("auroc", "ap", "fpr", "detection", "localisation", "pixel_auroc", "train_wall_s", "fit_s", "score_ips")
    out: dict[str, Any] = {
        "set": name,
        "n_types": len(rows),
        "anomon": {k: avg([r["anomon"][k] for r in rows]) for k in keys},
        "baselines": {
            n: {k: avg([r["baselines"][n][k] for r in rows]) for k in ("auroc", "ap", "fpr", "detection")}
            for n in BASELINE_NAMES
        },
    }
    for k in ("n_normal", "n_defective", "n_train", "n_cal", "n_test_normal", "n_test_defective"):
        out[k] = sum(r.get(k, 0) for r in rows)
    judge(out)
    return out


# --- the report ------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| set | anomon AUROC | AP | FPR@5% | detection | localisation | pixel AUROC | train s (wall / fit) "
        "| score img/s | " + " | ".join(BASELINE_NAMES) + " | best baseline + 0.03 | met |",
        "|---" * (11 + len(BASELINE_NAMES)) + "|",
    ]
    for r in rows:
        a, b = r["anomon"], r["baselines"]
        best = max([a["auroc"], *(b[n]["auroc"] for n in BASELINE_NAMES)])

        def auc(v: float) -> str:
            return f"**{v:.3f}**" if v == best else f"{v:.3f}"

        base = " | ".join(f"{auc(b[n]['auroc'])} ({fmt(b[n]['fpr'], 2)})" for n in BASELINE_NAMES)
        lines.append(
            f"| {r['set']} | {auc(a['auroc'])} | {fmt(a['ap'])} | {fmt(a['fpr'])} | {fmt(a['detection'], 2)} "
            f"| {fmt(a['localisation'], 2)} | {fmt(a['pixel_auroc'])} "
            f"| {fmt(a['train_wall_s'], 0)} / {fmt(a['fit_s'], 0)} | {fmt(a['score_ips'], 0)} | {base} "
            f"| {r['best_baseline']} {fmt(r['target'])} | {'yes' if r['met'] else 'no'} |"
        )
    return lines


def mean_auroc_line(rows: list[dict[str, Any]]) -> str:
    m = {"anomon": float(np.mean([r["anomon"]["auroc"] for r in rows]))}
    m.update({n: float(np.mean([r["baselines"][n]["auroc"] for r in rows])) for n in BASELINE_NAMES})
    best = max(m.values())

    def auc(v: float) -> str:
        return f"**{v:.3f}**" if v == best else f"{v:.3f}"

    base = " | ".join(auc(m[n]) for n in BASELINE_NAMES)
    return f"| **mean AUROC ({len(rows)} sets)** | {auc(m['anomon'])} |" + " |" * 7 + f" {base} | | |"


def render(main_rows: list[dict[str, Any]], piped: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    quick = " — QUICK (subsets, 1 epoch: a smoke test, not a result)" if meta["quick"] else ""
    lines = [
        f"# Real inspection photos: anomon vs raw-pixel baselines{quick}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['date_utc']} UTC, {platform.machine()}, nproc {meta['nproc']}, torch {meta['torch']} "
        f"({meta['torch_threads']} threads), load average {meta['load_before']} before, {meta['load_after']} after "
        "(a shared machine: timings are noisy)",
        "",
        "Split per set (seed " + str(meta["seed"]) + "): normals 70% training / 10% calibration / 20% test, every "
        "defective image in test. anomon: `python -m anomon train` defaults on the training images, "
        "recalibrated at 5% on the calibration normals. Baselines on 64x64 greyscale pixels, thresholded the "
        "same conformal way; their FPR in brackets.",
        "",
        *table(main_rows),
    ]
    if len(main_rows) > 1:
        lines.append(mean_auroc_line(main_rows))
    lines += [
        "",
        "- AUROC and AP: defective = positive, over the test normals and all defects. FPR@5%: realised false-alarm "
        "rate on the test normals at the threshold fitted for 5%; detection: share of defects above it.",
        f"- localisation: share of the *detected* defects whose anomaly-map peak (map resized bilinearly to the "
        f"photo's size) lies inside the labelled mask dilated by {PEAK_TOLERANCE:.0%} of the image diagonal, which "
        "forgives a peak on the edge of a thin crack. pixel AUROC: every test image's map at the working resolution "
        "against its mask max-pooled to that resolution (normals: no defect pixels). — = no masks in the set.",
        "- best baseline: the best of all four, mean intensity included; met = anomon AUROC >= its AUROC + 0.03 "
        "(capped at 1). A high mean-intensity AUROC means the defects change the overall brightness.",
        "- Bold: the best AUROC of the row. PIPED: one model per paper type, figures averaged over the types "
        "(train s and img/s per type).",
    ]
    few = [r["set"] for r in meta["all_rows"] if not r["anomon"]["guaranteed"]]
    if piped and all(r["set"] in few for r in piped):  # one name for the whole family
        n_cal = sorted(r["n_cal"] for r in piped)
        few = [n for n in few if family(n) != "PIPED"] + [f"every PIPED type ({n_cal[0]}-{n_cal[-1]})"]
    if few:
        lines.append(
            f"- Fewer than 19 calibration normals in {', '.join(few)}: the 5% guarantee cannot hold; the "
            "threshold is the largest calibration score."
        )
    if piped:
        lines += ["", "## PIPED per paper type", "", *table(piped)]
    lines += [
        "",
        "## Data and training",
        "",
        "| set | normals | defects | train | calib | test normals | test defects | working size (HxW), channels "
        "| anomon training metadata | notes |",
        "|---" * 10 + "|",
    ]
    for r in meta["all_rows"]:
        a = r["anomon"]
        md = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in a["metadata"].items()
            if isinstance(v, (int, float, str, bool))
        )
        lines.append(
            f"| {r['set']} | {r['n_normal']} | {r['n_defective']} | {r['n_train']} | {r['n_cal']} "
            f"| {r['n_test_normal']} | {r['n_test_defective']} | {'x'.join(map(str, a['working_shape']))}, "
            f"{a['channels']} | {md} | {'; '.join(r['notes'])} |"
        )
    pca = ", ".join(f"{r['set']} {r['baselines']['PCA']['n_components']}" for r in meta["all_rows"])
    lines += ["", f"PCA components (95% variance, at most n_train - 1): {pca}."]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------


def select(sets: list[PhotoSet], names: str | None) -> list[PhotoSet]:
    """--sets: comma-separated set names or families ("PIPED" = every type), case-insensitive."""
    if not names:
        return sets
    wanted = [t.strip().lower() for t in names.split(",") if t.strip()]

    def hit(ps: PhotoSet, t: str) -> bool:
        return ps.name.lower() == t or family(ps.name).lower().startswith(t)

    missing = [t for t in wanted if not any(hit(ps, t) for ps in sets)]
    if missing:
        found = ", ".join(ps.name for ps in sets)
        raise SystemExit(f"real_photos: --sets {', '.join(missing)} matched no set found ({found})")
    return [ps for ps in sets if any(hit(ps, t) for t in wanted)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dirs", nargs="+", type=Path, metavar="DATA_DIR", help="extracted set folders (layout detected)")
    ap.add_argument("--sets", metavar="NAMES", help="comma-separated: KolektorSDD, casting, BSData, PIPED, PIPED/<TYPE>")
    ap.add_argument(
        "--quick", action="store_true",
        help=f"smoke test: at most {QUICK_NORMAL} normals / {QUICK_DEFECTIVE} defects per set, 1 epoch",
    )
    ap.add_argument(
        "--out", type=Path,
        help=f"markdown file (default {RESULTS.relative_to(REPO)}, with --quick {QUICK_RESULTS}); JSON beside it",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="split, subsample and IsolationForest seed (anomon keeps its default seed)"
    )
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = ap.parse_args(argv)
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)

    import torch

    load_before = os.getloadavg()
    sets = select([ps for d in args.data_dirs for ps in discover(d)], args.sets)
    if args.quick:
        sets = [subsample(ps, QUICK_NORMAL, QUICK_DEFECTIVE, seed=args.seed) for ps in sets]
    rows = [run_set(ps, args) for ps in sets]

    main_rows = [r for r in rows if family(r["set"]) != "PIPED"]
    piped = [r for r in rows if family(r["set"]) == "PIPED"]
    if piped:
        main_rows.append(mean_row(f"PIPED (mean over {len(piped)} types)", piped))
    order = {f: i for i, f in enumerate(FAMILIES)}
    main_rows.sort(key=lambda r: order.get(family(r["set"]).split(" ")[0], len(order)))

    meta = {
        "command": "python bench/real_photos.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_before": " / ".join(f"{v:.1f}" for v in load_before),
        "load_after": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "quick": args.quick,
        "seed": args.seed,
        "all_rows": rows,
    }
    text = render(main_rows, piped, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {k: v for k, v in meta.items() if k != "all_rows"} | {"sets": rows, "summary": main_rows}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    log(f"wrote {out} and {out.with_suffix('.json')}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
